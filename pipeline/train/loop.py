"""One training loop for every architecture.

``fit`` knows nothing of MLflow or Optuna: it calls ``report(epoch, metrics)`` after each epoch and
returns a ``FitResult``. A listener may raise to stop training (the tuner's pruner does); the
exception propagates unchanged.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import metric_names as M
from ..config import EVAL_BATCH, DataConfig, TrainConfig, parse_class_weights
from ..data import BatchAugmenter, Dataset, Normalizer
from ..rng import RunRandom, seeded_dropout
from .device import autocast, on_device, resolve_device, resolve_precision

Report = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite: the configuration diverged."""


class StopTraining(Exception):
    """Raised by a report listener to end training after this epoch: ``fit`` returns what it has
    (the best state so far), with the message as its stop reason (a time budget uses this)."""


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float
    data_seconds: float  # indexing, augmentation and normalisation, outside forward/backward


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    val_probs: np.ndarray  # validation softmax of the best state, N x C, float32
    val_logits: np.ndarray | None = None  # its logits (temperature scaling needs them), N x C
    val_logits_flipped: np.ndarray | None = None  # logits of the horizontally flipped images (test-time flip)
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    data_fraction: float = 0.0
    stop_reason: str = "max_epochs"  # max_epochs | early_stopping | a listener's reason (e.g. the time budget)
    device: str = "cpu"
    precision: str = "fp32"
    epoch_stats: list[EpochStats] = field(default_factory=list)  # per epoch: images, seconds, data seconds


def seed_everything(seed: int) -> None:
    """Reseed every global generator: for scripts and tests; ``fit`` draws only from its own."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def class_weight_tensor(spec: str, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    parsed = parse_class_weights(spec)
    if parsed == "none":
        return None
    if parsed == "balanced":
        counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
        return counts.sum() / (num_classes * counts)
    return torch.tensor(parsed, dtype=torch.float32)


def _progress(iterable, enabled: bool, **kwargs):
    # Quiet when not a terminal: logs of batch jobs stay readable.
    return tqdm(iterable, disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True, **kwargs)


def train_one_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, augment: BatchAugmenter,
                    optimizer: torch.optim.Optimizer, loss_fn: nn.Module, batch_size: int,
                    device: torch.device, precision: str, generator: torch.Generator,
                    progress: bool = False, limit: int | None = None) -> EpochStats:
    """One pass over the training images (over ``limit`` of them, drawn afresh, when given)."""
    model.train()
    order = torch.randperm(len(labels), generator=generator)[:limit].to(images.device)
    n = len(order)
    # Sums stay on the device: no host sync per batch.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    data_seconds = 0.0
    start = time.perf_counter()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()  # BatchNorm cannot train on a batch of one
    for idx in _progress(batches, progress, leave=False, desc="batches"):
        t0 = time.perf_counter()
        x = images[idx].to(device, non_blocking=True)
        y = labels[idx].to(device, non_blocking=True)
        x, target = augment(x, y)
        data_seconds += time.perf_counter() - t0
        with autocast(device, precision):
            logits = model(x)
            loss = loss_fn(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    mean_loss = (loss_sum / max(seen, 1)).item()
    if not np.isfinite(mean_loss):
        raise NonFiniteLossError(f"training loss is {mean_loss}: the run diverged (try a lower learning rate)")
    return EpochStats(mean_loss, correct.item() / max(seen, 1), seen, time.perf_counter() - start, data_seconds)


@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor, normalizer: Normalizer, device: torch.device,
                   precision: str, batch_size: int = EVAL_BATCH, flip: bool = False) -> torch.Tensor:
    """Logits (float32, on the CPU) for uint8 images; ``flip``: of their horizontal mirror images."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True)
        x = normalizer(x.flip(-1) if flip else x)
        with autocast(device, precision):
            logits = model(x)
        out.append(logits.float())
    return torch.cat(out).cpu()


