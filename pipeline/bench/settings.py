"""What every bench figure depends on: the settings, the machine, and the data both paths read."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig
from ..data import Dataset, Split, load_dataset
from ..data.layout import index_dataset

SECTIONS = ("reference", "ours", "ceiling", "inference", "search")
OPTIONAL_SECTIONS = ("memory", "compile")  # minutes each: run only when asked (``also``)
DEFAULT_ARCHS = ("cnn_v1", "cnn_v2")
DEFAULT_EPOCHS = 3
DEFAULT_MAX_TRAIN = 1000
REFERENCE_BATCH = 32
TARGETS = {"train_speedup": 3.0, "data_fraction": 0.10, "fraction_of_peak": 0.70, "inference_ratio": 0.80,
           "search_epoch_ratio": 0.5, "peak_rss_bytes": 2 * 1024 ** 3}
WITHIN = 0.01  # "within 1 point" of the study's final best validation accuracy


@dataclass(frozen=True)
class BenchSettings:
    """Everything the figures depend on; printed first and written into the JSON line."""

    data_root: str
    image_size: int | None
    archs: tuple[str, ...]
    epochs: int
    batch_size: int
    max_train: int | None
    seed: int
    device: str
    precision: str
    lr: float
    search_trials: int
    search_epochs: int
    search_max_train: int | None
    search_pruner: str
    search_warmup: int | None  # None: the demo preset's pruner_warmup_epochs
    matmul_size: int
    inference_images: int
    inference_reps: int
    skip: tuple[str, ...]
    also: tuple[str, ...] = ()


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
    by_id = dict(zip(index.splits["train"].ids, index.splits["train"].paths))
    val = index.splits["validation"]
    return ([by_id[i] for i in data.train.ids], data.train.labels.tolist(), list(val.paths), list(val.labels))
