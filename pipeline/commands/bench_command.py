"""``bench``: our training, inference and search measured against the reference way (``bench.run``)."""

from __future__ import annotations

import os

from .. import tracking
from ..bench import bench_settings, run_bench
from ..config import Preset
from .options import BenchOptions


def main(preset: Preset, opts: BenchOptions, progress: bool) -> int:
    # Logged like every command's results (into --experiment, or the `mlflow run` launcher's run);
    # the store is checked before minutes of measuring.
    tracking.check_tracking(tracking.client())
    # The step-speed section's profiler logs kineto's USDT lines on every start; above its highest level
    # they are not printed (a value the user set wins). Read when the profiler starts, not at import.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    settings = bench_settings(preset, epochs=opts.epochs, archs=opts.archs, search_trials=opts.search_trials,
                              skip=opts.skip, also=opts.also)
    run_bench(preset, settings, json_path=opts.json, experiment=preset.tracking.experiment)
    return 0
