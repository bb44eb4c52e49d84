"""The ensemble step of a session, from plain inputs: candidates with their stored selection-split
logits and the labels in, the chosen pair, test-time variants, temperatures, rule and weight out,
logged into the run the caller opened for it.

``tune`` gathers the candidates (the top trials of each member study), then audits and registers
the result; this stage knows nothing of studies or sessions, and never sees an audit image.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import metrics as M
from .. import tracking
from ..config import StudyConfig
from .calibration import calibrated, variant_logprobs
from .evidence import Decision, Inputs, decide, decide_halves
from .figures import reliability_figure, weight_figure
from .rules import RULES, combine
from .search import Choice, View, calibrate, candidate_pairs, search

# MLflow's log_table selects 'object' columns, which pandas 3 says will stop including str ones.
warnings.filterwarnings("ignore", message="For backward compatibility, 'str' dtypes are included by select_dtypes")


@dataclass(frozen=True)
class Candidate:
    """One finished trial that may join the ensemble."""

    arch: str
    trial: int
    run_id: str
    val_accuracy: float  # its own best selection accuracy (the trial's value)
    logits: np.ndarray  # selection-split logits at its best epoch, N x C
    logits_flipped: np.ndarray | None  # of the mirror images, when stored
    checkpoint: Path
    precision: str = "fp32"  # what the stored logits were computed in
    rows: np.ndarray | None = None  # a cross-fitted final run: the selection rows it was scored on (it trained on
    # the others); None: every row

    @property
    def label(self) -> str:
        return f"{self.arch}#{self.trial}"


@dataclass(frozen=True)
class EnsembleResult:
    run_id: str
    member_a: Candidate
    member_b: Candidate
    weight: float  # member A's; member B gets 1 - weight
    method: str
    variant_a: str  # test-time variant: none | hflip
    variant_b: str
    temperature_a: float
    temperature_b: float
    selection_accuracy: float  # chosen on these images: in-sample
    selection_nll: float
    member_a_accuracy: float  # each member alone, plain, on the selection split
    member_b_accuracy: float
    selection_images: int
    decision: Decision | None = None  # which procedure the selection split supported, and why
    out_of_fold: bool = False  # cross-fitted final runs: selection figures are each image scored by the run
    # that did not train on it (the pair itself cannot be scored there); else in-sample

    @property
    def selection_note(self) -> str:
        if self.out_of_fold:
            return (f"out of fold: each of these {self.selection_images} images scored by the final run that did not "
                    "train on it")
        return f"in-sample: every choice read these {self.selection_images} images"

    @property
    def single(self) -> bool:
        """One network alone (a legitimate outcome: the split preferred it, or there was one candidate)."""
        return self.member_a.run_id == self.member_b.run_id or self.weight in (0.0, 1.0)

    @property
    def kind(self) -> str:
        if self.single:
            only = self.member_a if self.weight > 0 else self.member_b
            return f"single member {only.label}"
        return f"pair {self.member_a.label} + {self.member_b.label}" + (
            " (equal weights)" if self.decision is not None and self.decision.procedure == "equal" else "")

    def member_spec(self) -> list[dict]:
        """What the served model needs of each member besides its checkpoint."""
        return [{"arch": m.arch, "trial": m.trial, "run_id": m.run_id, "tta": v, "temperature": t,
                 "precision": m.precision}
                for m, v, t in ((self.member_a, self.variant_a, self.temperature_a),
                                (self.member_b, self.variant_b, self.temperature_b))]


def rules_of(settings: StudyConfig) -> tuple[str, ...]:
    return tuple(RULES) if settings.ensemble_method == "best" else (settings.ensemble_method,)


def enough_candidates(candidates: list[Candidate], settings: StudyConfig, planned: bool = False) -> bool:
    """At least one pair, from two member studies when the session has two or more; in a budget
    whose plan trained fewer members (``planned``), whatever the plan made, one run included."""
    archs = [c.arch for c in candidates]
    if planned:
        return bool(candidates)
    return len(candidates) >= 2 and bool(candidate_pairs(archs)) and len(set(archs)) >= min(2, len(settings.members))


def build_ensemble(candidates: list[Candidate], labels: np.ndarray, ids: list[str], classes: tuple[str, ...],
                   settings: StudyConfig, client, run_id: str, mirror: bool = True) -> EnsembleResult:
    """Calibrate, search, decide by cross-fitted evidence (``evidence.decide``), and log the choice into
    ``run_id`` (selection split only); ``mirror`` False leaves the mirror-image votes out. Final runs
    that each trained on half of the selection split go to ``build_from_halves``."""
    if any(c.rows is not None for c in candidates):
        return build_from_halves(candidates, labels, ids, classes, settings, client, run_id)
    logits, flipped, archs = [c.logits for c in candidates], [c.logits_flipped for c in candidates], \
        [c.arch for c in candidates]
    views = calibrate(logits, flipped, labels, mirror)
    rules = rules_of(settings)
    _, ranked = search(views, archs, labels, rules, settings.ensemble_weight_step, settings.sampler_seed)
    decision = decide(Inputs(logits, flipped, archs, labels, rules, settings.ensemble_weight_step,
                             settings.sampler_seed, mirror), settings.ensemble_margin)
    choice = decision.choice
    a, b = candidates[choice.a], candidates[choice.b]
    va, vb = views[(choice.a, choice.variant_a)], views[(choice.b, choice.variant_b)]
    result = EnsembleResult(run_id, a, b, choice.weight, choice.rule, choice.variant_a, choice.variant_b,
                            va.temperature, vb.temperature, choice.accuracy, choice.nll,
                            views[(choice.a, "none")].accuracy, views[(choice.b, "none")].accuracy, len(labels),
                            decision)
    _log_choice(client, result, len(candidates), settings, rules, mirror)
    _log_selection_outputs(client, result, _pair_rows(candidates, ranked), va, vb, labels, ids, classes)
    return result


def build_from_halves(candidates: list[Candidate], labels: np.ndarray, ids: list[str], classes: tuple[str, ...],
                      settings: StudyConfig, client, run_id: str) -> EnsembleResult:
    """Two cross-fitted final runs (``data.crossfit``): their equal-weight average unless one is worse
    on its held-out half by more than the margin (``evidence.decide_halves``); plain images only (no
    flips, no weight search: no image is left to check them on)."""
    halves = decide_halves([c.logits for c in candidates], [c.rows for c in candidates], labels,
                           settings.ensemble_margin)
    d = halves.decision
    ch = d.choice
    a, b = candidates[ch.a], candidates[ch.b]
    result = EnsembleResult(run_id, a, b, ch.weight, ch.rule, "none", "none", halves.temperatures[ch.a],
                            halves.temperatures[ch.b], ch.accuracy, ch.nll, halves.accuracy[ch.a],
                            halves.accuracy[ch.b], int(halves.covered.sum()), d, out_of_fold=True)
    _log_choice(client, result, len(candidates), settings, ("soft",), False)
    covered = np.flatnonzero(halves.covered)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        tracking.write_evaluation(out, labels[covered], halves.probs[covered].astype(np.float32),
                                  [ids[i] for i in covered], classes,
                                  "final runs out of fold (each image by the run that did not train on it)",
                                  split="selection (out of fold)")
        client.log_artifacts(run_id, str(out))
    return result


def _log_choice(client, result: EnsembleResult, n_candidates: int, settings: StudyConfig,
                rules: tuple[str, ...], mirror: bool) -> None:
    """The choice as the run's params (what was chosen, from how many candidates, by which rule) and metrics."""
    a, b, run_id = result.member_a, result.member_b, result.run_id
    tracking.log_params(client, run_id, {
        "member_a_run_id": a.run_id, "member_b_run_id": b.run_id, "member_a": a.label, "member_b": b.label,
        "weight": round(result.weight, 6), "method": result.method, "tta_a": result.variant_a,
        "tta_b": result.variant_b, "temperature_a": round(result.temperature_a, 4),
        "temperature_b": round(result.temperature_b, 4), "candidates": n_candidates, "top_k": settings.top_k,
        "rules": ",".join(rules), "weight_step": settings.ensemble_weight_step, "mirror_votes": mirror,
        "procedure": result.decision.procedure if result.decision else "searched",
        "chosen_by": ("final runs scored on the selection half each did not train on: the equal-weight pair unless "
                      f"one is worse by more than {settings.ensemble_margin:g} standard error(s)" if result.out_of_fold
                      else "cross-fitted selection accuracy: the equal-weight pair unless the best member alone or the "
                      f"searched combination beats it by more than {settings.ensemble_margin:g} standard error(s)"),
        "ensemble_kind": result.kind,
    })
    if result.decision is not None:
        tracking.set_tags(client, run_id, {"ensemble_decision": result.decision.reason[:5000]})
        tracking.log_metrics(client, run_id, {M.crossfit_metric(p): v
                                              for p, v in result.decision.crossfit_accuracy.items()})
    tracking.log_metrics(client, run_id, {
        M.SELECTION_ACCURACY: result.selection_accuracy, M.SELECTION_NLL: result.selection_nll,
        M.SELECTION_IMAGES: result.selection_images, M.MEMBER_A_SELECTION_ACCURACY: result.member_a_accuracy,
        M.MEMBER_B_SELECTION_ACCURACY: result.member_b_accuracy, M.ENSEMBLE_WEIGHT: result.weight,
        M.TEMPERATURE_A: result.temperature_a, M.TEMPERATURE_B: result.temperature_b,
        M.ENSEMBLE_MEMBERS: 1 if result.single else 2})


