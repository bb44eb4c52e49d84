"""What a finished training leaves in its run: per-epoch metrics (``EpochLogger``, fit's report
listener), the confusion matrix, per-class scores, validation probabilities and the best checkpoint."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from .. import metrics as M
from ..config import DataConfig, ModelConfig, TrainConfig
from ..train.checkpoint import ModelInterface, save_checkpoint
from .client import log_metrics, set_tags


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
    # scikit-learn gives the per-class rows; the macro-F1 is the one every run reports (metrics.macro_f1)
    report["macro avg"]["f1-score"] = M.macro_f1(probs, np.asarray(y_true), len(classes))
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
                     classes: tuple[str, ...], title: str, **arrays: np.ndarray | str | None) -> dict:
    """Confusion matrix (png + json), classification report and validation probabilities into out_dir;
    ``arrays`` (logits, flipped logits, precision…) are stored beside the probabilities."""
    import matplotlib.pyplot as plt

    matrix, report = classification_outputs(y_true, probs, classes)
    (out_dir / M.CONFUSION_JSON).write_text(json.dumps({"classes": list(classes), "matrix": matrix.tolist()}))
    (out_dir / M.REPORT_JSON).write_text(json.dumps(report, indent=2))
    fig = confusion_figure(matrix, list(classes), title)
    fig.savefig(out_dir / M.CONFUSION_PNG, dpi=110)
    plt.close(fig)
    pred_path = out_dir / M.PREDICTIONS_ARTIFACT
    pred_path.parent.mkdir(parents=True, exist_ok=True)
    extra = {k: np.asarray(v) for k, v in arrays.items() if v is not None}
    np.savez_compressed(pred_path, ids=np.asarray(ids), probs=probs.astype(np.float32),
                        labels=y_true.astype(np.int64), classes=np.asarray(classes), **extra)
    return report


def per_class_metrics(report: dict, classes: tuple[str, ...]) -> dict[str, float]:
    """val_macro_f1 (metrics.macro_f1, set by ``classification_outputs``) and each class's F1 and recall."""
    out = {M.VAL_MACRO_F1: report["macro avg"]["f1-score"]}
    for name in classes:
        out[f"val_f1_class_{name}"] = report[name]["f1-score"]
        out[f"val_recall_class_{name}"] = report[name]["recall"]
    return out


def log_training_outputs(mlflow_client: MlflowClient, run_id: str, result, data, model_cfg: ModelConfig,
                         data_cfg: DataConfig, train_cfg: TrainConfig) -> dict:
    """Summary metrics and artifacts of one finished ``fit``: what ensembles and the UI need."""
    y_val = data.validation.labels.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # What the ensemble reads: the selection split's probabilities and logits at the best epoch (and of
        # the mirror images), computed at the precision the trial ran at (the served model uses the same).
        report = write_evaluation(out, y_val, result.val_probs, data.validation.ids, data.classes,
                                  f"{model_cfg.arch}: {data.validation.name} split ({result.kept}, "
                                  f"epoch {result.best_epoch})",
                                  logits=result.val_logits, logits_flipped=result.val_logits_flipped,
                                  precision=result.precision, split=data.validation.name)
        save_checkpoint(out / M.CHECKPOINT_ARTIFACT, result.best_state, model_cfg, data_cfg, train_cfg,
                        ModelInterface(data.classes, data.image_shape[1:]), result.best_epoch,
                        result.best_val_accuracy)
        mlflow_client.log_artifacts(run_id, str(out))
    summary = {
        M.BEST_VAL_ACCURACY: result.best_val_accuracy,
        M.BEST_EPOCH: result.best_epoch,
        M.EPOCHS_RUN: result.epochs_run,
        M.TRAIN_SECONDS: result.train_seconds,
        M.IMAGES_PER_SECOND: result.images_per_second,
        M.EVAL_SECONDS: result.eval_seconds,
        M.EVAL_FRACTION: result.eval_fraction,
        M.TRAIN_IMAGES: result.images,
        **per_class_metrics(report, data.classes),
    }
    log_metrics(mlflow_client, run_id, summary, step=result.best_epoch)
    # val_* metrics and the best epoch were measured, and chosen, on this split
    set_tags(mlflow_client, run_id, {"val_split": f"{data.validation.name} ({len(data.validation)} images)"})
    return summary


