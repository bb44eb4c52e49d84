"""``make gpu-check DEVICE=cpu``: the GPU check at toy size on the CPU, run as a person runs it, so it
never rots: from a copy of the checkout, with the Makefile's defaults (no ``GPU_CHECK_*`` variable),
every step, every field of ``gpu-check.json``, a model really registered, a submission really written,
and nothing in the output from a library's logger or the profiler. A second run names a relative work
folder outside the checkout (the tune and predict processes run inside the work folder, so a path
left relative would name the wrong place)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from conftest import fresh_checkout
from mlflow.tracking import MlflowClient
from quiet import kind_of, third_party_lines

PROJECT = Path(__file__).resolve().parents[1]
SPEED_FIELDS = {"train_images_per_second", "eval_images_per_second", "train_step_ms", "outside_kernels_share"}




def make_gpu_check(checkout: Path, *variables: str) -> subprocess.CompletedProcess:
    """``make gpu-check DEVICE=cpu [VARIABLES]`` in ``checkout``, in the environment a person has (no
    make of ours around it, no logging levels chosen for the check)."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"MAKEFLAGS", "MAKELEVEL", "MFLAGS", "KINETO_LOG_LEVEL", "MLFLOW_LOGGING_LEVEL"}}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return subprocess.run(["make", "gpu-check", "DEVICE=cpu", *variables], cwd=checkout, env=env,
                          capture_output=True, text=True)


def assert_passed_quietly(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Nothing a person should not have to read: no Python warning, no line of MLflow's or alembic's
    # loggers ("INFO mlflow.store.db.utils: Creating initial MLflow database tables"), none of the
    # profiler's own log ("USDT: ... profiler_start", "ERROR: ... gpuGetDeviceCount failed").
    found = third_party_lines(proc.stdout + proc.stderr)
    assert not found, [(kind_of(line), line) for line in found]
    assert "toy run on the CPU: passed" in proc.stdout


def assert_registered(work: Path, figures: dict) -> None:
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")  # read back independently of the check
    version = client.get_model_version_by_alias("gpu-check", "challenger")
    assert int(version.version) == figures["tune"]["registered_version"]


def test_make_gpu_check_on_the_cpu_with_the_defaults_writes_every_field(tmp_path: Path) -> None:
    checkout = fresh_checkout(tmp_path / "checkout")
    proc = make_gpu_check(checkout)
    assert_passed_quietly(proc)
    assert "no CUDA: running the same steps on the CPU at toy size" in proc.stdout
    work = checkout / "gpu-check"  # the Makefile's defaults: relative to the checkout
    figures = json.loads((checkout / "gpu-check.json").read_text())
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
    assert_registered(work, figures)

    predict = figures["predict"]
    test_ids = [row["image_id"] for row in csv.DictReader((work / "synthetic-tiny" / "test.csv").open())]
    submission = list(csv.DictReader(Path(predict["out"]).open()))
    assert Path(predict["out"]) == (work / "submission.csv").resolve()
    assert predict["exit_code"] == 0 and predict["rows"] == len(test_ids) == len(submission)
    assert [r["image_id"] for r in submission] == test_ids
    assert predict["images_per_second"] > 0 and predict["device"] == "cpu"


@pytest.mark.parametrize("workdir", ["gpu-check", "../checks/gpu", "ABSOLUTE"])
@pytest.mark.parametrize("data", [None, "data/mine", "ABSOLUTE"])
def test_every_path_a_child_gets_is_absolute_and_where_the_user_meant(tmp_path, monkeypatch, workdir, data):
    """What `make gpu-check` above runs with its default (relative) work folder, for the other forms a user
    gives (GPU_CHECK_WORKDIR relative outside the checkout, or absolute; --data relative or absolute): the
    tune and predict children run inside the work folder, so each path is resolved against the user's
    working directory before they get it."""
    from pipeline.bench.gpu_check import work_paths

    user = tmp_path / "checkout"
    user.mkdir()
    monkeypatch.chdir(user)
    given_work = str(tmp_path / "abs-work") if workdir == "ABSOLUTE" else workdir
    given_data = str(tmp_path / "abs-data") if data == "ABSOLUTE" else data
    work, root = work_paths(Path(given_work), given_data, "tiny")
    expected_work = (user / given_work).resolve() if workdir != "ABSOLUTE" else tmp_path / "abs-work"
    assert work == expected_work and work.is_absolute()
    if data is None:
        assert root == expected_work / "synthetic-tiny"
    else:
        assert root == ((user / given_data).resolve() if data != "ABSOLUTE" else tmp_path / "abs-data")
