"""``tune``: one Optuna study per member architecture, then the ensemble's pair-and-weight search.

The only module that imports Optuna. Each trial is one ``fit`` logged as a nested MLflow run under
the session's parent run; the trial state is mirrored into the run (COMPLETE → FINISHED, PRUNED →
KILLED, FAIL → FAILED). Any number of ``tune`` processes may share one storage: admission of a new
trial is an atomic count-then-ask under the storage lock, so together they run exactly the budget.
"""

from __future__ import annotations

import gc
import math
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import mlflow
import optuna
import torch
from optuna.trial import TrialState

from . import faults
from . import metrics as M
from . import tracking
from .config import DataConfig, ModelConfig, Preset, SearchSpace, TrainConfig, flat_params, override, to_dict
from .data import Dataset, load_dataset
from .interrupt import Interrupted
from .models import arch_args, build_model
from .storage import check_url, default_storage, retry, storage_lock
from .train import fit, resolve_device, seed_everything

# We drive trials with ask/tell plus our own heartbeat thread (for exact budgets across workers);
# Optuna warns that heartbeats are meant for Study.optimize, which we knowingly replace.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_RETRY = 2  # a trial whose worker is lost (or interrupted) is run again at most this often
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # tags each trial run with the process that ran it


class TuneError(RuntimeError):
    """A study that cannot go on (for example: every trial fails)."""


# ----------------------------------------------------------------------------- search space

def suggest(trial: optuna.trial.BaseTrial, space: SearchSpace, model: ModelConfig, train: TrainConfig,
            data: DataConfig) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    """Sample one configuration. Returns plain configs: models never see a trial."""
    accepted = arch_args(model.arch)
    m: dict[str, Any] = {}
    t: dict[str, Any] = {"lr": trial.suggest_float("lr", *space.lr, log=True),
                         "batch_size": trial.suggest_categorical("batch_size", list(space.batch_size))}
    if space.dropout_features and "dropout_features" in accepted:
        m["dropout_features"] = trial.suggest_float("dropout_features", *space.dropout_features)
    if space.dropout_fc and "dropout_fc" in accepted:
        m["dropout_fc"] = trial.suggest_float("dropout_fc", *space.dropout_fc)
    if space.weight_decay:
        t["weight_decay"] = trial.suggest_float("weight_decay", *space.weight_decay, log=True)
    if space.label_smoothing:
        t["label_smoothing"] = trial.suggest_float("label_smoothing", *space.label_smoothing)
    d: dict[str, Any] = {}
    if space.augment:
        d["augment"] = trial.suggest_categorical("augment", list(space.augment))
    return replace(model, **m), replace(train, **t), replace(data, **d)


