"""A pair's final runs that learn from the selection split too, each scored on the half it did not read.

Once the search has chosen, the selection split has one job left: to check the final runs. Two final
runs can share it: run 1 trains on the training images plus selection half 2 and is scored (and its
best epoch chosen) on half 1; run 2 the other way round. Together they learned from every labelled
image outside the audit split, and each still has a score on images it never read. Where a budget
buys many passes over few images, more images are worth more than more passes (issue 29).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .dataset import Dataset, Split

HALVES = 2


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold per row, stratified by class: each class dealt round-robin after a seeded shuffle, the
    deal going on where the last class's ended, so a class's odd image goes to a fold that had none
    (one image per class still fills both halves of two folds; even class sizes deal as before)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(labels), dtype=np.int64)
    dealt = 0
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        out[rng.permutation(rows)] = (dealt + np.arange(len(rows))) % folds
        dealt += len(rows)
    return out


def concat(first: Split, second: Split, name: str) -> Split:
    """Two labelled splits as one, in memory (the rows of ``first``, then ``second``'s)."""
    hashes = None if first.hashes is None or second.hashes is None else np.concatenate([first.hashes, second.hashes])
    return Split(name, torch.cat([first.images, second.images]), torch.cat([first.labels, second.labels]),
                 [*first.ids, *second.ids], hashes=hashes)


def with_selection_half(data: Dataset, held_out: int, seed: int) -> Dataset:
    """``data`` for the final run that is scored on selection half ``held_out`` and trains on the
    training images plus the other half."""
    if data.validation.labels is None:
        raise ValueError("the selection split has no labels")
    halves = stratified_folds(data.validation.labels.numpy(), HALVES, seed)
    held = data.validation.subset(np.flatnonzero(halves == held_out), f"selection half {held_out + 1}")
    lent = data.validation.subset(np.flatnonzero(halves != held_out))
    train = concat(data.train, lent, f"train + selection half {HALVES - held_out}")
    splits = {**data.splits, **{k: v for k, v in (("train", train), ("validation", held)) if k in data.splits}}
    return replace(data, train=train, validation=held, splits=splits)
