"""One trial as one nested run. Whatever happens inside, the trial ends in a final state and its run
is closed: COMPLETE/FINISHED, PRUNED/KILLED, FAIL/FAILED with the reason (the study goes on), or, on
SIGINT/SIGTERM, FAIL/KILLED, re-queued with the same parameters, and re-raised."""

from __future__ import annotations

import gc
import threading
import optuna
import torch
from optuna.trial import TrialState

from .. import faults, tracking
from ..config import DataConfig, ModelConfig, Preset, TrainConfig, flat_params, override
from ..interrupt import Interrupted
from ..progress import EpochLines
from ..train import build_and_fit, resolve_device
from .pruners import PruningReporter
from .session import MAX_RETRY, RUN_ATTR, WORKER, Session
from . import space
from .storage import heartbeat_enabled


class Heartbeat:
    """Record the trial's heartbeat while it runs (Optuna only does this inside study.optimize)."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.is_set():
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # noqa: BLE001 - a missed beat is retried; the trial goes on
                pass
            self.stop.wait(self.interval)

    def __enter__(self):
        if heartbeat_enabled(self.storage):
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)


def session_trial_configs(session: Session, arch: str, trial: optuna.Trial) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    """The trial's configuration (sampled once; later calls read the stored parameters)."""
    preset = session.preset
    return space.trial_configs(trial, preset.study.space,
                         override(preset.model, arch=arch, num_classes=session.data.num_classes), preset.train,
                         preset.data)


class Listener:
    """fit's report callback: log the epoch to MLflow, say where the trial is, feed the pruner."""

    def __init__(self, session: Session, arch: str, trial: optuna.Trial, run_id: str, epochs: int = 0):
        self.logger = tracking.EpochLogger(session.client, run_id)
        self.progress = EpochLines(f"{arch} #{trial.number}", epochs)
        self.pruning = PruningReporter(trial)
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


def run_trial(session: Session, arch: str, trial: optuna.Trial, progress: bool = False) -> TrialState:
    study = session.studies[arch]
    client = session.client
    run_id: str | None = None
    listener: Listener | None = None
    value: float | None = None
    pruned_at: int | None = None
    failure = ""
    device = "cpu"
    with Heartbeat(session.storage, trial._trial_id, session.preset.study.heartbeat_seconds):
        try:
            model_cfg, train_cfg, data_cfg = session_trial_configs(session, arch, trial)
            device = str(resolve_device(train_cfg.device))
            retried_from = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(
                session.storage.get_trial(trial._trial_id))
            run_id = tracking.start_run(
                client, session.experiment_id, f"{arch}-trial-{trial.number}", parent_run_id=session.parent_run_id,
                tags={**tracking.standard_tags(device), "kind": "trial", "arch": arch,
                      "optuna.study": study.study_name, "optuna.trial": str(trial.number), "worker": WORKER,
                      **({"optuna.retried_from_trial": str(retried_from)} if retried_from is not None else {})})
            trial.set_user_attr(RUN_ATTR, run_id)
            if trial.user_attrs.get("error"):
                trial.set_user_attr("error", "")  # a retry starts without its predecessor's reason
            listener = Listener(session, arch, trial, run_id, train_cfg.epochs)
            params = flat_params(Preset(session.preset.name, data_cfg, model_cfg, train_cfg))
            tracking.log_params(client, run_id, {**params, **{f"optuna.{k}": v for k, v in trial.params.items()}})
            result = build_and_fit(model_cfg, session.data, data_cfg, train_cfg, listener, progress)
            faults.inject("artifact_failure", arch, trial.number)
            tracking.log_training_outputs(client, run_id, result, session.data, model_cfg, data_cfg, train_cfg)
            tracking.set_tags(client, run_id, {"optuna.state": "COMPLETE", "precision": result.precision,
                                               "stop_reason": result.stop_reason})
            value = result.best_val_accuracy
        except optuna.TrialPruned:
            pruned_at = listener.last_epoch if listener else 0
        except KeyboardInterrupt as exc:
            fail(session, study, trial, run_id, f"interrupted ({exc or 'SIGINT'}); re-queued with the same "
                                                "parameters for the next tune on this study", "KILLED", requeue=True)
            raise
        except torch.OutOfMemoryError as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            failure = (f"CUDA out of memory (batch_size {train_cfg.batch_size}, {session.data.image_shape[-1]} px, "
                       f"{model_cfg.arch}): lower the batch size or image size; the trial's memory was released "
                       f"and the study goes on. {first}")
        except Exception as exc:  # noqa: BLE001 - fail the trial, not the study
            failure = f"{type(exc).__name__}: {exc}"
        finally:
            # Drop every reference to the trial's tensors before the next trial (the exception and
            # its traceback are gone once the handler above has run).
            listener = result = None
            release_memory(device)
    # The trial's state first, then its run: a worker dying in between leaves a finished trial with
    # a RUNNING run, which close_lost_runs closes.
    if value is not None:
        study.tell(trial, value)
        quietly(lambda: tracking.end_run(client, run_id, "FINISHED"))
        return TrialState.COMPLETE
    if pruned_at is not None:
        study.tell(trial, state=TrialState.PRUNED)
        quietly(lambda: tracking.set_tags(client, run_id, {"optuna.state": "PRUNED", "pruned_at_epoch": pruned_at}),
                lambda: tracking.end_run(client, run_id, "KILLED"))
        return TrialState.PRUNED
    fail(session, study, trial, run_id, failure, "FAILED")
    return TrialState.FAIL


def quietly(*actions) -> None:
    """Best-effort bookkeeping: each action is tried, none hides the trial's outcome."""
    for action in actions:
        try:
            action()
        except Exception:  # noqa: BLE001 - record what we can; the storage stays consistent
            pass


def release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the failed trial's blocks back to the driver


def fail(session: Session, study: optuna.Study, trial: optuna.Trial, run_id: str | None, reason: str,
         status: str, requeue: bool = False) -> None:
    """Record why, close the run, then mark the trial FAIL (in that order: a worker dying in
    between leaves a RUNNING trial, which the heartbeat turns into FAIL and a retry)."""
    reason = session.scrub(reason)
    actions = [lambda: trial.set_user_attr("error", reason[:2000])]
    if run_id is not None:
        actions += [lambda: tracking.set_tags(session.client, run_id, {
                        "optuna.state": "FAIL", "error": reason[:5000],
                        **({"stopped_by": "interrupt"} if status == "KILLED" else {})}),
                    lambda: tracking.end_run(session.client, run_id, status)]
    actions.append(lambda: study.tell(trial, state=TrialState.FAIL))
    if requeue:
        actions.append(lambda: _requeue(session, study, trial))
    quietly(*actions)
    print(f"trial {trial.number} of {study.study_name} failed: {reason.splitlines()[0][:400]}")


def _requeue(session: Session, study: optuna.Study, trial: optuna.Trial) -> None:
    """Queue an interrupted trial again with the same parameters, as a lost worker's trial is."""
    callback = (session.storage.get_heartbeat_stale_trial_callback() if heartbeat_enabled(session.storage)
                else optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
    if callback is not None:
        callback(study, session.storage.get_trial(trial._trial_id))
