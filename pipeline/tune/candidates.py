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
    """The ``k`` best search trials of one member study, and every finished refit or final run."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and not math.isnan(t.value) and t.user_attrs.get(keys.RUN)]
    search = sorted((t for t in complete if not is_refit(t)), key=lambda t: (-t.value, t.number))[:k]
    return search + [t for t in complete if is_refit(t)]


def session_candidates(session: Session) -> dict[str, list[optuna.trial.FrozenTrial]]:
    """The ensemble's candidates, per member. When the session has finished final runs (a time
    budget), those alone: they had equal, long schedules, while a search run is a short run that ranks
    configurations and is no member (measured: a 5-pass search run paired with a final run scored below
    the final run alone). Otherwise each member's ``top_trials``."""
    k = session.preset.study.top_k
    chosen = {arch: top_trials(study, k) for arch, study in session.studies.items()}
    finals = {arch: [t for t in trials if keys.is_final(t)] for arch, trials in chosen.items()}
    return finals if any(finals.values()) else chosen


def candidate_fingerprint(session: Session, model_name: str) -> str:
    """Which trials would enter the ensemble: an ensemble of the same set is registered once."""
    return ";".join(f"{arch}:" + ",".join(str(t.number) for t in trials)
                    for arch, trials in session_candidates(session).items()) + f"|{model_name}"


def load_candidates(session: Session, workdir: Path) -> list[Candidate]:
    ids = session.data.validation.ids
    candidates = []
    for arch, trials in session_candidates(session).items():
        for t in trials:
            run_id = t.user_attrs[keys.RUN]
            dst = workdir / run_id
            dst.mkdir(parents=True, exist_ok=True)
            npz = tracking.download_artifact(session.client, run_id, M.PREDICTIONS_ARTIFACT, dst)
            ckpt = tracking.download_artifact(session.client, run_id, M.CHECKPOINT_ARTIFACT, dst)
            stored = np.load(npz)
            rows = held_out_rows(list(stored["ids"]), ids) if t.user_attrs.get(keys.SELECTION_HALF) is not None \
                else None
            if (rows is None and list(stored["ids"]) != list(ids)) or (rows is not None and len(rows) == 0):
                print(f"note: skipping trial {t.number} of {arch}: its predictions are for other images")
                continue
            # Runs of older versions stored probabilities only: their logs stand in for logits.
            logits = stored["logits"] if "logits" in stored else np.log(np.clip(stored["probs"], 1e-12, None))
            flipped = stored["logits_flipped"] if "logits_flipped" in stored else None
            precision = str(stored["precision"]) if "precision" in stored else "fp32"
            candidates.append(Candidate(arch, t.number, run_id, float(t.value), logits, flipped, ckpt, precision,
                                        rows))
    return candidates


def held_out_rows(stored: list[str], ids: list[str]) -> np.ndarray:
    """Where a cross-fitted final run's scored images sit in the selection split (empty: not all of them are in it)."""
    where = {image_id: i for i, image_id in enumerate(ids)}
    if any(image_id not in where for image_id in stored):
        return np.zeros(0, dtype=np.int64)
    return np.asarray([where[image_id] for image_id in stored], dtype=np.int64)
