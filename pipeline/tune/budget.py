"""The time budget of a session: one wall clock shared by every worker through the storage.

The budget is cut into phases by the session's plan (``plan.py``): the member search, then the final
runs, then a tail (``study.tail_seconds``) for the ensemble search, the audit and registration. A
search trial is admitted only while its run is projected to end inside the search phase (seconds per
epoch are measured as trials run and stored on the trials, so every worker projects with every
worker's measurements); as a safety, a search run stops at the epoch boundary where its next epoch
would end after the phase. A final run's schedule ends at its share of the final phase.

Everything here takes the clock as an argument (``time.time`` in use, a fake in tests).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import optuna

from ..train import StopTraining
from .keys import EPOCH_SECONDS
from .plan import waves

Clock = Callable[[], float]


@dataclass(frozen=True)
class Budget:
    started: float  # wall clock (time.time) when the session's first worker started
    seconds: float
    final_seconds: float  # the final runs' phase (the plan's)
    tail_seconds: float

    @property
    def end(self) -> float:
        return self.started + self.seconds

    @property
    def final_end(self) -> float:
        return self.end - min(self.tail_seconds, 0.5 * self.seconds)

    @property
    def search_end(self) -> float:
        return self.final_end - self.final_seconds

    def phase(self, now: float) -> str:
        return "search" if now < self.search_end else "final" if now < self.final_end else "tail"

    def describe_use(self, now: float) -> str:
        used = now - self.started
        verdict = (f"{_fmt(self.end - now)} to spare" if now <= self.end else f"OVER by {_fmt(now - self.end)}")
        return f"time budget {_fmt(self.seconds)}: used {_fmt(used)} ({verdict})"


def _fmt(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{int(seconds // 60)}m{seconds % 60:02.0f}s"


def epoch_estimates(trials: list[optuna.trial.FrozenTrial]) -> dict[object, float]:
    """Median seconds per epoch of one architecture's trials: by batch size, and overall (key None)."""
    by_size: dict[object, list[float]] = {}
    for t in trials:
        times = t.user_attrs.get(EPOCH_SECONDS) or []
        if times:
            by_size.setdefault(t.params.get("batch_size"), []).extend(times)
            by_size.setdefault(None, []).extend(times)
    return {size: statistics.median(times) for size, times in by_size.items()}


def projected_epoch(estimates: dict[object, float], batch_size: object = None) -> float | None:
    """Seconds the next epoch of this architecture should take (None: never measured yet)."""
    return estimates.get(batch_size, estimates.get(None))


def admits(budget: Budget, now: float, epoch_seconds: float | None, phase_end: float) -> bool:
    """A trial may start when its first epoch is projected to end before ``phase_end``. An
    architecture never measured is admitted while its phase has time left: its first epoch measures
    it, and the later phases absorb at most that one epoch."""
    if now >= phase_end:
        return False
    return epoch_seconds is None or now + epoch_seconds <= phase_end


def final_deadline(now: float, final_end: float, waiting: int, workers: int = 1) -> float:
    """Where a final run starting ``now`` ends: an even share of the final phase left with the
    ``waiting`` final runs not yet started, run ``workers`` at a time, so the plan's workers running
    them in rounds run every one (with a worker per run: each to the phase's end). Workers that start
    final runs at the same moment each see fewer waiting and take more."""
    return now + max(0.0, final_end - now) / waves(1 + max(0, waiting), workers)


class EpochBudget:
    """``fit``'s report listener that keeps a trial inside its phase: it records each epoch's wall
    time on the trial (for every worker's projections) and stops training at the epoch boundary
    when the next epoch, at this trial's own pace, would end after ``phase_end``."""

    def __init__(self, trial: optuna.Trial | None, phase_end: float, clock: Clock):
        self.trial, self.phase_end, self.clock = trial, phase_end, clock
        self.last = clock()
        self.times: list[float] = []

    def __call__(self, epoch: int, values: dict[str, float]) -> None:
        now = self.clock()
        self.times.append(now - self.last)
        self.last = now
        if self.trial is not None:
            self.trial.set_user_attr(EPOCH_SECONDS, [round(t, 3) for t in self.times])
        pace = statistics.mean(self.times)
        if now + pace > self.phase_end:
            raise StopTraining(f"time budget: another epoch (~{pace:.0f}s) would end after this phase")


# ----------------------------------------------------------------------------- which member next

@dataclass(frozen=True)
class MemberStats:
    """What the allocator knows of one member study."""

    arch: str
    taken: int  # finished + running search trials
    cap: int  # configurations the plan gives it (study.trials without a plan)


def choose_member(stats: list[MemberStats], by_plan: bool = True) -> str | None:
    """The member study that gets the next search trial, or None when every one has met its cap.

    With the plan's quotas (``by_plan``): the member furthest from its quota (the lowest share
    taken; ties to the earlier member), so members fill their quotas together and nothing a trial
    does (pruned, cheap, slow) draws more trials to its member. Without: the first member with
    trials left, member by member."""
    open_ = [s for s in stats if s.taken < s.cap]
    if not open_:
        return None
    if not by_plan:
        return open_[0].arch
    return min(open_, key=lambda s: (s.taken / s.cap, stats.index(s))).arch
