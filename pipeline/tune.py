"""``tune``: one Optuna study per member architecture, then the ensemble's pair-and-weight search.

The only module that imports Optuna. Each trial is one ``fit`` logged as a nested MLflow run under
the session's parent run; the trial state is mirrored into the run (COMPLETE → FINISHED, PRUNED →
KILLED, FAIL → FAILED). Any number of ``tune`` processes may share one storage: admission of a new
trial is an atomic count-then-ask under the storage lock, so together they run exactly the budget.
"""

from __future__ import annotations

import gc
import math
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import mlflow
import optuna
from optuna.trial import TrialState

from . import metrics as M
from . import tracking
from .config import DataConfig, ModelConfig, Preset, SearchSpace, TrainConfig, flat_params, override, to_dict
from .data import Dataset, load_dataset
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

    def member_study_name(self, arch: str) -> str:
        return f"{self.study_name}.{arch}"


def open_storage(url: str, heartbeat: int) -> optuna.storages.BaseStorage:
    if url.startswith(("sqlite", "postgresql", "mysql", "oracle", "mssql")):
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else {"connect_args": {"timeout": 60}},
            heartbeat_interval=heartbeat,
            grace_period=heartbeat * 2,
            # A trial whose worker died (no heartbeat) is failed and re-queued with the same params.
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
        )
    return optuna.storages.get_storage(url)


def open_session(preset: Preset, experiment: str, study_name: str | None, storage: str | None) -> Session:
    """Create or join a tuning session. Storages, studies, the experiment and the parent run are
    created under the storage lock, before any trial runs."""
    client = tracking.client()
    tracking_uri = mlflow.get_tracking_uri()
    with storage_lock(tracking_uri, "mlflow-schema"):
        tracking.check_tracking(client)
    url = storage or default_storage(tracking_uri)
    check_url(url)
    study_name = study_name or preset.name
    data = load_dataset(preset.data)
    try:
        with storage_lock(url, f"session:{study_name}"):
            opened = retry(lambda: open_storage(url, preset.study.heartbeat_seconds))
            experiment_id = tracking.ensure_experiment(client, experiment)
            session = Session(preset, experiment_id, study_name, url, opened, "", data, client)
            sampler_seed = preset.study.sampler_seed
            for i, arch in enumerate(preset.study.members):
                session.studies[arch] = optuna.create_study(
                    storage=opened, study_name=session.member_study_name(arch), direction="maximize",
                    load_if_exists=True,
                    sampler=optuna.samplers.TPESampler(seed=sampler_seed + i, n_startup_trials=3),
                    pruner=make_pruner(preset.study.pruner, preset.study.pruner_warmup_epochs,
                                       preset.train.epochs))
            session.parent_run_id = _parent_run(session)
    except (optuna.exceptions.OptunaError, ImportError) as exc:
        raise TuneError(f"Optuna storage {tracking.redact(url)} is not usable: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith("sqlalchemy"):
            raise TuneError(f"Optuna storage {tracking.redact(url)} is not usable: "
                            f"{str(exc).splitlines()[0][:300]}") from None
        raise
    return session


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
        "study": session.study_name,
        "member_studies": ",".join(session.member_study_name(a) for a in session.preset.study.members),
        "trials_per_member": session.preset.study.trials,
        "storage": tracking.redact(session.storage_url),
        "dataset": str(session.data.root),
        "dataset_digest": session.data.digest,
        "preset": session.preset.name,
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
        if isinstance(self.storage, optuna.storages.RDBStorage) and self.storage.get_heartbeat_interval():
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)


def admit_trial(session: Session, arch: str) -> optuna.Trial | None:
    """Atomically: start the next trial if the budget allows, else None."""
    study = session.studies[arch]
    optuna.storages.fail_stale_trials(study)
    with storage_lock(session.storage_url, f"admit:{study.study_name}"):
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        taken = sum(t.state in FINISHED or t.state == TrialState.RUNNING for t in trials)
        if not waiting and taken >= session.preset.study.trials:
            return None
        return study.ask()  # pops a waiting (retried) trial first


def close_lost_runs(session: Session, arch: str) -> int:
    """Runs of trials whose worker died are still RUNNING in MLflow: close them as FAILED, with why."""
    closed = 0
    for t in session.studies[arch].get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = t.user_attrs.get(RUN_ATTR)
        if not run_id:
            continue
        try:
            if session.client.get_run(run_id).info.status == "RUNNING":
                tracking.set_tags(session.client, run_id, {
                    "optuna.state": "FAIL",
                    "failure_reason": "worker lost: no heartbeat; the trial is retried with the same parameters"})
                tracking.end_run(session.client, run_id, "FAILED")
                closed += 1
        except Exception:  # noqa: BLE001 - best effort; the next worker tries again
            pass
    return closed


