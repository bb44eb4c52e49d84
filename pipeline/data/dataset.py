"""A dataset in memory: uint8 image tensors and labels per split, loaded through the decode cache."""

from __future__ import annotations

import hashlib
import mmap
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..config import DEFAULT_DATA, DataConfig
from .cache import default_cache_dir, file_pages, load_images, release_pages
from .layout import DataError, DatasetIndex, index_dataset
from .synth import synthesize


@dataclass
class Split:
    name: str
    images: torch.Tensor  # uint8 N x 3 x H x W
    labels: torch.Tensor | None  # int64 N, None when unlabelled
    ids: list[str]
    cache_file: Path | None = None
    cache_hit: bool = False
    hashes: np.ndarray | None = None  # N x 32 uint8: SHA-256 of each image's decoded pixels
    pages: mmap.mmap | None = None  # the cache file mapping ``images`` reads (None: images in memory)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: np.ndarray, name: str | None = None) -> Split:
        """The rows ``rows`` (in that order) as a split of their own (no copy when that is every row)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == len(self) and (rows == np.arange(len(self))).all():
            return replace(self, name=name or self.name)
        index = torch.as_tensor(rows)
        return Split(name or self.name, self.images[index], None if self.labels is None else self.labels[index],
                     [self.ids[i] for i in rows], self.cache_file, self.cache_hit,
                     None if self.hashes is None else self.hashes[np.asarray(rows, dtype=np.int64)])

    def release_pages(self) -> None:
        """Drop the pages of the cache file read so far from this process's resident set (see
        ``cache.release_pages``); the images stay readable."""
        release_pages(self.pages)

    def counts(self, num_classes: int) -> list[int]:
        if self.labels is None:
            return []
        return torch.bincount(self.labels, minlength=num_classes).tolist()


@dataclass
class Dataset:
    root: Path
    layout: str
    classes: tuple[str, ...]
    train: Split
    validation: Split
    test: Split | None
    digest: str
    load_seconds: float = 0.0
    cache_dir: Path | None = None
    splits: dict[str, Split] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def release_pages(self) -> None:
        """Every split's ``release_pages``: after an epoch or an evaluation pass, the memory-mapped
        images it read stop counting in this process's resident set."""
        for split in (self.train, self.validation, self.test, *self.splits.values()):
            if split is not None:
                split.release_pages()

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise DataError(f"{self.root}: no {name} split (have {', '.join(self.splits)})")
        return self.splits[name]


def ensure_default_data(cfg: DataConfig) -> None:
    """The default root is generated on first use, so every command works on a fresh clone."""
    root = Path(cfg.root)
    if cfg.root == DEFAULT_DATA and not root.exists():
        summary = synthesize(root, cfg.synth_preset, cfg.synth_seed)
        print(f"generated the synthetic dataset ({cfg.synth_preset}) in {root} "
              f"in {summary.seconds:.1f}s")


def load_dataset(cfg: DataConfig, labelled_only: bool = False) -> Dataset:
    """Every split, decoded through the cache; ``labelled_only``: not an unlabelled test split (training
    and its choices never read one, so ``tune`` does not decode it)."""
    start = time.perf_counter()
    ensure_default_data(cfg)
    index = index_dataset(cfg.root)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    names = [n for n, e in index.splits.items() if not (labelled_only and e.labels is None)]
    splits = {name: _load_split(index, name, cfg.image_size, cache_dir) for name in names}
    shape = splits["train"].images.shape[1:]
    for split in splits.values():
        if split.images.shape[1:] != shape:
            raise DataError(
                f"{index.splits[split.name].source}: {split.name} images are {tuple(split.images.shape[2:])}, "
                f"train images {tuple(shape[1:])}; set data.image_size (--image-size) to resize"
            )
    return Dataset(
        root=index.root,
        layout=index.layout,
        classes=index.classes,
        train=splits["train"],
        validation=splits["validation"],
        test=splits.get("test"),
        digest=content_digest(index.classes, splits),
        load_seconds=time.perf_counter() - start,
        cache_dir=cache_dir,
        splits=splits,
    )


def _load_split(index: DatasetIndex, name: str, image_size: int | None, cache_dir: Path) -> Split:
    entry = index.splits[name]
    array, hashes, cache_file, hit = load_images(entry.paths, image_size, cache_dir, name)
    labels = torch.tensor(entry.labels, dtype=torch.int64) if entry.labels is not None else None
    return Split(name, torch.from_numpy(array), labels, list(entry.ids), cache_file, hit, hashes, file_pages(array))


def content_digest(classes: tuple[str, ...], splits: dict[str, Split]) -> str:
    """What the labelled data is, not where: the classes, and per labelled split the sorted (pixel
    hash, label) rows. Equal for the same images and labels at any path, under any file names, in any
    row order; different for any changed pixel, label or split membership. An unlabelled test split
    plays no part in training, choices or scores, so it is not part of the digest."""
    h = hashlib.sha256(("classes=" + ",".join(classes)).encode())
    for name in sorted(splits):
        split = splits[name]
        if split.labels is None:
            continue
        labels = split.labels.tolist() if split.labels is not None else [-1] * len(split)
        rows = sorted(f"{row.tobytes().hex()}:{label}" for row, label in zip(split.hashes, labels, strict=True))
        h.update(f"|{name}:{len(rows)}|".encode() + "\n".join(rows).encode())
    return h.hexdigest()[:16]


def summarize(dataset: Dataset) -> str:
    lines = [
        f"dataset   {dataset.root} ({dataset.layout} layout)",
        f"classes   {len(dataset.classes)}: {', '.join(dataset.classes)}",
        f"image     {dataset.image_shape[1]}x{dataset.image_shape[2]} RGB, uint8",
        f"digest    {dataset.digest}",
    ]
    for split in dataset.splits.values():
        counts = split.counts(dataset.num_classes)
        per_class = (", ".join(f"{c}:{n}" for c, n in zip(dataset.classes, counts, strict=True)) if counts
                     else "unlabelled")
        lines.append(f"{split.name:<10}{len(split):>6} images  [{per_class}]")
    for split in dataset.splits.values():
        state = "hit" if split.cache_hit else "written"
        lines.append(f"cache     {split.cache_file} ({state})" if split.cache_file is not None else
                     f"cache     {split.name}: decoded in memory ({dataset.cache_dir} cannot be written)")
    lines.append(f"loaded in {dataset.load_seconds:.3f}s")
    return "\n".join(lines)
