"""Batch inference through a logged pyfunc model: the same path, and the same bytes, as a request to
``mlflow models serve``. Files are first checked by the dataset layer (missing ids and unreadable
images are a ``DataError`` naming the file), then predicted in batches."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from ..data.cache import decode_one
from ..data.layout import DataError, DatasetIndex, SplitIndex
from ..progress import Counter

READ_WORKERS = max(1, min(2, os.cpu_count() or 1))


class ModelLoadError(RuntimeError):
    """A model URI that cannot be loaded (no such model, version or alias)."""


def select_split(index: DatasetIndex, split: str) -> SplitIndex:
    """One split's ids, files and labels, or a ``DataError`` saying which file is missing."""
    if split not in index.splits:
        have = ", ".join(index.splits)
        where = index.root / (f"{split}.csv" if index.layout == "competition" else split)
        raise DataError(f"{index.root}: no {split} split (missing {where}; this dataset has {have})")
    return index.splits[split]


def read_images(paths: Sequence[Path], workers: int = READ_WORKERS, progress: bool = False,
                desc: str = "read and check") -> list[bytes]:
    """Each file's encoded bytes, after the dataset layer has decoded it once: an unreadable image is
    a ``DataError`` naming the file, raised before any model is loaded."""
    def read(path: Path) -> bytes:
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
        decode_one(path, None)  # the dataset layer's rule for what counts as an image
        return blob

    blobs = []
    with ThreadPoolExecutor(workers) as pool, Counter(len(paths), desc, bars=progress, leave=False) as counter:
        for blob in pool.map(read, paths):
            blobs.append(blob)
            counter.update()
    return blobs


def load_model(uri: str, device: str | None = None):
    """``mlflow.pyfunc.load_model`` with an error that names the URI (and the usual fix)."""
    import mlflow.pyfunc

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
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    frames = []
    with Counter(len(blobs), desc, bars=progress) as bar:
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
