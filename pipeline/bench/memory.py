"""Memory: the peak resident set of a ``tune`` worker on the ``full`` synthetic preset (competition
size: 12,500 / 1,250 / 6,500 images at 100 px), its cache cold and warm. The decode cache is
memory-mapped, so workers on one machine share its pages (counted in ``RssFile``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ..data.synth import synthesize


def worker_preset(path: Path, root: Path, images_per_epoch: int) -> Path:
    """One short trial per member of the real trainer on the whole dataset (every image decoded,
    the whole cache mapped), with an epoch of ``images_per_epoch`` images so it takes seconds."""
    path.write_text(yaml.safe_dump({
        "name": "memory",
        "data": {"root": str(root), "augment": "geometric", "normalize": "imagenet"},
        "train": {"epochs": 1, "batch_size": 32, "images_per_epoch": images_per_epoch, "device": "cpu"},
        "study": {"members": ["cnn_v1", "cnn_v2"], "trials": 1, "pruner": "none", "top_k": 1,
                  "space": {"train.lr": [0.001]}}}))
    return path


def run_worker(preset: Path, workdir: Path, cache: Path) -> dict[str, Any]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "DEEPFAKE_TUNE_CACHE": str(cache), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_RUN_ID", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli.rss_probe", "tune", "--config", str(preset),
                           "--storage", f"sqlite:///{workdir / 'optuna.db'}", "--quiet"],
                          cwd=workdir, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    probe = [line for line in proc.stdout.splitlines() if line.startswith("RSS_PROBE ")]
    if proc.returncode != 0 or not probe:
        raise RuntimeError(f"bench memory: the tune worker failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return {**json.loads(probe[-1][len("RSS_PROBE "):]), "seconds": seconds}


def bench_memory(tmp_dir: Path, data_root: str | None = None, images_per_epoch: int = 256,
                 seed: int = 0, phases: tuple[str, ...] = ("cold", "warm")) -> dict[str, Any]:
    root = Path(data_root) if data_root else tmp_dir / "full"
    t0 = time.perf_counter()
    if not root.exists():
        synthesize(root, "full", seed)
    synth_seconds = time.perf_counter() - t0
    cache = tmp_dir / "memory-cache"
    out: dict[str, Any] = {"dataset": str(root), "synth_seconds": synth_seconds, "images_per_epoch": images_per_epoch}
    for phase in phases:  # cold: the worker decodes and writes the cache (then maps it); warm: it maps it
        workdir = tmp_dir / f"memory-{phase}"
        workdir.mkdir(parents=True, exist_ok=True)
        out[phase] = run_worker(worker_preset(workdir / "preset.yaml", root, images_per_epoch), workdir, cache)
    out["cache_bytes"] = sum(p.stat().st_size for p in cache.glob("*.npy"))
    out["peak_rss_bytes"] = max(out[phase]["VmHWM"] for phase in phases)
    return out
