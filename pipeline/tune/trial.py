"""One trial as one nested run. Whatever happens inside, the trial ends in a final state and its run
is closed: COMPLETE/FINISHED, PRUNED/KILLED, FAIL/FAILED with the reason (the study goes on; a
failure is not retried), or, on SIGINT/SIGTERM, FAIL/KILLED, re-queued with the same parameters,
and re-raised. The heartbeat beats until the trial is told (``conclude``)."""

from __future__ import annotations

import gc
import threading
from dataclasses import replace

import optuna
import torch
from optuna.trial import TrialState

from .. import faults, tracking
from ..config import DataConfig, ModelConfig, Preset, TrainConfig, flat_params, override
from ..interrupt import Interrupted
from ..progress import EpochLines
from ..train import Deadline, build_and_fit, resolve_device
from .conclude import Outcome, conclude, quietly  # noqa: F401 - quietly: run.py's best-effort closes
from . import space
from .budget import EpochBudget, final_deadline
from .phases import search_epochs, waiting_finals
from .pruners import PruningReporter
from .refit import PHASE, is_final, is_refit, refit_start
from .session import RUN_ATTR, WORKER, Session
from .storage import heartbeat_enabled

RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback


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
    """The trial's configuration (sampled once; later calls read the stored parameters). A retry of a
    lost or interrupted trial keeps the original trial's seed as well as its parameters."""
    preset = session.preset
    origin = RETRY.retried_trial_number(session.storage.get_trial(trial._trial_id))
    return space.trial_configs(trial, preset.study.space,
                         override(preset.model, arch=arch, num_classes=session.data.num_classes), preset.train,
                         preset.data, origin)


def final_end(session: Session) -> float:
    """Where a final run starting now ends: its share of what is left of the final phase."""
    return final_deadline(session.clock(), session.budget.final_end, waiting_finals(session))


def budgeted_configs(session: Session, trial: optuna.Trial, train_cfg: TrainConfig) -> tuple[TrainConfig, Deadline | None]:
    """In a time budget: a search run lasts the plan's rung (its schedule ends with it); a final run
    lasts until its deadline. Without one: the preset's epochs."""
    if session.budget is None or session.plan is None:
        return train_cfg, None
    if is_final(trial):
        return train_cfg, Deadline(final_end(session), session.clock)
    return replace(train_cfg, epochs=search_epochs(session.plan, session.preset, len(session.data.train))), None


def trial_phase(trial: optuna.Trial | optuna.trial.FrozenTrial) -> str:
    """search, refit or final: in the run's name and its ``phase`` tag."""
    return trial.user_attrs.get(PHASE) or "search"


class Listener:
    """fit's report callback: log the epoch to MLflow, say where the trial is, feed the pruner (not
    for a refit), and, in a time budget, stop at the epoch boundary the trial's phase allows."""

    def __init__(self, session: Session, arch: str, trial: optuna.Trial, run_id: str, epochs: int = 0,
                 refit: bool = False):
        self.logger = tracking.EpochLogger(session.client, run_id)
        self.progress = EpochLines(f"{arch} #{trial.number}" + (f" {trial_phase(trial)}" if refit else ""), epochs)
        self.pruning = PruningReporter(trial, prune=not refit)
        # A search run's safety stop at the end of the search phase (its own length is the plan's rung).
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


def run_trial(session: Session, arch: str, trial: optuna.Trial, progress: bool = False) -> TrialState:
    study = session.studies[arch]
    client = session.client
    run_id: str | None = None
    listener: Listener | None = None
    outcome = Outcome()
    device = "cpu"
    # The heartbeat beats until conclude() has told the trial's state: however slow the tracking
    # server, no other worker takes this live trial for lost and re-runs it.
    with Heartbeat(session.storage, trial._trial_id, session.preset.study.heartbeat_seconds):
        try:
            model_cfg, train_cfg, data_cfg = session_trial_configs(session, arch, trial)
            refit, initial = is_refit(trial), None
            if refit and not is_final(trial):  # the best search trial's checkpoint, continued
                train_cfg, initial = refit_start(session, trial, train_cfg)
            train_cfg, deadline = budgeted_configs(session, trial, train_cfg)
            device = str(resolve_device(train_cfg.device))
            retried_from = RETRY.retried_trial_number(session.storage.get_trial(trial._trial_id))
            run_id = tracking.start_run(
                client, session.experiment_id, f"{arch}-{trial_phase(trial)}-{trial.number}",
                parent_run_id=session.parent_run_id,
                tags={**tracking.standard_tags(device), "kind": "trial", "arch": arch,
                      "optuna.study": study.study_name, "optuna.trial": str(trial.number), "worker": WORKER,
                      "phase": trial_phase(trial),
                      **({"refit_of_trial": str(trial.user_attrs["refit_of"])} if "refit_of" in trial.user_attrs
                         else {}),
                      **({"final_of_trial": str(trial.user_attrs["final_of"])} if "final_of" in trial.user_attrs
                         else {}),
                      **({"optuna.retried_from_trial": str(retried_from)} if retried_from is not None else {})})
            trial.set_user_attr(RUN_ATTR, run_id)
            if trial.user_attrs.get("error"):
                trial.set_user_attr("error", "")  # a retry starts without its predecessor's reason
            listener = Listener(session, arch, trial, run_id, 0 if deadline else train_cfg.epochs, refit)
            params = flat_params(Preset(session.preset.name, data_cfg, model_cfg, train_cfg))
            tracking.log_params(client, run_id, {**params, **{f"optuna.{k}": v for k, v in trial.params.items()}})
            result = build_and_fit(model_cfg, session.data, data_cfg, train_cfg, listener, progress, initial, deadline)
            faults.inject("artifact_failure", arch, trial.number)
            tracking.log_training_outputs(client, run_id, result, session.data, model_cfg, data_cfg, train_cfg)
            tracking.set_tags(client, run_id, {"optuna.state": "COMPLETE", "precision": result.precision,
                                               "stop_reason": result.stop_reason})
            outcome.value = result.best_val_accuracy
        except optuna.TrialPruned:
            outcome.pruned_at = listener.last_epoch if listener else 0
        except optuna.exceptions.UpdateFinishedTrialError:
            outcome.lost = True  # another worker failed this trial (it saw no heartbeat) while it ran here
        except KeyboardInterrupt as exc:
            outcome.failure = (f"interrupted ({exc or 'SIGINT'}); re-queued with the same parameters for the next "
                               "tune on this study")
            outcome.interrupted = True
            quietly(lambda: conclude(session, arch, trial, run_id, outcome))  # the interrupt is what propagates
            raise
        except torch.OutOfMemoryError as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            outcome.failure = (f"CUDA out of memory (batch_size {train_cfg.batch_size}, "
                               f"{session.data.image_shape[-1]} px, {model_cfg.arch}): lower the batch size or "
                               f"image size; the trial's memory was released and the study goes on. {first}")
        except Exception as exc:  # noqa: BLE001 - fail the trial, not the study
            outcome.failure = f"{type(exc).__name__}: {exc}"
        finally:
            # Drop every reference to the trial's tensors before the next trial (the exception and
            # its traceback are gone once the handler above has run).
            listener = result = None
            release_memory(device)
        return conclude(session, arch, trial, run_id, outcome)


def release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the failed trial's blocks back to the driver
