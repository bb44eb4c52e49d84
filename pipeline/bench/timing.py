"""Timing a region of work on its device: CUDA events on a GPU, the wall clock on the CPU.

A GPU runs its queue behind the host; ``time.perf_counter`` around a few launches measures the
launches, not the work. Events recorded on the stream time the work itself (and ``elapsed``
waits only for the end event, once).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class RegionTimer:
    """``with timer: ...`` then ``timer.seconds``: the region's time on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> RegionTimer:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the region starts with an empty queue
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000.0  # ms
        else:
            self.seconds = time.perf_counter() - self._t0


def time_repeated(work: Callable[[], object], reps: int, device: torch.device) -> float:
    """Seconds per call of ``work`` over ``reps`` back-to-back calls (queued without waits on a GPU)."""
    with RegionTimer(device) as timer:
        for _ in range(reps):
            work()
    return timer.seconds / reps
