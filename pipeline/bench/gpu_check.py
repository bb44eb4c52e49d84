"""``make gpu-check``: what a person with a GPU runs once, in about 8 minutes on one H100/H200.

Steps, each a line of the table and a part of ``gpu-check.json``:
1. each member's training and evaluation images per second at batch 64 and 256 (CUDA events);
2. the share of a training step spent outside kernels (the profiler's kernel time against the step's);
3. one training and evaluation step under ``torch.cuda.set_sync_debug_mode("error")``;
4. a budgeted ``tune`` (3 minutes, synthetic ``full`` preset: competition size) through to a
   registered model, as a real ``python -m pipeline tune`` process with its own stores;
5. ``predict`` with that model on the device.

Without CUDA the same steps run on the CPU at toy size (32 px, small batches, the ``tiny`` dataset
and preset, a short budget), say so, and still write every field: the test suite runs it so it
never rots.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.synth import synthesize
from ..train import resolve_device, resolve_precision
from .settings import machine_info, subprocess_env
from .step_speed import images_per_second, outside_kernels, step_bench, sync_debug_step

MODEL_NAME = "gpu-check"
MEMBERS = ("cnn_v1", "cnn_v2")


@dataclass(frozen=True)
class GpuCheckSettings:
    """What the check runs: ``gpu_settings`` on CUDA, ``toy_settings`` on the CPU."""

    device: str
    precision: str
    toy: bool
    image_size: int
    batches: tuple[int, ...]
    steps: int  # timed steps per member and batch size
    policy: str  # the augmentation in the timed training step
    synth_preset: str
    config: str  # the tune preset
    time_budget: str
    tail_seconds: int | None = None  # the tune's tail (ensemble, audit, registration); None: the preset's
    data: str | None = None  # a dataset to tune and predict on instead of the synthetic one


def check_settings(device: str, data: str | None = None) -> GpuCheckSettings:
    resolved = resolve_device(device)
    precision = resolve_precision("auto", resolved)
    if resolved.type == "cuda":
        return GpuCheckSettings(str(resolved), precision, False, 100, (64, 256), 50, "geometric", "full", "unibuc",
                                "3m", None, data)
    # A CPU core trains a few hundred 32-px images a second: toy batches, and a budget whose set-up
    # (two speed probes) and tail leave a final run of some seconds.
    return GpuCheckSettings(str(resolved), precision, True, 32, (8, 32), 2, "geometric", "tiny", "tiny", "75s", 15,
                            data)


def quiet_libraries() -> None:
    """Keep what a person should not have to read out of the check's output, in this process and the
    ``tune`` and ``predict`` processes it starts (they inherit the environment): the profiler's own log
    (kineto's ``USDT: profiler_start``/``profiler_stop`` and, on a CPU, ``ERROR: gpuGetDeviceCount
    failed``) and MLflow's INFO lines (``Creating initial MLflow database tables``). A value the user
    set wins: ``KINETO_LOG_LEVEL=0`` or ``MLFLOW_LOGGING_LEVEL=INFO`` shows them again."""
    # Above kineto's highest level (5, USDT); read when the profiler first starts, not at import.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:
        os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"  # an mlflow imported later, here or in a child
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # one imported already


def device_info(device: torch.device) -> dict[str, Any]:
    info = {**machine_info(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"device_name": props.name, "capability": f"{props.major}.{props.minor}",
                     "memory_bytes": props.total_memory, "cuda_version": torch.version.cuda})
    else:
        info.update({"device_name": info["processor"], "capability": None, "memory_bytes": None,
                     "cuda_version": torch.version.cuda})
    return info


def step_figures(s: GpuCheckSettings, say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, str]]:
    """Steps 1-3: images per second per member and batch, the outside-kernel share, the sync check."""
    device = torch.device(s.device)
    speed: dict[str, Any] = {}
    sync: dict[str, str] = {}
    for arch in MEMBERS:
        speed[arch] = {}
        for batch in s.batches:
            bench = step_bench(arch, s.policy, batch, s.image_size, device, s.precision)
            row = images_per_second(bench, s.steps)
            row["outside_kernels_share"] = outside_kernels(bench, row["train_step_ms"] / 1000, max(2, s.steps // 5))
            speed[arch][str(batch)] = row
            say(f"{arch} batch {batch}: train {row['train_images_per_second']:.0f} img/s, eval "
                f"{row['eval_images_per_second']:.0f} img/s, {row['outside_kernels_share']:.0%} of a step outside "
                "kernels")
        sync[arch] = sync_debug_step(step_bench(arch, s.policy, s.batches[0], s.image_size, device, s.precision))
        say(f"{arch} one step under sync debug 'error': {sync[arch]}")
    return speed, sync


def work_paths(workdir: Path, data: str | None, synth_preset: str) -> tuple[Path, Path]:
    """(work folder, dataset root), absolute against the user's working directory: the children run
    inside the work folder, where a relative path would name a folder inside it."""
    workdir = workdir.resolve()
    return workdir, (Path(data).resolve() if data else workdir / f"synthetic-{synth_preset}")


def child_env(workdir: Path) -> dict[str, str]:
    """The tune and predict processes' environment: their own tracking store and cache in ``workdir``
    (absolute: the children run inside it)."""
    return subprocess_env(workdir, workdir / "cache")


def tune_to_registry(s: GpuCheckSettings, root: Path, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Step 4: a budgeted ``tune`` process; its log in ``workdir/tune.log``; the registered version read
    back from the registry."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    args = [sys.executable, "-m", "pipeline", "tune", "--config", s.config, "--data", str(root),
            "--device", s.device, "--time-budget", s.time_budget, "--study", MODEL_NAME,
            "--storage", f"sqlite:///{workdir / 'optuna.db'}", "--model-name", MODEL_NAME,
            "--experiment", MODEL_NAME, "--no-progress",
            *(["--tail-seconds", str(s.tail_seconds)] if s.tail_seconds is not None else [])]
    log = workdir / "tune.log"
    t0 = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(args, cwd=workdir, env=child_env(workdir), stdout=handle, stderr=subprocess.STDOUT,
                              check=False).returncode
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"command": " ".join(args[1:]), "exit_code": code, "seconds": seconds,
                           "time_budget": s.time_budget, "log": str(log), "registered_version": None,
                           "selection_accuracy": None, "audit_accuracy": None}
    client = MlflowClient(child_env(workdir)["MLFLOW_TRACKING_URI"])
    version = None
    if code == 0:
        with contextlib.suppress(MlflowException):  # "not enough finished trials": nothing registered
            version = client.get_model_version_by_alias(MODEL_NAME, "challenger")
    if version is not None:
        metrics = client.get_run(version.run_id).data.metrics
        out.update({"registered_version": int(version.version), "model_uri": f"models:/{MODEL_NAME}@challenger",
                    "selection_accuracy": metrics.get("selection_accuracy"),
                    "audit_accuracy": metrics.get("audit_accuracy")})
    if out["registered_version"] is None:
        say("tune registered no model; the end of its log:\n" + "\n".join(log.read_text().splitlines()[-15:]))
    say(f"tune --time-budget {s.time_budget}: exit {code} in {seconds:.0f} s, registered version "
        f"{out['registered_version']} (log {log})")
    return out


def predict_on_device(s: GpuCheckSettings, root: Path, workdir: Path, model_uri: str,
                      say: Callable[[str], None]) -> dict[str, Any]:
    """Step 5: ``python -m pipeline predict`` with the registered model on the device, as a user runs it;
    its own figure (images per second of ``model.predict``) read from its report line."""
    out_csv = workdir / "submission.csv"
    args = [sys.executable, "-m", "pipeline", "predict", "--data", str(root), "--model-uri", model_uri,
            "--device", s.device, "--out", str(out_csv), "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=workdir, env=child_env(workdir), capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    (workdir / "predict.log").write_text(proc.stdout + proc.stderr)
    speed = re.search(r"predict [0-9.]+s \(([0-9.]+) images/s\)", proc.stdout)
    rows = sum(1 for _ in out_csv.open()) - 1 if proc.returncode == 0 and out_csv.exists() else None
    out = {"command": " ".join(args[1:]), "exit_code": proc.returncode, "rows": rows, "seconds": seconds,
           "images_per_second": float(speed.group(1)) if speed else None, "device": s.device, "out": str(out_csv)}
    say(f"predict on {s.device}: exit {proc.returncode}, {rows} rows, {out['images_per_second']} img/s in "
        f"model.predict, {seconds:.0f} s in all")
    return out


def run_gpu_check(s: GpuCheckSettings, workdir: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every step; returns the figures (also what ``gpu-check.json`` holds). A step that fails is
    recorded with its error and the later steps that need it are marked as not run."""
    start = time.perf_counter()
    workdir, root = work_paths(workdir, s.data, s.synth_preset)
    workdir.mkdir(parents=True, exist_ok=True)
    if s.toy:
        say("no CUDA: running the same steps on the CPU at toy size (figures say nothing about a GPU)")
    out: dict[str, Any] = {"settings": asdict(s), "machine": device_info(torch.device(s.device)), "toy": s.toy}
    out["step_speed"], out["sync_debug"] = step_figures(s, say)
    if not root.exists():
        say(f"synthesizing the {s.synth_preset} dataset into {root}")
        synthesize(root, s.synth_preset)
    out["tune"] = tune_to_registry(s, root, workdir, say)
    if out["tune"]["registered_version"] is None:
        out["predict"] = {"command": None, "exit_code": None, "rows": None, "seconds": None,
                          "images_per_second": None, "device": s.device, "out": None}
    else:
        out["predict"] = predict_on_device(s, root, workdir, out["tune"]["model_uri"], say)
    out["seconds"] = time.perf_counter() - start
    out["passed"] = bool(out["tune"]["exit_code"] == 0 and out["predict"]["rows"]
                         and all(v.startswith(("passed", "not checked")) for v in out["sync_debug"].values()))
    return out


def format_table(out: dict[str, Any]) -> str:
    rows = [("member", "batch", "train img/s", "eval img/s", "outside kernels")]
    for arch, by_batch in out["step_speed"].items():
        for batch, r in by_batch.items():
            rows.append((arch, batch, f"{r['train_images_per_second']:.0f}", f"{r['eval_images_per_second']:.0f}",
                         f"{r['outside_kernels_share']:.0%}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    t, p = out["tune"], out["predict"]
    lines += [f"sync debug: {out['sync_debug']}",
              f"tune ({t['time_budget']} budget): {t['seconds']:.0f} s, registered version {t['registered_version']}, "
              f"selection accuracy {t['selection_accuracy']}, audit accuracy {t['audit_accuracy']}",
              f"predict: {p['rows']} rows at {p['images_per_second']} img/s on {p['device']}",
              f"{'toy run on the CPU' if out['toy'] else out['machine']['device_name']}: "
              f"{'passed' if out['passed'] else 'FAILED'} in {out['seconds']:.0f} s"]
    return "\n".join(lines)


def write_json(out: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(out, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(partial, path)
