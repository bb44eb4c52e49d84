"""The names workers share through the storage, in one place: study and trial attributes, and locks.

Every worker of a session reads what the first one wrote under these names, so a name is spelled
once, here. Study attributes live on every member study unless noted (the first member's study for
session-wide facts); trial attributes on the trial they describe.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

# Study attributes: the session's facts, written once by its first worker.
PARENT_RUN = "mlflow_parent_run_id"
EXPERIMENT = "mlflow_experiment_id"
DATASET_DIGEST = "dataset_digest"
AUDIT_SPLIT = "audit_split"
BUDGET_STARTED = "budget_started_at"  # first member: when the session's clock started
BUDGET_SECONDS = "budget_seconds"  # first member: the time budget's length
PLAN = "plan"  # first member: the session's plan, as a dict
ENSEMBLE_FINGERPRINT = "ensemble_fingerprint"  # first member: which trials the registered ensemble holds
ENSEMBLE_VERSION = "ensemble_version"

# Study attributes: "enqueued once per session" markers.
DEFAULTS_ENQUEUED = "defaults_enqueued"
FINALS_ENQUEUED = "refit_enqueued"  # refits or final runs (the name predates final runs; stored sessions use it)
WARM_STARTED = "warm_started_from"

# Trial attributes.
RUN = "mlflow_run_id"  # the trial's MLflow run
ERROR = "error"  # why it failed, for close_lost_runs if its worker dies before closing the run
EPOCH_SECONDS = "epoch_seconds"  # wall seconds of each finished epoch (the budget's projections)
PHASE = "phase"  # search (absent), refit or final
REFIT = "refit"  # without a time budget: the best search trial continued (study.refit_epochs)
FINAL = "final"  # in a time budget: one of the plan's final runs
REFIT_OF = "refit_of"  # the search trial a refit continues, and its run
REFIT_OF_RUN = "refit_of_run"
FINAL_OF = "final_of"  # the search trial whose configuration a final run trains (-1: the default)
SELECTION_HALF = "selection_half"  # a pair's final run: the selection half it is scored on (it trains on the other)
DEFAULT_CONFIG = "default_config"  # the preset's own configuration, each searching member's first trial
WARM_START_FROM = "warm_start_from"  # STUDY.arch#n: the earlier trial a warm-started one repeats

# Trial states that count as done (a FAIL is retried or reported, never counted).
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

# Optuna's re-queueing of a lost (or interrupted) trial: same parameters, its origin's seed.
RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback
MAX_RETRY = 2  # a trial is run again at most this often

# Locks (storage.storage_lock): schema creation, then one per session and one per member study.
MLFLOW_SCHEMA_LOCK = "mlflow-schema"
SETUP_LOCK = "setup"


def admit_lock(study_name: str) -> str:
    """Held to count a member study's trials and ask the next one, or to enqueue into it."""
    return f"admit:{study_name}"


def session_lock(session_name: str) -> str:
    """Held to create the parent run and to start the session's clock and plan."""
    return f"session:{session_name}"


def ensemble_lock(session_name: str) -> str:
    """Held while one worker builds and registers the ensemble."""
    return f"ensemble:{session_name}"


def phase_of(trial: optuna.trial.FrozenTrial | optuna.Trial) -> str:
    """search, refit or final: in the run's name and its ``phase`` tag."""
    return trial.user_attrs.get(PHASE) or "search"


def is_refit(trial: optuna.trial.FrozenTrial | optuna.Trial) -> bool:
    """A refit or a final run: not a search trial (not counted against the search, never pruned)."""
    return trial.user_attrs.get(PHASE) in (REFIT, FINAL)


def is_final(trial: optuna.trial.FrozenTrial | optuna.Trial) -> bool:
    return trial.user_attrs.get(PHASE) == FINAL
