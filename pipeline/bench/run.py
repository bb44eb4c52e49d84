"""``bench``: our training, search and inference paths measured side by side with the reference way.

One process, one dataset, the same architectures. Sections (each skippable with ``skip``):

- ``reference``: the reference loop (``bench_reference``): PIL per sample per epoch, per-sample
  transforms in 2 DataLoader workers, fp32, default memory format, batch 32, plain Adam.
- ``ours``: ``train.fit`` as ``tune`` calls it (in-memory uint8 cache, batch augmentation with the same
  ``geometric`` policy, default precision: bf16 autocast where supported, channels_last), trained for
  the same epochs from the same seed and initial weights; throughput ratio and accuracy parity.
- ``ceiling``: the machine's matmul FLOP/s (fp32, bf16) and the fraction our training step reaches,
  from the model's FLOPs (``torch.utils.flop_counter``).
- ``inference``: the ensemble pyfunc (a real ``mlflow.pyfunc`` save and load, or ``model_uri``) on PNG
  bytes against its two members' raw forward passes on preloaded tensors.
- ``search``: on the embedded dataset, the epochs a study spends to come within 1 point of its own
  final best, median pruning against none (same TPE seed, same trial count).

Two more, minutes each, only when asked (``also``):

- ``memory``: the peak resident set of a real ``tune`` worker process on the ``full`` synthetic
  preset (competition size; kept and reused with its decode cache), and where it goes phase by phase.
- ``compile``: ``torch.compile`` modes against eager, training step and evaluation.

``run_bench`` prints a table and, last, one JSON line with every figure, and returns the same dict.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig, Preset
from ..data import Dataset
from .ceiling import bench_ceiling
from .compile import bench_compile
from .inference_speed import bench_inference
from .memory import bench_memory
from .report import (
    check_targets,
    describe_ceiling,
    describe_compile,
    describe_data,
    describe_inference,
    describe_memory,
    describe_search,
    describe_settings,
    describe_training,
    finite,
    format_table,
    log_bench_run,
)
from .search_efficiency import bench_search
from .settings import (
    NO_OPT_IN,
    REFERENCE_BATCH,
    BenchSettings,
    OptInSettings,
    bench_settings,
    load_bench_data,
    loadavg,
    machine_info,
    subsample,
)
from .training import bench_training


def run_bench(preset: Preset, settings: BenchSettings | None = None, *, search_data: DataConfig | None = None,
              model_uri: str | None = None, opt_in: OptInSettings = NO_OPT_IN, json_path: str | None = None,
              experiment: str | None = None, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every section not in ``settings.skip`` and those in ``settings.also`` (``settings`` defaults to
    ``bench_settings(preset)``); returns the figures. ``search_data``: the search section's data (default
    the embedded dataset); ``model_uri``: the ensemble the inference section loads (default: one saved
    from the members trained here); ``json_path``, ``experiment``: where the figures also go."""
    settings = bench_settings(preset) if settings is None else settings
    out: dict[str, Any] = {"settings": asdict(settings), "machine": machine_info(), "section_seconds": {}}
    print_fn(describe_settings(settings, out["machine"]))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        sections = _Sections(preset, settings, Path(tmp), out, print_fn)
        if {"reference", "ours", "ceiling", "inference"} - set(settings.skip):
            sections.on_the_data(model_uri)
        if "search" not in settings.skip:
            sections.run("search", lambda: bench_search(settings, search_data), describe_search)
        sections.opt_in(opt_in)
    out["targets"] = check_targets(out)
    out["seconds"] = time.perf_counter() - start
    out["machine"]["loadavg_end"] = loadavg()
    print_fn(format_table(out))
    line = json.dumps(finite(out), sort_keys=True)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(line + "\n")
    if experiment:
        log_bench_run(out, experiment)
    print_fn(line)
    return out


class _Sections:
    """The sections of one bench, in ``tmp_dir``: each timed into ``out["section_seconds"]``, its figures
    kept in ``out`` and described as it ends."""

    def __init__(self, preset: Preset, settings: BenchSettings, tmp_dir: Path, out: dict[str, Any],
                 print_fn: Callable[[str], None]):
        self.preset, self.settings, self.tmp_dir, self.out, self.print_fn = preset, settings, tmp_dir, out, print_fn
        self.device = torch.device(settings.device)
        # The reference's policy and normalisation, whatever the preset says: both paths see the same work.
        self.data_cfg = replace(preset.data, augment="geometric", normalize="imagenet", cutmix_alpha=0.0,
                                mixup_alpha=0.0)
        self.data: Dataset | None = None

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = fn()
        self.out["section_seconds"][name] = time.perf_counter() - t0
        return value

    def run(self, name: str, fn: Callable[[], Any], describe: Callable[[Any], str]) -> None:
        """A section whose figures are ``out[name]``."""
        self.out[name] = self.timed(name, fn)
        self.print_fn(describe(self.out[name]))

    def load_data(self) -> Dataset:
        """The bench's dataset, loaded (and timed) once, by the first section that reads it."""
        if self.data is None:
            self.data, self.out["data"] = self.timed("data", lambda: load_bench_data(self.data_cfg,
                                                                                     self.tmp_dir / "cache"))
        return self.data

    def on_the_data(self, model_uri: str | None) -> None:
        """The sections that read the bench's dataset: training (reference and ours), ceiling, inference."""
        s = self.settings
        data = self.load_data()
        train_data, self.out["data"]["train_used"] = subsample(data, s.max_train, s.seed, REFERENCE_BATCH)
        self.print_fn(describe_data(self.out["data"]))
        members = self.training(train_data)
        if "ceiling" not in s.skip:
            self.run("ceiling", lambda: bench_ceiling(s, data, self.out["training"], self.device), describe_ceiling)
        if "inference" not in s.skip:
            self.run("inference", lambda: bench_inference(data, self.data_cfg, self.preset.train, s, members,
                                                          self.tmp_dir, model_uri), describe_inference)

    def training(self, train_data: Dataset) -> dict[str, dict[str, torch.Tensor]]:
        """Each architecture's reference and ours sections; returns the weights ours trained (inference's members)."""
        s = self.settings
        self.out["training"] = {}
        members: dict[str, dict[str, torch.Tensor]] = {}
        for arch in s.archs if {"reference", "ours"} - set(s.skip) else ():
            figures, state = self.timed(f"training_{arch}", lambda arch=arch: bench_training(
                arch, train_data, self.data_cfg, self.preset.train, s, s.skip))
            self.out["training"][arch] = figures
            if state is not None:
                members[arch] = state
            self.print_fn(describe_training(arch, figures))
        return members

    def opt_in(self, opt: OptInSettings) -> None:
        """The sections run only when asked for (``also``): compile, then memory."""
        s = self.settings
        if "compile" in s.also:
            data = self.load_data()
            self.run("compile", lambda: bench_compile(s.archs, data.num_classes, data.image_shape, self.device,
                                                      s.precision, opt.compile_steps, s.seed), describe_compile)
        if "memory" in s.also:
            self.run("memory", lambda: bench_memory(self.tmp_dir, self.preset, opt.memory_root, opt.memory_steps,
                                                    s.seed), describe_memory)
