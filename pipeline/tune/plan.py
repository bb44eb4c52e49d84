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
    workers: int = 1  # that share the budget (``study.workers``, default ``study.n_jobs``)


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
    audit_pass_seconds: float = 0.0  # one pass of the final runs over the audit images (in the tail): what a
    # mirror vote would cost again, so the ensemble may choose one only where the time left pays for it
    workers: int = 1  # that share the budget: the search runs this many configurations at a time, and
    # final runs that fit side by side each train to the final phase's end

    @property
    def search(self) -> bool:
        return any(self.configs.values())

    @property
    def side_by_side(self) -> bool:
        """Whether every final run has a worker of its own (and trains to the final phase's end)."""
        return self.workers >= len(self.final_members) > 1

    def worker_roles(self) -> list[str]:
        """What the workers do, phase by phase (the printed plan's "N workers" line)."""
        roles = []
        if self.search:
            roles.append(f"the search runs {self.workers} configurations at a time")
        runs = len(self.final_members)
        if self.workers == runs:
            roles.append("each trains one of the final runs, side by side")
        elif self.workers > runs:
            roles.append(f"{runs} of them train the final runs side by side, {self.workers - runs} stop after the "
                         "search (the ensemble is a pair)")
        else:
            roles.append(f"the {runs} final runs in {waves(runs, self.workers)} rounds")
        roles.append("one builds the ensemble")
        return roles

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(values: dict) -> Plan:
        values = dict(values)
        values["final_members"] = tuple(values["final_members"])
        values["reasons"] = tuple(values.get("reasons", ()))
        return Plan(**values)

    def lines(self) -> list[str]:
        out = [f"plan for a {self.budget_seconds / 60:.1f}-minute budget ({self.setup_seconds:.0f} s of set-up "
               f"spent, {self.tail_seconds:.0f} s kept for ensemble, audit and registration):"]
        if self.workers > 1:
            out.append(f"  {self.workers} workers: " + "; ".join(self.worker_roles()))
        if self.search:
            per = ", ".join(f"{arch} {n}" for arch, n in self.configs.items() if n)
            out.append(f"  search {self.search_seconds / 60:.1f} min: configurations {per} (each member's default "
                       f"first), each a run of {self.rung_passes:g} passes whose schedule ends with it")
        else:
            out.append("  no search: the budget cannot pay for runs long enough to rank configurations; the "
                       "defaults get the time")
        finals = ", ".join(f"{arch} ~{self.final_passes[arch]:.1f} passes" for arch in self.final_members)
        finals += " (two seeds)" if len(set(self.final_members)) < len(self.final_members) else ""
        ends = "the phase's end, side by side" if self.side_by_side else "its share of the phase"
        out.append(f"  final runs {self.final_seconds / 60:.1f} min: {finals}, each with a schedule that ends "
                   f"at {ends}")
        out.append(f"  selection-split noise: +/-{100 * self.selection_noise:.1f} points (one standard error; a "
                   "searched configuration replaces a default only when it beats it by two)")
        out.extend(f"  why: {r}" for r in self.reasons)
        return out


def mirror_seconds(tail_seconds: float, audit_pass_seconds: float) -> float:
    """What the ensemble needs left to choose a mirror vote: the ensemble search and registration
    (``tail_seconds``) and two audit passes, plain and mirrored. (The plan kept one: on one CPU core a
    2,000-image pass is ~36 s, which the final run trains with instead.)"""
    return tail_seconds + 2 * audit_pass_seconds


def mirror_fits(seconds_left: float, tail_seconds: float, audit_pass_seconds: float) -> bool:
    """Whether the ensemble may choose a mirror vote (``mirror_seconds`` are left)."""
    return seconds_left >= mirror_seconds(tail_seconds, audit_pass_seconds)


