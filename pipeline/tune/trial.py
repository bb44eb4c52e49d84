"""One trial as one nested run, from its configuration to its final state.

Whatever happens inside, the trial ends in a final state and its run is closed: COMPLETE/FINISHED,
PRUNED/KILLED, FAIL/FAILED with the reason (the study goes on; a failure is not retried), or, on
SIGINT/SIGTERM, FAIL/KILLED, re-queued with the same parameters, and re-raised. How it ends
(``conclude``) runs while its heartbeat still beats:

- a slow tracking server can never make a live trial look lost, so a trial that failed for a
  deterministic reason is told FAIL once and never re-run by the heartbeat's retry;
- the tell comes before the MLflow bookkeeping: a worker dying in between leaves a finished trial
  with a RUNNING run, which ``workers.close_lost_runs`` closes with the recorded reason;
- a trial another worker already finished (it saw no heartbeat, failed and re-queued it) is not an
  error: the run is closed saying so, and the worker goes on.
"""

from __future__ import annotations

import gc
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from .. import faults, tracking
from ..config import DataConfig, ModelConfig, Preset, TrainConfig, flat_params, override
from ..interrupt import Interrupted
from ..progress import EpochLines
from ..train import Deadline, build_and_fit, resolve_device
from . import keys, sampling
from .budget import EpochBudget, final_deadline
from .phases import final_data, refit_start, search_epochs, waiting_finals
from .pruners import PruningReporter
from .session import WORKER, Session
from .storage import Heartbeat, heartbeat_enabled, retry


@dataclass
class Outcome:
    """What the trial's own work ended with; at most one of value, pruned_at, failure is set."""

    value: float | None = None  # COMPLETE with this objective
    pruned_at: int | None = None  # PRUNED after this epoch
    failure: str = ""  # FAIL for this reason
    interrupted: bool = False  # FAIL by SIGINT/SIGTERM: run KILLED, trial re-queued with its parameters
    lost: bool = False  # another worker finished the trial while this one ran it


def best_effort(*actions: Callable[[], object], attempts: int = 1) -> None:
    """Bookkeeping that must not hide the outcome: each action is tried (``attempts`` times), a
    failing one is skipped."""
    for action in actions:
        try:
            retry(action, attempts=attempts, delay=0.2)
        except Exception:  # noqa: BLE001 - record what we can; the storage stays consistent
            pass


# ----------------------------------------------------------------------------- the trial's settings

def retried_from(session: Session, trial: optuna.Trial) -> int | None:
    """The number of the lost or interrupted trial this one re-runs (None: a first run)."""
    return keys.RETRY.retried_trial_number(session.storage.get_trial(trial._trial_id))


def trial_configs(session: Session, arch: str, trial: optuna.Trial,
                  origin: int | None) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    """The trial's configuration (sampled once; later calls read the stored parameters). A retry of a
    lost or interrupted trial (``origin``: the trial it re-runs, ``retried_from``) keeps the original
    trial's seed as well as its parameters."""
    preset = session.preset
    return sampling.trial_configs(trial, preset.study.space,
                                  override(preset.model, arch=arch, num_classes=session.data.num_classes),
                                  preset.train, preset.data, origin)


def budgeted_configs(session: Session, trial: optuna.Trial,
                     train_cfg: TrainConfig) -> tuple[TrainConfig, Deadline | None]:
    """In a time budget: a search run lasts the plan's rung (its schedule ends with it); a final run
    lasts its share of what is left of the final phase (all of it with a worker per final run).
    Without one: the preset's epochs."""
    if session.budget is None or session.plan is None:
        return train_cfg, None
    if keys.is_final(trial):
        end = final_deadline(session.clock(), session.budget.final_end, waiting_finals(session), session.plan.workers)
        return train_cfg, Deadline(end, session.clock)
    return replace(train_cfg, epochs=search_epochs(session.plan, session.preset, len(session.data.train))), None


def run_tags(session: Session, arch: str, trial: optuna.Trial, device: str, origin: int | None) -> dict[str, str]:
    """The trial run's tags: what it is (arch, study, trial, phase), where it ran, what it continues
    (``origin``: the trial a retry re-runs)."""
    attrs = trial.user_attrs
    related = {"refit_of_trial": attrs.get(keys.REFIT_OF), "final_of_trial": attrs.get(keys.FINAL_OF),
               "optuna.retried_from_trial": origin}
    return {**tracking.standard_tags(device), "kind": "trial", "arch": arch,
            "optuna.study": session.member_study_name(arch), "optuna.trial": str(trial.number), "worker": WORKER,
            "phase": keys.phase_of(trial), **{k: str(v) for k, v in related.items() if v is not None}}


