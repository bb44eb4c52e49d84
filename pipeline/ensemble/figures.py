"""The ensemble run's pictures: the weight curve of the chosen pair and the reliability diagram."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..metrics import accuracy, nll, reliability
from .rules import combine
from .search import weight_grid


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def weight_figure(path: Path, p_a: np.ndarray, p_b: np.ndarray, labels: np.ndarray, result) -> None:
    """Selection NLL and accuracy against member A's weight, for the chosen variants and rule."""
    plt = _pyplot()
    weights = weight_grid(0.01)
    mixed = [combine(p_a, p_b, float(w), result.method) for w in weights]
    fig, left = plt.subplots(figsize=(6.4, 4))
    left.plot(weights, [accuracy(p, labels) for p in mixed], color="tab:blue", label="selection accuracy")
    left.set_xlabel(f"weight of {result.member_a.label} ({result.variant_a}); 1-w for {result.member_b.label} "
                    f"({result.variant_b})")
    left.set_ylabel("selection accuracy", color="tab:blue")
    right = left.twinx()
    right.plot(weights, [nll(p, labels) for p in mixed], color="tab:orange", label="selection NLL")
    right.set_ylabel("selection NLL (chosen on this)", color="tab:orange")
    left.axvline(result.weight, ls="--", color="red", label=f"chosen w={result.weight:.2f}")
    left.legend(loc="lower center")
    left.set_title(f"{result.method} vote, calibrated members (selection split: in-sample)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reliability_figure(path: Path, before: np.ndarray, after: np.ndarray, labels: np.ndarray, split: str) -> None:
    """Accuracy against confidence per bin, before and after the members' temperatures."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls=":", color="gray", label="perfect calibration")
    for name, probs, style in (("uncalibrated", before, "o--"), ("calibrated", after, "s-")):
        conf, acc, counts = reliability(probs, labels)
        keep = counts > 0
        ax.plot(conf[keep], acc[keep], style, label=name)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"ensemble reliability on the {split} split (15 bins)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
