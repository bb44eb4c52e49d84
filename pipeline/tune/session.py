"""A tuning session: the storage, one study per member, the parent run and the data, opened once per
worker process. Any number of workers join the same session through the storage."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlflow
import optuna

from .. import tracking
from ..config import Preset, flat_params, parse_duration
from ..data import Dataset, Split, load_dataset
from ..data.roles import AuditInfo, ids_digest, partition
from ..progress import duration
from ..train import resolve_device
from . import keys
from .budget import Budget
from .plan import Plan
from .pruners import make_pruner
from .storage import check_url, default_storage, open_storage, retry, storage_error, storage_lock
from .warm_start import warm_start

WORKER = f"{socket.gethostname()}:{os.getpid()}"  # tags each trial run with the process that ran it


class TuneError(RuntimeError):
    """A study that cannot go on (for example: every trial fails)."""


@dataclass(frozen=True)
class Session:
    """What a worker knows of its session, opened once per process and never reassigned. Two fields
    hold state that changes, each owned by this worker: ``closed_runs`` (finished trials whose run
    is known closed, so each is looked at once) and ``stopping`` (set on SIGINT/SIGTERM to stop the
    trial threads of ``--n-jobs``)."""

    preset: Preset
    experiment_id: str
    study_name: str
    storage_url: str
    storage: optuna.storages.BaseStorage
    parent_run_id: str
    data: Dataset
    client: Any
    studies: dict[str, optuna.Study]
    audit: Split | None  # images no choice reads; ``data.validation`` is the selection split
    audit_info: AuditInfo
    clock: Callable[[], float] = time.time  # the wall clock every budget figure is read from
    budget: Budget | None = None  # the session's time budget (None: none)
    plan: Plan | None = None  # the plan of a time-budgeted session
    closed_runs: set[int] = field(default_factory=set)
    stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def first_study(self) -> optuna.Study:
        """The first member's study, which holds the session-wide attributes (budget, plan, ensemble)."""
        return self.studies[self.preset.study.members[0]]

    def member_study_name(self, arch: str) -> str:
        return f"{self.study_name}.{arch}"

    def scrub(self, text: str) -> str:
        """``text`` without the storage's or the tracking server's password."""
        return tracking.scrub(text, self.storage_url, mlflow.get_tracking_uri())


def sampler(preset: Preset, member: int, number: int) -> optuna.samplers.BaseSampler:
    """TPE seeded by (member, trial number): reproducible, and workers sharing a storage do not all
    draw the same "random" start-up configurations, as samplers with one seed per process would."""
    return optuna.samplers.TPESampler(seed=preset.study.sampler_seed + 100_003 * member + number,
                                      n_startup_trials=3)


def open_session(preset: Preset, experiment: str | None = None, study_name: str | None = None,
                 storage: str | None = None, clock: Callable[[], float] = time.time) -> Session:
    """Create or join a tuning session, before any trial runs: the tracking store and the storage
    are checked first (a clear error, no training), then the schema and studies are created under a
    per-storage lock, then the experiment and parent run under a per-session lock. The session's
    time budget and plan are set later (``run.start_clock``)."""
    tracking_uri = mlflow.get_tracking_uri()
    with storage_lock(tracking_uri, keys.MLFLOW_SCHEMA_LOCK):  # the client creates a fresh store's schema
        client = tracking.client()
        tracking.check_tracking(client)
    url = storage or preset.study.storage or default_storage(tracking_uri)
    check_url(url)
    study_name = study_name or preset.study.name or preset.name
    opened, studies = _open_studies(preset, url, study_name)
    roles = partition(load_dataset(preset.data, labelled_only=True), preset.data)
    with storage_lock(url, keys.session_lock(study_name)):
        first = studies[preset.study.members[0]]
        check_same_data(first, roles.data.digest, roles.info.spec)
        experiment_id = tracking.ensure_experiment(client, experiment or preset.tracking.experiment)
        joined = _join_parent(client, first, study_name)
        run_id, experiment_id = joined or _start_parent(client, preset, experiment_id, study_name)
        session = Session(preset, experiment_id, study_name, url, opened, run_id, roles.data, client, studies,
                          roles.audit, roles.info, clock)
        if joined is None:
            _record_session(session)
    return session


def _open_studies(preset: Preset, url: str, study_name: str) -> tuple[optuna.storages.BaseStorage,
                                                                      dict[str, optuna.Study]]:
    """The storage and one study per member (created under one lock per storage: two processes
    creating a fresh schema at once fail), warm-started once when the preset asks."""
    studies: dict[str, optuna.Study] = {}
    try:
        with storage_lock(url, keys.SETUP_LOCK):
            opened = retry(lambda: open_storage(url, preset.study.heartbeat_seconds, keys.MAX_RETRY))
            for i, arch in enumerate(preset.study.members):
                studies[arch] = optuna.create_study(
                    storage=opened, study_name=f"{study_name}.{arch}", direction="maximize", load_if_exists=True,
                    sampler=sampler(preset, i, 0),
                    pruner=make_pruner(preset.study.pruner, preset.study.pruner_warmup_epochs, preset.train.epochs))
            if preset.study.warm_start:
                warm_start(studies, url, preset.study.warm_start, preset.study.warm_start_k)
    except Exception as exc:
        message = storage_error(url, exc)
        if message is None:
            raise
        raise TuneError(message) from None
    return opened, studies