def predict_probs(model: nn.Module, images: torch.Tensor, normalizer: Normalizer, device: torch.device,
                  precision: str, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Softmax probabilities (float32, on the CPU) for uint8 images."""
    return torch.softmax(predict_logits(model, images, normalizer, device, precision, batch_size), dim=1)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalizer: Normalizer,
             device: torch.device, precision: str, batch_size: int) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, accuracy, probabilities, logits) on a labelled split."""
    logits = predict_logits(model, images, normalizer, device, precision, batch_size)
    y = labels.cpu()
    loss = nn.functional.cross_entropy(logits, y).item()
    probs = torch.softmax(logits, dim=1)
    accuracy = (probs.argmax(1) == y).float().mean().item()
    return loss, accuracy, probs, logits


def fit(model: nn.Module, data: Dataset, data_cfg: DataConfig, cfg: TrainConfig,
        report: Report | None = None, progress: bool = True) -> FitResult:
    """Train ``model``. Shuffling, augmentation and dropout draw from the run's own generators
    (seeded by ``cfg.seed``), never from torch's global one: runs in threads (``tune --n-jobs``)
    neither perturb nor depend on each other."""
    run_random = RunRandom(cfg.seed, resolve_device(cfg.device))
    with seeded_dropout(model, run_random.device):
        return _fit(model, data, data_cfg, cfg, run_random, report, progress)


def _fit(model: nn.Module, data: Dataset, data_cfg: DataConfig, cfg: TrainConfig, run_random: RunRandom,
         report: Report | None, progress: bool) -> FitResult:
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
    model = model.to(device, memory_format=torch.channels_last)
    # On CUDA the whole uint8 dataset lives on the GPU, copied once and shared by every thread's run.
    train_x, train_y = on_device(data.train.images, device), on_device(data.train.labels, device)
    val_x, val_y = on_device(data.validation.images, device), data.validation.labels
    augment = BatchAugmenter(data_cfg.augment, data_cfg.normalize, device, data.num_classes,
                             data_cfg.cutmix_alpha, data_cfg.mixup_alpha, random=run_random)
    normalizer = augment.normalizer
    weights = class_weight_tensor(cfg.class_weights, data.train.labels, data.num_classes)
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None,
                                  label_smoothing=cfg.label_smoothing)
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # The fused kernel updates every parameter in one pass (cnn_v2 on one CPU thread: 22 -> 3 ms per step).
    optimizer = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                        fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=cfg.lr_patience,
                                                           factor=cfg.lr_factor)

    best_acc, best_epoch, best_state, best_probs, best_logits, best_flipped = -1.0, 0, None, None, None, None
    history: list[dict[str, float]] = []
    epoch_stats: list[EpochStats] = []
    train_seconds = images = data_seconds = 0.0
    stop_reason = "max_epochs"
    epochs = _progress(range(1, cfg.epochs + 1), progress, desc="epochs")
    for epoch in epochs:
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(model, train_x, train_y, augment, optimizer, loss_fn, cfg.batch_size,
                                device, precision, run_random.cpu, progress, cfg.images_per_epoch)
        epoch_stats.append(stats)
        train_seconds += stats.seconds
        data_seconds += stats.data_seconds
        images += stats.images
        val_loss, val_acc, probs, logits = evaluate(model, val_x, val_y, normalizer, device, precision,
                                                    cfg.eval_batch_size)
        scheduler.step(val_acc)
        if val_acc > best_acc:
            best_acc, best_epoch, best_probs, best_logits = val_acc, epoch, probs, logits
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            # The mirror images' logits at the best epoch only: the ensemble may choose a test-time flip.
            best_flipped = predict_logits(model, val_x, normalizer, device, precision, cfg.eval_batch_size, flip=True)
        row = {M.TRAIN_LOSS: stats.loss, M.TRAIN_ACCURACY: stats.accuracy, M.VAL_LOSS: val_loss,
               M.VAL_ACCURACY: val_acc, M.LR: lr,
               M.EPOCH_IMAGES_PER_SECOND: stats.images / stats.seconds if stats.seconds else 0.0}
        history.append(row)
        if hasattr(epochs, "set_postfix"):
            epochs.set_postfix(loss=f"{stats.loss:.3f}", val_acc=f"{val_acc:.3f}", best=f"{best_acc:.3f}")
        if report is not None:
            try:
                report(epoch, row)
            except StopTraining as stop:
                stop_reason = str(stop) or "stopped by a listener"
                break
        if epoch - best_epoch >= cfg.early_stop_patience:
            stop_reason = "early_stopping"
            break
    assert best_state is not None and best_probs is not None
    return FitResult(
        best_state=best_state,
        best_epoch=best_epoch,
        best_val_accuracy=best_acc,
        epochs_run=len(history),
        val_probs=best_probs.numpy().astype(np.float32),
        val_logits=best_logits.numpy().astype(np.float32),
        val_logits_flipped=best_flipped.numpy().astype(np.float32),
        history=history,
        train_seconds=train_seconds,
        images_per_second=images / train_seconds if train_seconds else 0.0,
        data_fraction=data_seconds / train_seconds if train_seconds else 0.0,
        epoch_stats=epoch_stats,
        stop_reason=stop_reason,
        device=str(device),
        precision=precision,
    )
