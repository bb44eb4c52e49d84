"""The pieces of one training loop for every architecture: an epoch of steps, evaluation, the
result of a run (``fit.py`` puts them together).

Nothing here knows MLflow or Optuna.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import EVAL_BATCH, TrainConfig, parse_class_weights
from ..data import BatchAugmenter, Normalizer
from .device import autocast

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
    ended: bool = False  # the run's length ran out inside this epoch


@dataclass
class FitResult:
    """``best_*``: the kept weights (see ``kept``), their epoch and their selection-split accuracy: the
    last weights of a decaying schedule, the best epoch of ``plateau``."""

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
    stop_reason: str = "max_epochs"  # max_epochs | deadline | early_stopping | a listener's reason
    device: str = "cpu"
    precision: str = "fp32"
    epoch_stats: list[EpochStats] = field(default_factory=list)  # per epoch: images, seconds, data seconds
    images: int = 0  # training images seen
    eval_seconds: float = 0.0  # wall seconds spent evaluating the selection split
    wall_seconds: float = 0.0  # wall seconds of the whole fit (set-up, training, evaluation)
    kept: str = "last weights"  # which weights are the run's model: last weights | EMA of the weights | best epoch

    @property
    def eval_fraction(self) -> float:
        return self.eval_seconds / self.wall_seconds if self.wall_seconds else 0.0


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


@dataclass(frozen=True)
class TrainStep:
    """How one training step is made, the same for every epoch of a run: the batch is augmented, run
    through ``model`` at ``precision`` on ``device`` (in parts of ``micro_batch`` images when set), scored
    by ``loss_fn`` and applied by ``optimizer``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    augment: BatchAugmenter
    device: torch.device
    precision: str
    micro_batch: int | None = None

    def update(self, x: torch.Tensor, target: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward and optimiser step on an augmented batch; (loss, correct count) stay on
        the device: nothing here waits for the host (tests/test_cuda.py runs it under sync debug).
        In parts, each part's mean loss is weighted by its share of the batch, so the summed gradients
        are the whole batch's mean-loss gradients (exactly, but for BatchNorm's per-part statistics and
        class weights' per-part normalisation); only one part's activations are alive at a time."""
        self.optimizer.zero_grad(set_to_none=True)
        parts = micro_batches(len(x), self.micro_batch)
        loss_sum = right = None  # no extra kernels in the usual one-part step (this is the hot path)
        for part in parts:
            with autocast(self.device, self.precision):
                logits = self.model(x[part])
                loss = self.loss_fn(logits.float(), target[part])
            if len(parts) > 1:
                loss = loss * ((part.stop - part.start) / len(x))
            loss.backward()
            hits = (logits.argmax(1) == y[part]).sum()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            right = hits if right is None else right + hits
        self.optimizer.step()
        return loss_sum, right


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The run's optimiser, as ``cfg`` names it. The speed probe and the memory bench build the same one,
    so what they measure is the run's step."""
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # The fused kernel updates every parameter in one pass (cnn_v2 on one CPU thread: 22 -> 3 ms per step).
    return cls(model.parameters(), lr=cfg.applied_lr, weight_decay=cfg.weight_decay,
               fused=device.type in ("cpu", "cuda"))


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Slices of a batch of ``n`` in parts of ``size`` (None: one part); a last part of one image joins
    the part before it (BatchNorm cannot train on one image)."""
    if not size or size >= n:
        return [slice(0, n)]
    starts = list(range(0, n, size))
    if n - starts[-1] < 2:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, [*starts[1:], n], strict=True)]


def train_one_epoch(step: TrainStep, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                    generator: torch.Generator, progress: bool = False, limit: int | None = None,
                    before_step: Callable[[int], bool] | None = None) -> EpochStats:
    """One pass over the training images (over ``limit`` of them, drawn afresh, when given).
    ``before_step(images_seen_this_epoch)`` sets the step's learning rate and returns False when the
    run is over (a deadline): the epoch ends there, ``EpochStats.ended`` says so."""
    model, device = step.model, step.device
    model.train()
    order = torch.randperm(len(labels), generator=generator)[:limit].to(images.device)
    n = len(order)
    # Sums stay on the device: no host sync per batch.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    data_seconds = 0.0
    ended = False
    start = time.perf_counter()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()  # BatchNorm cannot train on a batch of one
    for idx in _progress(batches, progress, leave=False, desc="batches"):
        if before_step is not None and not before_step(seen):
            ended = True
            break
        t0 = time.perf_counter()
        x = images[idx].to(device, non_blocking=True)
        y = labels[idx].to(device, non_blocking=True)
        x, target = step.augment(x, y)
        data_seconds += time.perf_counter() - t0
        loss, right = step.update(x, target, y)
        loss_sum += loss * len(y)
        correct += right
        seen += len(y)
    mean_loss = (loss_sum / max(seen, 1)).item() if seen else 0.0
    if not np.isfinite(mean_loss):
        raise NonFiniteLossError(f"training loss is {mean_loss}: the run diverged (try a lower learning rate)")
    return EpochStats(mean_loss, correct.item() / max(seen, 1), seen, time.perf_counter() - start, data_seconds,
                      ended)


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