def check_same_data(study: optuna.Study, digest: str, audit_spec: str) -> None:
    """Every worker of a session must train and choose on the same images: refuse other data."""
    known = study.user_attrs.get(keys.DATASET_DIGEST)
    if known and known != digest:
        raise TuneError(f"this worker's dataset (content digest {digest}) is not the data of session "
                        f"{study.study_name.rsplit('.', 1)[0]} (digest {known}): every worker needs the same images "
                        "and labels (see `python -m pipeline data inspect`)")
    spec = study.user_attrs.get(keys.AUDIT_SPLIT)
    if spec and spec != audit_spec:
        raise TuneError(f"this worker's audit split ({audit_spec}) differs from the session's ({spec}): set the "
                        "same data.audit_fraction and data.audit_min_per_class on every worker")


def _join_parent(client: Any, first: optuna.Study, study_name: str) -> tuple[str, str] | None:
    """(run id, experiment id) of the session's parent run when an earlier worker started it (its id
    lives in the studies' attributes); None to start one. Under ``mlflow run`` the launcher's run of
    a joining worker is tagged as a worker nested under that parent."""
    run_id = first.user_attrs.get(keys.PARENT_RUN)
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - deleted or from another tracking store: start anew
        return None
    if run.info.lifecycle_stage != "active":
        return None
    client.update_run(run_id, status="RUNNING")  # a resumed session's parent runs again while workers add trials
    adopted = tracking.adopted_run(client)
    if adopted and adopted[0] != run_id:
        tracking.set_tags(client, adopted[0], {tracking.PARENT_TAG: run_id, "kind": "tune-worker",
                                               "optuna.study": study_name})
    return run_id, run.info.experiment_id


def _start_parent(client: Any, preset: Preset, experiment_id: str, study_name: str) -> tuple[str, str]:
    """A new parent run: the launcher's run under ``mlflow run``, else a fresh one."""
    tags = {**tracking.standard_tags(str(resolve_device(preset.train.device))),
            "kind": "tune-session", "optuna.study": study_name}
    adopted = tracking.adopted_run(client)
    if adopted:
        tracking.set_tags(client, adopted[0], {**tags, "mlflow.runName": f"tune-{study_name}"})
        return adopted
    return tracking.start_run(client, experiment_id, f"tune-{study_name}", tags=tags), experiment_id


def _record_session(session: Session) -> None:
    """A new session's facts, for every later worker (study attributes) and for the UI (the parent
    run's tags, params, dataset input and the audit split's ids)."""
    audit, data, run_id = session.audit_info, session.data, session.parent_run_id
    for study in session.studies.values():
        study.set_user_attr(keys.PARENT_RUN, run_id)
        study.set_user_attr(keys.EXPERIMENT, session.experiment_id)
        study.set_user_attr(keys.DATASET_DIGEST, data.digest)
        study.set_user_attr(keys.AUDIT_SPLIT, audit.spec)
    tracking.set_tags(session.client, run_id, {"dataset_digest": data.digest, "audit_split": audit.spec,
                                               "audit_digest": ids_digest(session.audit)})
    params = {
        # "session." keeps these apart from the entry-point parameters `mlflow run` logs on its run.
        "session.study": session.study_name,
        "session.member_studies": ",".join(session.member_study_name(a) for a in session.preset.study.members),
        "session.trials_per_member": session.preset.study.trials,
        "session.storage": tracking.redact(session.storage_url),
        "session.dataset": str(data.root),
        "session.dataset_digest": data.digest,
        "session.preset": session.preset.name,
        "session.selection_images": len(data.validation),
        "session.audit_images": len(audit.ids),
        **flat_params(session.preset, ("data", "train", "study")),
        "study.name": session.study_name,
        "study.storage": tracking.redact(session.storage_url),  # never a password in a param
    }
    tracking.log_params(session.client, run_id, params)
    tracking.log_dataset(session.client, run_id, data)
    session.client.log_dict(run_id, {"source": audit.source, "spec": audit.spec, "digest": ids_digest(session.audit),
                                     "describe": audit.describe(), "ids": list(audit.ids)}, "audit/ids.json")


def session_budget(study: optuna.Study, time_budget: str | None, tail_seconds: float,
                   clock: Callable[[], float], started: float | None = None) -> Budget | None:
    """The session's budget, shared through the storage: the first worker that starts (not
    ``--setup-only``) records the start and the length on the first member study; every other
    worker reads them. None: no budget. Call under the session lock."""
    stored = study.user_attrs.get(keys.BUDGET_SECONDS)
    if time_budget is None and stored is None:
        return None
    seconds = parse_duration(time_budget) if time_budget is not None else float(stored)
    if stored is not None and abs(float(stored) - seconds) > 1e-6:
        raise TuneError(f"this worker's --time-budget ({duration(seconds)}) differs from the session's "
                        f"({duration(stored)}); workers share one budget: leave it out, or start a new --study")
    stored_start = study.user_attrs.get(keys.BUDGET_STARTED)
    if stored_start is None:
        started = clock() if started is None else started
        study.set_user_attr(keys.BUDGET_STARTED, started)
        study.set_user_attr(keys.BUDGET_SECONDS, seconds)
    else:
        started = stored_start
    return Budget(float(started), seconds, 0.0, tail_seconds)  # the plan sets final_seconds