class _AlwaysPruner(optuna.pruners.BasePruner):
    """Prunes every trial at its first report once the study has a complete trial (tests use it to
    force a pruned trial while keeping one complete trial per member for the ensemble)."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return bool(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def make_pruner(name: str, warmup: int, max_epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=warmup)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup), max_resource=max_epochs)
    if name == "always":
        return _AlwaysPruner()
    return optuna.pruners.NopPruner()


# ----------------------------------------------------------------------------- the session

@dataclass
class Session:
    """Everything a worker needs, opened once per process."""

    preset: Preset
    experiment_id: str
    study_name: str
    storage_url: str
    storage: optuna.storages.BaseStorage
    parent_run_id: str
    data: Dataset
    client: Any
    studies: dict[str, optuna.Study] = field(default_factory=dict)
    checked: set[int] = field(default_factory=set)  # ids of finished trials whose run is known closed
    stopping: threading.Event = field(default_factory=threading.Event)  # set on SIGINT/SIGTERM (n_jobs > 1)

    def member_study_name(self, arch: str) -> str:
        return f"{self.study_name}.{arch}"

    def scrub(self, text: str) -> str:
        """``text`` without the storage's or the tracking server's password."""
        return tracking.scrub(text, self.storage_url, mlflow.get_tracking_uri())


def open_storage(url: str, heartbeat: int) -> optuna.storages.BaseStorage:
    if url.startswith(("sqlite", "postgresql", "mysql", "oracle", "mssql")):
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else {"connect_args": {"timeout": 60}},
            heartbeat_interval=heartbeat,
            grace_period=heartbeat * 2,
            # A trial whose worker died (no heartbeat) is failed and re-queued with the same params.
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
        )
    return optuna.storages.get_storage(url)


def heartbeat_enabled(storage: optuna.storages.BaseStorage) -> bool:
    return isinstance(storage, optuna.storages.RDBStorage) and bool(storage.get_heartbeat_interval())


def _storage_error(url: str, exc: BaseException) -> TuneError | None:
    """A clear one-line error for a storage that cannot be opened (None: not a storage problem)."""
    if isinstance(exc, (optuna.exceptions.OptunaError, ImportError)) or type(exc).__module__.startswith("sqlalchemy"):
        text = tracking.scrub(str(exc).strip(), url)
        first = text.splitlines()[0][:300] if text else type(exc).__name__
        return TuneError(f"Optuna storage {tracking.redact(url)} is not usable: {first}")
    return None


def open_session(preset: Preset, experiment: str, study_name: str | None, storage: str | None) -> Session:
    """Create or join a tuning session, before any trial runs: the tracking store and the storage
    are checked first (a clear error, no training), then the schema and studies are created under a
    per-storage lock, then the experiment and parent run under a per-session lock."""
    tracking_uri = mlflow.get_tracking_uri()
    with storage_lock(tracking_uri, "mlflow-schema"):  # the client creates a fresh store's schema
        client = tracking.client()
        tracking.check_tracking(client)
    url = storage or default_storage(tracking_uri)
    check_url(url)
    study_name = study_name or preset.name
    studies: dict[str, optuna.Study] = {}
    try:
        # One lock per storage: two processes creating a fresh schema at once fail.
        with storage_lock(url, "setup"):
            opened = retry(lambda: open_storage(url, preset.study.heartbeat_seconds))
            for i, arch in enumerate(preset.study.members):
                studies[arch] = optuna.create_study(
                    storage=opened, study_name=f"{study_name}.{arch}", direction="maximize", load_if_exists=True,
                    sampler=_sampler(preset, i, 0),
                    pruner=make_pruner(preset.study.pruner, preset.study.pruner_warmup_epochs, preset.train.epochs))
    except Exception as exc:
        error = _storage_error(url, exc)
        if error is None:
            raise
        raise error from None
    data = load_dataset(preset.data)
    with storage_lock(url, f"session:{study_name}"):
        experiment_id = tracking.ensure_experiment(client, experiment)
        session = Session(preset, experiment_id, study_name, url, opened, "", data, client, studies)
        session.parent_run_id = _parent_run(session)
    return session


def _sampler(preset: Preset, member: int, number: int) -> optuna.samplers.BaseSampler:
    """TPE seeded by (member, trial number): reproducible, and workers sharing a storage do not all
    draw the same "random" start-up configurations, as samplers with one seed per process would."""
    return optuna.samplers.TPESampler(seed=preset.study.sampler_seed + 100_003 * member + number,
                                      n_startup_trials=3)
def _parent_run(session: Session) -> str:
    """The session's parent run id lives in the studies' user attributes: every worker finds it.
    Under ``mlflow run`` the launcher's run becomes the parent of a new session, or a worker run
    nested under the existing parent."""
    first = session.studies[session.preset.study.members[0]]
    run_id = first.user_attrs.get(PARENT_ATTR)
    adopted = tracking.adopted_run(session.client)
    if run_id:
        try:
            if session.client.get_run(run_id).info.lifecycle_stage == "active":
                session.experiment_id = session.client.get_run(run_id).info.experiment_id
                _reopen(session, run_id)
                if adopted and adopted[0] != run_id:
                    tracking.set_tags(session.client, adopted[0], {tracking.PARENT_TAG: run_id, "kind": "tune-worker",
                                                                   "optuna.study": session.study_name})
                return run_id
        except Exception:  # noqa: BLE001 - deleted or from another tracking store: start anew
            pass
    tags = {**tracking.standard_tags(str(resolve_device(session.preset.train.device))),
            "kind": "tune-session", "optuna.study": session.study_name}
    if adopted:
        run_id, session.experiment_id = adopted
        tracking.set_tags(session.client, run_id, {**tags, "mlflow.runName": f"tune-{session.study_name}"})
    else:
        run_id = tracking.start_run(session.client, session.experiment_id, f"tune-{session.study_name}", tags=tags)
    for study in session.studies.values():
        study.set_user_attr(PARENT_ATTR, run_id)
        study.set_user_attr("mlflow_experiment_id", session.experiment_id)
    params = {
        # "session." keeps these apart from the entry-point parameters `mlflow run` logs on its run.
        "session.study": session.study_name,
        "session.member_studies": ",".join(session.member_study_name(a) for a in session.preset.study.members),
        "session.trials_per_member": session.preset.study.trials,
        "session.storage": tracking.redact(session.storage_url),
        "session.dataset": str(session.data.root),
        "session.dataset_digest": session.data.digest,
        "session.preset": session.preset.name,
        **flat_params(session.preset, ("data", "train", "study")),
    }
    tracking.log_params(session.client, run_id, params)
    tracking.log_dataset(session.client, run_id, session.data)
    return run_id


def _reopen(session: Session, run_id: str) -> None:
    # A resumed session's parent shows as running again while workers add trials.
    session.client.update_run(run_id, status="RUNNING")


# ----------------------------------------------------------------------------- trials

class _Heartbeat:
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


def trial_configs(session: Session, arch: str, trial: optuna.Trial) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    """The trial's configuration (sampled once; later calls read the stored parameters)."""
    preset = session.preset
    return suggest(trial, preset.study.space, override(preset.model, arch=arch, num_classes=session.data.num_classes),
                   replace(preset.train, seed=preset.train.seed + trial.number), preset.data)


