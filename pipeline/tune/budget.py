"""The time budget of a session: one wall clock shared by every worker through the storage.

The budget is cut into phases: the member search, then the refit (``study.refit_fraction``), then a
tail (``study.tail_seconds``) for the ensemble search, the audit and registration. A trial is
admitted only while its first epoch is projected to end inside its phase (seconds per epoch are
measured for each architecture and batch size as trials run, and stored on the trials, so every
worker projects with every worker's measurements); a running trial stops at the epoch boundary
when its next epoch would not end in time, as a finished trial with its best state.

Everything here takes the clock as an argument (``time.time`` in use, a fake in tests).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import optuna

from ..train import StopTraining

Clock = Callable[[], float]
EPOCH_SECONDS = "epoch_seconds"  # trial user attribute: wall seconds of each finished epoch (train + evaluation)
STARTED = "budget_started_at"  # study user attributes: when the session's clock started, and its length
SECONDS = "budget_seconds"


@dataclass(frozen=True)
class Budget:
    started: float  # wall clock (time.time) when the session's first worker started
    seconds: float
    refit_fraction: float
    tail_seconds: float

    @property
    def end(self) -> float:
        return self.started + self.seconds

    @property
    def refit_end(self) -> float:
        return self.end - min(self.tail_seconds, 0.5 * self.seconds)

    @property
    def search_end(self) -> float:
        return self.refit_end - self.refit_fraction * self.seconds

    def phase(self, now: float) -> str:
        return "search" if now < self.search_end else "refit" if now < self.refit_end else "tail"

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


def search_deadline(budget: Budget, now: float, exploring: bool, members: int, explore: int) -> float:
    """Where a search trial must stop. While members are being explored (their first ``explore``
    trials), each trial gets an even share of the search phase, so the first trial, which successive
    halving always promotes (it has no rival yet), cannot take the phase from the others; after that,
    the pruner decides how far a trial goes, up to the end of the phase."""
    if not exploring:
        return budget.search_end
    share = (budget.search_end - budget.started) / max(1, members * explore)
    return min(budget.search_end, now + share)


def refit_deadline(now: float, refit_end: float, waiting: int) -> float:
    """Where a refit starting ``now`` must stop: an even share of the refit phase left with the
    ``waiting`` refits not yet started, so one worker refitting members in turn refits every member.
    (Workers that start refits at the same moment each see fewer waiting and take more.)"""
    return now + max(0.0, refit_end - now) / (1 + max(0, waiting))


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
    taken: int  # finished + running trials (the budget count)
    cap: int  # study.trials
    trial_seconds: float | None  # median wall seconds of its finished trials
    best: list[float]  # best value so far after each finished trial, in order


def gain_per_second(stats: MemberStats) -> float:
    """Recent improvement of the best value per trial (the last half of its trials), per second a
    trial costs: what one more second on this member has been buying lately."""
    n = len(stats.best)
    half = n // 2
    recent = (stats.best[-1] - stats.best[half - 1]) / (n - half) if half else stats.best[-1]
    # a member that stopped improving keeps a small share, so the estimate can change
    return max(recent, 1e-3) / max(stats.trial_seconds or 1.0, 1e-6)


def choose_member(stats: list[MemberStats], explore: int = 3, by_value: bool = True) -> str | None:
    """The member study that gets the next trial, or None when every one has met its cap.

    Without ``by_value`` (no time budget): the first member with trials left, as before. With it:
    every member first gets ``explore`` trials (cost and gain are unknown before); then the one whose
    trials have lately bought the most improvement per second: a slow architecture or configuration
    must earn its cost.
    """
    open_ = [s for s in stats if s.taken < s.cap]
    if not open_:
        return None
    if not by_value:
        return open_[0].arch
    unexplored = [s for s in open_ if len(s.best) < explore or s.trial_seconds is None]
    if unexplored:
        return min(unexplored, key=lambda s: (s.taken, stats.index(s))).arch
    return max(open_, key=lambda s: (gain_per_second(s), -stats.index(s))).arch


def session_budget(study: optuna.Study, time_budget: str | None, refit_fraction: float, tail_seconds: float,
                   clock: Clock) -> Budget | None:
    """The session's budget, shared through the storage: the first worker that starts (not
    ``--setup-only``) records the start and the length on the first member study; every other
    worker reads them. None: no budget. Call under the session lock."""
    from ..config import parse_duration
    from .session import TuneError

    stored = study.user_attrs.get(SECONDS)
    if time_budget is None and stored is None:
        return None
    seconds = parse_duration(time_budget) if time_budget is not None else float(stored)
    if stored is not None and abs(float(stored) - seconds) > 1e-6:
        raise TuneError(f"this worker's --time-budget ({_fmt(seconds)}) differs from the session's ({_fmt(stored)}); "
                        "workers share one budget: leave it out, or start a new --study")
    started = study.user_attrs.get(STARTED)
    if started is None:
        started = clock()
        study.set_user_attr(STARTED, started)
        study.set_user_attr(SECONDS, seconds)
    return Budget(float(started), seconds, refit_fraction, tail_seconds)
