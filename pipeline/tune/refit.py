"""Refit: once the search is over, each member's best configuration continues from its best
checkpoint for more epochs (the refit phase of a time budget, or ``study.refit_epochs``). A refit
is a trial of the member study like any other (a nested run tagged ``phase=refit``, an ensemble
candidate), enqueued once per member with the best trial's parameters; it does not count against
``study.trials`` and is never pruned."""

from __future__ import annotations

import math

import optuna
from optuna.trial import TrialState

from .session import RUN_ATTR
from .storage import storage_lock

PHASE = "phase"
REFIT = "refit"  # without a time budget: the best trial continued (study.refit_epochs)
FINAL = "final"  # in a time budget: the plan's final run (phases.py)
DONE = "refit_enqueued"  # member study user attribute


def is_refit(trial: optuna.trial.FrozenTrial | optuna.Trial) -> bool:
    """A refit or a final run: not a search trial (not counted, never pruned)."""
    return trial.user_attrs.get(PHASE) in (REFIT, FINAL)


def is_final(trial: optuna.trial.FrozenTrial | optuna.Trial) -> bool:
    return trial.user_attrs.get(PHASE) == FINAL


def best_search_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if not is_refit(t) and t.value is not None and not math.isnan(t.value) and t.user_attrs.get(RUN_ATTR)]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def enqueue_refits(studies: dict[str, optuna.Study], storage_url: str) -> dict[str, int]:
    """Enqueue one refit per member study (once per session); returns arch -> the trial it continues."""
    enqueued = {}
    for arch, study in studies.items():
        with storage_lock(storage_url, f"admit:{study.study_name}"):
            if study.user_attrs.get(DONE):
                continue
            best = best_search_trial(study)
            study.set_user_attr(DONE, True)
            if best is None:
                continue
            study.enqueue_trial(best.params, user_attrs={PHASE: REFIT, "refit_of": best.number,
                                                         "refit_of_run": best.user_attrs[RUN_ATTR]})
            enqueued[arch] = best.number
    return enqueued


def refit_enabled(session) -> bool:
    """Without a time budget: refits when ``study.refit_epochs`` asks (a budget has final runs instead)."""
    return session.budget is None and session.preset.study.refit_epochs > 0


def refit_start(session, trial: optuna.Trial, train_cfg):
    """(training settings, initial weights) of a refit: the best trial's checkpoint, continued for
    ``study.refit_epochs`` at the learning rate its plateau schedule would drop to next."""
    import tempfile
    from dataclasses import replace

    from .. import metrics as M
    from .. import tracking
    from ..train.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_artifact(session.client, trial.user_attrs["refit_of_run"], M.CHECKPOINT_ARTIFACT, tmp)
        state = load_checkpoint(path)["state_dict"]
    epochs = session.preset.study.refit_epochs
    return replace(train_cfg, epochs=epochs, lr=train_cfg.lr * train_cfg.lr_factor), state
