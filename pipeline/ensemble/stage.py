"""The ensemble step of a session, from plain inputs: candidates with their stored probabilities and
labels in, the chosen pair, weight and rule out, logged into the run the caller opened for it.

``tune`` gathers the candidates (the top trials of each member study) and registers the result;
this stage knows nothing of studies or sessions.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import metric_names as M
from .. import tracking
from ..config import StudyConfig
from .rules import RULES, combine
from .search import accuracy, candidate_pairs, cross_fitted_accuracy, search_pair, weight_curve

# MLflow's log_table selects 'object' columns, which pandas 3 says will stop including str ones.
warnings.filterwarnings("ignore", message="For backward compatibility, 'str' dtypes are included by select_dtypes")


@dataclass(frozen=True)
class Candidate:
    """One finished trial that may join the ensemble."""

    arch: str
    trial: int
    run_id: str
    val_accuracy: float
    probs: np.ndarray  # validation probabilities at its best epoch, N x C
    checkpoint: Path

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
    val_accuracy: float  # in-sample: chosen and scored on the same validation images
    holdout_accuracy: float  # cross-fitted over the ensemble's own choice only
    member_a_accuracy: float
    member_b_accuracy: float


def rules_of(settings: StudyConfig) -> tuple[str, ...]:
    return tuple(RULES) if settings.ensemble_method == "best" else (settings.ensemble_method,)


def enough_candidates(candidates: list[Candidate], settings: StudyConfig) -> bool:
    """At least one pair, from two member studies when the session has two or more."""
    archs = [c.arch for c in candidates]
    return len(candidates) >= 2 and bool(candidate_pairs(archs)) and len(set(archs)) >= min(2, len(settings.members))


def build_ensemble(candidates: list[Candidate], labels: np.ndarray, ids: list[str], classes: tuple[str, ...],
                   settings: StudyConfig, client, run_id: str) -> EnsembleResult:
    """Search the pair, weight and rule on the candidates' stored probabilities; log into ``run_id``."""
    archs = [c.arch for c in candidates]
    rules = rules_of(settings)
    probs = [c.probs for c in candidates]
    holdout = cross_fitted_accuracy(probs, archs, labels, settings.ensemble_trials, settings.sampler_seed, rules)
    (i, j, weight, method), in_sample = search_pair(probs, archs, labels, settings.ensemble_trials,
                                                    settings.sampler_seed, rules)
    a, b = candidates[i], candidates[j]
    result = EnsembleResult(run_id, a, b, weight, method, in_sample, holdout, accuracy(a.probs, labels),
                            accuracy(b.probs, labels))
    _log(client, result, candidates, labels, ids, classes, settings, rules)
    return result


def pair_table(candidates: list[Candidate], labels: np.ndarray, rules: tuple[str, ...]) -> list[dict]:
    """Every candidate pair and rule at its best weight on the curve, best first."""
    rows = []
    for i, j in candidate_pairs([c.arch for c in candidates]):
        ci, cj = candidates[i], candidates[j]
        for rule in rules:
            weights, accs = weight_curve(ci.probs, cj.probs, labels, rule)
            k = int(accs.argmax())
            rows.append({"member_a": ci.label, "member_b": cj.label, "method": rule, "best_weight": float(weights[k]),
                         "accuracy": float(accs[k]), "accuracy_at_0.5": float(accs[len(accs) // 2]),
                         "member_a_accuracy": ci.val_accuracy, "member_b_accuracy": cj.val_accuracy,
                         "member_a_run_id": ci.run_id, "member_b_run_id": cj.run_id})
    return sorted(rows, key=lambda r: -r["accuracy"])


def _log(client, result: EnsembleResult, candidates: list[Candidate], labels: np.ndarray, ids: list[str],
         classes: tuple[str, ...], settings: StudyConfig, rules: tuple[str, ...]) -> None:
    a, b, run_id = result.member_a, result.member_b, result.run_id
    tracking.log_params(client, run_id, {
        "member_a_run_id": a.run_id, "member_b_run_id": b.run_id, "member_a": a.label, "member_b": b.label,
        "weight": round(result.weight, 6), "method": result.method, "candidates": len(candidates),
        "top_k": settings.top_k, "search_trials": settings.ensemble_trials,
        "honest_estimate": "2-fold cross-fit on stratified halves of validation",
    })
    tracking.log_metrics(client, run_id, {
        M.ENSEMBLE_VAL_ACCURACY: result.val_accuracy, M.ENSEMBLE_HONEST_ACCURACY: result.holdout_accuracy,
        M.MEMBER_A_VAL_ACCURACY: result.member_a_accuracy, M.MEMBER_B_VAL_ACCURACY: result.member_b_accuracy,
        M.ENSEMBLE_WEIGHT: result.weight, M.VAL_ACCURACY: result.val_accuracy,
        M.BEST_VAL_ACCURACY: result.val_accuracy})
    rows = pair_table(candidates, labels, rules)
    probs = combine(a.probs, b.probs, result.weight, result.method)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "best_pairs.json").write_text(json.dumps(rows, indent=2))
        _weight_figure(out / M.WEIGHT_CURVE_PNG, result, labels)
        tracking.write_evaluation(out, labels, probs.astype(np.float32), ids, classes,
                                  f"ensemble {a.arch}+{b.arch}, w={result.weight:.2f}")
        client.log_artifacts(run_id, str(out))
    try:
        import pandas as pd

        client.log_table(run_id, data=pd.DataFrame(rows), artifact_file="best_pairs_table.json")
    except Exception:  # noqa: BLE001 - the JSON file above already holds the table
        pass


def _weight_figure(path: Path, result: EnsembleResult, labels: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = result.member_a, result.member_b
    weights, accs = weight_curve(a.probs, b.probs, labels, result.method)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(weights, accs, label=f"{result.method} vote")
    ax.axhline(result.member_a_accuracy, ls=":", color="gray")
    ax.axvline(result.weight, ls="--", color="red", label=f"chosen w={result.weight:.2f}")
    ax.set_xlabel(f"weight of {a.label} (1-w for {b.label})")
    ax.set_ylabel("validation accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
