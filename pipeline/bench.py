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

``run_bench`` prints a table and, last, one JSON line with every figure, and returns the same dict.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import metrics as M
from .config import DataConfig, ModelConfig, Preset, TrainConfig, load_preset
from .data import Dataset, Split, load_dataset
from .data.layout import index_dataset
from .models import build_model
from .train import autocast, evaluate, fit, resolve_device, resolve_precision, seed_everything

SECTIONS = ("reference", "ours", "ceiling", "inference", "search")
DEFAULT_ARCHS = ("cnn_v1", "cnn_v2")
DEFAULT_EPOCHS = 3
DEFAULT_MAX_TRAIN = 1000
REFERENCE_BATCH = 32
TARGETS = {"train_speedup": 3.0, "data_fraction": 0.10, "inference_ratio": 0.80, "search_epoch_ratio": 0.5}
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


def run_bench(preset: Preset, epochs: int | None = None, archs: str | None = None,
              search_trials: int | None = None, skip: str | None = None, json_path: str | None = None, *,
              max_train: int | None = DEFAULT_MAX_TRAIN, search_epochs: int = 6,
              search_max_train: int | None = 1000, search_data: DataConfig | None = None,
              search_pruner: str = "median", search_warmup: int | None = None, matmul_size: int = 2048,
              inference_images: int = 256,
              inference_reps: int = 3, model_uri: str | None = None, experiment: str | None = None,
              print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every section not in ``skip`` (comma list of ``SECTIONS``); returns the figures."""
    skipped = _parse_skip(skip)
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
        inference_images=inference_images, inference_reps=inference_reps, skip=skipped)
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
    out["targets"] = check_targets(out)
    out["seconds"] = time.perf_counter() - start
    out["machine"]["loadavg_end"] = _loadavg()
    print_fn(format_table(out))
    line = json.dumps(_finite(out), sort_keys=True)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(line + "\n")
    if experiment:
        log_bench_run(out, experiment)
    print_fn(line)
    return out


def _parse_skip(skip: str | None) -> tuple[str, ...]:
    names = tuple(s.strip() for s in (skip or "").split(",") if s.strip())
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise ValueError(f"bench: unknown section(s) to skip: {', '.join(map(repr, unknown))}; "
                         f"sections: {', '.join(SECTIONS)}")
    return names


# ----------------------------------------------------------------------------- machine and data

def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on, including how busy the machine was (load average)."""
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(), "cuda": torch.cuda.is_available(),
            "loadavg_start": _loadavg()}


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


def _train_paths(data: Dataset) -> tuple[list[Path], list[int], list[Path], list[int]]:
    index = index_dataset(data.root)
    by_id = dict(zip(index.splits["train"].ids, index.splits["train"].paths))
    val = index.splits["validation"]
    return ([by_id[i] for i in data.train.ids], data.train.labels.tolist(), list(val.paths), list(val.labels))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- training

