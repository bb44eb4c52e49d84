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
    min_rung_passes: float  # and at least this many passes: shorter runs rank configurations by noise
    min_configs: int  # configurations (the default included) a member's search must afford
    pair_min_passes: float  # passes over the training data each of two final runs must get
    final_min_passes: float = 0.0  # passes a final run after a search must still get: below them, the
    # passes a search takes from the final run are worth more than what it can find


@dataclass(frozen=True)
class Plan:
    budget_seconds: float
    setup_seconds: float  # already spent when the plan was made (data loading, speed probes)
    tail_seconds: float  # kept for the ensemble search, the audit (measured cost) and registration
    search_seconds: float
    final_seconds: float
    final_members: tuple[str, ...]  # one final run each (a member twice: two seeds), an even share of the phase
    rung_passes: float  # length of each search run, in passes over the training data (0: no search)
    configs: dict[str, int]  # configurations each member's search tries, its default first
    final_passes: dict[str, float]  # passes each final run is expected to make
    selection_noise: float  # standard error of an accuracy near 75 % on the selection split: a searched
    # configuration replaces the default in the final runs only when it beat it by at least this much
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
        finals += " (two seeds)" if len(set(self.final_members)) < len(self.final_members) else ""
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
              train_images: int, selection_images: int, settings: PlanSettings, audit_images: int = 0) -> Plan:
    """``speeds``: the members in preference order (the first is the primary member).

    In order of preference: a pair of final runs after a search; a pair with the whole time; one
    final run after a search; one final run with the whole time. A pair needs each of its runs to
    get ``pair_min_passes`` (below that, one run of the whole time learns more than two of half of
    it, and voting does not earn the difference back); it is the first two members, or the primary
    member twice (two seeds) when the second member is too slow to get its passes. A search needs
    ``min_configs`` runs per searching member, each of ``min_rung_passes`` at least, and must leave
    each final run ``final_min_passes`` (while the learning curve still climbs steeply, a longer final
    run is worth more than the search's best configuration over the default). The tail is
    ``tail_seconds`` for the ensemble search and registration plus the audit of each final run (plain
    and mirrored images) at its measured speed."""
    members = list(speeds)

    def tail(chosen: tuple[str, ...]) -> float:
        return tail_seconds + 2 * audit_images * sum(speeds[a].eval_seconds_per_image for a in chosen)

    def usable_for(chosen: tuple[str, ...]) -> float:
        return max(0.0, budget_seconds - setup_seconds - tail(chosen))

    noise = math.sqrt(0.75 * 0.25 / max(1, selection_images))

    def passes(seconds: float, chosen: tuple[str, ...]) -> dict[str, float]:
        share = seconds / len(chosen)
        return {a: passes_in(share, speeds[a], train_images, selection_images) for a in chosen}

    def pair(share: float) -> tuple[tuple[str, ...], float] | None:
        """The pair whose runs each get their passes from ``share`` of the usable time, and that time."""
        for chosen in ((members[0], members[1]) if len(members) > 1 else None, (members[0], members[0])):
            if chosen and min(passes(share * usable_for(chosen), chosen).values()) >= settings.pair_min_passes:
                return chosen, share * usable_for(chosen)
        return None

    def search(final_seconds: float, chosen: tuple[str, ...]) -> tuple[float, dict[str, int]]:
        """(rung passes, configurations per member) of a search in what the final runs leave."""
        rung = max(settings.min_rung_passes, math.ceil(settings.rung_fraction * min(passes(final_seconds,
                                                                                           chosen).values())))
        searching = sorted(set(chosen), key=members.index)
        configs = {a: 0 for a in members}
        for arch in searching:
            one = rung * pass_seconds(speeds[arch], train_images) + run_overhead(speeds[arch], selection_images)
            configs[arch] = int((usable_for(chosen) - final_seconds) / len(searching) // one)
        return rung, configs

    def affordable(configs: dict[str, int], chosen: tuple[str, ...]) -> bool:
        return all(configs[a] >= settings.min_configs for a in set(chosen))

    options = []
    for share, label in ((settings.final_fraction, "a pair after a search"), (1.0, "a pair with the whole time")):
        found = pair(share)
        if found:
            options.append((*found, label))
    alone = (members[0],)
    options += [(alone, settings.final_fraction * usable_for(alone), "one member after a search"),
                (alone, usable_for(alone), "one member with the whole time")]
    everyone = tuple(members)
    reasons = [f"a pair needs {settings.pair_min_passes:g} passes per final run; the whole time split between "
               + " and ".join(members) + " buys " + " and ".join(f"{p:.1f}" for p in
                                                                  passes(usable_for(everyone), everyone).values())]
    for chosen, final_seconds, label in options:
        usable = usable_for(chosen)
        if final_seconds < usable:
            short = min(passes(final_seconds, chosen).values())
            if short < settings.final_min_passes:
                reasons.append(f"not {label}: its final runs would get {short:.1f} passes, under the "
                               f"{settings.final_min_passes:g} below which more passes beat a search")
                continue
            rung, configs = search(final_seconds, chosen)
            if not affordable(configs, chosen):
                reasons.append(f"not {label}: {rung:g}-pass search runs leave room for "
                               + ", ".join(f"{a} {configs[a]}" for a in sorted(set(chosen), key=members.index))
                               + f" configurations, under the {settings.min_configs} a search needs to beat its "
                                 "default")
                continue
        else:
            rung, configs = 0.0, {a: 0 for a in members}
        reasons.append(f"chose {label}: " + ", ".join(f"{a} ~{p:.1f} passes" for a, p in
                                                       passes(final_seconds, chosen).items()))
        return Plan(budget_seconds, setup_seconds, tail(chosen), usable - final_seconds, final_seconds, chosen,
                    float(rung), configs, passes(final_seconds, chosen), noise, tuple(reasons))
    raise AssertionError("the last option always applies")