def admit_trial(session: Session, arch: str) -> optuna.Trial | None:
    """Atomically: start the next trial if the budget allows, else None.

    Under the storage lock: trials of lost workers (no heartbeat) are failed and re-queued with the
    same parameters, finished and running trials are counted, and the next trial is asked (a
    re-queued one first), given its first heartbeat and its parameters."""
    study = session.studies[arch]
    with storage_lock(session.storage_url, f"admit:{study.study_name}"):
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        taken = sum(t.state in FINISHED or t.state == TrialState.RUNNING for t in trials)
        if taken >= session.preset.study.trials:
            return None
        study.sampler = _sampler(session.preset, session.preset.study.members.index(arch), len(trials))
        trial = study.ask()  # pops a waiting (re-queued or enqueued) trial first
        if heartbeat_enabled(session.storage):
            # A worker killed before its heartbeat thread starts is detected too.
            session.storage.record_heartbeat(trial._trial_id)
        trial_configs(session, arch, trial)
        return trial


def close_lost_runs(session: Session, arch: str) -> int:
    """Runs left RUNNING by a worker that died: a FAIL trial's run is closed as FAILED with why
    (and the retry's number); a trial that finished just before its worker died gets the status its
    worker would have set. Each trial is looked at once per process."""
    closed = 0
    trials = session.studies[arch].get_trials(deepcopy=False)
    grace = 2 * (session.preset.study.heartbeat_seconds or 0)
    settled = datetime.now() - timedelta(seconds=max(60, grace))  # a live worker closes its run within ms
    for t in trials:
        run_id = t.user_attrs.get(RUN_ATTR)
        if t.state not in (TrialState.FAIL, *FINISHED) or not run_id or t._trial_id in session.checked:
            continue
        if t.state in FINISHED and (t.datetime_complete is None or t.datetime_complete > settled):
            continue  # its worker may be closing the run right now
        try:
            if session.client.get_run(run_id).info.status != "RUNNING":
                session.checked.add(t._trial_id)
                continue
            if t.state == TrialState.FAIL:
                retries = [r.number for r in trials
                           if t.number in optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(r)]
                recorded = t.user_attrs.get("error")
                why = recorded or (f"worker lost: no heartbeat for more than {grace} s (killed, preempted or "
                                   "disconnected); " + (f"retried as trial {retries[0]} with the same parameters"
                                                        if retries else "not retried (retry limit reached)"))
                tracking.set_tags(session.client, run_id, {"optuna.state": "FAIL", "error": why,
                                                           **({} if recorded else {"stopped_by": "heartbeat"})})
                tracking.end_run(session.client, run_id, "FAILED")
            else:
                tracking.set_tags(session.client, run_id, {"optuna.state": t.state.name,
                                                           "closed_by": "another worker: the trial's worker was lost "
                                                                        "after reporting its result"})
                tracking.end_run(session.client, run_id, "FINISHED" if t.state == TrialState.COMPLETE else "KILLED")
            session.checked.add(t._trial_id)
            closed += 1
        except Exception:  # noqa: BLE001 - best effort; the next check tries again
            pass
    if closed:
        print(f"closed {closed} run(s) of {session.member_study_name(arch)} left open by a lost worker")
    return closed


