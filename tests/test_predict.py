"""`predict`: the Kaggle submission from a registered model, its order, its equality with pyfunc
predictions, and the dataset layer's rules for bad input (clear error, no partial CSV)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import read_csv_rows, write_csv

from pipeline.commands.predict_command import ModelLoadError, write_csv_atomic, write_submission
from pipeline.config import DataConfig
from pipeline.data import DataError

CHALLENGER_URI = "models:/deepfake-ensemble@challenger"


def _test_ids(root: Path) -> list[str]:
    return [row["image_id"] for row in read_csv_rows(root / "test.csv")]


@pytest.fixture(scope="module")
def pyfunc(tuned):
    """The challenger loaded the way a user would, plus the test split's raw file bytes."""
    import mlflow.pyfunc

    with pytest.MonkeyPatch.context() as mp:
        tuned.use(mp)
        model = mlflow.pyfunc.load_model(CHALLENGER_URI)
    ids = _test_ids(tuned.data)
    blobs = [(tuned.data / "test" / f"{image_id}.png").read_bytes() for image_id in ids]
    return model, ids, blobs


def test_submission_matches_test_csv_order_and_pyfunc_predictions(tuned, pyfunc, tmp_path, monkeypatch):
    tuned.use(monkeypatch)
    model, ids, blobs = pyfunc
    out = tmp_path / "out" / "submission.csv"
    # Batches of 16 over 50 images: batching must change nothing.
    result = write_submission(DataConfig(root=str(tuned.data)), CHALLENGER_URI, out, probabilities=True,
                              batch_size=16, progress=False)
    frame = pd.read_csv(out, dtype={"image_id": str})
    assert list(frame.columns) == ["image_id", "label"] + [f"prob_{i}" for i in range(5)]
    assert frame["image_id"].tolist() == ids  # test.csv order, which is not sorted
    assert ids != sorted(ids)
    assert result.rows == len(ids) == 50 and result.path == out
    assert not (out.parent / "submission.csv.partial").exists()

    expected = model.predict(pd.DataFrame({"image": blobs}))
    assert frame["label"].tolist() == expected["label"].tolist()
    probs = frame[[f"prob_{i}" for i in range(5)]].to_numpy().astype(np.float32)
    # Equal up to float rounding: a batch of 2 and one of 50 may take different kernels (AVX2 machines).
    np.testing.assert_allclose(probs, expected[[f"prob_{i}" for i in range(5)]].to_numpy(np.float32), rtol=0, atol=1e-6)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # The synthetic test split is labelled: the reported accuracy is the CSV's.
    truth = [int(row["label"]) for row in read_csv_rows(tuned.data / "test.csv")]
    assert result.accuracy == pytest.approx(np.mean(np.array(truth) == frame["label"].to_numpy()))
    assert "images/s" in result.describe() and str(out) in result.describe()


def test_unlabelled_test_csv_like_the_competition(tuned, tmp_path, monkeypatch):
    tuned.use(monkeypatch)
    data = shutil.copytree(tuned.data, tmp_path / "data")
    ids = _test_ids(data)
    write_csv(data / "test.csv", [(i,) for i in ids], ("image_id",))
    out = tmp_path / "submission.csv"
    result = write_submission(DataConfig(root=str(data)), CHALLENGER_URI, out, progress=False)
    rows = read_csv_rows(out)
    assert list(rows[0]) == ["image_id", "label"]
    assert [r["image_id"] for r in rows] == ids
    assert {int(r["label"]) for r in rows} <= set(range(5))
    assert result.accuracy is None and "accuracy" not in result.describe()


def test_missing_test_csv_is_a_clear_error_and_writes_nothing(tuned, tmp_path, monkeypatch):
    tuned.use(monkeypatch)
    data = shutil.copytree(tuned.data, tmp_path / "data")
    (data / "test.csv").unlink()
    out = tmp_path / "submission.csv"
    with pytest.raises(DataError, match=r"no test split \(missing .*test\.csv"):
        write_submission(DataConfig(root=str(data)), CHALLENGER_URI, out, progress=False)
    assert list(tmp_path.glob("submission.csv*")) == []


