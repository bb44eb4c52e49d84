"""What every bench figure depends on: the settings, the machine, and the data both paths read."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig, Preset
from ..data import Dataset, Split, load_dataset
from ..data.layout import index_dataset
from ..train import resolve_device, resolve_precision

SECTIONS = ("reference", "ours", "ceiling", "inference", "search")
OPTIONAL_SECTIONS = ("memory", "compile")  # minutes each: run only when asked (``also``)
DEFAULT_ARCHS = ("cnn_v1", "cnn_v2")
DEFAULT_EPOCHS = 3
DEFAULT_MAX_TRAIN = 1000
REFERENCE_BATCH = 32
TARGETS = {"train_speedup": 3.0, "data_fraction": 0.10, "fraction_of_peak": 0.70, "inference_ratio": 0.80,
           "search_epoch_ratio": 0.5, "peak_rss_bytes": 2 * 1024 ** 3}
# A GPU runs these memory-bound BatchNorm/ReLU networks at 10-25 % of its matmul peak, a CPU's
# oneDNN kernels much closer to theirs: the step's target is the device's own.
CUDA_TARGETS = {"fraction_of_peak": 0.10}
WITHIN = 0.01  # "within 1 point" of the study's final best validation accuracy


@dataclass(frozen=True)
class BenchSettings:
    """Everything the figures depend on; printed first and written into the JSON line. The first six
    come from the preset (``bench_settings`` resolves them); the rest default to the command's defaults."""

    data_root: str
    image_size: int | None
    seed: int
    device: str
    precision: str
    lr: float
    archs: tuple[str, ...] = DEFAULT_ARCHS
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = REFERENCE_BATCH
    max_train: int | None = DEFAULT_MAX_TRAIN
    search_trials: int = 8
    search_epochs: int = 6
    search_max_train: int | None = 1000
    search_pruner: str = "median"
    search_warmup: int | None = None  # None: the demo preset's pruner_warmup_epochs
    matmul_size: int = 2048
    inference_images: int = 256
    inference_reps: int = 3
    skip: tuple[str, ...] = ()
    also: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Checked here, not where it is used: a bad pruner would otherwise fail minutes into the bench.
        if self.search_pruner not in ("median", "hyperband"):
            raise ValueError(f"bench: search_pruner must be median or hyperband, got {self.search_pruner!r}")


@dataclass(frozen=True)
class OptInSettings:
    """The opt-in sections' own knobs (``also``). Not figures' settings of the default run: kept out of
    the JSON line's ``settings``."""

    memory_root: str | None = None  # default: the ``full`` synthetic preset, kept beside the decode cache
    memory_steps: int = 3  # training steps per member at the preset's largest batch
    compile_steps: int = 10


NO_OPT_IN = OptInSettings()  # the default run's: every opt-in knob at its default


def bench_settings(preset: Preset, *, epochs: int | None = None, archs: str | None = None,
                   search_trials: int | None = None, skip: str | None = None, also: str | None = None) -> BenchSettings:
    """The settings of a bench on ``preset``'s data, device, precision, seed and lr, with the command's
    flags: ``archs`` a comma list, ``skip`` a comma list of ``SECTIONS``, ``also`` one of
    ``OPTIONAL_SECTIONS``; the other settings keep their defaults (``dataclasses.replace`` changes them)."""
    skipped = _parse_sections(skip, SECTIONS, "skip")
    extra = _parse_sections(also, OPTIONAL_SECTIONS, "also")
    device = resolve_device(preset.train.device)
    return BenchSettings(
        data_root=str(preset.data.root), image_size=preset.data.image_size, seed=preset.train.seed,
        device=str(device), precision=resolve_precision(preset.train.precision, device), lr=preset.train.lr,
        archs=tuple(a.strip() for a in archs.split(",")) if archs else DEFAULT_ARCHS,
        epochs=epochs or DEFAULT_EPOCHS, search_trials=search_trials or 8, skip=skipped, also=extra,
        matmul_size=8192 if device.type == "cuda" else 2048)  # 2048^3 is about a launch on a GPU


def targets_for(device: str) -> dict[str, float]:
    """The bench's targets on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``)."""
    return {**TARGETS, **(CUDA_TARGETS if device.startswith("cuda") else {})}


def _parse_sections(spec: str | None, known: tuple[str, ...], flag: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in (spec or "").split(",") if s.strip())
    unknown = [s for s in names if s not in known]
    if unknown:
        raise ValueError(f"bench: unknown section(s) for --{flag}: {', '.join(map(repr, unknown))}; "
                         f"sections: {', '.join(known)}")
    return names


def subprocess_env(workdir: Path, cache: Path) -> dict[str, str]:
    """A ``python -m pipeline`` child's environment: its own tracking store in ``workdir``, the decode
    cache ``cache``, no telemetry, and never the caller's ``MLFLOW_RUN_ID``."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "DEEPFAKE_TUNE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on, including how busy the machine was (load average)."""
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(), "cuda": torch.cuda.is_available(),
            "loadavg_start": loadavg()}


def load_bench_data(cfg: DataConfig, cache_dir: Path) -> tuple[Dataset, dict[str, Any]]:
    """Load twice into a fresh cache: the first load builds it (decode), the second is a hit."""
    cfg = replace(cfg, cache_dir=str(cache_dir))
    t0 = time.perf_counter()
    load_dataset(cfg)
    build = time.perf_counter() - t0
    data = load_dataset(cfg)
    _, height, width = data.image_shape
    return data, {"root": str(data.root), "layout": data.layout, "height": height, "width": width,
                  "train_total": len(data.train), "validation": len(data.validation),
                  "cache_build_seconds": build, "cache_load_seconds": data.load_seconds,
                  "cache_hit": all(s.cache_hit for s in data.splits.values())}


def subsample(data: Dataset, n: int | None, seed: int, multiple: int = 1) -> tuple[Dataset, int]:
    """The same ``n`` training images (seeded, sorted) for both paths, rounded down to a ``multiple``
    (whole batches: no odd last-batch shape inside a timed epoch); validation stays whole."""
    total = len(data.train)
    if n is None or n >= total:
        return data, total
    n = max(multiple, n // multiple * multiple)
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    split = Split("train", data.train.images[idx], data.train.labels[idx], [data.train.ids[i] for i in idx])
    return replace(data, train=split, splits={**data.splits, "train": split}), n


def reference_paths(data: Dataset) -> tuple[list[Path], list[int], list[Path], list[int]]:
    index = index_dataset(data.root)
    by_id = dict(zip(index.splits["train"].ids, index.splits["train"].paths, strict=True))
    val = index.splits["validation"]
    return ([by_id[i] for i in data.train.ids], data.train.labels.tolist(), list(val.paths), list(val.labels))
