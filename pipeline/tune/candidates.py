"""The ensemble's candidates: the top trials of each member study, with their stored validation
probabilities and best checkpoints downloaded from their runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from .. import metrics as M
from .. import tracking
from ..ensemble.stage import Candidate
from . import keys
from .keys import is_refit
from .session import Session


def top_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The ``k`` best search trials, and every finished refit (a continued best configuration)."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and not math.isnan(t.value) and t.user_attrs.get(keys.RUN)]
    search = sorted((t for t in complete if not is_refit(t)), key=lambda t: (-t.value, t.number))[:k]
    return search + [t for t in complete if is_refit(t)]


def candidate_fingerprint(session: Session, model_name: str) -> str:
    """Which trials would enter the ensemble: an ensemble of the same set is registered once."""
    k = session.preset.study.top_k
    return ";".join(f"{arch}:" + ",".join(str(t.number) for t in top_trials(study, k))
                    for arch, study in session.studies.items()) + f"|{model_name}"


def load_candidates(session: Session, workdir: Path) -> list[Candidate]:
    ids = session.data.validation.ids
    candidates = []
    for arch, study in session.studies.items():
        for t in top_trials(study, session.preset.study.top_k):
            run_id = t.user_attrs[keys.RUN]
            dst = workdir / run_id
            dst.mkdir(parents=True, exist_ok=True)
            npz = tracking.download_artifact(session.client, run_id, M.PREDICTIONS_ARTIFACT, dst)
            ckpt = tracking.download_artifact(session.client, run_id, M.CHECKPOINT_ARTIFACT, dst)
            stored = np.load(npz)
            if list(stored["ids"]) != list(ids):
                print(f"note: skipping trial {t.number} of {arch}: its predictions are for other images")
                continue
            # Runs of older versions stored probabilities only: their logs stand in for logits.
            logits = stored["logits"] if "logits" in stored else np.log(np.clip(stored["probs"], 1e-12, None))
            flipped = stored["logits_flipped"] if "logits_flipped" in stored else None
            precision = str(stored["precision"]) if "precision" in stored else "fp32"
            candidates.append(Candidate(arch, t.number, run_id, float(t.value), logits, flipped, ckpt, precision))
    return candidates
