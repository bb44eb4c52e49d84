"""No host sync inside a training or evaluation step on CUDA: one real step of each member under
``torch.cuda.set_sync_debug_mode("error")`` (any ``.item()``, host copy or data-dependent shape
raises). Skipped without CUDA; the CPU-side equivalents (cached constants, the batched policies'
sync-free paths) are in test_bench.py and test_augment_color.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.data import BatchAugmenter
from pipeline.models import build_model
from pipeline.rng import RunRandom
from pipeline.train.loop import TrainStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("policy", ["geometric", "color", "shift"])
@pytest.mark.parametrize("arch", ["cnn_v1", "cnn_v2"])
def test_a_training_and_an_evaluation_step_never_wait_for_the_host(arch: str, policy: str) -> None:
    device = torch.device("cuda")
    model = build_model(ModelConfig(arch=arch)).to(device, memory_format=torch.channels_last)
    images = torch.randint(0, 256, (256, 3, 100, 100), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 5, (256,), device=device)
    augment = BatchAugmenter(policy, "imagenet", device, 5, random=RunRandom(0, device))
    step = TrainStep(model, torch.optim.AdamW(model.parameters(), fused=True), nn.CrossEntropyLoss(),
                     augment, device, "bf16")
    order = torch.randperm(256, device=device)

    def one_step(idx: torch.Tensor) -> None:
        x, target = augment(images[idx], labels[idx])
        step.update(x, target, labels[idx])
        with torch.inference_mode():
            model.eval()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(augment.normalizer(images[idx]))
            model.train()

    one_step(order[:64])  # warm-up: cuDNN autotuning and lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        one_step(order[64:128])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
