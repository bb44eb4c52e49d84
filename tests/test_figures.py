"""Every reported figure against a value computed another way: by hand, or by scipy or
scikit-learn, never by the function under test (Wilson intervals, macro-F1, ECE, the exact McNemar
p, the bootstrap's determinism)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import f1_score

from pipeline.metrics import VAL_MACRO_F1, bootstrap, ece, macro_f1, mcnemar, nll, wilson


def test_wilson_interval_known_values():
    low, high = wilson(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    # 0 of 10 by hand: centre = half = (z^2 / 2n) / (1 + z^2 / n), so the interval is [0, z^2 / (n + z^2)].
    z2 = 1.959963984540054 ** 2
    assert wilson(0, 10) == (0.0, pytest.approx(z2 / (10 + z2)))
    for k, n in [(1, 3), (50, 50), (37, 120), (1997, 2000), (0, 1)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson(k, n) == (pytest.approx(ci.low, abs=1e-9), pytest.approx(ci.high, abs=1e-9)), (k, n)
    assert wilson(0, 0) == (0.0, 1.0)


def test_macro_f1_matches_scikit_learn_with_a_class_never_predicted():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 200)
    predicted = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 5, 200))
    predicted[predicted == 4] = 2  # class 4 is never predicted: its F1 is 0 and still counts
    probs = np.eye(5)[predicted] * 0.9 + 0.02
    expected = f1_score(labels, predicted, average="macro", labels=list(range(5)), zero_division=0)
    assert macro_f1(probs, labels) == pytest.approx(expected, abs=1e-12)
    assert macro_f1(probs, labels) < f1_score(labels, predicted, average="macro", labels=[0, 1, 2, 3])


def test_a_runs_macro_f1_is_the_one_macro_f1_and_its_per_class_rows_stay_scikit_learns():
    """val_macro_f1 (metrics.macro_f1, as the audit and promotion report it) and the per-class F1 and recall
    of a training run, against scikit-learn, with a class never predicted."""
    from sklearn.metrics import recall_score

    from pipeline.tracking import classification_outputs, per_class_metrics

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 5, 150)
    predicted = np.where(rng.random(150) < 0.6, labels, rng.integers(0, 5, 150))
    predicted[predicted == 3] = 1  # class 3 is never predicted
    probs = np.eye(5)[predicted] * 0.9 + 0.02
    classes = ("a", "b", "c", "d", "e")
    _, report = classification_outputs(labels, probs, classes)
    figures = per_class_metrics(report, classes)
    everything = {"labels": list(range(5)), "zero_division": 0}
    assert figures[VAL_MACRO_F1] == pytest.approx(f1_score(labels, predicted, average="macro", **everything),
                                                  abs=1e-12)
    assert figures[VAL_MACRO_F1] == macro_f1(probs, labels)  # the very number the audit and promotion report
    f1s = f1_score(labels, predicted, average=None, **everything)
    recalls = recall_score(labels, predicted, average=None, **everything)
    for c, name in enumerate(classes):
        assert figures[f"val_f1_class_{name}"] == pytest.approx(f1s[c], abs=1e-12)
        assert figures[f"val_recall_class_{name}"] == pytest.approx(recalls[c], abs=1e-12)
    assert figures["val_f1_class_d"] == 0.0


def test_ece_on_a_hand_built_two_bin_example():
    # Four images at confidence 0.95 (bin 15), three right: |0.75 - 0.95| = 0.20, weight 4/6;
    # two at confidence 0.45 (bin 7), one right: |0.5 - 0.45| = 0.05, weight 2/6.
    probs = np.array([[0.95, 0.05, 0.0]] * 4 + [[0.45, 0.30, 0.25]] * 2)
    labels = np.array([0, 0, 0, 1, 0, 2])
    assert ece(probs, labels) == pytest.approx(4 / 6 * 0.20 + 2 / 6 * 0.05)
    # NLL by hand: -mean(log p of the true class).
    expected_nll = -(3 * np.log(0.95) + np.log(0.05) + np.log(0.45) + np.log(0.25)) / 6
    assert nll(probs, labels) == pytest.approx(expected_nll)


@pytest.mark.parametrize("b, c", [(25, 3), (2, 0), (3, 25), (7, 7), (0, 0), (1, 12), (40, 60)])
def test_mcnemar_p_is_the_exact_binomial_test_of_the_discordant_pairs(b, c):
    a_right = np.array([True] * b + [False] * c + [True] * 10 + [False] * 5)
    b_right = np.array([False] * b + [True] * c + [True] * 10 + [False] * 5)
    only_a, only_b, p = mcnemar(a_right, b_right)
    assert (only_a, only_b) == (b, c)
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    assert p == pytest.approx(expected, rel=1e-9)


def test_promotion_needs_p_below_alpha_and_p_exactly_at_alpha_is_not_enough():
    from pipeline.registry.promote import KEPT, PROMOTED, decide
    from pipeline.registry.scoring import Score, Scored

    # 6 discordant images, all the challenger's: p = 2 / 2^6 = 0.03125 (by hand); 1 vs 5: 2 x 7 / 64.
    champion = np.array([False] * 6 + [True] * 94)
    challenger = np.ones(100, dtype=bool)
    assert mcnemar(challenger, champion)[2] == pytest.approx(0.03125)
    assert mcnemar(np.array([True] + [False] * 5), np.array([False] + [True] * 5))[2] == pytest.approx(0.21875)

    def outcome(alpha):
        return decide(Scored(Score("2", challenger), 0.0), Scored(Score("1", champion), 0.0), 0.0, alpha, False)[0]

    assert outcome(0.03125) == KEPT  # p = alpha: not below it
    assert outcome(0.0313) == PROMOTED
    assert outcome(0.03) == KEPT


def test_the_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 300)
    probs = rng.dirichlet(np.ones(5), 300)
    assert bootstrap(ece, probs, labels, reps=200, seed=7) == bootstrap(ece, probs, labels, reps=200, seed=7)
    assert bootstrap(ece, probs, labels, reps=200, seed=7) != bootstrap(ece, probs, labels, reps=200, seed=8)
