"""One member's training and evaluation step on synthetic device batches: images per second, the
share of a step spent outside kernels, and one step under CUDA's sync debug mode.

The step is the real one (``TrainStep.update`` after ``BatchAugmenter``), on uint8 images already on
the device as ``fit`` holds them, so the figures are the step's alone, without the epoch's bookkeeping.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..data import BatchAugmenter
from ..models import build_model
from ..rng import RunRandom
from ..train import autocast, synchronize
from ..train.loop import TrainStep
from .timing import time_repeated

WARM_UP_STEPS = 3  # cuDNN/oneDNN pick kernels on the first calls of a shape


@dataclass(frozen=True)
class StepBench:
    """A member's step on ``device`` at one batch size: the model, its training step and a pool of
    synthetic uint8 images (two batches' worth) it draws batches from."""

    step: TrainStep
    images: torch.Tensor
    labels: torch.Tensor
    batch: int

    def train(self, i: int) -> None:
        idx = slice((i % 2) * self.batch, (i % 2 + 1) * self.batch)
        x, target = self.step.augment(self.images[idx], self.labels[idx])
        self.step.update(x, target, self.labels[idx])

    def evaluate(self, i: int) -> None:
        idx = slice((i % 2) * self.batch, (i % 2 + 1) * self.batch)
        self.step.model.eval()
        with torch.inference_mode(), autocast(self.step.device, self.step.precision):
            self.step.model(self.step.augment.normalizer(self.images[idx]))
        self.step.model.train()


def step_bench(arch: str, policy: str, batch: int, size: int, device: torch.device, precision: str,
               seed: int = 0) -> StepBench:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (2 * batch, 3, size, size), dtype=torch.uint8, generator=generator).to(device)
    labels = torch.randint(0, 5, (2 * batch,), generator=generator).to(device)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch=arch)).to(device, memory_format=torch.channels_last)
    augment = BatchAugmenter(policy, "imagenet", device, 5, random=RunRandom(seed, device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type in ("cpu", "cuda"))
    step = TrainStep(model, optimizer, nn.CrossEntropyLoss(label_smoothing=0.1), augment, device, precision)
    return StepBench(step, images, labels, batch)


def images_per_second(bench: StepBench, steps: int) -> dict[str, float]:
    """Training and evaluation images per second over ``steps`` back-to-back steps each (timed on the
    device's own clock), after ``WARM_UP_STEPS`` of each."""
    device, counter = bench.step.device, itertools.count()
    for _ in range(WARM_UP_STEPS):
        bench.train(next(counter))
        bench.evaluate(next(counter))
    synchronize(device)
    train = time_repeated(lambda: bench.train(next(counter)), steps, device)
    evaluation = time_repeated(lambda: bench.evaluate(next(counter)), steps, device)
    return {"train_images_per_second": bench.batch / train, "eval_images_per_second": bench.batch / evaluation,
            "train_step_ms": 1000 * train}


def busy_seconds(bench: StepBench, steps: int) -> float:
    """Seconds per training step spent inside kernels, by the profiler: on CUDA the GPU's kernel and
    copy time, on the CPU the operators' own time (what is left of the step is Python, dispatch and
    launches)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = bench.step.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            bench.train(i)
        synchronize(bench.step.device)
    events = prof.key_averages()
    total_us = sum(e.self_device_time_total for e in events) if cuda else sum(e.self_cpu_time_total for e in events)
    return total_us / 1e6 / steps


def outside_kernels(bench: StepBench, step_seconds: float, steps: int) -> float:
    """Share of a training step's time (``step_seconds``, timed without the profiler) outside kernels."""
    return min(1.0, max(0.0, 1.0 - busy_seconds(bench, steps) / step_seconds))


def sync_debug_step(bench: StepBench) -> str:
    """One training and one evaluation step with CUDA's sync debug mode at "error" (any host sync in
    the step raises): "passed" on CUDA; on the CPU there is nothing to check and the step simply runs."""
    device = bench.step.device
    bench.train(0)  # warm-up: cuDNN autotuning and lazy initialisation may sync once
    bench.evaluate(1)
    synchronize(device)
    if device.type != "cuda":
        bench.train(2)
        bench.evaluate(3)
        return "not checked (no CUDA: a CPU step has no host sync to find)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        bench.train(2)
        bench.evaluate(3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return "passed"
