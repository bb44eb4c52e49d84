"""The ensemble search on the selection split's stored logits: no retraining.

Each candidate is first calibrated (a temperature per test-time variant, fitted on the selection
split). An Optuna study then tries every (pair, test-time variant of each member, voting rule) once
(grid sampler: the space is small and discrete); within a trial the weight of member A runs over a
grid from 0 to 1, both ends included, so a single member is always a candidate. A weight is kept
only if its selection accuracy is at least the better member's, and the lowest selection NLL wins:
likelihood breaks the ties accuracy leaves, so no weight wins for being tried first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import optuna

from ..metrics import accuracy, nll
from .calibration import VARIANTS, calibrated, fit_temperature, variant_logprobs
from .rules import combine


class EnsembleError(RuntimeError):
    """No ensemble can be formed from these candidates."""


@dataclass(frozen=True)
class View:
    """One candidate under one test-time variant, calibrated on the selection split."""

    candidate: int
    variant: str
    temperature: float
    probs: np.ndarray  # calibrated selection probabilities
    accuracy: float


@dataclass(frozen=True)
class Choice:
    a: int
    b: int
    variant_a: str
    variant_b: str
    rule: str
    weight: float  # member A's
    nll: float  # on the selection split
    accuracy: float  # on the selection split
    floor: float  # the better member's plain selection accuracy, which the choice may not go below


def candidate_pairs(archs: list[str]) -> list[tuple[int, int]]:
    """Index pairs of candidates that may form an ensemble: one from each of two member studies
    (any two when every candidate comes from the same study; a lone candidate with itself, where
    the pair can still choose a test-time flip for one side)."""
    if len(archs) == 1:
        return [(0, 0)]
    one_arch = len(set(archs)) == 1
    return [(i, j) for i in range(len(archs)) for j in range(i + 1, len(archs)) if one_arch or archs[i] != archs[j]]


def calibrate(logits: list[np.ndarray], flipped: list[np.ndarray | None], labels: np.ndarray,
              mirror: bool = True) -> dict[tuple, View]:
    """Every candidate under every available variant, with its fitted temperature (``mirror`` False:
    plain only, as where a time budget cannot pay for the audit of the mirror images)."""
    variants = VARIANTS if mirror and all(f is not None for f in flipped) else ("none",)
    views = {}
    for c, (z, zf) in enumerate(zip(logits, flipped, strict=True)):
        for v in variants:
            logp = variant_logprobs(z, zf, v)
            t = fit_temperature(logp, labels)
            probs = calibrated(logp, t)
            views[(c, v)] = View(c, v, t, probs, accuracy(probs, labels))
    return views


def weight_grid(step: float) -> np.ndarray:
    n = max(1, round(1.0 / step))
    return np.linspace(0.0, 1.0, n + 1)


def best_weight(p_a: np.ndarray, p_b: np.ndarray, labels: np.ndarray, rule: str, weights: np.ndarray,
                floor: float) -> tuple[float, float, float] | None:
    """(weight, nll, accuracy) of the lowest-NLL weight whose accuracy is >= floor; None if none is."""
    best = None
    for w in weights:
        probs = combine(p_a, p_b, float(w), rule)
        acc, loss = accuracy(probs, labels), nll(probs, labels)
        if acc + 1e-12 < floor:
            continue
        key = (round(loss, 12), -acc)
        if best is None or key < best[0]:
            best = (key, float(w), loss, acc)
    return None if best is None else best[1:]


def search(views: dict[tuple, View], archs: list[str], labels: np.ndarray, rules: tuple[str, ...],
           weight_step: float, seed: int) -> tuple[Choice, list[Choice]]:
    """The chosen (pair, variants, rule, weight) and every trial's best, lowest NLL first."""
    pairs = candidate_pairs(archs)
    if not pairs:
        raise EnsembleError("the ensemble needs finished trials from two member studies")
    variants = sorted({v for _, v in views}, key=VARIANTS.index)
    keys = [f"{i}-{j}" for i, j in pairs]
    weights = weight_grid(weight_step)
    space = {"pair": keys, "variant_a": variants, "variant_b": variants, "method": list(rules)}
    tried: list[Choice] = []

    def objective(trial: optuna.Trial) -> float:
        i, j = map(int, trial.suggest_categorical("pair", keys).split("-"))
        va, vb = trial.suggest_categorical("variant_a", variants), trial.suggest_categorical("variant_b", variants)
        rule = trial.suggest_categorical("method", list(rules))
        floor = max(views[(i, "none")].accuracy, views[(j, "none")].accuracy)
        found = best_weight(views[(i, va)].probs, views[(j, vb)].probs, labels, rule, weights, floor)
        if found is None:
            return float("inf")
        w, loss, acc = found
        trial.set_user_attr("weight", w)
        trial.set_user_attr("accuracy", acc)
        tried.append(Choice(i, j, va, vb, rule, w, loss, acc, floor))
        return loss

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.GridSampler(space, seed=seed))
    study.optimize(objective, n_trials=len(keys) * len(variants) ** 2 * len(rules))
    # Deterministic among exact ties (a single member reached under several rules is one model).
    ranked = sorted(tried, key=lambda c: (round(c.nll, 12), -c.accuracy, c.a, c.b, VARIANTS.index(c.variant_a),
                                          VARIANTS.index(c.variant_b), c.rule, c.weight))
    return ranked[0], ranked
