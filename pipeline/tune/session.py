"""A tuning session: the storage, one study per member, the parent run and the data, opened once per
worker process. Any number of workers join the same session through the storage."""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import mlflow
import optuna

from .. import tracking
from ..config import Preset, flat_params
from ..data import Dataset, Split, load_dataset
from ..data.audit import AuditInfo, ids_digest, partition
from ..train import resolve_device
from .pruners import make_pruner
from .storage import check_url, default_storage, open_storage, retry, storage_error, storage_lock

PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
MAX_RETRY = 2  # a trial whose worker is lost (or interrupted) is run again at most this often
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # tags each trial run with the process that ran it


class TuneError(RuntimeError):
    """A study that cannot go on (for example: every trial fails)."""


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
    audit: Split | None = None  # images no choice reads; ``data.validation`` is the selection split
    audit_info: AuditInfo | None = None
    budget: Any = None  # budget.Budget once a worker has started the session's clock (None: no time budget)
    plan: Any = None  # plan.Plan of a time-budgeted session
    clock: Callable[[], float] = time.time  # the wall clock every budget figure is read from
    checked: set[int] = field(default_factory=set)  # ids of finished trials whose run is known closed
    stopping: threading.Event = field(default_factory=threading.Event)  # set on SIGINT/SIGTERM (n_jobs > 1)

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
                 storage: str | None = None) -> Session:
    """Create or join a tuning session, before any trial runs: the tracking store and the storage
    are checked first (a clear error, no training), then the schema and studies are created under a
    per-storage lock, then the experiment and parent run under a per-session lock."""
    tracking_uri = mlflow.get_tracking_uri()
    with storage_lock(tracking_uri, "mlflow-schema"):  # the client creates a fresh store's schema
        client = tracking.client()
        tracking.check_tracking(client)
    url = storage or preset.study.storage or default_storage(tracking_uri)
    check_url(url)
    study_name = study_name or preset.study.name or preset.name
    studies: dict[str, optuna.Study] = {}
    try:
        # One lock per storage: two processes creating a fresh schema at once fail.
        with storage_lock(url, "setup"):
            opened = retry(lambda: open_storage(url, preset.study.heartbeat_seconds, MAX_RETRY))
            for i, arch in enumerate(preset.study.members):
                studies[arch] = optuna.create_study(
                    storage=opened, study_name=f"{study_name}.{arch}", direction="maximize", load_if_exists=True,
                    sampler=sampler(preset, i, 0),
                    pruner=make_pruner(preset.study.pruner, preset.study.pruner_warmup_epochs, preset.train.epochs))
            if preset.study.warm_start:
                from .warm_start import warm_start

                warm_start(studies, url, preset.study.warm_start, preset.study.warm_start_k)
    except Exception as exc:
        message = storage_error(url, exc)
        if message is None:
            raise
        raise TuneError(message) from None
    roles = partition(load_dataset(preset.data, labelled_only=True), preset.data)
    with storage_lock(url, f"session:{study_name}"):
        check_same_data(studies[preset.study.members[0]], roles.data.digest, roles.info.spec)
        experiment_id = tracking.ensure_experiment(client, experiment or preset.tracking.experiment)
        session = Session(preset, experiment_id, study_name, url, opened, "", roles.data, client, studies,
                          roles.audit, roles.info)
        session.parent_run_id = _parent_run(session)
    return session


def check_same_data(study: optuna.Study, digest: str, audit_spec: str) -> None:
    """Every worker of a session must train and choose on the same images: refuse other data."""
    known = study.user_attrs.get("dataset_digest")
    if known and known != digest:
        raise TuneError(f"this worker's dataset (content digest {digest}) is not the data of session "
                        f"{study.study_name.rsplit('.', 1)[0]} (digest {known}): every worker needs the same images "
                        "and labels (see `python -m pipeline data inspect`)")
    spec = study.user_attrs.get("audit_split")
    if spec and spec != audit_spec:
        raise TuneError(f"this worker's audit split ({audit_spec}) differs from the session's ({spec}): set the "
                        "same data.audit_fraction and data.audit_min_per_class on every worker")


def _parent_run(session: Session) -> str:
    """The session's parent run id lives in the studies' user attributes: every worker finds it.
    Under ``mlflow run`` the launcher's run becomes the parent of a new session, or a worker run
    nested under the existing parent."""
    first = session.studies[session.preset.study.members[0]]
    run_id = first.user_attrs.get(PARENT_ATTR)
    adopted = tracking.adopted_run(session.client)
    if run_id:
        try:
            run = session.client.get_run(run_id)
            if run.info.lifecycle_stage == "active":
                session.experiment_id = run.info.experiment_id
                # A resumed session's parent shows as running again while workers add trials.
                session.client.update_run(run_id, status="RUNNING")
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
    audit = session.audit_info
    for study in session.studies.values():
        study.set_user_attr(PARENT_ATTR, run_id)
        study.set_user_attr("mlflow_experiment_id", session.experiment_id)
        study.set_user_attr("dataset_digest", session.data.digest)
        study.set_user_attr("audit_split", audit.spec)
    tracking.set_tags(session.client, run_id, {"dataset_digest": session.data.digest, "audit_split": audit.spec,
                                               "audit_digest": ids_digest(session.audit)})
    params = {
        # "session." keeps these apart from the entry-point parameters `mlflow run` logs on its run.
        "session.study": session.study_name,
        "session.member_studies": ",".join(session.member_study_name(a) for a in session.preset.study.members),
        "session.trials_per_member": session.preset.study.trials,
        "session.storage": tracking.redact(session.storage_url),
        "session.dataset": str(session.data.root),
        "session.dataset_digest": session.data.digest,
        "session.preset": session.preset.name,
        "session.selection_images": len(session.data.validation),
        "session.audit_images": len(audit.ids),
        **flat_params(session.preset, ("data", "train", "study")),
        "study.name": session.study_name,
        "study.storage": tracking.redact(session.storage_url),  # never a password in a param
    }
    tracking.log_params(session.client, run_id, params)
    tracking.log_dataset(session.client, run_id, session.data)
    session.client.log_dict(run_id, {"source": audit.source, "spec": audit.spec, "digest": ids_digest(session.audit),
                                     "describe": audit.describe(), "ids": list(audit.ids)}, "audit/ids.json")
    return run_id
