"""Voting rules: how two members' probabilities become one. A table, name -> function.

Member A gets ``weight``, member B ``1 - weight``; every rule returns rows that sum to 1. Numpy only:
imported by config (to validate ``study.ensemble_method``), the search and the served model alike.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Rule = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def soft(p_a: np.ndarray, p_b: np.ndarray, weight: float) -> np.ndarray:
    """Weighted average of the probabilities."""
    return weight * p_a + (1.0 - weight) * p_b


def confidence(p_a: np.ndarray, p_b: np.ndarray, weight: float) -> np.ndarray:
    """The second reference's rule: each member's vote is further scaled per image by its own
    confidence (its top probability), so the surer model wins disagreements."""
    c_a = weight * p_a.max(axis=1, keepdims=True)
    c_b = (1.0 - weight) * p_b.max(axis=1, keepdims=True)
    total = np.clip(c_a + c_b, 1e-12, None)
    return (c_a * p_a + c_b * p_b) / total


RULES: dict[str, Rule] = {"soft": soft, "confidence": confidence}


def combine(p_a: np.ndarray, p_b: np.ndarray, weight: float, rule: str) -> np.ndarray:
    try:
        return RULES[rule](p_a, p_b, weight)
    except KeyError:
        raise ValueError(f"unknown ensemble method {rule!r}; choose one of {', '.join(RULES)}") from None