def bench_training(arch: str, data: Dataset, data_cfg: DataConfig, base: TrainConfig, settings: BenchSettings,
                   skipped: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Reference and ours for one architecture: throughput, data fraction and accuracy parity."""
    device = torch.device(settings.device)
    figures: dict[str, Any] = {"train_images": len(data.train), "val_images": len(data.validation),
                               "epochs": settings.epochs}
    state = None
    model_cfg = ModelConfig(arch=arch, num_classes=data.num_classes)
    eval_batches = (REFERENCE_BATCH, len(data.validation) % REFERENCE_BATCH, base.eval_batch_size,
                    len(data.validation) % base.eval_batch_size)
    if "reference" not in skipped:
        warm_up(model_cfg, data.image_shape, device, "fp32", False, eval_batches)
        figures["reference"] = run_reference(model_cfg, data, settings, device)
    if "ours" not in skipped:
        warm_up(model_cfg, data.image_shape, device, settings.precision, True, eval_batches)
        figures["ours"], state = run_ours(model_cfg, data, data_cfg, base, settings)
    if "reference" in figures and "ours" in figures:
        ref, ours = figures["reference"], figures["ours"]
        figures["train_speedup"] = ours["train_images_per_second"] / ref["train_images_per_second"]
        figures["eval_speedup"] = ours["eval_images_per_second"] / ref["eval_images_per_second"]
        figures["parity"] = parity(ref["best_val_accuracy"], ours["best_val_accuracy"], len(data.validation))
    return figures, state


def warm_up(model_cfg: ModelConfig, shape: tuple[int, int, int], device: torch.device, precision: str,
            channels_last: bool, eval_batches: tuple[int, ...]) -> None:
    """Two training steps and the evaluation batch shapes on a throwaway model, so the timed epochs
    measure the steady state rather than oneDNN/cuDNN's one-time kernel selection for each shape."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(model_cfg).to(device, memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), fused=channels_last and device.type in ("cpu", "cuda"))
    x = torch.randn(REFERENCE_BATCH, *shape, device=device).contiguous(memory_format=fmt)
    y = torch.zeros(REFERENCE_BATCH, dtype=torch.int64, device=device)
    for _ in range(2):
        with autocast(device, precision):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.inference_mode():
        for batch in {b for b in eval_batches if b > 0}:
            with autocast(device, precision):
                model(torch.randn(batch, *shape, device=device).contiguous(memory_format=fmt))
    _sync(device)


def run_reference(model_cfg: ModelConfig, data: Dataset, settings: BenchSettings,
                  device: torch.device) -> dict[str, Any]:
    from .bench_reference import reference_fit

    train_paths, train_labels, val_paths, val_labels = _train_paths(data)
    seed_everything(settings.seed)
    model = build_model(model_cfg)
    resize = settings.image_size if settings.image_size else None
    epochs = reference_fit(model, train_paths, train_labels, val_paths, val_labels, settings.epochs, settings.lr,
                           resize, settings.seed, device)
    train_rates = [e.train_images / e.train_seconds for e in epochs]
    eval_rates = [e.eval_images / e.eval_seconds for e in epochs]
    accs = [e.val_accuracy for e in epochs]
    return {"precision": "fp32", "memory_format": "contiguous", "batch_size": REFERENCE_BATCH, "workers": 2,
            "train_seconds": sum(e.train_seconds for e in epochs),
            "train_images_per_second": statistics.median(train_rates), "epoch_train_images_per_second": train_rates,
            "eval_images_per_second": statistics.median(eval_rates), "epoch_eval_images_per_second": eval_rates,
            "val_accuracy": accs, "best_val_accuracy": max(accs), "last_val_accuracy": accs[-1]}


def bench_train_config(base: TrainConfig, settings: BenchSettings, epochs: int) -> TrainConfig:
    """The reference's training settings expressed as a ``TrainConfig``: plain Adam at the same lr and batch,
    no weight decay, no label smoothing, no schedule or early stop inside the few epochs."""
    return replace(base, epochs=epochs, batch_size=settings.batch_size, lr=settings.lr, weight_decay=0.0,
                   optimizer="adam", label_smoothing=0.0, class_weights="none", lr_patience=epochs,
                   early_stop_patience=epochs, seed=settings.seed, device=settings.device)


def run_ours(model_cfg: ModelConfig, data: Dataset, data_cfg: DataConfig, base: TrainConfig,
             settings: BenchSettings) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = bench_train_config(base, settings, settings.epochs)
    seed_everything(settings.seed)
    model = build_model(model_cfg)  # same seed, same initial weights as the reference
    result = fit(model, data, data_cfg, cfg, progress=False)
    device = torch.device(result.device)
    from .data import Normalizer

    normalizer = Normalizer(data_cfg.normalize, device)
    val_x, val_y = data.validation.images.to(device), data.validation.labels
    eval_rates = []
    for _ in range(settings.epochs):  # as many evaluation passes as the reference times
        _sync(device)
        t0 = time.perf_counter()
        evaluate(model, val_x, val_y, normalizer, device, result.precision, cfg.eval_batch_size)
        _sync(device)
        eval_rates.append(len(val_x) / (time.perf_counter() - t0))
    train_rates = [e.images / e.seconds for e in result.epoch_stats]
    accs = [row[M.VAL_ACCURACY] for row in result.history]
    figures = {"precision": result.precision, "memory_format": "channels_last", "batch_size": cfg.batch_size,
               "train_seconds": result.train_seconds,
               "train_images_per_second": statistics.median(train_rates), "epoch_train_images_per_second": train_rates,
               "mean_train_images_per_second": result.images_per_second, "data_fraction": result.data_fraction,
               "epoch_data_fraction": [e.data_seconds / e.seconds for e in result.epoch_stats],
               "compute_images_per_second": statistics.median(
                   e.images / (e.seconds - e.data_seconds) for e in result.epoch_stats),
               "eval_images_per_second": statistics.median(eval_rates), "epoch_eval_images_per_second": eval_rates,
               "val_accuracy": accs, "best_val_accuracy": result.best_val_accuracy, "last_val_accuracy": accs[-1],
               "best_epoch": result.best_epoch}
    return figures, result.best_state


def parity(ref_acc: float, ours_acc: float, n: int) -> dict[str, float | bool]:
    """Equal accuracy within noise: the gap against two standard errors of a difference of two
    accuracies on ``n`` validation images (binomial)."""
    p = min(max((ref_acc + ours_acc) / 2, 1.0 / n), 1 - 1.0 / n)
    se = math.sqrt(2 * p * (1 - p) / n)
    gap = ours_acc - ref_acc
    return {"gap": gap, "two_se": 2 * se, "within_noise": gap >= -2 * se}


# ----------------------------------------------------------------------------- hardware ceiling

def matmul_flops(n: int, dtype: torch.dtype, device: torch.device, reps: int = 5) -> float:
    """Best-of-``reps`` FLOP/s of an n x n x n matmul (2 n^3 FLOPs)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    _sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def model_flops(arch: str, num_classes: int, shape: tuple[int, int, int],
                batch: int = REFERENCE_BATCH) -> dict[str, float]:
    """FLOPs per image of one forward and of one forward+backward (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(ModelConfig(arch=arch, num_classes=num_classes)).train()
    x = torch.randn(batch, *shape)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    train = counter.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return {"forward_per_image": counter.get_total_flops() / batch, "train_per_image": train / batch}


def bench_ceiling(settings: BenchSettings, data: Dataset, training: dict[str, Any],
                  device: torch.device) -> dict[str, Any]:
    from .train import bf16_supported

    peaks = {"fp32": matmul_flops(settings.matmul_size, torch.float32, device), "bf16": float("nan")}
    # Without native bf16 (AVX2-only CPUs) torch emulates it at ~1 GFLOP/s: a 2048^3 matmul would
    # take minutes and measure nothing our training uses (precision auto picks fp32 there).
    if bf16_supported(device):
        peaks["bf16"] = matmul_flops(settings.matmul_size, torch.bfloat16, device)
    out: dict[str, Any] = {"matmul_size": settings.matmul_size, "matmul_fp32_flops": peaks["fp32"],
                           "matmul_bf16_flops": peaks["bf16"], "archs": {}}
    for arch in settings.archs:
        flops = model_flops(arch, data.num_classes, data.image_shape)
        row: dict[str, Any] = {"train_flops_per_image": flops["train_per_image"],
                               "forward_flops_per_image": flops["forward_per_image"]}
        figures = training.get(arch, {})
        if "ours" in figures:
            ours = figures["ours"]
            peak = peaks.get(ours["precision"], peaks["fp32"])
            row["ours_flops"] = flops["train_per_image"] * ours["train_images_per_second"]
            row["ours_fraction_of_peak"] = row["ours_flops"] / peak
            row["ours_compute_fraction_of_peak"] = (flops["train_per_image"] * ours["compute_images_per_second"]
                                                    / peak)
            row["ours_peak"] = ours["precision"]
        if "reference" in figures:
            row["reference_flops"] = flops["train_per_image"] * figures["reference"]["train_images_per_second"]
            row["reference_fraction_of_peak"] = row["reference_flops"] / peaks["fp32"]
        out["archs"][arch] = row
    return out


# ----------------------------------------------------------------------------- inference

def train_members(data: Dataset, data_cfg: DataConfig, base: TrainConfig, settings: BenchSettings,
                  archs: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """One quick epoch per member when the training sections were skipped (weights do not change speed)."""
    cfg = bench_train_config(base, settings, 1)
    states = {}
    for arch in archs:
        seed_everything(settings.seed)
        model = build_model(ModelConfig(arch=arch, num_classes=data.num_classes))
        states[arch] = fit(model, data, data_cfg, cfg, progress=False).best_state
    return states


def _ensemble_module():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mlflow's advice on predict type hints, given when the class is defined
        import mlflow.pyfunc  # noqa: F401

        from . import ensemble
    return ensemble


def save_ensemble(data: Dataset, data_cfg: DataConfig, base: TrainConfig, settings: BenchSettings,
                  states: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> Path:
    """An ensemble saved with ``mlflow.pyfunc.save_model``: the artifacts (two checkpoints and the spec),
    signature and requirements ``registry.register_ensemble`` logs, weight 0.5, soft voting."""
    import mlflow.pyfunc

    from .checkpoint import save_checkpoint

    ens = _ensemble_module()

    arch_a, arch_b = list(states)[:2]
    cfg = bench_train_config(base, settings, settings.epochs)
    paths = {}
    for key, arch in (("member_a", arch_a), ("member_b", arch_b)):
        paths[key] = str(save_checkpoint(out_dir / f"{key}.pt", states[arch],
                                         ModelConfig(arch=arch, num_classes=data.num_classes), data_cfg, cfg,
                                         data.classes, settings.epochs, 0.0, data.image_shape[1:]))
    spec = ens.write_spec(out_dir / "ensemble.json", 0.5, "soft", list(data.classes),
                      [{"arch": arch_a, "trial": 0, "run_id": ""}, {"arch": arch_b, "trial": 0, "run_id": ""}])
    model_dir = out_dir / "ensemble"
    mlflow_logger = logging.getLogger("mlflow")
    level = mlflow_logger.level
    mlflow_logger.setLevel(logging.ERROR)  # the registry's own choices (cloudpickle, no type hints) are not news here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.pyfunc.save_model(path=str(model_dir), python_model=ens.EnsembleModel(),
                                     artifacts={**paths, "ensemble": str(spec)},
                                     signature=ens.signature(data.num_classes), pip_requirements=ens.pip_requirements(),
                                     model_config={"device": settings.device})
    finally:
        mlflow_logger.setLevel(level)
    return model_dir


def _median_seconds(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_inference(data: Dataset, data_cfg: DataConfig, base: TrainConfig, settings: BenchSettings,
                    members: dict[str, dict[str, torch.Tensor]], tmp_dir: Path,
                    model_uri: str | None) -> dict[str, Any]:
    """Pyfunc ``predict`` on a DataFrame of PNG bytes (decode included) against the members' raw
    forward passes on preloaded uint8 tensors (same device, precision and batch size)."""
    decode_request_image = _ensemble_module().decode_request_image
    import mlflow.pyfunc
    import pandas as pd

    from .train import predict_probs

    if model_uri is None:
        if len(members) < 2:
            pair = tuple(dict.fromkeys(settings.archs + DEFAULT_ARCHS))[:2]
            members = {**train_members(data, data_cfg, base, settings, tuple(a for a in pair if a not in members)),
                       **members}
        model_uri = str(save_ensemble(data, data_cfg, base, settings, members, tmp_dir))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = mlflow.pyfunc.load_model(model_uri)
    load_s = time.perf_counter() - t0
    ensemble = loaded.unwrap_python_model()
    paths = index_dataset(data.root).splits["validation"].paths[:settings.inference_images]
    frame = pd.DataFrame({"image": [Path(p).read_bytes() for p in paths]})
    n = len(frame)
    device = ensemble.device

    loaded.predict(frame)  # warm-up: first-call kernel selection for these batch shapes
    predict_s = _median_seconds(lambda: loaded.predict(frame), settings.inference_reps, device)
    decode_s = _median_seconds(lambda: [decode_request_image(v, i) for i, v in enumerate(frame["image"])],
                               settings.inference_reps, device)
    images = [decode_request_image(v, i) for i, v in enumerate(frame["image"])]
    forward_s = 0.0
    for member in ensemble.members:
        batch = member.prepare(images).to(device)
        forward_s += _median_seconds(lambda: predict_probs(member.model, batch, member.normalizer, device,
                                                           ensemble.precision, ensemble.batch_size),
                                     settings.inference_reps, device)
    return {"model_uri": model_uri, "images": n, "precision": ensemble.precision, "batch_size": ensemble.batch_size,
            "members": [m.arch for m in ensemble.members], "load_seconds": load_s,
            "pyfunc_images_per_second": n / predict_s, "members_raw_images_per_second": n / forward_s,
            "decode_images_per_second": n / decode_s, "pyfunc_seconds": predict_s, "raw_seconds": forward_s,
            "decode_seconds": decode_s, "ratio": forward_s / predict_s}


# ----------------------------------------------------------------------------- search efficiency

def bench_search(settings: BenchSettings, search_data: DataConfig | None) -> dict[str, Any]:
    """Two real Optuna studies on the embedded dataset (the ``demo`` preset's data, space and trainer),
    same TPE seed and trial count: ``search_pruner`` against no pruning."""
    import optuna

    demo = load_preset("demo")
    data_cfg = search_data or demo.data
    data, _ = subsample(load_dataset(data_cfg), settings.search_max_train, settings.seed)
    model_cfg = replace(demo.model, arch=demo.study.members[0], num_classes=data.num_classes)
    train_cfg = replace(demo.train, epochs=settings.search_epochs, device=settings.device, seed=settings.seed)
    if settings.search_warmup is not None:
        demo = replace(demo, study=replace(demo.study, pruner_warmup_epochs=settings.search_warmup))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies = {}
    for label, pruner in ((settings.search_pruner, settings.search_pruner), ("none", "none")):
        studies[label] = run_study(pruner, settings.search_trials, demo.study, data, data_cfg, model_cfg, train_cfg)
    pruned, plain = studies[settings.search_pruner], studies["none"]
    # Stricter reading: epochs the pruned study needs to come within 1 point of the *unpruned* study's best.
    cross = epochs_to_reach(pruned["trace"], plain["final_best"] - WITHIN)
    return {"dataset": str(data.root), "train_images": len(data.train), "val_images": len(data.validation),
            "arch": model_cfg.arch, "trials": settings.search_trials, "max_epochs": settings.search_epochs,
            "pruner": settings.search_pruner, "pruner_warmup_epochs": demo.study.pruner_warmup_epochs,
            "with_pruning": pruned, "without_pruning": plain,
            "epoch_ratio": pruned["epochs_to_within_1pt"] / plain["epochs_to_within_1pt"],
            "total_epoch_ratio": pruned["total_epochs"] / plain["total_epochs"],
            "pruned_epochs_to_within_1pt_of_unpruned_best": cross,
            "cross_epoch_ratio": cross / plain["epochs_to_within_1pt"] if cross is not None else None}


def epochs_to_reach(trace: list[float], target: float) -> int | None:
    """Cumulative epochs until one epoch's validation accuracy reaches ``target`` (None: never)."""
    return next((i + 1 for i, acc in enumerate(trace) if acc >= target), None)


def run_study(pruner_name: str, trials: int, study_cfg, data: Dataset, data_cfg: DataConfig,
              model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    """Trials one after another as ``tune`` runs them (``suggest``, then ``fit`` with a pruning listener);
    every epoch's validation accuracy is kept in order, so epochs-to-target can be counted."""
    import optuna
    from optuna.trial import TrialState

    from .tune import make_pruner, suggest

    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=study_cfg.sampler_seed, n_startup_trials=3),
                                pruner=make_pruner(pruner_name, study_cfg.pruner_warmup_epochs, train_cfg.epochs))
    trace: list[float] = []  # validation accuracy of every epoch, in the order they ran
    t0 = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        m_cfg, t_cfg, d_cfg = suggest(trial, study_cfg.space, model_cfg,
                                      replace(train_cfg, seed=train_cfg.seed + trial.number), data_cfg)

        def listener(epoch: int, values: dict[str, float], trial=trial) -> None:
            trace.append(values[M.OBJECTIVE])
            trial.report(values[M.OBJECTIVE], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        try:
            seed_everything(t_cfg.seed)  # initial weights from the trial's seed: equal trials start equal
            result = fit(build_model(m_cfg), data, d_cfg, t_cfg, report=listener, progress=False)
            study.tell(trial, result.best_val_accuracy)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        except Exception:  # noqa: BLE001 - fail the trial, not the study (its epochs still count)
            study.tell(trial, state=TrialState.FAIL)
    if not trace:
        raise RuntimeError(f"bench search: all {trials} trials failed before their first epoch")
    final = max(trace)
    states = [t.state for t in study.trials]
    return {"final_best": final, "epochs_to_within_1pt": epochs_to_reach(trace, final - WITHIN),
            "total_epochs": len(trace), "trace": trace,
            "complete": states.count(TrialState.COMPLETE), "pruned": states.count(TrialState.PRUNED),
            "failed": states.count(TrialState.FAIL),
            "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- targets, table, logging

def check_targets(out: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    for arch, fig in out.get("training", {}).items():
        if "train_speedup" in fig:
            targets[f"{arch}_train_speedup_3x"] = fig["train_speedup"] >= TARGETS["train_speedup"]
            targets[f"{arch}_accuracy_parity"] = bool(fig["parity"]["within_noise"])
        if "ours" in fig:
            targets[f"{arch}_data_fraction_below_10pct"] = fig["ours"]["data_fraction"] < TARGETS["data_fraction"]
    if "inference" in out:
        targets["inference_ratio_80pct"] = out["inference"]["ratio"] >= TARGETS["inference_ratio"]
    if "search" in out:
        s = out["search"]
        targets["pruning_half_epochs"] = s["epoch_ratio"] <= TARGETS["search_epoch_ratio"]
        # The stricter reading: the pruned study must not lose the best trial on the way.
        targets["pruning_keeps_best_within_1pt"] = (s["with_pruning"]["final_best"]
                                                    >= s["without_pruning"]["final_best"] - WITHIN)
    targets["all_met"] = all(targets.values()) if targets else False
    return targets


def describe_settings(s: BenchSettings, machine: dict[str, Any]) -> str:
    return (f"bench: data {s.data_root}, image size {s.image_size or 'native'}, archs {','.join(s.archs)}, "
            f"{s.epochs} epochs, batch {s.batch_size}, max train {s.max_train or 'all'}, seed {s.seed}, "
            f"device {s.device}, our precision {s.precision}; search {s.search_trials} trials x "
            f"{s.search_epochs} epochs ({s.search_pruner} vs none, warm-up {s.search_warmup or 'preset'}); skip {','.join(s.skip) or '-'}; "
            f"{machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads, load {machine['loadavg_start']}")


def describe_data(d: dict[str, Any]) -> str:
    return (f"data: {d['root']} ({d['layout']}), {d['height']}x{d['width']} px, train {d['train_used']} of "
            f"{d['train_total']}, validation {d['validation']}; uint8 cache built in {d['cache_build_seconds']:.2f}s, "
            f"loaded (hit) in {d['cache_load_seconds']:.2f}s")


def describe_training(arch: str, fig: dict[str, Any]) -> str:
    parts = [f"{arch}:"]
    if "reference" in fig:
        r = fig["reference"]
        parts.append(f"reference {r['train_images_per_second']:.1f} img/s train, {r['eval_images_per_second']:.1f} "
                     f"eval, best val {r['best_val_accuracy']:.3f};")
    if "ours" in fig:
        o = fig["ours"]
        parts.append(f"ours {o['train_images_per_second']:.1f} img/s train ({o['data_fraction']:.1%} data), "
                     f"{o['eval_images_per_second']:.1f} eval, best val {o['best_val_accuracy']:.3f}")
    if "train_speedup" in fig:
        parts.append(f"-> {fig['train_speedup']:.2f}x train, {fig['eval_speedup']:.2f}x eval")
    return " ".join(parts)


def describe_ceiling(c: dict[str, Any]) -> str:
    return (f"ceiling: matmul {c['matmul_size']}^3 fp32 {c['matmul_fp32_flops'] / 1e9:.1f} GFLOP/s, "
            f"bf16 {c['matmul_bf16_flops'] / 1e9:.1f} GFLOP/s")


def describe_inference(i: dict[str, Any]) -> str:
    return (f"inference: pyfunc {i['pyfunc_images_per_second']:.1f} img/s on PNG bytes, members raw "
            f"{i['members_raw_images_per_second']:.1f} img/s -> {i['ratio']:.1%}")


def describe_search(s: dict[str, Any]) -> str:
    p, n = s["with_pruning"], s["without_pruning"]
    return (f"search: epochs to within 1 pt of the final best: {s['pruner']} {p['epochs_to_within_1pt']} "
            f"(best {p['final_best']:.3f}, {p['total_epochs']} epochs in all), none {n['epochs_to_within_1pt']} "
            f"(best {n['final_best']:.3f}, {n['total_epochs']} in all) -> {s['epoch_ratio']:.2f}")


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return format(value, spec)


def format_table(out: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []
    for arch, fig in out.get("training", {}).items():
        r, o = fig.get("reference", {}), fig.get("ours", {})
        ratio = lambda key: _fmt(fig.get(key), ".2f") + "x" if key in fig else "-"  # noqa: E731
        rows += [
            (f"{arch} train img/s (1 epoch)", _fmt(r.get("train_images_per_second")),
             _fmt(o.get("train_images_per_second")), ratio("train_speedup")),
            (f"{arch} eval img/s", _fmt(r.get("eval_images_per_second")), _fmt(o.get("eval_images_per_second")),
             ratio("eval_speedup")),
            (f"{arch} best val acc ({fig['epochs']} ep)", _fmt(r.get("best_val_accuracy"), ".3f"),
             _fmt(o.get("best_val_accuracy"), ".3f"),
             f"gap {fig['parity']['gap']:+.3f} (2se {fig['parity']['two_se']:.3f})" if "parity" in fig else "-"),
            (f"{arch} data time / epoch", "-", _fmt(o.get("data_fraction"), ".1%"), "target < 10%"),
        ]
    if "data" in out:
        d = out["data"]
        rows.append(("cache build / load s", "-", f"{d['cache_build_seconds']:.2f} / {d['cache_load_seconds']:.2f}",
                     f"{d['train_total']}+{d['validation']} images"))
    if "ceiling" in out:
        c = out["ceiling"]
        rows.append(("matmul GFLOP/s fp32 / bf16", "-",
                     f"{c['matmul_fp32_flops'] / 1e9:.1f} / {c['matmul_bf16_flops'] / 1e9:.1f}",
                     f"{c['matmul_size']}^3"))
        for arch, a in c["archs"].items():
            rows.append((f"{arch} train GFLOP/s (% of peak)",
                         f"{a['reference_flops'] / 1e9:.1f} ({a['reference_fraction_of_peak']:.1%} fp32)"
                         if "reference_flops" in a else "-",
                         f"{a['ours_flops'] / 1e9:.1f} ({a['ours_fraction_of_peak']:.1%} {a['ours_peak']})"
                         if "ours_flops" in a else "-",
                         f"{a['train_flops_per_image'] / 1e9:.3f} GFLOP/img"))
    if "inference" in out:
        i = out["inference"]
        rows.append(("ensemble predict img/s (PNG)", f"members raw {i['members_raw_images_per_second']:.1f}",
                     f"pyfunc {i['pyfunc_images_per_second']:.1f}", f"{i['ratio']:.1%} (target >= 80%)"))
    if "search" in out:
        s = out["search"]
        rows.append(("search epochs to within 1 pt", f"none {s['without_pruning']['epochs_to_within_1pt']}",
                     f"{s['pruner']} {s['with_pruning']['epochs_to_within_1pt']}",
                     f"{s['epoch_ratio']:.2f} (target <= 0.5)"))
        cross = s["pruned_epochs_to_within_1pt_of_unpruned_best"]
        rows.append(("  ... to within 1 pt of unpruned best", f"none {s['without_pruning']['epochs_to_within_1pt']}",
                     f"{s['pruner']} {cross if cross is not None else 'never'}",
                     _fmt(s["cross_epoch_ratio"], ".2f")))
        rows.append(("search final best / all epochs",
                     f"{s['without_pruning']['final_best']:.3f} / {s['without_pruning']['total_epochs']}",
                     f"{s['with_pruning']['final_best']:.3f} / {s['with_pruning']['total_epochs']}",
                     f"{s['total_epoch_ratio']:.2f}"))
    header = ("figure", "reference / baseline", "ours", "ratio / note")
    widths = [max(len(str(row[k])) for row in [header, *rows]) for k in range(4)]
    line = lambda row: "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
    targets = ", ".join(f"{k}={_fmt(v)}" for k, v in out["targets"].items())
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows),
                      f"targets: {targets}",
                      "seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in out["section_seconds"].items()),
                      f"bench took {out['seconds']:.0f}s; load average "
                      f"{out['machine']['loadavg_start']} at start, {out['machine']['loadavg_end']} at end "
                      "(figures taken on a busy machine are noisy)"])


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        return _finite(value.item())
    return value


def flat_figures(value: Any, prefix: str = "") -> dict[str, float]:
    """Every number in ``out`` as ``section.key`` -> float (booleans as 0/1), for MLflow metrics."""
    flat: dict[str, float] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            flat.update(flat_figures(v, f"{prefix}{k}."))
    elif isinstance(value, (bool, int, float)) and not isinstance(value, str):
        if math.isfinite(float(value)):
            flat[prefix[:-1]] = float(value)
    return flat


def log_bench_run(out: dict[str, Any], experiment: str) -> str:
    """The bench as one MLflow run: settings as params, every figure as a metric, the JSON as an artifact."""
    from . import tracking

    client = tracking.client()
    run_id, _ = tracking.open_run(client, experiment, "bench", tags={"kind": "bench"})  # `mlflow run`'s, or new
    tracking.log_params(client, run_id, {f"bench.{k}": v for k, v in out["settings"].items()})
    tracking.log_metrics(client, run_id, flat_figures({k: v for k, v in out.items() if k != "settings"}))
    client.log_dict(run_id, _finite(out), "bench.json")
    tracking.end_run(client, run_id, "FINISHED")
    return run_id