class _Listener:
    """fit's report callback: log the epoch to MLflow, feed the pruner."""

    def __init__(self, session: Session, arch: str, trial: optuna.Trial, run_id: str):
        self.logger = tracking.EpochLogger(session.client, run_id)
        self.session, self.arch, self.trial = session, arch, trial

    def __call__(self, epoch: int, values: dict[str, float]) -> None:
        if self.session.stopping.is_set():  # the main thread was interrupted: stop this thread's trial too
            raise Interrupted("the worker is stopping")
        faults.inject("cuda_oom", self.arch, self.trial.number)
        self.logger(epoch, values)
        self.trial.report(values[M.OBJECTIVE], epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")


def _train(session: Session, model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: TrainConfig,
           listener: _Listener, progress: bool):
    # The network lives only in this frame: once it returns or its exception is handled, the
    # model, optimiser and activations can be freed before the next trial.
    seed_everything(train_cfg.seed)  # weight init is part of the seeded trial
    model = build_model(model_cfg)
    return fit(model, session.data, data_cfg, train_cfg, report=listener, progress=progress)


def run_trial(session: Session, arch: str, trial: optuna.Trial, progress: bool = False) -> TrialState:
    """One trial as one nested run. Whatever happens inside, the trial ends in a final state and its
    run is closed: COMPLETE/FINISHED, PRUNED/KILLED, FAIL/FAILED with the reason (the study goes
    on), or, on SIGINT/SIGTERM, FAIL/KILLED, re-queued with the same parameters, and re-raised."""
    study = session.studies[arch]
    client = session.client
    run_id: str | None = None
    listener: _Listener | None = None
    value: float | None = None
    pruned_at: int | None = None
    failure = ""
    device = "cpu"
    with _Heartbeat(session.storage, trial._trial_id, session.preset.study.heartbeat_seconds):
        try:
            model_cfg, train_cfg, data_cfg = trial_configs(session, arch, trial)
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
            listener = _Listener(session, arch, trial, run_id)
            params = flat_params(Preset(session.preset.name, data_cfg, model_cfg, train_cfg))
            tracking.log_params(client, run_id, {**params, **{f"optuna.{k}": v for k, v in trial.params.items()}})
            result = _train(session, model_cfg, data_cfg, train_cfg, listener, progress)
            faults.inject("artifact_failure", arch, trial.number)
            tracking.log_training_outputs(client, run_id, result, session.data, model_cfg, data_cfg, train_cfg)
            tracking.set_tags(client, run_id, {"optuna.state": "COMPLETE", "precision": result.precision,
                                               "stop_reason": result.stop_reason})
            value = result.best_val_accuracy
        except optuna.TrialPruned:
            pruned_at = listener.logger.last_epoch if listener else 0
        except KeyboardInterrupt as exc:
            _fail(session, study, trial, run_id, f"interrupted ({exc or 'SIGINT'}); re-queued with the same "
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
            _release_memory(device)
    # The trial's state first, then its run: a worker dying in between leaves a finished trial with
    # a RUNNING run, which close_lost_runs closes.
    if value is not None:
        study.tell(trial, value)
        _quietly(lambda: tracking.end_run(client, run_id, "FINISHED"))
        return TrialState.COMPLETE
    if pruned_at is not None:
        study.tell(trial, state=TrialState.PRUNED)
        _quietly(lambda: tracking.set_tags(client, run_id, {"optuna.state": "PRUNED", "pruned_at_epoch": pruned_at}),
                 lambda: tracking.end_run(client, run_id, "KILLED"))
        return TrialState.PRUNED
    _fail(session, study, trial, run_id, failure, "FAILED")
    return TrialState.FAIL


def _quietly(*actions) -> None:
    """Best-effort bookkeeping: each action is tried, none hides the trial's outcome."""
    for action in actions:
        try:
            action()
        except Exception:  # noqa: BLE001 - record what we can; the storage stays consistent
            pass


def _release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the failed trial's blocks back to the driver


def _fail(session: Session, study: optuna.Study, trial: optuna.Trial, run_id: str | None, reason: str,
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
    _quietly(*actions)
    print(f"trial {trial.number} of {study.study_name} failed: {reason.splitlines()[0][:400]}")


def _requeue(session: Session, study: optuna.Study, trial: optuna.Trial) -> None:
    """Queue an interrupted trial again with the same parameters, as a lost worker's trial is."""
    callback = (session.storage.get_heartbeat_stale_trial_callback() if heartbeat_enabled(session.storage)
                else optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
    if callback is not None:
        callback(study, session.storage.get_trial(trial._trial_id))


def run_member_study(session: Session, arch: str, progress: bool = False) -> dict[str, int]:
    """Add trials until the study holds the budget of finished trials. Returns counts by state."""
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    max_failures = max(3, session.preset.study.trials)
    while not session.stopping.is_set():
        trial = admit_trial(session, arch)
        close_lost_runs(session, arch)
        if trial is None:
            break
        state = run_trial(session, arch, trial, progress)
        counts[state.name] += 1
        if counts["FAIL"] >= max_failures and counts["FAIL"] > counts["COMPLETE"] + counts["PRUNED"]:
            raise TuneError(f"{session.member_study_name(arch)}: {counts['FAIL']} trials failed in this worker; "
                            "stopping (see the failed runs' 'error' tag)")
    return counts


def run_members(session: Session, n_jobs: int = 1, progress: bool = False) -> int:
    """Each member study in turn; ``n_jobs`` threads share the work (several trials on one GPU).
    Returns the number of trials this worker ran."""
    ran = 0
    for arch in session.preset.study.members:
        if n_jobs <= 1:
            ran += sum(run_member_study(session, arch, progress).values())
            continue
        errors: list[BaseException] = []
        done: list[int] = []
        ended = [threading.Event() for _ in range(n_jobs)]

        def work(end: threading.Event) -> None:
            try:
                done.append(sum(run_member_study(session, arch, False).values()))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                errors.append(exc)
            finally:
                end.set()

        for end in ended:
            threading.Thread(target=work, args=(end,)).start()
        _await_threads(session, ended)
        if errors:
            raise errors[0]
        ran += sum(done)
    return ran


def _await_threads(session: Session, ended: list[threading.Event]) -> None:
    """Wait for the trial threads by polling, not ``Thread.join``: a signal interrupting ``join``
    can mark a running thread as stopped (CPython before 3.13), and the process would then exit
    under a thread still closing its trial. Signals reach the main thread only, so on SIGINT/SIGTERM
    the other threads are told to stop their trials too."""
    try:
        while not all(end.is_set() for end in ended):
            time.sleep(0.2)
    except KeyboardInterrupt:
        session.stopping.set()
        while not all(end.is_set() for end in ended):
            time.sleep(0.2)
        raise


def _budget_state(session: Session) -> tuple[int, bool]:
    """(trials running anywhere, whether some member study still has budget left), after failing
    and re-queueing the trials of lost workers."""
    running, open_budget = 0, False
    for study in session.studies.values():
        with storage_lock(session.storage_url, f"admit:{study.study_name}"):
            optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
        running += sum(t.state == TrialState.RUNNING for t in trials)
        open_budget |= sum(t.state in FINISHED or t.state == TrialState.RUNNING for t in trials) < session.preset.study.trials
    return running, open_budget


def settle(session: Session) -> bool:
    """Wait until no trial of the session runs in another worker. True when work appeared meanwhile
    (a lost worker's trial was re-queued): the caller runs the members again. Without heartbeats
    (non-RDB storages) a lost trial cannot be told from a live one, so nothing is awaited."""
    announced = False
    while True:
        running, open_budget = _budget_state(session)
        if open_budget:
            return True
        if not running or not heartbeat_enabled(session.storage):
            return False
        if not announced:
            grace = 2 * session.preset.study.heartbeat_seconds
            print(f"waiting for {running} trial(s) running in other workers (a lost worker's trial is "
                  f"re-queued after {grace} s without heartbeat); the ensemble is built once all are done")
            announced = True
        time.sleep(session.preset.study.heartbeat_seconds)


# ----------------------------------------------------------------------------- ensemble

def search_pair(probs: list, arches: list[str], labels, n_trials: int, seed: int,
                methods: tuple[str, ...]) -> tuple[tuple[int, int, float, str], float]:
    """Optuna over (pair, weight, method) on stored probabilities (rows already selected).

    Pairs join two different member studies (any two trials when there is only one member).
    Returns ((i, j, weight, method), accuracy)."""
    from .ensemble import accuracy, combine

    one_arch = len(set(arches)) == 1
    pairs = [(i, j) for i in range(len(probs)) for j in range(i + 1, len(probs))
             if one_arch or arches[i] != arches[j]]
    if not pairs:
        raise TuneError("the ensemble needs finished trials from two member studies")
    keys = [f"{i}-{j}" for i, j in pairs]

    def objective(trial: optuna.Trial) -> float:
        i, j = map(int, trial.suggest_categorical("pair", keys).split("-"))
        w = trial.suggest_float("weight", 0.0, 1.0)
        method = trial.suggest_categorical("method", list(methods))
        return accuracy(combine(probs[i], probs[j], w, method), labels)

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    # Every pair is first tried at equal weight, so none is left out by chance.
    for key in keys:
        for method in methods:
            study.enqueue_trial({"pair": key, "weight": 0.5, "method": method})
    study.optimize(objective, n_trials=max(n_trials, len(keys) * len(methods)))
    best = study.best_trial
    i, j = map(int, best.params["pair"].split("-"))
    return (i, j, float(best.params["weight"]), best.params["method"]), float(best.value)


def log_study_figures(session: Session) -> None:
    """Optuna's own figures (history, importances, intermediate values) into the parent run."""
    from optuna import visualization as vis

    for arch, study in session.studies.items():
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        figures = {"optimization_history": vis.plot_optimization_history,
                   "intermediate_values": vis.plot_intermediate_values}
        if len(complete) >= 2 and len({tuple(sorted(t.params.items())) for t in complete}) >= 2:
            figures["param_importances"] = vis.plot_param_importances
        for name, plot in figures.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fig = plot(study)
                session.client.log_figure(session.parent_run_id, fig, f"optuna/{arch}/{name}.html")
            except Exception as exc:  # noqa: BLE001 - a figure must never fail the session
                print(f"note: could not draw {name} for {arch}: {exc}")


@dataclass
class TuneSummary:
    parent_run_id: str
    members: dict[str, dict[str, Any]]
    ensemble: dict[str, Any]
    model_version: str | None
    seconds: float


def run_tuning(preset: Preset, experiment: str, study_name: str | None = None, storage: str | None = None,
               model_name: str = "deepfake-ensemble", n_jobs: int = 1, progress: bool = True,
               setup_only: bool = False) -> TuneSummary | None:
    from .report import print_summary

    start = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    session = open_session(preset, experiment, study_name, storage)
    print(f"tuning session {session.study_name}: parent run {session.parent_run_id}, "
          f"storage {tracking.redact(session.storage_url)}, {preset.study.trials} trials per member")
    if setup_only:
        return None
    try:
        run_members(session, n_jobs, progress)
        while settle(session):  # a lost worker's trial was re-queued meanwhile: run it here
            run_members(session, n_jobs, progress)
        for arch in preset.study.members:
            close_lost_runs(session, arch)
        members = {arch: _member_summary(session, arch) for arch in preset.study.members}
        with storage_lock(session.storage_url, f"ensemble:{session.study_name}"):
            log_study_figures(session)
            ensemble = _ensemble_once(session, model_name)
        tracking.log_metrics(session.client, session.parent_run_id, {
            f"{arch}_best_val_accuracy": m["best_val_accuracy"] for arch, m in members.items()
            if m["best_val_accuracy"] is not None})
        tracking.end_run(session.client, session.parent_run_id, "FINISHED")
    except KeyboardInterrupt as exc:
        _close_parent(session, "KILLED", {"stopped_by": f"interrupt ({exc or 'SIGINT'})"})
        raise
    except BaseException as exc:
        _close_parent(session, "FAILED", {"error": session.scrub(f"{type(exc).__name__}: {exc}")[:5000]})
        raise
    summary = TuneSummary(session.parent_run_id, members, ensemble or {}, (ensemble or {}).get("version"),
                          time.perf_counter() - start)
    print_summary(summary)
    return summary


def _close_parent(session: Session, status: str, tags: dict[str, str]) -> None:
    """A worker that stops early closes the shared parent run only when no other worker still has
    a trial running; otherwise the parent stays open for them (and the last one closes it)."""
    try:
        others, _ = _budget_state(session)
    except Exception:  # noqa: BLE001 - the storage itself may be what failed
        others = 0
    _quietly(lambda: tracking.set_tags(session.client, session.parent_run_id, tags))
    if not others:
        _quietly(lambda: tracking.end_run(session.client, session.parent_run_id, status))


def _ensemble_once(session: Session, model_name: str) -> dict[str, Any]:
    """Build and register the ensemble unless this exact set of candidate trials already was."""
    from .ensemble_run import run_ensemble

    k = session.preset.study.top_k
    fingerprint = ";".join(f"{arch}:" + ",".join(str(t.number) for t in top_trials(study, k))
                           for arch, study in session.studies.items()) + f"|{model_name}"
    first = session.studies[session.preset.study.members[0]]
    if first.user_attrs.get("ensemble_fingerprint") == fingerprint:
        print(f"the ensemble of these trials is already registered as {model_name} version "
              f"{first.user_attrs.get('ensemble_version')}; nothing new to register")
        return {}
    ensemble = run_ensemble(session, model_name)
    if ensemble:
        first.set_user_attr("ensemble_fingerprint", fingerprint)
        first.set_user_attr("ensemble_version", ensemble["version"])
        tracking.log_metrics(session.client, session.parent_run_id, {
            M.ENSEMBLE_VAL_ACCURACY: ensemble["val_accuracy"],
            M.ENSEMBLE_HONEST_ACCURACY: ensemble["holdout_accuracy"]})
    return ensemble or {}


def _member_summary(session: Session, arch: str) -> dict[str, Any]:
    study = session.studies[arch]
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    return {
        "study": study.study_name,
        "complete": len(complete),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "best_trial": best.number if best else None,
        "best_val_accuracy": best.value if best else None,
        "best_run_id": best.user_attrs.get(RUN_ATTR) if best else None,
        "best_params": best.params if best else {},
    }


def top_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and not math.isnan(t.value) and t.user_attrs.get(RUN_ATTR)]
    return sorted(complete, key=lambda t: (-t.value, t.number))[:k]


__all__ = ["suggest", "run_tuning", "open_session", "run_member_study", "search_pair", "top_trials",
           "to_dict"]