def waves(runs: int, workers: int) -> int:
    """Rounds in which ``workers`` train ``runs`` runs of equal length."""
    return math.ceil(runs / max(1, workers))


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
    """``speeds``: the members in preference order (the first is the primary member), each measured as
    the workers on one device will run it (their processes stepping at once).

    ``settings.workers`` share the budget: a search runs that many configurations at a time, and final runs
    that each have a worker train side by side, each to the final phase's end. A pair of two seeds
    then costs no time over one run, so with two or more workers the plan always trains a pair (the
    ensemble stage still keeps one run alone when the selection split says so).

    In order of preference: a pair of final runs after a search; a pair with the whole time; one
    final run after a search; one final run with the whole time. A pair needs each of its runs to
    get ``pair_min_passes`` (below that, one run of the whole time learns more than two of half of
    it, and voting does not earn the difference back); it is the first two members, or the primary
    member twice (two seeds) when the second member is too slow to get its passes. A search needs
    ``min_configs`` runs per searching member, each of ``min_rung_passes`` at least, and must leave
    each final run ``final_min_passes`` (while the learning curve still climbs steeply, a longer final
    run is worth more than the search's best configuration over the default). The tail is
    ``tail_seconds`` for the ensemble search and registration plus one audit pass of each final run (its
    plain images) at its measured speed; the mirrored pass is not kept for: the ensemble chooses a
    mirror vote only where the time left then pays for it (``mirror_fits``)."""
    budgeting = _Budgeting(speeds, budget_seconds, setup_seconds, tail_seconds, train_images, selection_images,
                           settings, audit_images)
    reasons = [budgeting.pair_note()]
    for chosen, final_seconds, label in budgeting.options():
        refused, rung, configs = budgeting.judge(chosen, final_seconds, label)
        if refused:
            reasons.append(refused)
            continue
        final_passes = budgeting.passes(final_seconds, chosen)
        if not any(configs.values()):  # a final fraction of 1: the first option has the whole time
            label = label.replace("after a search", "with the whole time")
        reasons.append(f"chose {label}: " + ", ".join(f"{a} ~{p:.1f} passes" for a, p in final_passes.items()))
        usable = budgeting.usable(chosen)
        return Plan(budget_seconds, setup_seconds, budgeting.tail(chosen), usable - final_seconds, final_seconds,
                    chosen, float(rung), configs, final_passes, budgeting.noise, tuple(reasons),
                    budgeting.audit_pass(chosen), settings.workers)
    raise AssertionError("the last option always applies")


def pair_affordable(speeds: dict[str, Speed], budget_seconds: float, setup_seconds: float, tail_seconds: float,
                    train_images: int, selection_images: int, settings: PlanSettings, audit_images: int = 0) -> bool:
    """Whether a pair could still be planned, given the primary member's speed (``speeds``' first) and
    ``make_plan``'s other inputs. When even two runs of the primary member cannot get their passes in
    half the time (of what one run's tail leaves: the most any pair gets), no pair can: the other
    members' speeds cannot change the plan, and measuring them would only spend the budget (~10 s for
    cnn_v2 on a CPU core)."""
    first = next(iter(speeds))
    alone = _Budgeting({first: speeds[first]}, budget_seconds, setup_seconds, tail_seconds, train_images,
                       selection_images, settings, audit_images)
    # Every pair has the primary member in it, with at most half of the time that one run alone leaves
    # (all of it when the pair's runs train side by side).
    half = alone.usable((first,)) / waves(2, settings.workers)
    return passes_in(half, speeds[first], train_images, selection_images) >= settings.pair_min_passes


