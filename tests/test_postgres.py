"""Scale-out on an existing engine: an Optuna PostgreSQL storage and an ``mlflow server`` with a
PostgreSQL backend store and proxied artifacts, all real, on 127.0.0.1, stopped by pid afterwards.

Skipped (with the install command) when PostgreSQL's server binaries are absent.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from conftest import cli_env
from mlflow.tracking import MlflowClient
from workers import (
    THREADS,
    assert_one_session,
    finish,
    load_trials,
    session_runs,
    start_worker,
    tune_args,
    write_preset,
)

pytestmark = [pytest.mark.postgres, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]


def test_a_wrong_password_is_a_clear_error_that_does_not_echo_it(postgres, small_data, tmp_path, tracking_here,
                                                                 capsys):
    from pipeline.cli import main

    preset = write_preset(tmp_path / "preset.yaml", small_data)
    url = postgres.url("spare", password="not-the-password-123")
    code = main(["tune", "--config", str(preset), "--study", "bad", "--storage", url, "--no-progress"])
    out = capsys.readouterr()
    assert code == 2
    errors = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "password authentication failed" in errors[0], out.err
    assert f"{postgres.user}:***@" in errors[0]
    assert "not-the-password-123" not in out.out + out.err
    assert session_runs(MlflowClient()) == []


def _strings(value) -> str:
    return json.dumps(value, default=str)


@pytest.mark.slow
def test_two_workers_on_postgresql_and_an_mlflow_server(postgres, tracking_server, small_data, tmp_path):
    """README's scale-out recipe on one machine: setup once, then two workers; same guarantees as SQLite,
    and the database password appears in no param, tag, attribute or output."""
    # One member, 3 trials for 2 workers: the same admission race as the SQLite test's two members, at
    # a third of the cost (cnn_v2 trains 4x slower than cnn_v1).
    preset = write_preset(tmp_path / "preset.yaml", small_data, members=("cnn_v1",), trials=3)
    storage = postgres.url("optuna")
    env = {"MLFLOW_TRACKING_URI": tracking_server.url}
    setup = subprocess.run(tune_args(preset, "scale", storage, "--setup-only"), cwd=tmp_path,
                           env=cli_env(tmp_path, **THREADS, **env), capture_output=True, text=True, timeout=600)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    started = time.monotonic()
    workers = [start_worker(tune_args(preset, "scale", storage), tmp_path, log, **env) for log in logs]
    outs = [finish(w, log) for w, log in zip(workers, logs, strict=True)]
    seconds = time.monotonic() - started
    assert [w.returncode for w in workers] == [0, 0], outs

    client = MlflowClient(tracking_uri=tracking_server.url, registry_uri=tracking_server.url)
    studies = ["scale.cnn_v1"]
    session = assert_one_session(client, storage, studies, 3)
    assert session["parent"].info.status == "FINISHED"
    assert session["parent"].data.params["session.storage"] == postgres.url("optuna", password="***")
    versions = client.search_model_versions("name='deepfake-ensemble'")
    assert len(versions) == 1
    # Artifacts went through the server into its --artifacts-destination.
    assert list(Path(tracking_server.artifacts).rglob("best.pt"))
    workers_seen = {r.data.tags["worker"] for r in session["trial_runs"]}

    secret = postgres.password
    for text in [setup.stdout, setup.stderr, *outs]:
        assert secret not in text
    for run in session["runs"]:
        assert secret not in _strings([run.data.params, run.data.tags, run.info.run_name])
    for version in versions:
        assert secret not in _strings([version.tags, version.source, version.run_id])
    for name in studies:
        study = optuna.load_study(study_name=name, storage=storage)
        assert secret not in _strings([study.user_attrs, [t.user_attrs for t in load_trials(storage, name)]])
    print(f"\nPostgreSQL + mlflow server: 2 workers x 1 member x 3 trials: "
          f"{sum(len(load_trials(storage, n)) for n in studies)} trials, {len(session['trial_runs'])} trial runs, "
          f"1 parent, {len(versions)} model version, trials ran in {len(workers_seen)} worker(s), {seconds:.0f} s")
