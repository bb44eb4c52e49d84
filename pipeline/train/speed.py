"""A member's speed, measured in a few seconds: what a time budget's plan is made from."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..config import DataConfig, ModelConfig, TrainConfig
from ..data import BatchAugmenter, Dataset
from ..models import build_model
from ..rng import RunRandom, global_draws
from .device import on_device, resolve_device, resolve_precision, synchronize
from .loop import TrainStep, make_optimizer, predict_logits, train_one_epoch


def measure_speed(model_cfg: ModelConfig, data: Dataset, data_cfg: DataConfig, train_cfg: TrainConfig,
                  steps: int = 2, batch: int = 32) -> tuple[float, float]:
    """(training images per second, evaluation seconds per image) of this configuration: ``steps``
    training steps of ``batch`` images after one untimed warm-up step, and the faster of two passes
    over an evaluation batch (a few seconds in all: the probe's time comes out of the budget it plans; per-image
    speed of these convnets on a CPU barely depends on the batch size)."""
    device = resolve_device(train_cfg.device)
    precision = resolve_precision(train_cfg.precision, device)
    with global_draws(train_cfg.seed):
        model = build_model(model_cfg).to(device, memory_format=torch.channels_last)
    random = RunRandom(train_cfg.seed, device)
    augment = BatchAugmenter(data_cfg.augment, data_cfg.normalize, device, data.num_classes, random=random)
    optimizer = make_optimizer(model, train_cfg, device)
    x, y = on_device(data.train.images, device), on_device(data.train.labels, device)
    batch = min(batch, train_cfg.batch_size, len(y))
    step = TrainStep(model, optimizer, nn.CrossEntropyLoss(), augment, device, precision, train_cfg.micro_batch)

    def train(n: int) -> float:
        t0 = time.perf_counter()
        train_one_epoch(step, x, y, batch, random.cpu, limit=n * batch)
        synchronize(device)
        return time.perf_counter() - t0

    train(1)
    seconds = train(steps)
    val = on_device(data.validation.images, device)
    n_eval = min(len(val), train_cfg.eval_batch_size)

    def evaluate() -> float:
        t0 = time.perf_counter()
        predict_logits(model, val[:n_eval], augment.normalizer, device, precision, train_cfg.eval_batch_size)
        synchronize(device)
        return time.perf_counter() - t0

    # The first pass at a new batch shape builds its kernels (measured here: 134 images/s cold against
    # 224 warm for cnn_v1): the faster of two passes is the speed the audit will see.
    eval_seconds = min(evaluate(), evaluate())
    return steps * batch / seconds, eval_seconds / max(n_eval, 1)
