"""``make gpu-check DEVICE=cpu``: the GPU check at toy size on the CPU, run as a person runs it, so it
never rots: every step, every field of ``gpu-check.json``, a model really registered and a
submission really written."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
from pathlib import Path

from mlflow.tracking import MlflowClient

PROJECT = Path(__file__).resolve().parents[1]
SPEED_FIELDS = {"train_images_per_second", "eval_images_per_second", "train_step_ms", "outside_kernels_share"}


def test_make_gpu_check_on_the_cpu_writes_every_field(tmp_path: Path) -> None:
    out, work = tmp_path / "gpu-check.json", tmp_path / "work"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run(["make", "-s", "gpu-check", "DEVICE=cpu", f"GPU_CHECK_OUT={out}",
                           f"GPU_CHECK_WORKDIR={work}"], cwd=PROJECT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no CUDA: running the same steps on the CPU at toy size" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["toy"] is True and figures["passed"] is True
    assert figures["machine"]["device"] == "cpu" and figures["settings"]["batches"] == [8, 32]

    assert set(figures["step_speed"]) == {"cnn_v1", "cnn_v2"}
    for by_batch in figures["step_speed"].values():
        assert set(by_batch) == {"8", "32"}
        for row in by_batch.values():
            assert set(row) == SPEED_FIELDS
            assert all(math.isfinite(row[k]) and row[k] > 0 for k in SPEED_FIELDS - {"outside_kernels_share"})
            assert 0.0 <= row["outside_kernels_share"] <= 1.0
    assert all(v.startswith("not checked") for v in figures["sync_debug"].values())

    tune = figures["tune"]
    assert tune["exit_code"] == 0 and tune["time_budget"] == "75s"
    assert 0.0 <= tune["selection_accuracy"] <= 1.0 and 0.0 <= tune["audit_accuracy"] <= 1.0
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")  # read back independently of the check
    version = client.get_model_version_by_alias("gpu-check", "challenger")
    assert int(version.version) == tune["registered_version"]

    predict = figures["predict"]
    test_ids = [row["image_id"] for row in csv.DictReader((work / "synthetic-tiny" / "test.csv").open())]
    submission = list(csv.DictReader(Path(predict["out"]).open()))
    assert predict["exit_code"] == 0 and predict["rows"] == len(test_ids) == len(submission)
    assert [r["image_id"] for r in submission] == test_ids
    assert predict["images_per_second"] > 0 and predict["device"] == "cpu"
    assert "toy run on the CPU: passed" in proc.stdout
