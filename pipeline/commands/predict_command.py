"""``predict``: the Kaggle submission from a registered model.

Images go through ``registry.inference`` (the bytes a served request carries); the CSV is written to
``OUT.partial`` and renamed, so a failure never leaves a partial submission behind.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import tracking
from ..config import DataConfig, Preset
from ..data.dataset import ensure_default_data
from ..data.layout import index_dataset
from ..progress import say
from ..registry.inference import (  # noqa: F401
    ModelLoadError,
    load_model,
    predict_images,
    probability_columns,
    read_images,
    select_split,
)
from .options import PredictOptions


@dataclass(frozen=True)
class Submission:
    path: Path
    model_uri: str
    split: str
    rows: int
    probabilities: bool
    read_seconds: float  # reading and checking the image files
    load_seconds: float  # loading the model
    predict_seconds: float  # model.predict over every batch (decode, resize, both networks)
    seconds: float  # the whole call
    accuracy: float | None = None  # when the split happens to be labelled (synthetic test, validation)

    @property
    def images_per_second(self) -> float:
        return self.rows / self.predict_seconds if self.predict_seconds > 0 else float("inf")

    def describe(self) -> str:
        columns = "image_id,label" + (",prob_0..prob_N" if self.probabilities else "")
        lines = [f"wrote {self.path}: {self.rows} rows ({columns}) for the {self.split} split, model {self.model_uri}",
                 f"predict {self.predict_seconds:.2f}s ({self.images_per_second:.1f} images/s); read and check "
                 f"{self.read_seconds:.2f}s, model load {self.load_seconds:.2f}s, total {self.seconds:.2f}s"]
        if self.accuracy is not None:
            lines.append(f"the {self.split} split is labelled: accuracy {100 * self.accuracy:.2f}%")
        return "\n".join(lines)


def write_csv_atomic(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    """Write ``path.partial`` beside the target, then rename: the target is complete or untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_submission(data_cfg: DataConfig, uri: str, out: str | os.PathLike, split: str = "test",
                     probabilities: bool = False, batch_size: int = 256, progress: bool = True,
                     device: str | None = None) -> Submission:
    """Predict every image of ``split`` with the model at ``uri`` and write ``image_id,label``
    (plus ``prob_0..`` with ``probabilities``) in the split's own order (``test.csv`` order)."""
    start = time.perf_counter()
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'submission.csv'}")
    ensure_default_data(data_cfg)
    entry = select_split(index_dataset(data_cfg.root), split)
    blobs = read_images(entry.paths, progress=progress, desc=f"read and check {split}")
    read_done = time.perf_counter()
    say(f"loading {uri}")  # tens of seconds on a busy CPU: say what the wait is
    model = load_model(uri, device)
    load_done = time.perf_counter()
    frame = predict_images(model, blobs, batch_size, progress, desc=f"predict {split}")
    predict_done = time.perf_counter()

    labels = frame["label"].to_numpy().astype(np.int64)
    header = ["image_id", "label"]
    columns: list[np.ndarray] = [labels]
    if probabilities:
        prob_cols = probability_columns(frame)
        if not prob_cols:
            raise RuntimeError(f"the model {uri} returns no prob_* columns; predict without --probabilities")
        header += prob_cols
        columns += [frame[c].to_numpy(dtype=np.float32) for c in prob_cols]
    rows = [[image_id, int(labels[i])] + [format(float(col[i]), ".9g") for col in columns[1:]]
            for i, image_id in enumerate(entry.ids)]
    write_csv_atomic(out, header, rows)
    accuracy = float((labels == np.asarray(entry.labels)).mean()) if entry.labels is not None else None
    return Submission(out, uri, split, len(rows), probabilities, read_done - start, load_done - read_done,
                      predict_done - load_done, time.perf_counter() - start, accuracy)


def main(preset: Preset, opts: PredictOptions, progress: bool) -> int:
    uri = opts.model_uri or f"models:/{preset.study.model_name}@champion"
    if uri.startswith(("models:/", "runs:/")):  # a model in the tracking store (else a local path): checked first
        tracking.check_tracking(tracking.client())
    result = write_submission(preset.data, uri, opts.out, split=opts.split, probabilities=opts.probabilities,
                              batch_size=opts.batch_size, progress=progress, device=preset.train.device)
    print(result.describe())
    return 0
