"""``torch.compile`` against eager for the training step and evaluation, per mode.

Measured on synthetic batches of the dataset's shape (the step alone, no data path), with the
same precision and memory format as ``fit``. A mode is worth adopting only if it is at least
``ADOPT_SPEEDUP`` faster after its compile time, with the same numbers: the first steps' losses
from the same initial weights agree to ``LOSS_TOLERANCE``.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..models import build_model
from ..train import autocast, synchronize
from .settings import REFERENCE_BATCH
from .timing import time_repeated

MODES = ("default", "max-autotune-no-cudagraphs")
CUDA_MODES = ("reduce-overhead",)  # CUDA graphs: one replay instead of ~300 launches per step
ADOPT_SPEEDUP = 1.2
LOSS_TOLERANCE = 1e-2


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                device: torch.device, precision: str) -> torch.Tensor:
    with autocast(device, precision):
        loss = nn.functional.cross_entropy(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()  # read by the caller only outside the timed steps: no sync per step


def _measure(model: nn.Module, mode: str | None, x: torch.Tensor, y: torch.Tensor, device: torch.device,
             precision: str, steps: int) -> dict[str, Any]:
    """Compile (or not), run 3 steps (compiling on the first), then time ``steps`` train steps and
    ``steps`` evaluation batches."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type in ("cpu", "cuda"))
    runner = torch.compile(model, mode=mode) if mode else model
    t0 = time.perf_counter()
    losses = [float(_train_step(runner, optimizer, x, y, device, precision)) for _ in range(3)]
    first = time.perf_counter() - t0
    train = steps * time_repeated(lambda: _train_step(runner, optimizer, x, y, device, precision), steps, device)
    runner.eval()

    def forward() -> None:
        with torch.inference_mode(), autocast(device, precision):
            runner(x)

    t0 = time.perf_counter()
    forward()  # evaluation compiles its own graph
    synchronize(device)
    eval_first = time.perf_counter() - t0
    evaluation = steps * time_repeated(forward, steps, device)
    runner.train()
    return {"losses": losses, "first_steps_seconds": first + eval_first,
            "train_images_per_second": steps * len(x) / train, "eval_images_per_second": steps * len(x) / evaluation}


def bench_compile(archs: tuple[str, ...], num_classes: int, shape: tuple[int, int, int], device: torch.device,
                  precision: str, steps: int = 20, seed: int = 0) -> dict[str, Any]:
    modes = MODES + (CUDA_MODES if device.type == "cuda" else ())
    out: dict[str, Any] = {"modes": list(modes), "steps": steps, "batch_size": REFERENCE_BATCH, "archs": {}}
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(REFERENCE_BATCH, *shape, generator=generator).to(device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (REFERENCE_BATCH,), generator=generator).to(device)
    for arch in archs:
        torch.manual_seed(seed)
        model = build_model(ModelConfig(arch=arch, num_classes=num_classes)).to(
            device, memory_format=torch.channels_last)
        eager = _measure(model, None, x, y, device, precision, steps)
        row: dict[str, Any] = {"eager": eager}
        for mode in modes:
            torch._dynamo.reset()  # each mode compiles from scratch: its compile time is its own
            fig = _measure(model, mode, x, y, device, precision, steps)
            fig["train_speedup"] = fig["train_images_per_second"] / eager["train_images_per_second"]
            fig["eval_speedup"] = fig["eval_images_per_second"] / eager["eval_images_per_second"]
            fig["max_loss_difference"] = max(abs(a - b) for a, b in zip(fig["losses"], eager["losses"], strict=False))
            same = fig["max_loss_difference"] <= LOSS_TOLERANCE
            fig["adopt_train"] = bool(same and fig["train_speedup"] >= ADOPT_SPEEDUP)
            fig["adopt_eval"] = bool(same and fig["eval_speedup"] >= ADOPT_SPEEDUP)
            row[mode] = fig
        out["archs"][arch] = row
    return out