@dataclass(frozen=True)
class _Budgeting:
    """``make_plan``'s inputs and the arithmetic each option is judged by."""

    speeds: dict[str, Speed]
    budget_seconds: float
    setup_seconds: float
    tail_seconds: float
    train_images: int
    selection_images: int
    settings: PlanSettings
    audit_images: int

    @property
    def members(self) -> list[str]:
        return list(self.speeds)

    @property
    def workers(self) -> int:
        return self.settings.workers

    @property
    def pair_side_by_side(self) -> bool:
        """Whether a pair's two runs each have a worker (a second seed then costs no time)."""
        return waves(2, self.workers) == 1

    @property
    def noise(self) -> float:
        """One standard error of an accuracy near 75 % on the selection split."""
        return math.sqrt(0.75 * 0.25 / max(1, self.selection_images))

    def audit_pass(self, chosen: tuple[str, ...]) -> float:
        return self.audit_images * sum(self.speeds[a].eval_seconds_per_image for a in chosen)

    def tail(self, chosen: tuple[str, ...]) -> float:
        return self.tail_seconds + self.audit_pass(chosen)

    def usable(self, chosen: tuple[str, ...]) -> float:
        return max(0.0, self.budget_seconds - self.setup_seconds - self.tail(chosen))

    def passes(self, seconds: float, chosen: tuple[str, ...]) -> dict[str, float]:
        share = seconds / waves(len(chosen), self.workers)
        return {a: passes_in(share, self.speeds[a], self.train_images, self.selection_images) for a in chosen}

    def pair(self, share: float) -> tuple[tuple[str, ...], float] | None:
        """The pair whose runs each get their passes from ``share`` of the usable time, and that time."""
        members = self.members
        for chosen in ((members[0], members[1]) if len(members) > 1 else None, (members[0], members[0])):
            seconds = share * self.usable(chosen) if chosen else 0.0
            # Two seeds side by side cost no time over one run: only a slower second member must get its passes.
            free = chosen == (members[0], members[0]) and self.pair_side_by_side
            if chosen and (free or min(self.passes(seconds, chosen).values()) >= self.settings.pair_min_passes):
                return chosen, seconds
        return None

    def options(self) -> list[tuple[tuple[str, ...], float, str]]:
        """(final members, final seconds, label) in order of preference."""
        found = [(*pair, label) for share, label in ((self.settings.final_fraction, "a pair after a search"),
                                                     (1.0, "a pair with the whole time"))
                 if (pair := self.pair(share))]
        alone = (self.members[0],)
        return found + [(alone, self.settings.final_fraction * self.usable(alone), "one member after a search"),
                        (alone, self.usable(alone), "one member with the whole time")]

    def pair_note(self) -> str:
        if len(self.members) == 1:
            passes = self.passes(self.usable((self.members[0],) * 2), (self.members[0],) * 2)[self.members[0]]
            if self.pair_side_by_side:
                return (f"two {self.members[0]} runs side by side, {passes:.1f} passes each (no other member's "
                        "speed measured)")
            return (f"a pair needs {self.settings.pair_min_passes:g} passes per final run; half the time buys "
                    f"{self.members[0]} {passes:.1f} (no other member's speed measured: none could pair)")
        everyone = tuple(self.members)
        bought = self.passes(self.usable(everyone), everyone).values()
        split = "the whole time side by side for" if self.pair_side_by_side else "the whole time split between"
        return (f"a pair needs {self.settings.pair_min_passes:g} passes per final run; {split} "
                + " and ".join(self.members) + " buys " + " and ".join(f"{p:.1f}" for p in bought))

    def search(self, final_seconds: float, chosen: tuple[str, ...]) -> tuple[float, dict[str, int]]:
        """(rung passes, configurations per member) of a search in what the final runs leave."""
        shortest = min(self.passes(final_seconds, chosen).values())
        rung = max(self.settings.min_rung_passes, math.ceil(self.settings.rung_fraction * shortest))
        searching = sorted(set(chosen), key=self.members.index)
        configs = dict.fromkeys(self.members, 0)
        for arch in searching:
            one = (rung * pass_seconds(self.speeds[arch], self.train_images)
                   + run_overhead(self.speeds[arch], self.selection_images))
            configs[arch] = int(self.workers * (self.usable(chosen) - final_seconds) / len(searching) // one)
        return rung, configs

    def judge(self, chosen: tuple[str, ...], final_seconds: float,
              label: str) -> tuple[str | None, float, dict[str, int]]:
        """(why the option is refused or None, rung passes, configurations per member)."""
        if final_seconds >= self.usable(chosen):
            return None, 0.0, dict.fromkeys(self.members, 0)
        short = min(self.passes(final_seconds, chosen).values())
        if short < self.settings.final_min_passes:
            return (f"not {label}: its final runs would get {short:.1f} passes, under the "
                    f"{self.settings.final_min_passes:g} below which more passes beat a search"), 0.0, {}
        rung, configs = self.search(final_seconds, chosen)
        searching = sorted(set(chosen), key=self.members.index)
        if any(configs[a] < self.settings.min_configs for a in searching):
            return (f"not {label}: {rung:g}-pass search runs leave room for "
                    + ", ".join(f"{a} {configs[a]}" for a in searching)
                    + f" configurations, under the {self.settings.min_configs} a search needs to beat its default"
                    ), rung, configs
        return None, rung, configs