def _pair_rows(candidates: list[Candidate], ranked: list[Choice]) -> list[dict]:
    """The ranked pairs, one row each: the run's ``best_pairs`` table."""
    return [{"member_a": candidates[c.a].label, "member_b": candidates[c.b].label, "tta_a": c.variant_a,
             "tta_b": c.variant_b, "method": c.rule, "weight": c.weight, "selection_nll": c.nll,
             "selection_accuracy": c.accuracy, "better_member_accuracy": c.floor,
             "member_a_run_id": candidates[c.a].run_id, "member_b_run_id": candidates[c.b].run_id} for c in ranked]


def _log_selection_outputs(client, result: EnsembleResult, rows: list[dict], va: View, vb: View, labels: np.ndarray,
                           ids: list[str], classes: tuple[str, ...]) -> None:
    """The pairs table, the weight curve, the reliability figure and the ensemble's evaluation files, all on
    the selection split."""
    a, b, run_id = result.member_a, result.member_b, result.run_id
    probs = combine(va.probs, vb.probs, result.weight, result.method)
    raw = [calibrated(variant_logprobs(m.logits, m.logits_flipped, v), 1.0)
           for m, v in ((a, result.variant_a), (b, result.variant_b))]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "best_pairs.json").write_text(json.dumps(rows, indent=2))
        weight_figure(out / M.WEIGHT_CURVE_PNG, va.probs, vb.probs, labels, result)
        reliability_figure(out / "reliability_selection.png", combine(raw[0], raw[1], result.weight, result.method),
                           probs, labels, "selection (in-sample)")
        tracking.write_evaluation(out, labels, probs.astype(np.float32), ids, classes,
                                  f"ensemble {a.label}+{b.label}, w={result.weight:.2f} (selection split)",
                                  split="selection")
        client.log_artifacts(run_id, str(out))
    try:
        import pandas as pd

        client.log_table(run_id, data=pd.DataFrame(rows[:200]), artifact_file="best_pairs_table.json")
    except Exception:  # noqa: BLE001 - the JSON file above already holds the table
        pass
