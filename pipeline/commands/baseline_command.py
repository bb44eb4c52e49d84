"""``baseline``: the second reference's SVM (RBF) on flattened, standardised pixels.

Logged under the same metric names and artifacts as a CNN run, so the MLflow UI compares them.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from torchvision.transforms.v2 import functional as F

from .. import metrics as M
from .. import tracking
from ..config import Preset, flat_params
from ..data import load_dataset
from ..progress import pct
from .options import BaselineOptions
from .train_command import TrainOutcome


def flatten(images: torch.Tensor, pixels: int | None) -> np.ndarray:
    if pixels is not None and images.shape[-1] != pixels:
        images = F.resize(images, [pixels, pixels], antialias=True)
    return images.reshape(len(images), -1).numpy().astype(np.float32) / 255.0


def fit_svm(x: np.ndarray, y: np.ndarray, c: float, seed: int):
    """The RBF SVM with probabilities as ``SVC(probability=True)`` made them: Platt scaling fitted on
    out-of-fold decision values (5 shuffled folds), then the SVM refitted on every image. scikit-learn
    1.9 deprecates that flag and names this wrapper (``ensemble=False``) as its replacement."""
    smallest_class = int(np.unique(y, return_counts=True)[1].min())
    folds = max(2, min(5, smallest_class))  # 5 as libsvm's, fewer when a class has fewer images
    svm = CalibratedClassifierCV(SVC(C=c, kernel="rbf", gamma="scale"), method="sigmoid", ensemble=False,
                                 cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return make_pipeline(StandardScaler(), svm).fit(x, y)


def run_baseline(preset: Preset, experiment: str, c: float | None = None, pixels: int | None = None,
                 max_train: int | None = None) -> TrainOutcome:
    c = 10.0 if c is None else c
    pixels = 32 if pixels is None else pixels
    client = tracking.client()
    tracking.check_tracking(client)
    data = load_dataset(preset.data)
    run_id, _ = tracking.open_run(client, experiment, "baseline-svm",
                                  tags={**tracking.standard_tags("cpu"), "kind": "baseline", "arch": "svm_rbf"})
    with tracking.run_guard(client, run_id):
        rng = np.random.default_rng(preset.train.seed)
        n = len(data.train)
        keep = np.sort(rng.choice(n, size=max_train, replace=False)) if max_train and max_train < n else np.arange(n)
        x_train = flatten(data.train.images[keep], pixels)
        y_train = data.train.labels.numpy()[keep]
        tracking.log_params(client, run_id, {**flat_params(replace(preset), ("data",)), "preset": preset.name,
                                             "model.arch": "svm_rbf", "svm.C": c, "svm.gamma": "scale",
                                             "svm.pixels": pixels, "svm.train_images": len(keep)})
        tracking.log_dataset(client, run_id, data)
        start = time.perf_counter()
        model = fit_svm(x_train, y_train, c, preset.train.seed)
        seconds = time.perf_counter() - start
        probs = model.predict_proba(flatten(data.validation.images, pixels)).astype(np.float32)
        y_val = data.validation.labels.numpy()
        accuracy = float((probs.argmax(1) == y_val).mean())
        tracking.log_metrics(client, run_id, {M.VAL_ACCURACY: accuracy}, step=1)
        with tempfile.TemporaryDirectory() as tmp:
            report = tracking.write_evaluation(Path(tmp), y_val, probs, data.validation.ids, data.classes,
                                               f"SVM (RBF, {pixels}px): validation")
            client.log_artifacts(run_id, tmp)
        summary = {M.BEST_VAL_ACCURACY: accuracy, M.BEST_EPOCH: 1, M.EPOCHS_RUN: 1, M.TRAIN_SECONDS: seconds,
                   M.IMAGES_PER_SECOND: len(keep) / seconds if seconds else 0.0,
                   **tracking.per_class_metrics(report, data.classes)}
        tracking.log_metrics(client, run_id, summary, step=1)
        tracking.describe_run(client, run_id, f"SVM (RBF, C={c:g}) on the {pixels}-px pixels of {Path(data.root).name} "
                                              f"({len(keep)} training images): validation accuracy {pct(accuracy)} "
                                              f"({len(y_val)} images)")
    return TrainOutcome(run_id, summary)


def main(preset: Preset, opts: BaselineOptions, progress: bool) -> int:
    outcome = run_baseline(preset, preset.tracking.experiment, c=opts.svm_c, pixels=opts.pixels,
                           max_train=opts.max_train)
    print(f"run {outcome.run_id}: " + ", ".join(f"{k}={v:.4g}" for k, v in outcome.summary.items()))
    return 0
