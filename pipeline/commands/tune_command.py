"""``tune``: one worker of a tuning session (``tune.run.run_tuning`` is the session, step by step)."""

from __future__ import annotations

from ..config import Preset
from ..tune import WorkerOptions, run_tuning
from .options import TuneOptions


def main(preset: Preset, opts: TuneOptions, progress: bool) -> int:
    run_tuning(preset, WorkerOptions(progress=progress, setup_only=opts.setup_only, trials_only=opts.trials_only))
    return 0
