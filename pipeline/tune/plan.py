"""The plan of a time-budgeted session, made before the search from measured speeds.

A budget is a plan, not a cap: from each member's measured training speed, the budget and the data
size, decide how long the final runs are (the best configuration gets most of the time), whether a
pair of members is worth two final runs, how long a search run must be for its ranking to mean
something, and how many configurations each member can try in what is left. When the budget cannot
pay for a search, there is none and the final runs get its time (AutoGluon spends a small time
limit on defaults and ensembling, not search). Pure arithmetic: the tests give it speeds and budgets.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

# Seconds a run costs besides its training steps: building the network, the timing probe, writing
# the checkpoint and the evaluation artifacts (measured here: 3-6 s on one CPU core).
RUN_OVERHEAD_SECONDS = 6.0


@dataclass(frozen=True)
class Speed:
    """One member's measured speed at its default configuration."""

    images_per_second: float  # training
    eval_seconds_per_image: float  # forward pass only


@dataclass(frozen=True)
class PlanSettings:
    final_fraction: float  # share of the usable time for the final runs when there is a search
    rung_fraction: float  # a search run's length relative to a final run's (in training images)
    min_configs: int  # configurations (the default included) a member's search must afford
    pair_min_passes: float  # passes over the training data each of two final runs must get


@dataclass(frozen=True)
class Plan:
    budget_seconds: float
    setup_seconds: float  # already spent when the plan was made (data loading, speed probes)
    tail_seconds: float  # kept for the ensemble search, the audit and registration
    search_seconds: float
    final_seconds: float
    final_members: tuple[str, ...]  # each gets one final run, in turn, an even share of the final phase
    rung_passes: float  # length of each search run, in passes over the training data (0: no search)
    configs: dict[str, int]  # configurations each member's search tries, its default first
    final_passes: dict[str, float]  # passes each final run is expected to make
    selection_noise: float  # standard error of an accuracy near 75 % on the selection split
    reasons: tuple[str, ...] = field(default_factory=tuple)

    @property
    def search(self) -> bool:
        return any(self.configs.values())

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(values: dict) -> "Plan":
        values = dict(values)
        values["final_members"] = tuple(values["final_members"])
        values["reasons"] = tuple(values.get("reasons", ()))
        return Plan(**values)

    def lines(self) -> list[str]:
        out = [f"plan for a {self.budget_seconds / 60:.1f}-minute budget ({self.setup_seconds:.0f} s of set-up "
               f"spent, {self.tail_seconds:.0f} s kept for ensemble, audit and registration):"]
        if self.search:
            per = ", ".join(f"{arch} {n}" for arch, n in self.configs.items() if n)
            out.append(f"  search {self.search_seconds / 60:.1f} min: configurations {per} (each member's default "
                       f"first), each a run of {self.rung_passes:g} passes whose schedule ends with it")
        else:
            out.append("  no search: the budget cannot pay for runs long enough to rank configurations; the "
                       "defaults get the time")
        finals = ", ".join(f"{arch} ~{self.final_passes[arch]:.1f} passes" for arch in self.final_members)
        out.append(f"  final runs {self.final_seconds / 60:.1f} min: {finals}, each with a schedule that ends "
                   "at its share of the phase")
        out.append(f"  selection-split noise: +/-{100 * self.selection_noise:.1f} points (one standard error)")
        out.extend(f"  why: {r}" for r in self.reasons)
        return out


def pass_seconds(speed: Speed, train_images: int) -> float:
    return train_images / speed.images_per_second


def run_overhead(speed: Speed, selection_images: int) -> float:
    """A run's fixed cost: its last evaluation (plain and mirrored images) and writing its outputs."""
    return 2 * selection_images * speed.eval_seconds_per_image + RUN_OVERHEAD_SECONDS


def passes_in(seconds: float, speed: Speed, train_images: int, selection_images: int) -> float:
    """Passes over the training data that a run of ``seconds`` makes (its evaluations paid for)."""
    return max(0.0, seconds - run_overhead(speed, selection_images)) / pass_seconds(speed, train_images)


def make_plan(speeds: dict[str, Speed], budget_seconds: float, setup_seconds: float, tail_seconds: float,
              train_images: int, selection_images: int, settings: PlanSettings) -> Plan:
    """``speeds``: the members in preference order (the first is the primary member)."""
    members = list(speeds)
    usable = max(0.0, budget_seconds - setup_seconds - tail_seconds)
    noise = math.sqrt(0.75 * 0.25 / max(1, selection_images))
    reasons: list[str] = []

    def finals_for(seconds: float, chosen: list[str]) -> dict[str, float]:
        share = seconds / len(chosen)
        return {a: passes_in(share, speeds[a], train_images, selection_images) for a in chosen}

    # Two final runs only where each still gets enough passes to be near what it can learn; below
    # that, one member trained for the whole time beats two trained for half of it.
    chosen = members[:1]
    if len(members) >= 2:
        pair = finals_for(usable * settings.final_fraction, members[:2])
        alone = finals_for(usable, members[:2])
        if min(pair.values()) >= settings.pair_min_passes:
            chosen = members[:2]
            reasons.append(f"a pair: each final run gets >= {settings.pair_min_passes:g} passes even after a "
                           f"search ({', '.join(f'{a} {p:.1f}' for a, p in pair.items())})")
        elif min(alone.values()) >= settings.pair_min_passes:
            chosen = members[:2]
            reasons.append(f"a pair without search: two final runs of the whole time get >= "
                           f"{settings.pair_min_passes:g} passes each "
                           f"({', '.join(f'{a} {p:.1f}' for a, p in alone.items())})")
        else:
            reasons.append(f"one member: two final runs would get under {settings.pair_min_passes:g} passes each "
                           f"({', '.join(f'{a} {p:.1f}' for a, p in alone.items())}); one run of the whole "
                           "time learns more than two of half of it")

    final_seconds = usable * settings.final_fraction
    final = finals_for(final_seconds, chosen)
    rung = max(1.0, math.ceil(settings.rung_fraction * min(final.values())))
    search_seconds = usable - final_seconds
    configs = {}
    for arch in members:
        if arch not in chosen:
            configs[arch] = 0
            continue
        one = rung * pass_seconds(speeds[arch], train_images) + run_overhead(speeds[arch], selection_images)
        configs[arch] = int(search_seconds / len(chosen) // one)
    if any(0 < n < settings.min_configs for n in configs.values()) or not any(configs.values()):
        short = {a: n for a, n in configs.items() if a in chosen}
        reasons.append(f"no search: {rung:g}-pass runs (a {settings.rung_fraction:g} share of a final run, "
                       f"at least one pass) leave room for {', '.join(f'{a} {n}' for a, n in short.items())} "
                       f"configurations, under the {settings.min_configs} a search needs to beat its default")
        configs = {a: 0 for a in members}
        final_seconds, search_seconds, rung = usable, 0.0, 0.0
        if len(chosen) == 2 and min(finals_for(usable, chosen).values()) < settings.pair_min_passes:
            chosen = chosen[:1]
        final = finals_for(final_seconds, chosen)
    return Plan(budget_seconds, setup_seconds, tail_seconds, search_seconds, final_seconds, tuple(chosen),
                rung, configs, final, noise, tuple(reasons))
