"""A member's speed, measured in a few seconds: what a time budget's plan is made from."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import DataConfig, ModelConfig, TrainConfig
from ..data import BatchAugmenter, Dataset
from ..models import build_model
from ..rng import RunRandom, global_draws
from .device import on_device, resolve_device, resolve_precision, synchronize
from .loop import TrainStep, make_optimizer, predict_logits, train_one_epoch

PROBE_BATCH = 32  # images per timed step


def probe_batch(train_cfg: TrainConfig, data: Dataset) -> int:
    return min(PROBE_BATCH, train_cfg.batch_size, len(data.train.labels))


def _probe_step(model_cfg: ModelConfig, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                data_cfg: DataConfig, train_cfg: TrainConfig, batch: int) -> tuple[Callable[[int], float], TrainStep]:
    """A training step of this configuration as the runs take it: (``train(n)``: seconds for ``n``
    steps of ``batch`` images, the step with its model, augmenter, device and precision)."""
    device = resolve_device(train_cfg.device)
    precision = resolve_precision(train_cfg.precision, device)
    with global_draws(train_cfg.seed):
        model = build_model(model_cfg).to(device, memory_format=torch.channels_last)
    random = RunRandom(train_cfg.seed, device)
    augment = BatchAugmenter(data_cfg.augment, data_cfg.normalize, device, num_classes, random=random)
    optimizer = make_optimizer(model, train_cfg, device)
    x, y = on_device(images, device), on_device(labels, device)
    step = TrainStep(model, optimizer, nn.CrossEntropyLoss(), augment, device, precision, train_cfg.micro_batch)

    def train(n: int) -> float:
        t0 = time.perf_counter()
        train_one_epoch(step, x, y, batch, random.cpu, limit=n * batch)
        synchronize(device)
        return time.perf_counter() - t0

    return train, step


def measure_speed(model_cfg: ModelConfig, data: Dataset, data_cfg: DataConfig, train_cfg: TrainConfig,
                  steps: int = 2, warmed: Callable[[], None] | None = None) -> tuple[float, float]:
    """(training images per second, evaluation seconds per image) of this configuration: ``steps``
    training steps of ``probe_batch`` images after one untimed warm-up step, and the faster of two passes
    over an evaluation batch (a few seconds in all: the probe's time comes out of the budget it plans; per-image
    speed of these convnets on a CPU barely depends on the batch size). ``warmed`` is called between
    the warm-up and the timed steps."""
    batch = probe_batch(train_cfg, data)
    train, step = _probe_step(
        model_cfg, data.train.images, data.train.labels, data.num_classes, data_cfg, train_cfg, batch)
    train(1)
    if warmed is not None:
        warmed()
    seconds = train(steps)
    val = on_device(data.validation.images, step.device)
    n_eval = min(len(val), train_cfg.eval_batch_size)

    def evaluate() -> float:
        t0 = time.perf_counter()
        predict_logits(step.model, val[:n_eval], step.augment.normalizer, step.device, step.precision,
                       train_cfg.eval_batch_size)
        synchronize(step.device)
        return time.perf_counter() - t0

    # The first pass at a new batch shape builds its kernels (measured here: 134 images/s cold against
    # 224 warm for cnn_v1): the faster of two passes is the speed the audit will see.
    eval_seconds = min(evaluate(), evaluate())
    return steps * batch / seconds, eval_seconds / max(n_eval, 1)


@dataclass(frozen=True)
class Load:
    """What a load process of ``measure_speed_shared`` trains: the measured configuration on a few of
    the same images, at the measuring process's thread count."""

    model_cfg: ModelConfig
    data_cfg: DataConfig
    train_cfg: TrainConfig
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    batch: int
    threads: int


def measure_speed_shared(model_cfg: ModelConfig, data: Dataset, data_cfg: DataConfig, train_cfg: TrainConfig,
                         processes: int, start_seconds: float = 120.0) -> tuple[float, float, int]:
    """``measure_speed`` while ``processes - 1`` other processes train the same configuration on the
    same device (one GPU, or this CPU's cores at the calling process's thread count): the speed each of
    ``processes`` workers stepping at once gets. Returns (training images/s, evaluation s/image, the
    processes that stepped together: 1 when the others could not start within ``start_seconds``)."""
    if processes <= 1:
        return (*measure_speed(model_cfg, data, data_cfg, train_cfg), 1)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked CUDA context or locks
    ready, stop = context.Barrier(processes), context.Event()
    batch = probe_batch(train_cfg, data)
    load = Load(model_cfg, data_cfg, train_cfg, data.train.images[:4 * batch].clone(),
                data.train.labels[:4 * batch].clone(), data.num_classes, batch, torch.get_num_threads())
    others = [context.Process(target=step_until, args=(load, ready, stop, start_seconds), daemon=True)
              for _ in range(processes - 1)]
    together = processes

    def warmed() -> None:
        nonlocal together
        try:
            ready.wait(timeout=start_seconds)
        except threading.BrokenBarrierError:
            together = 1  # measured alone: the caller says so

    try:
        for proc in others:
            proc.start()
        rate, eval_rate = measure_speed(model_cfg, data, data_cfg, train_cfg, warmed=warmed)
    finally:
        stop.set()
        for proc in others:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return rate, eval_rate, together


def step_until(load: Load, ready, stop, start_seconds: float) -> None:
    """A load process of ``measure_speed_shared``: warm up, meet the others, then train until told to stop."""
    torch.set_num_threads(load.threads)
    train, _ = _probe_step(load.model_cfg, load.images, load.labels, load.num_classes, load.data_cfg, load.train_cfg,
                           load.batch)
    train(1)
    try:
        ready.wait(timeout=start_seconds)
    except threading.BrokenBarrierError:
        return
    while not stop.is_set():
        train(1)