def test_unreadable_image_names_the_file_and_keeps_the_old_submission(tuned, tmp_path, monkeypatch):
    tuned.use(monkeypatch)
    data = shutil.copytree(tuned.data, tmp_path / "data")
    bad = data / "test" / f"{_test_ids(data)[-1]}.png"  # the last row: found before any prediction
    bad.write_bytes(bad.read_bytes()[:40])
    out = tmp_path / "submission.csv"
    out.write_text("previous submission\n")
    with pytest.raises(DataError, match=rf"{bad.name}: cannot decode image"):
        write_submission(DataConfig(root=str(data)), CHALLENGER_URI, out, progress=False)
    assert out.read_text() == "previous submission\n"
    assert not (tmp_path / "submission.csv.partial").exists()


def test_csv_writer_failing_midway_leaves_no_partial_file(tmp_path):
    class Boom:
        def __str__(self) -> str:
            raise RuntimeError("disk full")

    out = tmp_path / "submission.csv"
    with pytest.raises(RuntimeError, match="disk full"):
        write_csv_atomic(out, ["image_id", "label"], [["a", 1], ["b", Boom()]])
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_uri_is_a_clear_error(tuned, tmp_path, monkeypatch):
    tuned.use(monkeypatch)
    with pytest.raises(ModelLoadError, match="cannot load model models:/deepfake-ensemble@nosuch"):
        write_submission(DataConfig(root=str(tuned.data)), "models:/deepfake-ensemble@nosuch",
                         tmp_path / "s.csv", progress=False)
    # The CLI's default URI is @champion: without one, the error says how to get one.
    with pytest.raises(ModelLoadError, match="no version is @champion yet"):
        write_submission(DataConfig(root=str(tuned.data)), "models:/no-such-model@champion",
                         tmp_path / "s.csv", progress=False)
    assert not list(tmp_path.glob("s.csv*"))


def test_predict_cli_writes_the_submission(tuned, tmp_path, monkeypatch, capsys):
    import signal

    from pipeline.cli import main

    tuned.use(monkeypatch)
    out = tmp_path / "sub.csv"
    handler = signal.getsignal(signal.SIGTERM)
    try:
        code = main(["predict", "--data", str(tuned.data), "--model-uri", CHALLENGER_URI, "--out", str(out),
                     "--probabilities", "--batch-size", "20", "--no-progress"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    stdout = capsys.readouterr().out
    assert code == 0 and "50 rows" in stdout and "images/s" in stdout
    rows = read_csv_rows(out)
    assert [r["image_id"] for r in rows] == _test_ids(tuned.data) and "prob_4" in rows[0]


def test_imagefolder_submission_ids_are_paths_under_the_split(tuned, pyfunc, tmp_path, monkeypatch):
    """Class folders that reuse file names (``test/coat/0.png``, ``test/dress/0.png``), PNG and JPEG,
    at another size than the members were trained at: one row per file, the id its path under the
    split, the label the model's answer for those bytes."""
    from PIL import Image

    tuned.use(monkeypatch)
    model, _, blobs = pyfunc
    root = tmp_path / "clothes"
    classes = ("bag", "coat", "dress", "shirt", "shoe")
    for split in ("train", "validation", "test"):
        for k, name in enumerate(classes):
            for i in range(2):
                picture = Image.open(io.BytesIO(blobs[2 * k + i])).convert("RGB").resize((24, 24))
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                picture.save(folder / (f"{i}.jpg" if i else f"{i}.png"))
    out = tmp_path / "submission.csv"
    result = write_submission(DataConfig(root=str(root)), CHALLENGER_URI, out, progress=False)
    rows = read_csv_rows(out)
    ids = [r["image_id"] for r in rows]
    assert ids == [f"{name}/{f}" for name in classes for f in ("0.png", "1.jpg")]
    expected = model.predict(pd.DataFrame({"image": [(root / "test" / i).read_bytes() for i in ids]}))
    assert [int(r["label"]) for r in rows] == expected["label"].tolist()
    assert result.rows == 10 and result.accuracy is not None  # labelled by class folder
    bad = root / "test" / "dress" / "0.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=str(bad)):  # errors name the file, hence the id
        write_submission(DataConfig(root=str(root)), CHALLENGER_URI, out, progress=False)
