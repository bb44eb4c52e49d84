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
  preset (competition size), cache cold and warm (memory-mapped).
- ``compile``: ``torch.compile`` modes against eager, training step and evaluation.

``run_bench`` prints a table and, last, one JSON line with every figure, and returns the same dict.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import DataConfig, Preset
from ..train import resolve_device, resolve_precision
from .ceiling import bench_ceiling
from .compile import bench_compile
from .inference import bench_inference
from .memory import bench_memory
from .report import (check_targets, describe_ceiling, describe_compile, describe_data, describe_inference, describe_memory, describe_search,
                     describe_settings, describe_training, finite, format_table, log_bench_run)
from .search import bench_search
from .settings import (DEFAULT_ARCHS, DEFAULT_EPOCHS, DEFAULT_MAX_TRAIN, OPTIONAL_SECTIONS, REFERENCE_BATCH, SECTIONS, BenchSettings,
                       load_bench_data, loadavg, machine_info, subsample)
from .training import bench_training

def run_bench(preset: Preset, epochs: int | None = None, archs: str | None = None,
              search_trials: int | None = None, skip: str | None = None, json_path: str | None = None,
              also: str | None = None, *,
              max_train: int | None = DEFAULT_MAX_TRAIN, search_epochs: int = 6,
              search_max_train: int | None = 1000, search_data: DataConfig | None = None,
              search_pruner: str = "median", search_warmup: int | None = None, matmul_size: int = 2048,
              inference_images: int = 256,
              inference_reps: int = 3, model_uri: str | None = None, experiment: str | None = None,
              memory_root: str | None = None, memory_images_per_epoch: int = 256, compile_steps: int = 10,
              print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every section not in ``skip`` (comma list of ``SECTIONS``) and those in ``also`` (comma
    list of ``OPTIONAL_SECTIONS``); returns the figures."""
    skipped = _parse_sections(skip, SECTIONS, "skip")
    extra = _parse_sections(also, OPTIONAL_SECTIONS, "also")
    if search_pruner not in ("median", "hyperband"):
        raise ValueError(f"bench: search_pruner must be median or hyperband, got {search_pruner!r}")
    device = resolve_device(preset.train.device)
    settings = BenchSettings(
        data_root=str(preset.data.root), image_size=preset.data.image_size,
        archs=tuple(a.strip() for a in archs.split(",")) if archs else DEFAULT_ARCHS,
        epochs=epochs or DEFAULT_EPOCHS, batch_size=REFERENCE_BATCH, max_train=max_train, seed=preset.train.seed,
        device=str(device), precision=resolve_precision(preset.train.precision, device), lr=preset.train.lr,
        search_trials=search_trials or 8, search_epochs=search_epochs, search_max_train=search_max_train,
        search_pruner=search_pruner, search_warmup=search_warmup, matmul_size=matmul_size,
        inference_images=inference_images, inference_reps=inference_reps, skip=skipped, also=extra)
    out: dict[str, Any] = {"settings": asdict(settings), "machine": machine_info(), "section_seconds": {}}
    clock = out["section_seconds"]

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = fn()
        clock[name] = time.perf_counter() - t0
        return value

    print_fn(describe_settings(settings, out["machine"]))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp_dir = Path(tmp)
        # The reference's policy and normalisation, whatever the preset says: both paths see the same work.
        data_cfg = replace(preset.data, augment="geometric", normalize="imagenet", cutmix_alpha=0.0, mixup_alpha=0.0)
        members: dict[str, dict[str, torch.Tensor]] = {}
        if {"reference", "ours", "ceiling", "inference"} - set(skipped):
            data, out["data"] = timed("data", lambda: load_bench_data(data_cfg, tmp_dir / "cache"))
            train_data, out["data"]["train_used"] = subsample(data, max_train, settings.seed, REFERENCE_BATCH)
            print_fn(describe_data(out["data"]))
            out["training"] = {}
            for arch in settings.archs if {"reference", "ours"} - set(skipped) else ():
                figures, state = timed(f"training_{arch}", lambda: bench_training(
                    arch, train_data, data_cfg, preset.train, settings, skipped))
                out["training"][arch] = figures
                if state is not None:
                    members[arch] = state
                print_fn(describe_training(arch, figures))
            if "ceiling" not in skipped:
                out["ceiling"] = timed("ceiling", lambda: bench_ceiling(settings, data, out["training"], device))
                print_fn(describe_ceiling(out["ceiling"]))
            if "inference" not in skipped:
                out["inference"] = timed("inference", lambda: bench_inference(
                    data, data_cfg, preset.train, settings, members, tmp_dir, model_uri))
                print_fn(describe_inference(out["inference"]))
        if "search" not in skipped:
            out["search"] = timed("search", lambda: bench_search(settings, search_data))
            print_fn(describe_search(out["search"]))
        if "compile" in extra:
            if "data" not in out:
                data, out["data"] = timed("data", lambda: load_bench_data(data_cfg, tmp_dir / "cache"))
            out["compile"] = timed("compile", lambda: bench_compile(
                settings.archs, data.num_classes, data.image_shape, device, settings.precision, compile_steps, settings.seed))
            print_fn(describe_compile(out["compile"]))
        if "memory" in extra:
            out["memory"] = timed("memory", lambda: bench_memory(tmp_dir, memory_root, memory_images_per_epoch,
                                                                 settings.seed))
            print_fn(describe_memory(out["memory"]))
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


def _parse_sections(spec: str | None, known: tuple[str, ...], flag: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in (spec or "").split(",") if s.strip())
    unknown = [s for s in names if s not in known]
    if unknown:
        raise ValueError(f"bench: unknown section(s) for --{flag}: {', '.join(map(repr, unknown))}; "
                         f"sections: {', '.join(known)}")
    return names
