"""The reference way of training, re-implemented faithfully so ``bench`` can measure against it.

What the reference solutions do: a ``Dataset`` whose ``__getitem__`` opens the PNG with PIL on every
access and converts it to RGB, per-sample ``torchvision.transforms`` (reference 1's ``geometric``
policy: RandomRotation(15), RandomHorizontalFlip, RandomPerspective(0.2, p=0.3), then ToTensor and
ImageNet Normalize) run in ``DataLoader(batch_size=32, shuffle=True, num_workers=2)`` workers, fp32,
the default memory format, plain Adam, and an evaluation pass through a ``DataLoader`` too (no
augmentation). Nothing in the product imports this module; only ``bench`` does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from .settings import BenchSettings

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BATCH_SIZE = 32
WORKERS = 2


class PILDataset(torch.utils.data.Dataset):
    """One PNG opened with PIL per ``__getitem__``, every epoch, as the reference does."""

    def __init__(self, paths: list[Path], labels: list[int], transform):
        self.paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as img:
            image = img.convert("RGB")
        return self.transform(image), self.labels[i]


def reference_transform(train: bool, image_size: int | None):
    from torchvision import transforms as T

    steps = [T.Resize((image_size, image_size))] if image_size else []
    if train:
        steps += [T.RandomRotation(15), T.RandomHorizontalFlip(), T.RandomPerspective(distortion_scale=0.2, p=0.3)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(*IMAGENET)])


def reference_loader(paths: list[Path], labels: list[int], train: bool, image_size: int | None, seed: int,
                     batch_size: int = BATCH_SIZE, workers: int = WORKERS) -> DataLoader:
    dataset = PILDataset(paths, labels, reference_transform(train, image_size))
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed))


@dataclass
class ReferenceEpoch:
    train_seconds: float
    train_images: int
    train_loss: float
    eval_seconds: float
    eval_images: int
    val_accuracy: float


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                device: torch.device) -> tuple[float, int, float]:
    """(seconds, images, mean loss) for one pass, worker start-up and decoding included."""
    model.train()
    start = time.perf_counter()
    total, seen = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(y)
        seen += len(y)
    return time.perf_counter() - start, seen, total / max(seen, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, int, float]:
    """(seconds, images, accuracy)."""
    model.eval()
    start = time.perf_counter()
    correct, seen = 0, 0
    for x, y in loader:
        logits = model(x.to(device))
        correct += (logits.argmax(1).cpu() == y).sum().item()
        seen += len(y)
    return time.perf_counter() - start, seen, correct / max(seen, 1)


def reference_fit(model: nn.Module, train_paths: list[Path], train_labels: list[int], val_paths: list[Path],
                  val_labels: list[int], settings: BenchSettings, device: torch.device) -> list[ReferenceEpoch]:
    """Train ``settings.epochs`` epochs the reference way (``settings.lr``, ``settings.seed``, images resized to
    ``settings.image_size`` when set), evaluating after each; returns per-epoch figures."""
    seed, image_size = settings.seed, settings.image_size or None
    torch.manual_seed(seed)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    loss_fn = nn.CrossEntropyLoss()
    train_loader = reference_loader(train_paths, train_labels, True, image_size, seed)
    val_loader = reference_loader(val_paths, val_labels, False, image_size, seed)
    out = []
    for _ in range(settings.epochs):
        t_sec, t_n, loss = train_epoch(model, train_loader, optimizer, loss_fn, device)
        e_sec, e_n, acc = evaluate(model, val_loader, device)
        out.append(ReferenceEpoch(t_sec, t_n, loss, e_sec, e_n, acc))
    return out
