"""Runs through an explicit client: create, adopt, log params/metrics/tags, close; store checks.

Everything goes through an explicit ``MlflowClient`` and run id, never the fluent "active run", so
nested trial runs and several workers in one process cannot log into each other's runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import torch
from mlflow import get_tracking_uri
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

# MLflow's SQL store sets up a loader strategy that SQLAlchemy 2.1 deprecates (shown with -W default).
warnings.filterwarnings("ignore", message="The ``noload`` loader strategy is deprecated")

PROJECT_DIR = Path(__file__).resolve().parent.parent.parent
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # the run's Description in the UI (markdown)


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or used."""


def redact(url: str) -> str:
    """A URL with any password removed: credentials never reach params, tags or output."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None and "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username
    netloc = f"{user}:***@{host}" if user else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def client() -> MlflowClient:
    return MlflowClient()


def scrub(text: str, *urls: str) -> str:
    """``text`` with the password of any of ``urls`` replaced by ``***`` (error messages may quote
    a connection string)."""
    for url in urls:
        try:
            password = urlsplit(url).password
        except ValueError:
            continue
        if password:
            text = text.replace(password, "***")
            text = text.replace(url, redact(url))
    return text


# The start-up probe of a tracking server: a few quick attempts, not MLflow's minutes of back-off.
PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def check_tracking(mlflow_client: MlflowClient) -> None:
    """Fail fast, before any training, when the tracking store is unusable."""
    uri = get_tracking_uri()
    remote = uri.startswith(("http://", "https://"))
    saved = {k: os.environ.get(k) for k in PROBE_ENV} if remote else {}
    try:
        os.environ.update({k: v for k, v in PROBE_ENV.items() if k in saved and saved[k] is None})
        mlflow_client.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - connection errors come in many types
        text = scrub(str(exc).strip(), uri)
        if remote and ("Max retries exceeded" in text or "Connection" in text or "timed out" in text):
            why = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
            reason = why.group(1).strip() if why else "no answer"
            raise TrackingError(f"MLflow tracking server {redact(uri)} is unreachable ({reason}); start it or "
                                "fix MLFLOW_TRACKING_URI") from None
        first = text.splitlines()[0] if text else type(exc).__name__
        raise TrackingError(f"MLflow tracking store {redact(uri)} is not usable: {first[:300]}") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def ensure_experiment(mlflow_client: MlflowClient, name: str) -> str:
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except MlflowException:
        # Another worker created it between our lookup and create.
        return mlflow_client.get_experiment_by_name(name).experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True,
                             timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def standard_tags(device: str) -> dict[str, str]:
    return {"git_commit": git_commit(), "device": device, "torch_version": torch.__version__,
            "mlflow.source.git.commit": git_commit()}


def start_run(mlflow_client: MlflowClient, experiment_id: str, name: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = mlflow_client.create_run(experiment_id, run_name=name, tags=all_tags)
    return run.info.run_id


def end_run(mlflow_client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    mlflow_client.set_terminated(run_id, status=status)


def log_params(mlflow_client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params; a key that the run already holds with another value (``mlflow run`` logs the
    entry point's raw parameters, e.g. ``split=''``) is logged as ``resolved.<key>`` instead, since
    MLflow refuses to change a param."""
    existing = mlflow_client.get_run(run_id).data.params
    items = []
    for key, value in params.items():
        text = _param_value(value)
        if key in existing and existing[key] != text:
            key = f"resolved.{key}"
        items.append(Param(key, text))
    for i in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[i:i + 100])


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)[:6000]


def log_metrics(mlflow_client: MlflowClient, run_id: str, values: dict[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in values.items()]
    mlflow_client.log_batch(run_id, metrics=batch)


def set_tags(mlflow_client: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    mlflow_client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def describe_run(mlflow_client: MlflowClient, run_id: str, text: str) -> None:
    """Set the run's Description, the markdown the UI shows above its details (MLflow keeps it in a tag)."""
    set_tags(mlflow_client, run_id, {NOTE_TAG: text[:5000]})


def download_artifact(mlflow_client: MlflowClient, run_id: str, path: str, dst: str | os.PathLike) -> Path:
    return Path(mlflow_client.download_artifacts(run_id, path, str(dst)))


class run_guard:
    """Close a run by how its block ended: FINISHED, KILLED (Ctrl-C / SIGTERM) or FAILED with the error."""

    def __init__(self, mlflow_client: MlflowClient, run_id: str):
        self.client, self.run_id = mlflow_client, run_id

    def __enter__(self) -> str:
        return self.run_id

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                end_run(self.client, self.run_id, "FINISHED")
            elif issubclass(exc_type, KeyboardInterrupt):
                set_tags(self.client, self.run_id, {"stopped_by": "interrupt"})
                end_run(self.client, self.run_id, "KILLED")
            else:
                set_tags(self.client, self.run_id, {"error": f"{exc_type.__name__}: {exc}"[:5000]})
                end_run(self.client, self.run_id, "FAILED")
        except Exception:
            if exc_type is None:
                raise
        return False


def adopted_run(mlflow_client: MlflowClient) -> tuple[str, str] | None:
    """Under ``mlflow run`` the launcher has already created a run (``MLFLOW_RUN_ID``): use it, so one
    call is one run. Returns (run_id, experiment_id) or None."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException:
        return None
    if run.info.status != "RUNNING":
        return None
    return run_id, run.info.experiment_id


def open_run(mlflow_client: MlflowClient, experiment: str, name: str, tags: dict[str, str]) -> tuple[str, str]:
    """The run a command logs into: the ``mlflow run`` launcher's, or a new one. (run_id, experiment_id)"""
    adopted = adopted_run(mlflow_client)
    if adopted:
        run_id, experiment_id = adopted
        set_tags(mlflow_client, run_id, {**tags, "mlflow.runName": name})
        return run_id, experiment_id
    experiment_id = ensure_experiment(mlflow_client, experiment)
    return start_run(mlflow_client, experiment_id, name, tags=tags), experiment_id
