"""Randomness a training run owns, so runs in threads (``tune --n-jobs``) neither perturb each other
nor depend on which thread got there first.

A run draws shuffling, augmentation and dropout masks from its own generators (``RunRandom``),
never from torch's global generator. The few draws that cannot take a generator (torchvision's v2
transforms, CutMix/MixUp, ``nn.init`` when a network is built) run inside ``global_draws(seed)``:
under one process-wide lock, with the global CPU generator set to a seed the run chose and restored
afterwards, so no other thread sees or changes it meanwhile. A leaf: imports nothing of the package.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Iterator

import torch
from torch import nn

_GLOBAL = threading.RLock()  # held while torch's global CPU generator is borrowed
SEED_BOUND = 2 ** 62


@contextlib.contextmanager
def global_draws(seed: int) -> Iterator[None]:
    """Run the block with torch's global CPU generator seeded by ``seed``, then put its state back.
    Only the CPU generator is touched: CUDA generators (other threads' trials) are left alone."""
    with _GLOBAL:
        state = torch.random.get_rng_state()
        torch.random.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            torch.random.set_rng_state(state)


class RunRandom:
    """One run's generators: ``cpu`` for host-side draws (shuffling, seeds of global draws) and
    ``device`` for draws on the training device (augmentation parameters, dropout masks)."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self.cpu = torch.Generator().manual_seed(seed)
        self.device = self.cpu if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)

    def next_seed(self) -> int:
        """A fresh seed for one ``global_draws`` block, from this run's own sequence."""
        return int(torch.randint(SEED_BOUND, (1,), generator=self.cpu))


# ------------------------------------------------------------------ dropout from a run's generator

def _dropout_forward(module: nn.Module, generator: torch.Generator):
    """``module``'s forward with its mask drawn from ``generator``: the same distribution and scaling
    as torch's (element-wise, or whole channels for Dropout1d/2d/3d)."""
    channelwise = isinstance(module, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = float(self.p)
        if not self.training or p == 0.0:
            return x
        if p >= 1.0:
            return torch.zeros_like(x)
        # One value per (sample, channel) for channel dropout, per element otherwise.
        shape = x.shape[:2] + (1,) * (x.dim() - 2) if channelwise and x.dim() > 2 else x.shape
        keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p, generator=generator)
        return x * keep.div_(1.0 - p)

    return types.MethodType(forward, module)


DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


@contextlib.contextmanager
def seeded_dropout(model: nn.Module, generator: torch.Generator) -> Iterator[nn.Module]:
    """Inside the block, every dropout layer of ``model`` draws its masks from ``generator``. The
    layers themselves are unchanged (no state, same class); only their forward is redirected."""
    patched = [m for m in model.modules() if type(m) in DROPOUTS]
    for module in patched:
        module.forward = _dropout_forward(module, generator)
    try:
        yield model
    finally:
        for module in patched:
            del module.forward
