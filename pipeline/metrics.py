"""Metrics, defined once: every figure's name and, beside it, the function that computes it. The loop, the
tracker, the pruner, the ensemble, promotion and the tests all use this module.

A leaf (it imports nothing of the package) with numpy only at import, so the training stage may import it;
scipy's binomial is imported inside ``mcnemar``. Figures of probabilities take ``probs`` (images x classes)
and integer ``labels``; accuracy has a Wilson interval, the other audit figures bootstrap ones (95 %)."""

from __future__ import annotations

import math

import numpy as np

TRAIN_LOSS = "train_loss"
TRAIN_ACCURACY = "train_accuracy"
VAL_LOSS = "val_loss"
VAL_ACCURACY = "val_accuracy"
LR = "lr"
EPOCH_IMAGES_PER_SECOND = "epoch_images_per_second"  # training throughput of that epoch (wall clock)
EPOCH_METRICS = (TRAIN_LOSS, TRAIN_ACCURACY, VAL_LOSS, VAL_ACCURACY, LR, EPOCH_IMAGES_PER_SECOND)
TIMING_METRICS = (EPOCH_IMAGES_PER_SECOND,)  # differ run to run even when the learning is repeatable

BEST_VAL_ACCURACY = "best_val_accuracy"
BEST_EPOCH = "best_epoch"
EPOCHS_RUN = "epochs_run"
TRAIN_SECONDS = "train_seconds"
IMAGES_PER_SECOND = "images_per_second"
EVAL_SECONDS = "eval_seconds"  # wall seconds spent evaluating the selection split during the run
EVAL_FRACTION = "eval_fraction"  # their share of the run's wall time
TRAIN_IMAGES = "train_images"  # training images seen (with repetition)
WALL_SECONDS = "wall_seconds"  # a whole command's wall time, data loading to the last artifact
SUMMARY_METRICS = (BEST_VAL_ACCURACY, BEST_EPOCH, EPOCHS_RUN, TRAIN_SECONDS, IMAGES_PER_SECOND, EVAL_SECONDS,
                   EVAL_FRACTION, TRAIN_IMAGES)

# The one number every study maximises and every pruner watches.
OBJECTIVE = VAL_ACCURACY

VAL_MACRO_F1 = "val_macro_f1"  # as audit_macro_f1 and the promotion run's macro-F1s: macro_f1 below


def macro_f1(probs: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> float:
    """Mean per-class F1 over every class, a class never predicted counting 0 (scikit-learn's macro F1 with all
    labels and zero_division=0): unlike accuracy, it drops when one class is neglected."""
    predicted = probs.argmax(1)
    k = num_classes or probs.shape[1]
    scores = []
    for c in range(k):
        tp = int(((predicted == c) & (labels == c)).sum())
        fp = int(((predicted == c) & (labels != c)).sum())
        fn = int(((predicted != c) & (labels == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


# Ensemble run. "selection": images every choice read (in-sample figures); "audit": images no choice
# read (honest figures, with a 95 % interval). Trial runs' val_* metrics are on the selection split.
SELECTION_ACCURACY = "selection_accuracy"
SELECTION_NLL = "selection_nll"
SELECTION_IMAGES = "selection_images"
MEMBER_A_SELECTION_ACCURACY = "member_a_selection_accuracy"
MEMBER_B_SELECTION_ACCURACY = "member_b_selection_accuracy"
ENSEMBLE_WEIGHT = "ensemble_weight"
TEMPERATURE_A = "temperature_a"
TEMPERATURE_B = "temperature_b"
# The ensemble's choice between procedures (equal-weight pair, best member alone, searched combination):
# each one's accuracy out of fold on the selection split (fitted on the other folds): crossfit_accuracy_<name>.
CROSSFIT_ACCURACY = "crossfit_accuracy"
ENSEMBLE_MEMBERS = "ensemble_members"  # networks the registered model runs: 1 (a single member) or 2 (a pair)


def crossfit_metric(procedure: str) -> str:
    return f"{CROSSFIT_ACCURACY}_{procedure}"


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose most probable class is the label: the figure the ensemble search must not lose."""
    return float((probs.argmax(1) == labels).mean())


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class: it sees confidence, so it breaks the ties accuracy leaves."""
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


AUDIT_ACCURACY = "audit_accuracy"
AUDIT_MACRO_F1 = "audit_macro_f1"
AUDIT_NLL = "audit_nll"
AUDIT_ECE = "audit_ece"
AUDIT_FIGURES = (AUDIT_ACCURACY, AUDIT_MACRO_F1, AUDIT_NLL, AUDIT_ECE)  # each also as <name>_low, <name>_high
AUDIT_IMAGES = "audit_images"
AUDIT_NLL_UNCALIBRATED = "audit_nll_uncalibrated"
AUDIT_ECE_UNCALIBRATED = "audit_ece_uncalibrated"
MEMBER_A_AUDIT_ACCURACY = "member_a_audit_accuracy"
MEMBER_B_AUDIT_ACCURACY = "member_b_audit_accuracy"

ECE_BINS = 15
Z95 = 1.959963984540054


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


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (audit_accuracy_low/high, a promoted version's accuracy):
    unlike the normal approximation it stays inside [0, 1] near 0 % and 100 %."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(figure, probs: np.ndarray, labels: np.ndarray, reps: int = 500, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of ``figure(probs, labels)`` over images (the other audit figures'
    _low/_high): macro-F1, NLL and ECE have no closed-form interval."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    values = [figure(probs[idx], labels[idx]) for idx in (rng.integers(0, n, n) for _ in range(reps))]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


# Artifact paths inside a run
CHECKPOINT_ARTIFACT = "checkpoints/best.pt"
PREDICTIONS_ARTIFACT = "predictions/validation.npz"
CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_JSON = "confusion_matrix.json"
REPORT_JSON = "classification_report.json"
WEIGHT_CURVE_PNG = "weight_curve.png"  # ensemble run: accuracy against the weight of member A

# Session figures in the parent run (PNG: the MLflow UI shows them inline)
FIGURES_DIR = "figures"
EPOCH_CURVES_PNG = f"{FIGURES_DIR}/val_accuracy_per_epoch.png"
PARAMS_PNG = f"{FIGURES_DIR}/best_accuracy_vs_params.png"
SESSION_WEIGHT_CURVE_PNG = f"{FIGURES_DIR}/ensemble_weight_curve.png"

# Promotion run (registry.promote): both versions scored on the same labelled split
CHALLENGER_ACCURACY = "challenger_accuracy"
CHALLENGER_MACRO_F1 = "challenger_macro_f1"
CHAMPION_ACCURACY = "champion_accuracy"
CHAMPION_MACRO_F1 = "champion_macro_f1"
ACCURACY_GAIN = "accuracy_gain"  # challenger - champion
PROMOTED = "promoted"  # 1.0 when @champion moved
ONLY_CHALLENGER_RIGHT = "only_challenger_right"  # discordant images, for the exact McNemar test
ONLY_CHAMPION_RIGHT = "only_champion_right"
MCNEMAR_P = "mcnemar_p"


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> tuple[int, int, float]:
    """Exact McNemar test on paired outcomes: (images only A gets right, only B gets right, two-sided p).
    Both versions saw the same images, so only the images they disagree on carry evidence."""
    from scipy.stats import binom

    only_a = int((a_correct & ~b_correct).sum())
    only_b = int((~a_correct & b_correct).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else min(1.0, 2.0 * float(binom.cdf(min(only_a, only_b), n, 0.5)))
    return only_a, only_b, p
