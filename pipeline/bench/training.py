"""Training throughput and accuracy parity: the reference loop against ``build_and_fit`` as ``tune`` runs it."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .. import metrics as M
from ..config import DataConfig, ModelConfig, TrainConfig
from ..data import Dataset, Normalizer
from ..models import build_model
from ..train import autocast, build_and_fit, evaluate, seed_everything, synchronize
from .settings import REFERENCE_BATCH, BenchSettings, reference_paths


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
    synchronize(device)


def run_reference(model_cfg: ModelConfig, data: Dataset, settings: BenchSettings,
                  device: torch.device) -> dict[str, Any]:
    from .reference import reference_fit

    train_paths, train_labels, val_paths, val_labels = reference_paths(data)
    seed_everything(settings.seed)
    model = build_model(model_cfg)
    epochs = reference_fit(model, train_paths, train_labels, val_paths, val_labels, settings, device)
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
    no weight decay, no label smoothing, a constant learning rate (a plateau schedule that never drops)
    and every epoch evaluated, the best kept, as the reference does."""
    return replace(base, epochs=epochs, batch_size=settings.batch_size, lr=settings.lr, weight_decay=0.0,
                   optimizer="adam", label_smoothing=0.0, class_weights="none", schedule="plateau",
                   lr_patience=epochs, early_stop_patience=epochs, seed=settings.seed, device=settings.device)


def run_ours(model_cfg: ModelConfig, data: Dataset, data_cfg: DataConfig, base: TrainConfig,
             settings: BenchSettings) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = bench_train_config(base, settings, settings.epochs)
    # The trial mechanic tune runs; the same seed gives the reference's initial weights.
    result = build_and_fit(model_cfg, data, data_cfg, cfg)
    device = torch.device(result.device)
    model = build_model(model_cfg).to(device, memory_format=torch.channels_last)
    model.load_state_dict(result.best_state)  # evaluation speed does not depend on which weights
    normalizer = Normalizer(data_cfg.normalize, device)
    val_x, val_y = data.validation.images.to(device), data.validation.labels
    eval_rates = []
    for _ in range(settings.epochs):  # as many evaluation passes as the reference times
        synchronize(device)
        t0 = time.perf_counter()
        evaluate(model, val_x, val_y, normalizer, device, result.precision, cfg.eval_batch_size)
        synchronize(device)
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