class Listener:
    """fit's report callback: log the epoch to MLflow, say where the trial is, feed the pruner (not
    for a refit or final run), and, for a search run in a time budget, stop at the epoch boundary
    where its next epoch would end after the search phase."""

    def __init__(self, session: Session, arch: str, trial: optuna.Trial, run_id: str, epochs: int = 0):
        refit = keys.is_refit(trial)
        self.logger = tracking.EpochLogger(session.client, run_id)
        self.progress = EpochLines(f"{arch} #{trial.number}" + (f" {keys.phase_of(trial)}" if refit else ""), epochs)
        self.pruning = PruningReporter(trial, prune=not refit)
        self.budget = (EpochBudget(trial, session.budget.search_end, session.clock)
                       if session.budget is not None and not refit else None)
        self.session, self.arch, self.trial = session, arch, trial

    @property
    def last_epoch(self) -> int:
        return self.logger.last_epoch

    def __call__(self, epoch: int, values: dict[str, float]) -> None:
        if self.session.stopping.is_set():  # the main thread was interrupted: stop this thread's trial too
            raise Interrupted("the worker is stopping")
        faults.inject("cuda_oom", self.arch, self.trial.number)
        self.logger(epoch, values)
        self.progress(epoch, values)  # before the pruner, which may end the trial at this epoch
        self.pruning(epoch, values)
        if self.budget is not None:
            self.budget(epoch, values)  # StopTraining: fit ends here with its best state


# ----------------------------------------------------------------------------- running it

def run_trial(session: Session, arch: str, trial: optuna.Trial, progress: bool = False) -> TrialState:
    """Train the trial's configuration in its own nested run and conclude it, whatever happens."""
    outcome, train = Outcome(), _TrialRun(session, arch, trial)
    # The heartbeat beats until conclude() has told the trial's state: however slow the tracking
    # server, no other worker takes this live trial for lost and re-runs it.
    with Heartbeat(session.storage, trial._trial_id, session.preset.study.heartbeat_seconds):
        try:
            outcome.value = train(progress)
        except optuna.TrialPruned:
            outcome.pruned_at = train.listener.last_epoch if train.listener else 0
        except UpdateFinishedTrialError:
            outcome.lost = True  # another worker failed this trial (it saw no heartbeat) while it ran here
        except KeyboardInterrupt as exc:
            release_interrupted(exc)
            outcome.failure = (f"interrupted ({exc or 'SIGINT'}); re-queued with the same parameters for the next "
                               "tune on this study")
            outcome.interrupted = True
            best_effort(lambda: conclude(session, arch, trial, train.run_id, outcome))  # the interrupt propagates
            raise
        except torch.OutOfMemoryError as exc:
            outcome.failure = train.out_of_memory(exc)
        except Exception as exc:  # noqa: BLE001 - fail the trial, not the study
            outcome.failure = f"{type(exc).__name__}: {exc}"
        finally:
            train.release()
        return conclude(session, arch, trial, train.run_id, outcome)


def release_interrupted(exc: BaseException) -> None:
    """Free what the interrupted code held: an interrupt can land mid-read, and the store's cursor,
    kept alive by the traceback's frames, would hold the database's shared lock (SQLite) until the
    process exits, stalling this worker's closing writes and every other worker's."""
    traceback.clear_frames(exc.__traceback__)
    gc.collect()  # the cursor sits in reference cycles of the store's objects


class _TrialRun:
    """The trial's work: its settings, its run, the training and its outputs. Holds what
    ``run_trial``'s handlers need (the run, the listener, the settings) and releases it after."""

    def __init__(self, session: Session, arch: str, trial: optuna.Trial):
        self.session, self.arch, self.trial = session, arch, trial
        self.run_id: str | None = None
        self.listener: Listener | None = None
        self.device = "cpu"
        self.model_cfg: ModelConfig | None = None
        self.train_cfg: TrainConfig | None = None

    def __call__(self, progress: bool) -> float:
        session, trial, client = self.session, self.trial, self.session.client
        origin = retried_from(session, trial)  # one storage read for the seed and the run's tag
        model_cfg, train_cfg, data_cfg = trial_configs(session, self.arch, trial, origin)
        initial = None
        if keys.is_refit(trial) and not keys.is_final(trial):  # the best search trial's checkpoint, continued
            train_cfg, initial = refit_start(session, trial, train_cfg)
        train_cfg, deadline = budgeted_configs(session, trial, train_cfg)
        self.model_cfg, self.train_cfg = model_cfg, train_cfg
        self.device = str(resolve_device(train_cfg.device))
        self.run_id = tracking.start_run(client, session.experiment_id,
                                         f"{self.arch}-{keys.phase_of(trial)}-{trial.number}",
                                         parent_run_id=session.parent_run_id,
                                         tags=run_tags(session, self.arch, trial, self.device, origin))
        trial.set_user_attr(keys.RUN, self.run_id)
        if trial.user_attrs.get(keys.ERROR):
            trial.set_user_attr(keys.ERROR, "")  # a retry starts without its predecessor's reason
        self.listener = Listener(session, self.arch, trial, self.run_id, 0 if deadline else train_cfg.epochs)
        params = {**flat_params(Preset(session.preset.name, data_cfg, model_cfg, train_cfg)),
                  "train.applied_lr": train_cfg.applied_lr}  # what the run trained at (train.lr_batch)
        tracking.log_params(client, self.run_id, {**params, **{f"optuna.{k}": v for k, v in trial.params.items()}})
        tracking.log_dataset(client, self.run_id, session.data)  # the runs table's Dataset column, as the parent's
        data = final_data(session, trial)
        if data is not session.data:
            tracking.set_tags(client, self.run_id, {"trained_on": f"{data.train.name} ({len(data.train)} images)"})
        result = build_and_fit(model_cfg, data, data_cfg, train_cfg, self.listener, progress, initial, deadline)
        faults.inject("artifact_failure", self.arch, trial.number)
        tracking.log_training_outputs(client, self.run_id, result, data, model_cfg, data_cfg, train_cfg)
        tracking.set_tags(client, self.run_id, {"optuna.state": "COMPLETE", "precision": result.precision,
                                                "stop_reason": result.stop_reason})
        return result.best_val_accuracy

    def out_of_memory(self, exc: BaseException) -> str:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        batch = self.train_cfg.batch_size if self.train_cfg else "?"
        arch = self.model_cfg.arch if self.model_cfg else self.arch
        return (f"CUDA out of memory (batch_size {batch}, {self.session.data.image_shape[-1]} px, {arch}): lower "
                f"the batch size or image size; the trial's memory was released and the study goes on. {first}")

    def release(self) -> None:
        """Drop every reference to the trial's tensors before the next trial (the exception and its
        traceback are gone once run_trial's handler has run)."""
        self.listener = None
        gc.collect()
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the failed trial's blocks back to the driver


