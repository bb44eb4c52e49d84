"""The ensemble step of a tuning session: choose the pair and weight, log one nested run, register.

The search runs on stored validation probabilities. Choosing on the same images that score the
choice flatters it, so the honest figure is cross-fitted: choose on one stratified half, score on
the other, and the other way round; the mean is reported beside the in-sample accuracy.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics as M
from . import tracking
from .ensemble import METHODS, accuracy, combine, stratified_halves, weight_curve


@dataclass
class Candidate:
    arch: str
    trial: int
    run_id: str
    val_accuracy: float
    probs: np.ndarray
    checkpoint: Path


def load_candidates(session, workdir: Path) -> tuple[list[Candidate], np.ndarray]:
    from .tune import top_trials

    labels = session.data.validation.labels.numpy()
    ids = session.data.validation.ids
    candidates = []
    for arch, study in session.studies.items():
        for t in top_trials(study, session.preset.study.top_k):
            run_id = t.user_attrs["mlflow_run_id"]
            dst = workdir / run_id
            dst.mkdir(parents=True, exist_ok=True)
            npz = tracking.download_artifact(session.client, run_id, M.PREDICTIONS_ARTIFACT, dst)
            ckpt = tracking.download_artifact(session.client, run_id, M.CHECKPOINT_ARTIFACT, dst)
            stored = np.load(npz)
            if list(stored["ids"]) != list(ids):
                print(f"note: skipping trial {t.number} of {arch}: its predictions are for other images")
                continue
            candidates.append(Candidate(arch, t.number, run_id, float(t.value), stored["probs"], ckpt))
    return candidates, labels


def choose(candidates: list[Candidate], labels: np.ndarray, rows: np.ndarray, n_trials: int, seed: int,
           methods: tuple[str, ...]) -> tuple[tuple[int, int, float, str], float]:
    from .tune import search_pair

    return search_pair([c.probs[rows] for c in candidates], [c.arch for c in candidates], labels[rows],
                       n_trials, seed, methods)


def run_ensemble(session, model_name: str) -> dict[str, Any] | None:
    from .registry import register_ensemble

    cfg = session.preset.study
    methods = METHODS if cfg.ensemble_method == "best" else (cfg.ensemble_method,)
    client = session.client
    with tempfile.TemporaryDirectory() as tmp:
        candidates, labels = load_candidates(session, Path(tmp))
        if len({c.arch for c in candidates}) < min(2, len(cfg.members)) or len(candidates) < 2:
            print("not enough finished trials for an ensemble: nothing registered")
            return None
        run_id = tracking.start_run(client, session.experiment_id, f"ensemble-{session.study_name}",
                                    parent_run_id=session.parent_run_id,
                                    tags={**tracking.standard_tags("cpu"), "kind": "ensemble",
                                          "optuna.study": session.study_name})
        with tracking.run_guard(client, run_id):
            # Honest estimate: choose on one half, score on the other, both ways.
            half_a, half_b = stratified_halves(labels, cfg.sampler_seed)
            holdout = []
            for fit_rows, score_rows in ((half_a, half_b), (half_b, half_a)):
                (i, j, w, m), _ = choose(candidates, labels, fit_rows, cfg.ensemble_trials, cfg.sampler_seed, methods)
                holdout.append(accuracy(combine(candidates[i].probs[score_rows], candidates[j].probs[score_rows],
                                                w, m), labels[score_rows]))
            everything = np.arange(len(labels))
            (i, j, weight, method), in_sample = choose(candidates, labels, everything, cfg.ensemble_trials,
                                                        cfg.sampler_seed, methods)
            a, b = candidates[i], candidates[j]
            probs = combine(a.probs, b.probs, weight, method)
            result = {
                "run_id": run_id, "member_a": a, "member_b": b, "weight": weight, "method": method,
                "val_accuracy": in_sample, "holdout_accuracy": float(np.mean(holdout)),
                "member_a_accuracy": accuracy(a.probs, labels), "member_b_accuracy": accuracy(b.probs, labels),
            }
            _log(session, run_id, candidates, labels, result, methods, probs)
            version = register_ensemble(session, run_id, result, model_name)
            result["version"] = version
    return result


def _log(session, run_id: str, candidates: list[Candidate], labels: np.ndarray, result: dict,
         methods: tuple[str, ...], probs: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = session.client
    a, b = result["member_a"], result["member_b"]
    tracking.log_params(client, run_id, {
        "member_a_run_id": a.run_id, "member_b_run_id": b.run_id,
        "member_a": f"{a.arch}#{a.trial}", "member_b": f"{b.arch}#{b.trial}",
        "weight": round(result["weight"], 6), "method": result["method"], "candidates": len(candidates),
        "top_k": session.preset.study.top_k, "search_trials": session.preset.study.ensemble_trials,
        "honest_estimate": "2-fold cross-fit on stratified halves of validation",
    })
    tracking.log_metrics(client, run_id, {
        M.ENSEMBLE_VAL_ACCURACY: result["val_accuracy"], M.ENSEMBLE_HONEST_ACCURACY: result["holdout_accuracy"],
        M.MEMBER_A_VAL_ACCURACY: result["member_a_accuracy"], M.MEMBER_B_VAL_ACCURACY: result["member_b_accuracy"],
        M.ENSEMBLE_WEIGHT: result["weight"], M.VAL_ACCURACY: result["val_accuracy"],
        M.BEST_VAL_ACCURACY: result["val_accuracy"]})
    rows = []
    one_arch = len({c.arch for c in candidates}) == 1
    for i, ci in enumerate(candidates):
        for j in range(i + 1, len(candidates)):
            cj = candidates[j]
            if not one_arch and ci.arch == cj.arch:
                continue
            for method in methods:
                weights, accs = weight_curve(ci.probs, cj.probs, labels, method)
                k = int(accs.argmax())
                rows.append({"member_a": f"{ci.arch}#{ci.trial}", "member_b": f"{cj.arch}#{cj.trial}",
                             "method": method, "best_weight": float(weights[k]), "accuracy": float(accs[k]),
                             "accuracy_at_0.5": float(accs[50]), "member_a_accuracy": ci.val_accuracy,
                             "member_b_accuracy": cj.val_accuracy,
                             "member_a_run_id": ci.run_id, "member_b_run_id": cj.run_id})
    rows.sort(key=lambda r: -r["accuracy"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "best_pairs.json").write_text(json.dumps(rows, indent=2))
        weights, accs = weight_curve(a.probs, b.probs, labels, result["method"])
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(weights, accs, label=f"{result['method']} vote")
        ax.axhline(result["member_a_accuracy"], ls=":", color="gray")
        ax.axvline(result["weight"], ls="--", color="red", label=f"chosen w={result['weight']:.2f}")
        ax.set_xlabel(f"weight of {a.arch}#{a.trial} (1-w for {b.arch}#{b.trial})")
        ax.set_ylabel("validation accuracy")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "weight_curve.png", dpi=110)
        plt.close(fig)
        tracking.write_evaluation(out, labels, probs.astype(np.float32), session.data.validation.ids,
                                  session.data.classes, f"ensemble {a.arch}+{b.arch}, w={result['weight']:.2f}")
        client.log_artifacts(run_id, str(out))
    try:
        import pandas as pd

        client.log_table(run_id, data=pd.DataFrame(rows), artifact_file="best_pairs_table.json")
    except Exception:  # noqa: BLE001 - the JSON file above already holds the table
        pass
