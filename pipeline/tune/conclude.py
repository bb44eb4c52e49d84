"""How a trial ends: its state told to the study first, then its run closed, all while the trial's
heartbeat still beats (``run_trial`` calls this inside its ``Heartbeat``).

- The heartbeat beats until the tell: a slow tracking server can never make a live trial look lost,
  so a trial that failed for a deterministic reason (a non-finite loss, a bad configuration) is told
  FAIL once and never re-run by the heartbeat's retry.
- The tell comes before the MLflow bookkeeping: a worker dying in between leaves a finished trial
  with a RUNNING run, which ``close_lost_runs`` closes with the recorded reason.
- A trial another worker already finished (it saw no heartbeat and failed, then re-queued, it) is
  not an error: the run is closed saying so, and the worker goes on.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from .. import faults, tracking
from .session import MAX_RETRY, Session
from .storage import heartbeat_enabled

RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback


@dataclass
class Outcome:
    """What the trial's own work ended with; at most one of value, pruned_at, failure is set."""

    value: float | None = None  # COMPLETE with this objective
    pruned_at: int | None = None  # PRUNED after this epoch
    failure: str = ""  # FAIL for this reason
    interrupted: bool = False  # FAIL by SIGINT/SIGTERM: run KILLED, trial re-queued with its parameters
    lost: bool = False  # another worker finished the trial while this one ran it


def quietly(*actions) -> None:
    """Best-effort bookkeeping: each action is tried, none hides the trial's outcome."""
    for action in actions:
        try:
            action()
        except Exception:  # noqa: BLE001 - record what we can; the storage stays consistent
            pass


def conclude(session: Session, arch: str, trial: optuna.Trial, run_id: str | None, outcome: Outcome) -> TrialState:
    """Tell the study how the trial ended, then close its run accordingly. Returns the trial's state."""
    study = session.studies[arch]
    # Test hook: a tracking server that answers slowly while the trial is being closed.
    faults.inject("slow_tracking", arch, trial.number, seconds=3 * (session.preset.study.heartbeat_seconds or 1))
    if outcome.lost:
        return lost(session, arch, trial, run_id)
    reason = session.scrub(outcome.failure)
    try:
        if outcome.value is not None:
            study.tell(trial, outcome.value)
            state = TrialState.COMPLETE
        elif outcome.pruned_at is not None:
            study.tell(trial, state=TrialState.PRUNED)
            state = TrialState.PRUNED
        else:
            trial.set_user_attr("error", reason[:2000])  # close_lost_runs' reason if this worker dies next
            study.tell(trial, state=TrialState.FAIL)
            state = TrialState.FAIL
    except (ValueError, UpdateFinishedTrialError):
        # Optuna refuses to tell a finished trial (ValueError) or loses the race (UpdateFinishedTrialError).
        if not session.storage.get_trial(trial._trial_id).state.is_finished():
            raise
        return lost(session, arch, trial, run_id)
    if outcome.interrupted:
        quietly(lambda: requeue(session, study, trial))
    if run_id is not None:
        close_run(session, run_id, state, outcome, reason)
    if state == TrialState.FAIL:
        print(f"trial {trial.number} of {study.study_name} failed: {reason.splitlines()[0][:400] if reason else '?'}")
    return state


def close_run(session: Session, run_id: str, state: TrialState, outcome: Outcome, reason: str) -> None:
    client = session.client
    if state == TrialState.COMPLETE:
        quietly(lambda: tracking.end_run(client, run_id, "FINISHED"))
    elif state == TrialState.PRUNED:
        quietly(lambda: tracking.set_tags(client, run_id, {"optuna.state": "PRUNED",
                                                           "pruned_at_epoch": outcome.pruned_at}),
                lambda: tracking.end_run(client, run_id, "KILLED"))
    else:
        status = "KILLED" if outcome.interrupted else "FAILED"
        quietly(lambda: tracking.set_tags(client, run_id, {
                    "optuna.state": "FAIL", "error": reason[:5000],
                    **({"stopped_by": "interrupt"} if outcome.interrupted else {})}),
                lambda: tracking.end_run(client, run_id, status))


def lost(session: Session, arch: str, trial: optuna.Trial, run_id: str | None) -> TrialState:
    """Another worker finished this trial while this one ran it: it saw no heartbeat for longer than
    the grace period, failed the trial and re-queued it. This worker's result does not count; its run
    is closed FAILED saying so, and the worker goes on."""
    study = session.studies[arch]
    state = session.storage.get_trial(trial._trial_id).state
    retry = next((t.number for t in study.get_trials(deepcopy=False) if trial.number in RETRY.retry_history(t)
                  and t.number > trial.number), None)
    grace = 2 * (session.preset.study.heartbeat_seconds or 0)
    why = (f"another worker marked trial {trial.number} {state.name} (no heartbeat from this worker for more "
           f"than {grace} s) before this worker reported its outcome, so its result here does not count; "
           + (f"retried as trial {retry} with the same parameters" if retry is not None else "not retried"))
    if run_id is not None:
        quietly(lambda: tracking.set_tags(session.client, run_id, {"optuna.state": state.name, "error": why,
                                                                   "stopped_by": "heartbeat"}),
                lambda: tracking.end_run(session.client, run_id, "FAILED"))
    print(f"trial {trial.number} of {study.study_name}: {why}")
    return state


def requeue(session: Session, study: optuna.Study, trial: optuna.Trial) -> None:
    """Queue an interrupted trial again with the same parameters (and seed), as a lost worker's is."""
    callback = (session.storage.get_heartbeat_stale_trial_callback() if heartbeat_enabled(session.storage)
                else RETRY(max_retry=MAX_RETRY))
    if callback is not None:
        callback(study, session.storage.get_trial(trial._trial_id))