class _Listener:
    """fit's report callback: log the epoch to MLflow, feed the pruner."""

    def __init__(self, session: Session, trial: optuna.Trial, run_id: str):
        self.logger = tracking.EpochLogger(session.client, run_id)
        self.trial = trial

    def __call__(self, epoch: int, values: dict[str, float]) -> None:
        self.logger(epoch, values)
        self.trial.report(values[M.OBJECTIVE], epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")


def run_trial(session: Session, arch: str, trial: optuna.Trial, progress: bool = False) -> TrialState:
    study = session.studies[arch]
    preset = session.preset
    model_cfg, train_cfg, data_cfg = suggest(trial, preset.study.space,
                                             override(preset.model, arch=arch, num_classes=session.data.num_classes),
                                             replace(preset.train, seed=preset.train.seed + trial.number),
                                             preset.data)
    client = session.client
    retried_from = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(
        session.storage.get_trial(trial._trial_id))
    run_id = tracking.start_run(
        client, session.experiment_id, f"{arch}-trial-{trial.number}", parent_run_id=session.parent_run_id,
        tags={**tracking.standard_tags(str(resolve_device(train_cfg.device))), "kind": "trial", "arch": arch,
              "optuna.study": study.study_name, "optuna.trial": str(trial.number),
              **({"optuna.retried_from_trial": str(retried_from)} if retried_from is not None else {})})
    trial.set_user_attr(RUN_ATTR, run_id)
    listener = _Listener(session, trial, run_id)
    try:
        with _Heartbeat(session.storage, trial._trial_id, preset.study.heartbeat_seconds):
            params = flat_params(Preset(preset.name, data_cfg, model_cfg, train_cfg))
            tracking.log_params(client, run_id, {**params, **{f"optuna.{k}": v for k, v in trial.params.items()}})
            seed_everything(train_cfg.seed)  # weight init is part of the seeded trial
            model = build_model(model_cfg)
            result = fit(model, session.data, data_cfg, train_cfg, report=listener, progress=progress)
            tracking.log_training_outputs(client, run_id, result, session.data, model_cfg, data_cfg, train_cfg)
            tracking.set_tags(client, run_id, {"optuna.state": "COMPLETE", "precision": result.precision,
                                               "stop_reason": result.stop_reason})
        study.tell(trial, result.best_val_accuracy)
        tracking.end_run(client, run_id, "FINISHED")
        return TrialState.COMPLETE
    except optuna.TrialPruned:
        tracking.set_tags(client, run_id, {"optuna.state": "PRUNED", "pruned_at_epoch": listener.logger.last_epoch})
        study.tell(trial, state=TrialState.PRUNED)
        tracking.end_run(client, run_id, "KILLED")
        return TrialState.PRUNED
    except KeyboardInterrupt:
        _fail(session, study, trial, run_id, "interrupted (SIGINT/SIGTERM)", "KILLED")
        raise
    except Exception as exc:  # noqa: BLE001 - fail the trial, not the study
        _fail(session, study, trial, run_id, f"{type(exc).__name__}: {exc}", "FAILED")
        return TrialState.FAIL
    finally:
        del listener
        gc.collect()
        if session.data.train.images.is_cuda or resolve_device(train_cfg.device).type == "cuda":
            import torch

            torch.cuda.empty_cache()  # give back a failed trial's memory before the next one


def _fail(session: Session, study: optuna.Study, trial: optuna.Trial, run_id: str, reason: str,
          status: str) -> None:
    for action in (lambda: trial.set_user_attr("error", reason[:2000]),
                   lambda: study.tell(trial, state=TrialState.FAIL),
                   lambda: tracking.set_tags(session.client, run_id, {"optuna.state": "FAIL", "error": reason[:5000]}),
                   lambda: tracking.end_run(session.client, run_id, status)):
        try:
            action()
        except Exception:  # noqa: BLE001 - record what we can; the storage stays consistent
            pass
    print(f"trial {trial.number} of {study.study_name} failed: {reason.splitlines()[0][:300]}")


def run_member_study(session: Session, arch: str, progress: bool = False) -> dict[str, int]:
    """Add trials until the study holds the budget of finished trials. Returns counts by state."""
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    max_failures = max(3, session.preset.study.trials)
    while True:
        close_lost_runs(session, arch)
        trial = admit_trial(session, arch)
        if trial is None:
            break
        state = run_trial(session, arch, trial, progress)
        counts[state.name] += 1
        if counts["FAIL"] >= max_failures and counts["FAIL"] > counts["COMPLETE"] + counts["PRUNED"]:
            raise TuneError(f"{session.member_study_name(arch)}: {counts['FAIL']} trials failed in this worker; "
                            "stopping (see the failed runs' 'error' tag)")
    return counts


def run_members(session: Session, n_jobs: int = 1, progress: bool = False) -> None:
    """Each member study in turn; ``n_jobs`` threads share the work (several trials on one GPU)."""
    for arch in session.preset.study.members:
        if n_jobs <= 1:
            run_member_study(session, arch, progress)
            continue
        errors: list[BaseException] = []

        def work() -> None:
            try:
                run_member_study(session, arch, False)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(n_jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


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
        members = {arch: _member_summary(session, arch) for arch in preset.study.members}
        if _trials_running(session):
            # Other workers still train: the last one to finish builds the ensemble.
            print("other workers are still running trials; the last worker to finish builds the ensemble")
            return TuneSummary(session.parent_run_id, members, {}, None, time.perf_counter() - start)
        with storage_lock(session.storage_url, f"ensemble:{session.study_name}"):
            log_study_figures(session)
            ensemble = _ensemble_once(session, model_name)
        tracking.log_metrics(session.client, session.parent_run_id, {
            f"{arch}_best_val_accuracy": m["best_val_accuracy"] for arch, m in members.items()
            if m["best_val_accuracy"] is not None})
        tracking.end_run(session.client, session.parent_run_id, "FINISHED")
    except KeyboardInterrupt:
        tracking.end_run(session.client, session.parent_run_id, "KILLED")
        raise
    except BaseException as exc:
        tracking.set_tags(session.client, session.parent_run_id, {"error": f"{type(exc).__name__}: {exc}"[:5000]})
        tracking.end_run(session.client, session.parent_run_id, "FAILED")
        raise
    summary = TuneSummary(session.parent_run_id, members, ensemble or {}, (ensemble or {}).get("version"),
                          time.perf_counter() - start)
    print_summary(summary)
    return summary


def _trials_running(session: Session) -> bool:
    for study in session.studies.values():
        optuna.storages.fail_stale_trials(study)
        if study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            return True
    return False


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
