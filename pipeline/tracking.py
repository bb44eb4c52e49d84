"""The MLflow side: runs, params, per-epoch metrics, figures, checkpoints and predictions.

Everything goes through an explicit ``MlflowClient`` and run id, never the fluent "active run", so
nested trial runs and several workers in one process cannot log into each other's runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import metrics as M
from .config import DataConfig, ModelConfig, TrainConfig
from .interrupt import Interrupted  # noqa: F401 - re-exported

PROJECT_DIR = Path(__file__).resolve().parent.parent
PARENT_TAG = "mlflow.parentRunId"


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
    from mlflow import get_tracking_uri

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


class EpochLogger:
    """The ``report`` listener that mirrors each epoch's metrics into a run (step = epoch)."""

    def __init__(self, mlflow_client: MlflowClient, run_id: str):
        self.client, self.run_id = mlflow_client, run_id
        self.last_epoch = 0

    def __call__(self, epoch: int, values: dict[str, float]) -> None:
        self.last_epoch = epoch
        log_metrics(self.client, self.run_id, values, step=epoch)


def classification_outputs(y_true: np.ndarray, probs: np.ndarray, classes: Iterable[str]) -> tuple[np.ndarray, dict]:
    from sklearn.metrics import classification_report, confusion_matrix

    classes = list(classes)
    y_pred = probs.argmax(1)
    labels = list(range(len(classes)))
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    report = classification_report(y_true, y_pred, labels=labels, target_names=classes, output_dict=True,
                                   zero_division=0)
    return matrix, report


def confusion_figure(matrix: np.ndarray, classes: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = matrix.max() or 1
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > top / 2 else "black", fontsize=9)
    fig.tight_layout()
    return fig


def write_evaluation(out_dir: Path, y_true: np.ndarray, probs: np.ndarray, ids: list[str],
                     classes: tuple[str, ...], title: str) -> dict:
    """Confusion matrix (png + json), classification report and validation probabilities into out_dir."""
    import matplotlib.pyplot as plt

    matrix, report = classification_outputs(y_true, probs, classes)
    (out_dir / M.CONFUSION_JSON).write_text(json.dumps({"classes": list(classes), "matrix": matrix.tolist()}))
    (out_dir / M.REPORT_JSON).write_text(json.dumps(report, indent=2))
    fig = confusion_figure(matrix, list(classes), title)
    fig.savefig(out_dir / M.CONFUSION_PNG, dpi=110)
    plt.close(fig)
    pred_path = out_dir / M.PREDICTIONS_ARTIFACT
    pred_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(pred_path, ids=np.asarray(ids), probs=probs.astype(np.float32),
                        labels=y_true.astype(np.int64), classes=np.asarray(classes))
    return report


def per_class_metrics(report: dict, classes: tuple[str, ...]) -> dict[str, float]:
    out = {M.VAL_MACRO_F1: report["macro avg"]["f1-score"]}
    for name in classes:
        out[f"val_f1_class_{name}"] = report[name]["f1-score"]
        out[f"val_recall_class_{name}"] = report[name]["recall"]
    return out


def log_dataset(mlflow_client: MlflowClient, run_id: str, data) -> None:
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    class _ImageDataset(MetaDataset):
        # MetaDataset carries no profile; the split sizes belong in the UI's dataset panel.
        def to_dict(self) -> dict[str, str]:
            profile = {name: len(split) for name, split in data.splits.items()}
            profile |= {"image_shape": list(data.image_shape), "classes": list(data.classes)}
            return {**super().to_dict(), "profile": json.dumps(profile)}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": all local paths
        source = resolve_dataset_source(str(Path(data.root).resolve()))
    dataset = _ImageDataset(source, name=Path(data.root).name,
                            digest=data.digest)
    entity = dataset._to_mlflow_entity()
    mlflow_client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", "training")])])


def log_training_outputs(mlflow_client: MlflowClient, run_id: str, result, data, model_cfg: ModelConfig,
                         data_cfg: DataConfig, train_cfg: TrainConfig) -> dict:
    """Summary metrics and artifacts of one finished ``fit``: what ensembles and the UI need."""
    from .checkpoint import save_checkpoint

    y_val = data.validation.labels.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        report = write_evaluation(out, y_val, result.val_probs, data.validation.ids, data.classes,
                                  f"{model_cfg.arch}: validation (epoch {result.best_epoch})")
        save_checkpoint(out / M.CHECKPOINT_ARTIFACT, result.best_state, model_cfg, data_cfg, train_cfg,
                        data.classes, result.best_epoch, result.best_val_accuracy,
                        data.image_shape[1:])
        mlflow_client.log_artifacts(run_id, str(out))
    summary = {
        M.BEST_VAL_ACCURACY: result.best_val_accuracy,
        M.BEST_EPOCH: result.best_epoch,
        M.EPOCHS_RUN: result.epochs_run,
        M.TRAIN_SECONDS: result.train_seconds,
        M.IMAGES_PER_SECOND: result.images_per_second,
        **per_class_metrics(report, data.classes),
    }
    log_metrics(mlflow_client, run_id, summary, step=result.best_epoch)
    return summary


def download_artifact(mlflow_client: MlflowClient, run_id: str, path: str, dst: str | os.PathLike) -> Path:
    return Path(mlflow_client.download_artifacts(run_id, path, str(dst)))


__all__ = ["RunStatus", "TrackingError", "EpochLogger", "redact"]


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
        except Exception:  # noqa: BLE001 - never hide the original error behind a logging one
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
