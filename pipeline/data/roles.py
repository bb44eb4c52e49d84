"""The three roles of labelled data: train (fit weights), selection (every choice: best epoch, early
stopping, pruning, the sampler, top-k, the ensemble search, calibration) and audit (read by no choice,
so its figures are honest).

The audit split is the labelled test split when there is one, else a fixed, stratified part of
validation chosen by content: within each class, the images whose pixel hashes sort first. Which
images those are depends only on the data (not on row order, file names, paths or the machine), so
every session and every ``promote`` on the same data audits on the same images.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import numpy as np

from ..config import DataConfig
from .dataset import Dataset, Split
from .layout import DataError


@dataclass(frozen=True)
class AuditInfo:
    source: str  # "test" (a labelled test split), "validation" (a part of it) or "none" (audit off)
    fraction: float
    min_per_class: int
    ids: tuple[str, ...]  # audit images, in the source split's order
    selection_rows: np.ndarray  # rows of validation used for selection
    audit_rows: np.ndarray  # rows of the source split used for the audit

    @property
    def enabled(self) -> bool:
        return self.source != "none"

    @property
    def spec(self) -> str:
        """How the audit set was drawn, e.g. ``validation:0.3:20``; equal specs on equal data give equal sets."""
        return self.source if self.source != "validation" else f"validation:{self.fraction:g}:{self.min_per_class}"

    def describe(self) -> str:
        if self.source == "none":
            return "audit split off (data.audit_fraction 0): every figure is in-sample (selection)"
        where = "the labelled test split" if self.source == "test" else (
            f"{self.fraction:.0%} of validation per class (at least {self.min_per_class})")
        return f"audit split: {len(self.ids)} images, {where}; selection split: {len(self.selection_rows)} images"


@dataclass(frozen=True)
class Partition:
    """The dataset as choices see it (validation = the selection split), and the audit split."""

    data: Dataset
    audit: Split | None
    info: AuditInfo


def audit_counts(labels: np.ndarray, fraction: float, min_per_class: int, where: str) -> dict[int, int]:
    """Audit images per class: ``fraction`` of the class, at least ``min_per_class``, and never more
    than half of it (selection needs images too)."""
    counts = {}
    for cls in np.unique(labels):
        n = int((labels == cls).sum())
        k = max(math.ceil(fraction * n - 1e-9), min_per_class)
        if k > n // 2:
            raise DataError(f"{where}: class {cls} has {n} validation images, too few for an audit split of "
                            f"{k} ({fraction:.0%}, at least {min_per_class}) that leaves half for selection; "
                            "lower data.audit_min_per_class or data.audit_fraction (0 turns the audit split off)")
        counts[int(cls)] = k
    return counts


def choose_audit_rows(split: Split, fraction: float, min_per_class: int) -> np.ndarray:
    """Rows of ``split`` in the audit set: per class, the ``k`` images with the smallest pixel hash."""
    labels = split.labels.numpy()
    counts = audit_counts(labels, fraction, min_per_class, split.name)
    keys = [row.tobytes() + image_id.encode() for row, image_id in zip(split.hashes, split.ids, strict=True)]
    chosen = []
    for cls, k in counts.items():
        rows = np.flatnonzero(labels == cls)
        chosen += sorted(rows, key=lambda r: keys[r])[:k]
    return np.sort(np.asarray(chosen, dtype=np.int64))


def partition(data: Dataset, cfg: DataConfig) -> Partition:
    """Split labelled data into its roles. A labelled test split is the audit split (all of validation
    is for selection); otherwise ``cfg.audit_fraction`` of validation is, or nothing when it is 0."""
    val = data.validation
    every_row = np.arange(len(val))
    whole = replace(val, name="selection")  # all of validation is for selection
    view = replace(data, validation=whole, splits={**data.splits, "validation": whole})
    test = data.test
    if test is not None and test.labels is not None and cfg.audit_fraction > 0:
        info = AuditInfo("test", cfg.audit_fraction, cfg.audit_min_per_class, tuple(test.ids), every_row,
                         np.arange(len(test)))
        return Partition(view, test.subset(info.audit_rows, "audit"), info)
    if cfg.audit_fraction <= 0:
        return Partition(view, None, AuditInfo("none", 0.0, cfg.audit_min_per_class, (), every_row,
                                               np.zeros(0, dtype=np.int64)))
    audit_rows = choose_audit_rows(val, cfg.audit_fraction, cfg.audit_min_per_class)
    selection_rows = np.setdiff1d(every_row, audit_rows)
    selection = val.subset(selection_rows, "selection")
    view = replace(data, validation=selection, splits={**data.splits, "validation": selection})
    info = AuditInfo("validation", cfg.audit_fraction, cfg.audit_min_per_class,
                     tuple(val.ids[i] for i in audit_rows), selection_rows, audit_rows)
    return Partition(view, val.subset(audit_rows, "audit"), info)


def ids_digest(split: Split | None) -> str:
    """Content digest of an audit set (its pixel hashes and labels), to tell two audit sets apart."""
    if split is None:
        return "none"
    rows = sorted(f"{h.tobytes().hex()}:{y}" for h, y in zip(split.hashes, split.labels.tolist(), strict=True))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]
