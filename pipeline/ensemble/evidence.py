"""Which ensemble the selection split supports: procedures scored out of fold, not an in-sample maximum.

Choosing a pair, flips, a rule and a weight among many on the same few hundred images that then
score the choice fits their noise (measured: selection 81.4 %, audit 81.0 %; and a pair below its
own best member). So the choice is between *procedures*, each scored by cross-fitting on the
selection split (fitted on four folds, scored on the fifth, every image once):

- ``equal``: the equal-weight probability average of the best pair (plain images, calibrated members);
- ``single``: the best member alone;
- ``searched``: the full search (pair, test-time flips, voting rule and weight).

``equal`` is the default; another procedure replaces it only when its cross-fitted accuracy beats
``equal``'s by more than ``margin`` standard errors of the per-image difference. The chosen
procedure is then fitted on the whole split. When nothing beats the equal pair by its noise, the
pair is kept and the decision says the split could not tell them apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..data.crossfit import stratified_folds
from ..metrics import accuracy, nll
from .calibration import calibrated, fit_temperature, log_softmax, variant_logprobs
from .rules import combine
from .search import Choice, View, calibrate, candidate_pairs, search

FOLDS = 5
PROCEDURES = ("equal", "single", "searched")  # the first is the default the others must beat


@dataclass(frozen=True)
class Inputs:
    """The candidates' selection-split logits and what the search may use."""

    logits: list[np.ndarray]
    flipped: list[np.ndarray | None]
    archs: list[str]
    labels: np.ndarray
    rules: tuple[str, ...]
    weight_step: float
    seed: int
    mirror: bool

    def subset(self, rows: np.ndarray) -> Inputs:
        return Inputs([z[rows] for z in self.logits], [None if f is None else f[rows] for f in self.flipped],
                      self.archs, self.labels[rows], self.rules, self.weight_step, self.seed, self.mirror)


@dataclass(frozen=True)
class Decision:
    procedure: str  # which procedure was chosen (then fitted on the whole split)
    choice: Choice
    crossfit_accuracy: dict[str, float]  # procedure -> out-of-fold accuracy on the selection split
    gain: dict[str, tuple[float, float]]  # challenger -> (accuracy over equal, its standard error)
    reason: str

    @property
    def single(self) -> bool:
        """One network: the same member on both sides, or a weight that leaves one side out."""
        return self.choice.a == self.choice.b or self.choice.weight in (0.0, 1.0)


def score(views: dict[tuple, View], labels: np.ndarray, a: int, b: int, va: str, vb: str, rule: str,
          weight: float) -> Choice:
    probs = combine(views[(a, va)].probs, views[(b, vb)].probs, weight, rule)
    floor = max(views[(a, "none")].accuracy, views[(b, "none")].accuracy)
    return Choice(a, b, va, vb, rule, weight, nll(probs, labels), accuracy(probs, labels), floor)


def best_single(views: dict[tuple, View], inputs: Inputs) -> Choice:
    n = len(inputs.logits)
    best = max(range(n), key=lambda i: (views[(i, "none")].accuracy, -i))
    return score(views, inputs.labels, best, best, "none", "none", "soft", 1.0)


def equal_pair(views: dict[tuple, View], inputs: Inputs) -> Choice:
    pairs = candidate_pairs(inputs.archs)
    if pairs == [(0, 0)]:
        return best_single(views, inputs)
    a, b = max(pairs, key=lambda p: (views[(p[0], "none")].accuracy + views[(p[1], "none")].accuracy, -p[0], -p[1]))
    return score(views, inputs.labels, a, b, "none", "none", "soft", 0.5)


def searched(views: dict[tuple, View], inputs: Inputs) -> Choice:
    return search(views, inputs.archs, inputs.labels, inputs.rules, inputs.weight_step, inputs.seed)[0]


FIT: dict[str, Callable[[dict[tuple, View], Inputs], Choice]] = {
    "equal": equal_pair, "single": best_single, "searched": searched}


