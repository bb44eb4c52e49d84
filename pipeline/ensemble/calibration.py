"""Member probabilities as the ensemble uses them: a test-time variant (plain, or averaged with the
horizontally flipped image) and a temperature fitted on the selection split.

Temperature scaling divides log-probabilities by T (> 1 softens an over-confident member, < 1
sharpens an under-confident one); it never changes a member's predicted class.
"""

from __future__ import annotations

import numpy as np

VARIANTS = ("none", "hflip")  # test-time augmentation of one member
T_RANGE = (0.05, 20.0)


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


def fit_temperature(logprobs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the NLL of ``labels`` (bounded search on log T)."""
    from scipy.optimize import minimize_scalar

    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        return float(-log_softmax(logprobs / np.exp(log_t))[rows, labels].mean())

    found = minimize_scalar(loss, bounds=tuple(np.log(T_RANGE)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))
