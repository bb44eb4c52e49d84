"""Batch-wise augmentation and normalisation on the training device (torchvision.transforms.v2).

A v2 transform called on a batch draws one set of random parameters for the whole batch, so the
batch is cut into groups of ``group_size`` images, each with its own draw: per-group variety at
batch-op speed, with no per-sample work in worker processes.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
POLICIES = ("none", "geometric", "color")


def build_policy(name: str) -> v2.Transform | None:
    """The two reference solutions' training augmentations, by name."""
    if name == "none":
        return None
    if name == "geometric":  # reference 1
        return v2.Compose([
            v2.RandomRotation(15),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomPerspective(distortion_scale=0.2, p=0.3),
        ])
    if name == "color":  # reference 2
        return v2.Compose([
            v2.RandomHorizontalFlip(0.5),
            v2.RandomRotation(15),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
            v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.0))], p=0.3),
        ])
    raise ValueError(f"unknown augmentation policy {name!r}; choose one of {', '.join(POLICIES)}")


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


class BatchAugmenter:
    """Training-time batch transform: augment per group, optional CutMix/MixUp, normalise."""

    def __init__(self, policy: str, normalize: str, device: torch.device, num_classes: int,
                 cutmix_alpha: float = 0.0, mixup_alpha: float = 0.0, group_size: int = 8):
        self.policy = build_policy(policy)
        self.mix = build_mix(cutmix_alpha, mixup_alpha, num_classes)
        self.normalizer = Normalizer(normalize, device)
        self.group_size = group_size

    @property
    def soft_labels(self) -> bool:
        return self.mix is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalizer.scale(x)
        if self.policy is not None:
            x = torch.cat([self.policy(chunk) for chunk in x.split(self.group_size)])
        if self.mix is not None and len(x) > 1:
            x, y = self.mix(x, y)
        elif self.mix is not None:
            y = torch.nn.functional.one_hot(y, self.mix_classes()).float()
        return self.normalizer(x), y

    def mix_classes(self) -> int:
        mix = self.mix.transforms[0] if isinstance(self.mix, v2.RandomChoice) else self.mix
        return mix.num_classes