def folds_of(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold per image, stratified by class."""
    return stratified_folds(labels, folds, seed)


def predict(views: dict[tuple, View], inputs: Inputs, choice: Choice) -> np.ndarray:
    """The chosen combination's probabilities on ``inputs``' images, with the temperatures of ``views``."""
    def member(i: int, v: str) -> np.ndarray:
        return calibrated(variant_logprobs(inputs.logits[i], inputs.flipped[i], v), views[(i, v)].temperature)

    return combine(member(choice.a, choice.variant_a), member(choice.b, choice.variant_b), choice.weight, choice.rule)


def out_of_fold(inputs: Inputs, fit: Callable[[dict[tuple, View], Inputs], Choice], folds: int) -> np.ndarray:
    """Per image: whether the procedure, fitted on the other folds (temperatures included), got it right."""
    fold = folds_of(inputs.labels, folds, inputs.seed)
    right = np.zeros(len(inputs.labels), dtype=bool)
    for k in range(folds):
        train, held = inputs.subset(fold != k), inputs.subset(fold == k)
        views = calibrate(train.logits, train.flipped, train.labels, train.mirror)
        right[fold == k] = predict(views, held, fit(views, train)).argmax(1) == held.labels
    return right


def decide(inputs: Inputs, margin: float, folds: int = FOLDS) -> Decision:
    """The procedure the selection split supports, fitted on all of it. ``margin``: standard errors of
    the per-image difference by which a challenger must beat the default (the equal pair; with one
    candidate, that candidate alone, whose challenger is its searched test-time variant)."""
    views = calibrate(inputs.logits, inputs.flipped, inputs.labels, inputs.mirror)
    folds = min(folds, int(np.bincount(inputs.labels).min()) if len(inputs.labels) else 0)
    procedures = PROCEDURES if len(inputs.logits) > 1 else ("single", "searched")
    if folds < 2:
        why = f"too few selection images per class to cross-fit: {NAMES[procedures[0]]}"
        return Decision(procedures[0], FIT[procedures[0]](views, inputs), {}, {}, why)
    right = {name: out_of_fold(inputs, FIT[name], folds) for name in procedures}
    base = right[procedures[0]].astype(float)
    gain = {}
    for name in procedures[1:]:
        d = right[name].astype(float) - base
        gain[name] = (float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0)
    beating = [n for n, (g, se) in gain.items() if g > 0 and g > margin * se]
    procedure = max(beating, key=lambda n: (gain[n][0], -PROCEDURES.index(n))) if beating else procedures[0]
    crossfit = {name: float(r.mean()) for name, r in right.items()}
    return Decision(procedure, FIT[procedure](views, inputs), crossfit, gain,
                    _reason(procedures[0], procedure, crossfit, gain, margin))


NAMES = {"equal": "the equal-weight pair", "single": "the best member alone",
         "searched": "the searched pair/flips/rule/weight"}


def _reason(base: str, procedure: str, crossfit: dict[str, float], gain: dict[str, tuple[float, float]],
            margin: float) -> str:
    def pts(name: str) -> str:
        g, se = gain[name]
        return f"{NAMES[name]} {100 * crossfit[name]:.1f} % ({100 * g:+.1f} ± {100 * se:.1f} points)"

    figures = (f"cross-fitted selection accuracy ({FOLDS} folds): {NAMES[base]} {100 * crossfit[base]:.1f} %, "
               + ", ".join(pts(name) for name in gain))
    if procedure == base:
        tie = base == "equal" and abs(gain["single"][0]) <= margin * gain["single"][1]
        return (figures + f"; nothing beats {NAMES[base]} by more than {margin:g} standard error(s): kept it"
                + (" (the selection split cannot tell the pair from its best member alone; two runs averaged is the "
                   "better-supported choice)" if tie else ""))
    return figures + f"; {NAMES[procedure]} beats {NAMES[base]} by more than {margin:g} standard error(s): chose it"


@dataclass(frozen=True)
class Halves:
    """A cross-fitted pair's evidence: each final run scored on the selection half it did not train on."""

    decision: Decision
    temperatures: list[float]
    accuracy: list[float]  # each run's, on its own held-out half
    probs: np.ndarray  # every covered image scored by the run that did not train on it (calibrated); N x C
    covered: np.ndarray  # bool per selection image: some run was scored on it


def decide_halves(logits: list[np.ndarray], rows: list[np.ndarray], labels: np.ndarray, margin: float) -> Halves:
    """The equal-weight pair of two cross-fitted final runs, unless one scores below the other on its
    held-out half by more than ``margin`` standard errors (then the better one alone). The pair itself
    cannot be scored on the selection split (every image trained one of its runs): two runs of one
    schedule whose scores agree within noise are averaged, the better-supported choice."""
    temps, accs, nlls, n = [], [], [], len(labels)
    probs = np.zeros((n, logits[0].shape[1]))
    covered = np.zeros(n, dtype=bool)
    for z, r in zip(logits, rows, strict=True):
        logp = log_softmax(z)
        t = fit_temperature(logp, labels[r])
        p = calibrated(logp, t)
        temps.append(t)
        accs.append(accuracy(p, labels[r]))
        nlls.append(nll(p, labels[r]))
        probs[r], covered[r] = p, True
    pooled = (accuracy(probs[covered], labels[covered]), nll(probs[covered], labels[covered]))
    crossfit = {"out_of_fold": pooled[0]}
    if len(logits) == 1:
        choice = Choice(0, 0, "none", "none", "soft", 1.0, nlls[0], accs[0], accs[0])
        return Halves(Decision("single", choice, crossfit, {}, "one final run finished: it alone"), temps, accs,
                      probs, covered)
    better, worse = (0, 1) if accs[0] >= accs[1] else (1, 0)
    sizes = [len(r) for r in rows]
    se = math.sqrt(sum(a * (1 - a) / max(1, k) for a, k in zip(accs, sizes, strict=True)))
    gap = accs[better] - accs[worse]
    figures = (f"each final run also trained on half of the selection split and was scored on the other: "
               f"run 1 {100 * accs[0]:.1f} % of {sizes[0]}, run 2 {100 * accs[1]:.1f} % of {sizes[1]} "
               f"(gap {100 * gap:.1f} ± {100 * se:.1f} points); out of fold together {100 * pooled[0]:.1f} %")
    gain = {"single": (gap, se)}
    if gap > margin * se:
        choice = Choice(better, better, "none", "none", "soft", 1.0, nlls[better], accs[better], accs[better])
        return Halves(Decision("single", choice, crossfit, gain, figures + f"; one run scores below the other by "
                               f"more than {margin:g} standard error(s): the better run alone"), temps, accs, probs,
                      covered)
    choice = Choice(0, 1, "none", "none", "soft", 0.5, pooled[1], pooled[0], max(accs))
    return Halves(Decision("equal", choice, crossfit, gain, figures + "; no image can score the pair itself (each "
                           "trained one of its runs), and the runs agree within noise: the selection split cannot "
                           "tell the pair from its better run, and the equal-weight average of two runs of one "
                           "schedule is the better-supported choice: kept the pair"), temps, accs, probs, covered)
