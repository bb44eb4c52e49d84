"""The pair, weight and voting-rule search on stored validation probabilities: no retraining.

An Optuna study over (pair, weight, rule); pairs join two different member architectures (any two
candidates when there is only one). Every pair and rule is first tried at equal weight, so none is
left out by chance.
"""

from __future__ import annotations

import numpy as np
import optuna

from .rules import combine


class EnsembleError(RuntimeError):
    """No ensemble can be formed from these candidates."""


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def weight_curve(p_a: np.ndarray, p_b: np.ndarray, labels: np.ndarray, rule: str,
                 points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    weights = np.linspace(0.0, 1.0, points)
    return weights, np.array([accuracy(combine(p_a, p_b, w, rule), labels) for w in weights])


def candidate_pairs(archs: list[str]) -> list[tuple[int, int]]:
    """Index pairs of candidates that may form an ensemble: one from each of two member studies
    (any two when every candidate comes from the same study)."""
    one_arch = len(set(archs)) == 1
    return [(i, j) for i in range(len(archs)) for j in range(i + 1, len(archs)) if one_arch or archs[i] != archs[j]]


def stratified_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint, class-balanced halves of the validation indices."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        first.append(idx[: len(idx) // 2])
        second.append(idx[len(idx) // 2:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def search_pair(probs: list[np.ndarray], archs: list[str], labels: np.ndarray, n_trials: int, seed: int,
                rules: tuple[str, ...]) -> tuple[tuple[int, int, float, str], float]:
    """Optuna over (pair, weight, rule) on probabilities whose rows are already selected.
    Returns ((i, j, weight, rule), accuracy)."""
    pairs = candidate_pairs(archs)
    if not pairs:
        raise EnsembleError("the ensemble needs finished trials from two member studies")
    keys = [f"{i}-{j}" for i, j in pairs]

    def objective(trial: optuna.Trial) -> float:
        i, j = map(int, trial.suggest_categorical("pair", keys).split("-"))
        w = trial.suggest_float("weight", 0.0, 1.0)
        rule = trial.suggest_categorical("method", list(rules))
        return accuracy(combine(probs[i], probs[j], w, rule), labels)

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    for key in keys:
        for rule in rules:
            study.enqueue_trial({"pair": key, "weight": 0.5, "method": rule})
    study.optimize(objective, n_trials=max(n_trials, len(keys) * len(rules)))
    best = study.best_trial
    i, j = map(int, best.params["pair"].split("-"))
    return (i, j, float(best.params["weight"]), best.params["method"]), float(best.value)


def cross_fitted_accuracy(probs: list[np.ndarray], archs: list[str], labels: np.ndarray, n_trials: int, seed: int,
                          rules: tuple[str, ...]) -> float:
    """Choose on one stratified half, score on the other, both ways; the mean. Only the ensemble's
    own choice is held out: the members' epochs and trials were chosen on all of these images."""
    half_a, half_b = stratified_halves(labels, seed)
    scores = []
    for fit_rows, score_rows in ((half_a, half_b), (half_b, half_a)):
        (i, j, w, rule), _ = search_pair([p[fit_rows] for p in probs], archs, labels[fit_rows], n_trials, seed, rules)
        scores.append(accuracy(combine(probs[i][score_rows], probs[j][score_rows], w, rule), labels[score_rows]))
    return float(np.mean(scores))
