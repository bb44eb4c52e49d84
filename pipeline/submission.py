"""Batch inference through a logged pyfunc model, and the Kaggle submission it writes.

Images travel as their encoded file bytes into ``model.predict(DataFrame({"image": ...}))``: the
same path, and the same bytes, as a request to ``mlflow models serve``. Files are first checked
by the dataset layer (missing ids and unreadable images are a ``DataError`` naming the file),
then predicted in batches; the CSV is written to ``OUT.partial`` and renamed, so a failure never
leaves a partial submission behind.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .config import DataConfig
from .data.layout import DataError, DatasetIndex, SplitIndex, index_dataset

READ_WORKERS = max(1, min(2, os.cpu_count() or 1))


class ModelLoadError(RuntimeError):
    """A model URI that cannot be loaded (no such model, version or alias)."""


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


def select_split(index: DatasetIndex, split: str) -> SplitIndex:
    """One split's ids, files and labels, or a ``DataError`` saying which file is missing."""
    if split not in index.splits:
        have = ", ".join(index.splits)
        where = index.root / (f"{split}.csv" if index.layout == "competition" else split)
        raise DataError(f"{index.root}: no {split} split (missing {where}; this dataset has {have})")
    return index.splits[split]


def read_images(paths: Sequence[Path], workers: int = READ_WORKERS) -> list[bytes]:
    """Each file's encoded bytes, after the dataset layer has decoded it once: an unreadable image is
    a ``DataError`` naming the file, raised before any model is loaded."""
    from .data.cache import decode_one

    def read(path: Path) -> bytes:
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
        decode_one(path, None)  # the dataset layer's rule for what counts as an image
        return blob

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(read, paths))


def load_model(uri: str, device: str | None = None):
    """``mlflow.pyfunc.load_model`` with an error that names the URI (and the usual fix)."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    config = {"device": device} if device else None
    try:
        return mlflow.pyfunc.load_model(uri, model_config=config)
    except (MlflowException, OSError) as exc:
        first = (str(getattr(exc, "message", exc)).strip().splitlines() or [type(exc).__name__])[0]
        hint = ""
        if uri.endswith("@champion"):
            hint = ("; no version is @champion yet? run `python -m pipeline promote`, or pass "
                    "--model-uri models:/<name>@challenger")
        raise ModelLoadError(f"cannot load model {uri}: {first[:300]}{hint}") from None


def predict_images(model, blobs: Sequence[bytes], batch_size: int = 256, progress: bool = False,
                   desc: str = "predict") -> pd.DataFrame:
    """``model.predict`` over ``blobs`` in batches; one output row per image, in order."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    frames = []
    bar = tqdm(total=len(blobs), desc=desc, unit="img", disable=not (progress and sys.stderr.isatty()),
               dynamic_ncols=True)
    with bar:
        for start in range(0, len(blobs), batch_size):
            chunk = list(blobs[start:start + batch_size])
            out = model.predict(pd.DataFrame({"image": chunk}))
            if not isinstance(out, pd.DataFrame) or "label" not in out.columns or len(out) != len(chunk):
                raise RuntimeError(f"the model returned {type(out).__name__} of {len(out)} rows for {len(chunk)} "
                                   "images; expected a table with a 'label' column, one row per image")
            frames.append(out.reset_index(drop=True))
            bar.update(len(chunk))
    if not frames:
        return pd.DataFrame({"label": np.zeros(0, dtype=np.int64)})
    return pd.concat(frames, ignore_index=True)


def probability_columns(frame: pd.DataFrame) -> list[str]:
    cols = [c for c in frame.columns if str(c).startswith("prob_")]
    return sorted(cols, key=lambda c: int(str(c)[5:]))


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
    from .data.dataset import ensure_default_data

    start = time.perf_counter()
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'submission.csv'}")
    ensure_default_data(data_cfg)
    entry = select_split(index_dataset(data_cfg.root), split)
    blobs = read_images(entry.paths)
    read_done = time.perf_counter()
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
