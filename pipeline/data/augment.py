"""Batch-wise augmentation and normalisation on the training device.

Every policy draws its own parameters per image, as the reference solutions' per-sample torchvision
transforms do, and runs whole-batch kernels on the training device: ``geometric`` (reference 1,
``geometric.BatchGeometric``), ``color`` (reference 2, ``color.BatchColor``), ``shift`` (flip and
whole-pixel shift, ``BatchShift``). No per-sample work in worker processes, no draws from torch's
global generator, no host sync on CUDA. CutMix/MixUp stay torchvision's (drawn under ``global_draws``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from ..rng import RunRandom, global_draws
from .color import BatchColor
from .geometric import BatchGeometric

NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

Policy = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]

# The two reference solutions' training augmentations and a resampling-free one, by name
# (config.AUGMENT_POLICIES lists the same names).
POLICIES: dict[str, Callable[[], Policy | None]] = {
    "none": lambda: None, "geometric": BatchGeometric, "color": BatchColor, "shift": lambda: BatchShift()}


def build_policy(name: str) -> Policy | None:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown augmentation policy {name!r}; choose one of {', '.join(POLICIES)}") from None


def build_mix(cutmix_alpha: float, mixup_alpha: float, num_classes: int) -> v2.Transform | None:
    mixes = []
    if cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


class Normalizer:
    """uint8 NCHW → normalised float, channels_last, on the batch's device."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in NORMALIZATION:
            raise ValueError(f"unknown normalisation {mode!r}; choose one of {', '.join(NORMALIZATION)}")
        mean, std = NORMALIZATION[mode]
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = self.scale(x)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


class BatchShift:
    """Horizontal flip (p=0.5) and a shift by up to ``pixels`` whole pixels in x and y (zero fill), per
    image, batched. No resampling: the generators' pixel-grid artefacts, which tell the classes apart,
    are moved, never interpolated (the ablation in docs/ablation.md measures it against ``geometric``)."""

    def __init__(self, pixels: int = 6, flip_p: float = 0.5):
        self.pixels, self.flip_p = pixels, flip_p

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, _, h, w = x.shape
        if n == 0:
            return x
        p = self.pixels
        flip = torch.rand(n, device=x.device, generator=generator) < self.flip_p
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
        dy, dx = torch.randint(0, 2 * p + 1, (2, n, 1), device=x.device, generator=generator)
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        rows = (dy + torch.arange(h, device=x.device)).view(n, 1, h, 1)  # crop window of each image
        cols = (dx + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        chans = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        return padded[batch, chans, rows, cols]


class BatchAugmenter:
    """Training-time batch transform: augment (per-image parameters, whole-batch kernels), optional
    CutMix/MixUp, normalise.

    With ``random`` (a run's own generators) every draw is the run's: the policy samples from its
    device generator, and the mixes, which draw from torch's global generator, run inside
    ``global_draws`` with a seed from the run's sequence. Without it, torch's global generator is used."""

    def __init__(self, policy: str, normalize: str, device: torch.device, num_classes: int,
                 cutmix_alpha: float = 0.0, mixup_alpha: float = 0.0, random: RunRandom | None = None):
        self.policy = build_policy(policy)
        self.mix = build_mix(cutmix_alpha, mixup_alpha, num_classes)
        self.normalizer = Normalizer(normalize, device)
        self.random = random

    def _global(self, fn, *args):
        """``fn(*args)``, its global-generator draws taken from this run's sequence when it has one."""
        if self.random is None:
            return fn(*args)
        with global_draws(self.random.next_seed()):
            return fn(*args)

    @property
    def soft_labels(self) -> bool:
        return self.mix is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalizer.scale(x)
        if self.policy is not None:
            x = self.policy(x, self.random.device if self.random is not None else None)
        if self.mix is not None and len(x) > 1:
            x, y = self._global(self.mix, x, y)
        elif self.mix is not None:
            y = torch.nn.functional.one_hot(y, self.mix_classes()).float()
        return self.normalizer(x), y

    def mix_classes(self) -> int:
        mix = self.mix.transforms[0] if isinstance(self.mix, v2.RandomChoice) else self.mix
        return mix.num_classes
