"""``bench``: our training, inference and search measured against the reference way (``bench.run``)."""

from __future__ import annotations

from .. import tracking
from ..bench import bench_settings, run_bench
from ..bench.gpu_check import quiet_libraries
from ..config import Preset
from .options import BenchOptions


def main(preset: Preset, opts: BenchOptions, progress: bool) -> int:
    # Logged like every command's results (into --experiment, or the `mlflow run` launcher's run);
    # the store is checked before minutes of measuring.
    tracking.check_tracking(tracking.client())
    quiet_libraries()  # the step-speed section's profiler logs USDT lines on every start (kineto)
    settings = bench_settings(preset, epochs=opts.epochs, archs=opts.archs, search_trials=opts.search_trials,
                              skip=opts.skip, also=opts.also)
    run_bench(preset, settings, json_path=opts.json, experiment=preset.tracking.experiment)
    return 0
