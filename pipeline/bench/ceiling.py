"""The hardware ceiling: matmul FLOP/s, and the share of it each training step reaches."""

from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig
from ..data import Dataset
from ..models import build_model
from ..train import bf16_native, synchronize
from .settings import REFERENCE_BATCH, BenchSettings
from .timing import time_repeated


def matmul_flops(n: int, dtype: torch.dtype, device: torch.device, reps: int | None = None) -> float:
    """FLOP/s of an n x n x n matmul (2 n^3 FLOPs), averaged over ``reps`` back-to-back calls after one
    warm-up (default 20 on a GPU, where one call is about a launch's worth of time, 5 on the CPU),
    timed with CUDA events on a GPU."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    synchronize(device)
    reps = reps or (20 if device.type == "cuda" else 5)
    return 2 * n ** 3 / time_repeated(lambda: torch.mm(a, b), reps, device)


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
    peaks = {"fp32": matmul_flops(settings.matmul_size, torch.float32, device), "bf16": float("nan")}
    # Without native bf16 (AVX2-only CPUs) torch emulates it at ~1 GFLOP/s: a 2048^3 matmul would
    # take minutes and measure nothing our training uses (precision auto picks fp32 there).
    if bf16_native(device):
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
