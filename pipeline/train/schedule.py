"""Learning-rate schedules that end where the run ends, and the run's length.

A run knows its length before it starts: a wall-clock deadline (a time budget) or a number of
training images (``epochs`` x images per epoch). ``RunLength.fraction`` says how far along it is,
and a decaying schedule reaches zero at fraction 1: the last step trains at a learning rate near
zero, so the last weights are the run's model (Li, Yumer & Ramanan, "Budgeted Training", ICLR 2020:
at small budgets a schedule that ends at the budget beats step and plateau schedules). ``plateau``
is the old behaviour: the rate drops when the selection accuracy stalls, and the best epoch is kept.
Pure functions and an injectable clock: the tests drive it without training anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


def _linear(fraction: float) -> float:
    return 1.0 - fraction


def _cosine(fraction: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * fraction))


# Decay after the warm-up, from 1 at its end to 0 at the run's end; "plateau" is not here: it
# follows the selection accuracy, not the run's length (config.SCHEDULES lists these names too).
DECAYS: dict[str, Callable[[float], float]] = {"linear": _linear, "cosine": _cosine}


def lr_factor(schedule: str, fraction: float, warmup: float) -> float:
    """Multiplier of the peak learning rate at ``fraction`` (0..1) of the run: a linear warm-up over
    the first ``warmup`` of it, then the decay, reaching exactly 0 at 1."""
    fraction = min(max(fraction, 0.0), 1.0)
    if warmup > 0 and fraction < warmup:
        return max(fraction / warmup, 0.01)  # never 0 at the first step: that step would be wasted
    return DECAYS[schedule]((fraction - warmup) / (1.0 - warmup) if warmup < 1 else 1.0)


@dataclass(frozen=True)
class Deadline:
    """When a run must be over, on ``clock``: its training, its last evaluation of the selection split
    and the scoring of ``after_images`` more images by the caller (an audit) included."""

    at: float
    clock: Clock
    after_images: int = 0


@dataclass(frozen=True)
class RunLength:
    """A run's length: until ``deadline`` on ``clock`` (from ``start``), or ``images`` training images."""

    images: int | None = None
    deadline: float | None = None
    start: float = 0.0
    clock: Clock | None = None

    def __post_init__(self) -> None:
        if (self.images is None) == (self.deadline is None):
            raise ValueError("a run's length is a number of images or a deadline, exactly one of them")
        if self.deadline is not None and self.clock is None:
            raise ValueError("a deadline needs the clock it is read on")

    @property
    def timed(self) -> bool:
        return self.deadline is not None

    def fraction(self, images_seen: int) -> float:
        if self.deadline is not None:
            span = self.deadline - self.start
            return 1.0 if span <= 0 else (self.clock() - self.start) / span
        return images_seen / self.images if self.images else 1.0

    def over(self, images_seen: int) -> bool:
        return self.fraction(images_seen) >= 1.0

    def describe(self) -> str:
        if self.deadline is not None:
            return f"until its deadline ({self.deadline - self.start:.0f} s)"
        return f"{self.images} training images"
