"""The ensemble's choice by cross-fitted evidence (pipeline/ensemble/evidence.py): the equal-weight pair
unless the best member alone or the searched combination beats it out of fold by more than its noise."""

from __future__ import annotations

import numpy as np

from pipeline.ensemble.evidence import Inputs, decide, folds_of, out_of_fold


def _informative(rng, labels, strength, classes=5):
    z = rng.normal(0, 1, (len(labels), classes))
    z[np.arange(len(labels)), labels] += strength
    return z


def _inputs(logits, labels, archs=None, margin_rules=("soft", "confidence")):
    archs = archs or ["cnn_v1", "cnn_v2"][:len(logits)]
    return Inputs(list(logits), [None] * len(logits), archs, labels, margin_rules, 0.05, 0, True)


def test_folds_are_stratified_and_cover_every_image_once():
    labels = np.repeat(np.arange(5), [40, 41, 42, 43, 44])
    fold = folds_of(labels, 5, seed=3)
    for c in range(5):
        counts = np.bincount(fold[labels == c], minlength=5)
        assert counts.max() - counts.min() <= 1, (c, counts)
    assert not np.array_equal(fold, folds_of(labels, 5, seed=4))  # seeded, not fixed


def test_two_equal_members_are_averaged_with_equal_weights():
    """Independent errors of equal size: averaging helps, and no weight search beats 0.5 by its noise."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 5, 500)
        logits = [_informative(rng, y, 1.8), _informative(rng, y, 1.8)]
        d = decide(_inputs(logits, y), margin=2.0)
        assert d.procedure == "equal", d.reason
        assert (d.choice.a, d.choice.b, d.choice.weight, d.choice.rule) == (0, 1, 0.5, "soft")
        assert not d.single
        alone = [float((z.argmax(1) == y).mean()) for z in logits]
        # The pair's out-of-fold accuracy beats either member's in-sample accuracy on this data.
        assert d.crossfit_accuracy["equal"] > max(alone)
        assert "kept it" in d.reason


def test_a_member_that_is_noise_leaves_the_best_member_alone():
    """A member that knows nothing, so over-confident that no temperature in range softens it, drags the
    equal average far below its partner: out of fold the best member alone beats the pair by far more
    than its noise, so it is chosen (over the search, which finds the same thing), a single member."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 5, 500)
    logits = [_informative(rng, y, 2.5), 100 * rng.normal(0, 1, (500, 5))]
    d = decide(_inputs(logits, y), margin=2.0)
    assert d.procedure == "single", d.reason
    assert d.single and (d.choice.a, d.choice.b, d.choice.weight) == (0, 0, 1.0)
    g, se = d.gain["single"]
    assert g > 2 * se > 0
    assert "beats the equal-weight pair" in d.reason


def test_the_margin_is_what_decides():
    """The same evidence under a margin no gain can clear keeps the equal pair."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 5, 500)
    logits = [_informative(rng, y, 2.5), 100 * rng.normal(0, 1, (500, 5))]
    assert decide(_inputs(logits, y), margin=1e6).procedure == "equal"


def test_one_candidate_is_a_single_member_unless_its_mirror_vote_pays():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    plain = _informative(rng, y, 1.0)
    d = decide(_inputs([plain], y, archs=["cnn_v1"]), margin=2.0)  # no mirror logits: nothing to search
    assert d.procedure == "single" and d.single and set(d.crossfit_accuracy) == {"single", "searched"}
    # Mirror images that carry independent evidence: averaging both views beats the plain images out of fold.
    inputs = Inputs([plain], [_informative(rng, y, 1.0)], ["cnn_v1"], y, ("soft",), 0.05, 0, True)
    d = decide(inputs, margin=2.0)
    assert d.procedure == "searched" and d.single and "hflip" in (d.choice.variant_a, d.choice.variant_b), d.reason
    assert "beats the best member alone" in d.reason


def test_out_of_fold_scores_images_the_fit_did_not_read():
    """Out of fold, the best member is picked on the other folds and scored on the held-out one: a
    member right on every image is picked in every fold and stays right on every held-out image."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 300)
    perfect = np.eye(5)[y] * 10
    inputs = _inputs([perfect, rng.normal(0, 1, (300, 5))], y)
    from pipeline.ensemble.evidence import best_single

    assert out_of_fold(inputs, best_single, 5).all()


def test_two_cross_fitted_runs_alike_within_noise_are_averaged_and_a_broken_one_is_left_out():
    """Each run is scored on the half it did not train on; the pair itself cannot be scored there."""
    from pipeline.ensemble.evidence import decide_halves

    rng = np.random.default_rng(5)
    y = rng.integers(0, 5, 400)
    halves = [np.arange(0, 400, 2), np.arange(1, 400, 2)]
    good = [_informative(rng, y[h], 2.0) for h in halves]
    d = decide_halves(good, halves, y, margin=2.0)
    assert d.decision.procedure == "equal" and (d.decision.choice.a, d.decision.choice.b) == (0, 1)
    assert d.decision.choice.weight == 0.5 and d.covered.all()
    right = np.concatenate([(z.argmax(1) == y[h]) for z, h in zip(good, halves, strict=True)])
    assert d.decision.crossfit_accuracy["out_of_fold"] == right.mean()  # temperatures never change a class
    assert "cannot tell the pair from its better run" in d.decision.reason
    broken = [good[0], rng.normal(0, 1, (200, 5))]  # run 2 learned nothing
    d = decide_halves(broken, halves, y, margin=2.0)
    assert d.decision.procedure == "single" and (d.decision.choice.a, d.decision.choice.b) == (0, 0)
    assert d.decision.choice.accuracy == d.accuracy[0]  # its own held-out half, not the pooled figure