# ----------------------------------------------------------------------------- how it ends

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
            trial.set_user_attr(keys.ERROR, reason[:2000])  # close_lost_runs' reason if this worker dies next
            study.tell(trial, state=TrialState.FAIL)
            state = TrialState.FAIL
    except (ValueError, UpdateFinishedTrialError):
        # Optuna refuses to tell a finished trial (ValueError) or loses the race (UpdateFinishedTrialError).
        if not session.storage.get_trial(trial._trial_id).state.is_finished():
            raise
        return lost(session, arch, trial, run_id)
    if outcome.interrupted:
        best_effort(lambda: requeue(session, study, trial))
    if run_id is not None:
        close_run(session, run_id, state, outcome, reason)
    if state == TrialState.FAIL:
        print(f"trial {trial.number} of {study.study_name} failed: {reason.splitlines()[0][:400] if reason else '?'}")
    return state


def close_run(session: Session, run_id: str, state: TrialState, outcome: Outcome, reason: str) -> None:
    client = session.client
    if state == TrialState.COMPLETE:
        best_effort(lambda: tracking.end_run(client, run_id, "FINISHED"))
    elif state == TrialState.PRUNED:
        best_effort(lambda: tracking.set_tags(client, run_id, {"optuna.state": "PRUNED",
                                                               "pruned_at_epoch": outcome.pruned_at}),
                    lambda: tracking.end_run(client, run_id, "KILLED"))
    else:
        status = "KILLED" if outcome.interrupted else "FAILED"
        # An interrupt can land mid-write to the tracking store (its connection still busy for a
        # moment): the run's closing writes are retried, so it is not left RUNNING.
        best_effort(lambda: tracking.set_tags(client, run_id, {
                        "optuna.state": "FAIL", "error": reason[:5000],
                        **({"stopped_by": "interrupt"} if outcome.interrupted else {})}),
                    lambda: tracking.end_run(client, run_id, status), attempts=3 if outcome.interrupted else 1)


def lost(session: Session, arch: str, trial: optuna.Trial, run_id: str | None) -> TrialState:
    """Another worker finished this trial while this one ran it: it saw no heartbeat for longer than
    the grace period, failed the trial and re-queued it. This worker's result does not count; its run
    is closed FAILED saying so, and the worker goes on."""
    study = session.studies[arch]
    state = session.storage.get_trial(trial._trial_id).state
    retry = next((t.number for t in study.get_trials(deepcopy=False) if trial.number in keys.RETRY.retry_history(t)
                  and t.number > trial.number), None)
    grace = 2 * (session.preset.study.heartbeat_seconds or 0)
    why = (f"another worker marked trial {trial.number} {state.name} (no heartbeat from this worker for more "
           f"than {grace} s) before this worker reported its outcome, so its result here does not count; "
           + (f"retried as trial {retry} with the same parameters" if retry is not None else "not retried"))
    if run_id is not None:
        best_effort(lambda: tracking.set_tags(session.client, run_id, {"optuna.state": state.name, "error": why,
                                                                       "stopped_by": "heartbeat"}),
                    lambda: tracking.end_run(session.client, run_id, "FAILED"))
    print(f"trial {trial.number} of {study.study_name}: {why}")
    return state


def requeue(session: Session, study: optuna.Study, trial: optuna.Trial) -> None:
    """Queue an interrupted trial again with the same parameters (and seed), as a lost worker's is."""
    callback = (session.storage.get_heartbeat_stale_trial_callback() if heartbeat_enabled(session.storage)
                else keys.RETRY(max_retry=keys.MAX_RETRY))
    if callback is not None:
        callback(study, session.storage.get_trial(trial._trial_id))
