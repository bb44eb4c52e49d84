"""Member probabilities as the ensemble uses them: a test-time variant (plain, or averaged with the
horizontally flipped image) and a temperature fitted on the selection split.

Temperature scaling divides log-probabilities by T (> 1 softens an over-confident member, < 1
sharpens an under-confident one); it never changes a member's predicted class.
"""

from __future__ import annotations

import numpy as np

VARIANTS = ("none", "hflip")  # test-time augmentation of one member
T_RANGE = (0.05, 20.0)
FOLDS = 5  # cross-fitting: each fold's NLL under a temperature fitted on the other folds


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(z))


def variant_logprobs(logits: np.ndarray, flipped: np.ndarray | None, variant: str) -> np.ndarray:
    """Log-probabilities of one member under a test-time variant."""
    if variant == "none":
        return log_softmax(logits)
    if variant == "hflip":
        if flipped is None:
            raise ValueError("the hflip variant needs the flipped images' logits")
        return np.log((softmax(logits) + softmax(flipped)) / 2.0)
    raise ValueError(f"unknown test-time variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def calibrated(logprobs: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(logprobs / temperature)


def _nll(logprobs: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return float(-log_softmax(logprobs / temperature)[np.arange(len(labels)), labels].mean())


def best_temperature(logprobs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the NLL of ``labels`` (bounded search on log T)."""
    from scipy.optimize import minimize_scalar

    found = minimize_scalar(lambda log_t: _nll(logprobs, labels, float(np.exp(log_t))),
                            bounds=tuple(np.log(T_RANGE)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def fit_temperature(logprobs: np.ndarray, labels: np.ndarray, folds: int = FOLDS) -> float:
    """The NLL-minimising temperature of ``labels``, applied only when it also lowers the NLL of
    images it was not fitted on; else 1 (no calibration). Cross-fitted: the selection images are cut
    into ``folds`` fixed folds, each scored under a temperature fitted on the others, and the
    calibrated NLL of all folds is compared with the uncalibrated one. A temperature that only fits
    the noise of a few hundred images (or an outlier) is never applied, so calibration cannot make
    the served probabilities worse on images like these."""
    n = len(labels)
    folds = min(folds, n // 2)
    if folds < 2:
        return 1.0  # too few images to tell a real miscalibration from noise
    fold = np.random.default_rng(0).permutation(n) % folds  # fixed by the number of images only
    held_out = 0.0
    for k in range(folds):
        fit, test = fold != k, fold == k
        held_out += test.sum() * _nll(logprobs[test], labels[test], best_temperature(logprobs[fit], labels[fit]))
    if held_out / n >= _nll(logprobs, labels, 1.0):
        return 1.0
    return best_temperature(logprobs, labels)
