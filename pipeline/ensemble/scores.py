"""Figures of probabilities against labels, with their uncertainty: accuracy (Wilson interval),
macro-F1, NLL, ECE (15 bins; bootstrap intervals), and the exact McNemar test for two classifiers
scored on the same images. Numpy (and scipy's binomial) only."""

from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15
Z95 = 1.959963984540054


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: |accuracy - confidence| per confidence bin, weighted by the bin's share."""
    confidence, predicted = probs.max(1), probs.argmax(1)
    correct = predicted == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> tuple[np.ndarray, ...]:
    """Per bin: (mean confidence, accuracy, count), for the reliability diagram."""
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    conf = np.array([confidence[which == b].mean() if (which == b).any() else np.nan for b in range(bins)])
    acc = np.array([correct[which == b].mean() if (which == b).any() else np.nan for b in range(bins)])
    return conf, acc, np.bincount(which, minlength=bins)


def macro_f1(probs: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> float:
    predicted = probs.argmax(1)
    k = num_classes or probs.shape[1]
    scores = []
    for c in range(k):
        tp = int(((predicted == c) & (labels == c)).sum())
        fp = int(((predicted == c) & (labels != c)).sum())
        fn = int(((predicted != c) & (labels == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(figure, probs: np.ndarray, labels: np.ndarray, reps: int = 500, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of ``figure(probs, labels)`` over images."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    values = [figure(probs[idx], labels[idx]) for idx in (rng.integers(0, n, n) for _ in range(reps))]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> tuple[int, int, float]:
    """Exact McNemar test on paired outcomes: (images only A gets right, only B gets right, two-sided p)."""
    from scipy.stats import binom

    only_a = int((a_correct & ~b_correct).sum())
    only_b = int((~a_correct & b_correct).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else min(1.0, 2.0 * float(binom.cdf(min(only_a, only_b), n, 0.5)))
    return only_a, only_b, p
