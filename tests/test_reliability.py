"""A lost worker or a bad trial costs one trial, never the study, the tracking data or the registry.

Real processes, real signals, real stores: ``tune`` workers are killed with SIGKILL and SIGTERM
mid-trial, two workers start at once on one SQLite storage, a trial diverges for real (an enqueued
absurd learning rate), and the two faults a CPU cannot produce on demand (CUDA out of memory, an
artifact upload failing) come from the documented test hook ``DEEPFAKE_TUNE_FAULT``. Nothing is
mocked in MLflow or Optuna.
"""

from __future__ import annotations

import gc
import os
import signal
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from workers import (assert_one_session, finish, load_trials, mid_trial, session_runs, small_data,  # noqa: F401
                     start_worker, tracking_here, tune_args, wait_for, write_preset)

from pipeline import metric_names as M
from pipeline.train.checkpoint import load_checkpoint

RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback
pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")]


# ------------------------------------------------------------------ in-process: start-up errors, OOM

def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("storage, expected", [
    ("postgresql+psycopg2://tuner:s3cret-pw@127.0.0.1:{port}/optuna", "Connection refused"),
    ("sqlite:///{tmp}/missing-folder/optuna.db", "does not exist"),
    ("optuna.db", "is not a storage URL"),
], ids=["postgres-down", "sqlite-missing-folder", "not-a-url"])
def test_a_wrong_storage_url_fails_before_any_training(storage, expected, small_data, tmp_path, tracking_here,
                                                       capsys):
    from pipeline.cli import main

    preset = write_preset(tmp_path / "preset.yaml", small_data)
    url = storage.format(port=_closed_port(), tmp=tmp_path)
    started = time.monotonic()
    code = main(["tune", "--config", str(preset), "--study", "bad", "--storage", url, "--no-progress"])
    out = capsys.readouterr()
    assert code == 2
    lines = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], out.err
    assert "s3cret-pw" not in out.out + out.err
    assert time.monotonic() - started < 60
    assert session_runs(MlflowClient()) == []  # nothing started, not even the parent run


def test_an_unreachable_tracking_server_fails_fast_with_one_line(small_data, tmp_path, tracking_here, capsys):
    from pipeline.cli import main

    tracking_here(f"http://tuner:s3cret-pw@127.0.0.1:{_closed_port()}")
    preset = write_preset(tmp_path / "preset.yaml", small_data)
    started = time.monotonic()
    code = main(["tune", "--config", str(preset), "--study", "bad", "--storage",
                 f"sqlite:///{tmp_path / 'optuna.db'}", "--no-progress"])
    out = capsys.readouterr()
    assert code == 2
    assert time.monotonic() - started < 60  # MLflow's own back-off would take minutes
    lines = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "unreachable (Connection refused)" in lines[0], out.err
    assert "s3cret-pw" not in out.out + out.err and "tuner:***@" in lines[0]
    assert not (tmp_path / "optuna.db").exists()  # the storage was not even created


def _live_models() -> int:
    from torch import nn

    gc.collect()
    return sum(type(o).__module__ == "pipeline.models" and issubclass(type(o), nn.Module) for o in gc.get_objects())


def test_cuda_oom_fails_the_trial_releases_its_memory_and_the_study_goes_on(small_data, tmp_path, tracking_here,
                                                                            monkeypatch, capsys):
    from pipeline import tune
    from pipeline.config import load_preset
    from pipeline.train import recipe

    monkeypatch.setenv("DEEPFAKE_TUNE_FAULT", "cuda_oom@cnn_v1#0")
    preset = load_preset(str(write_preset(tmp_path / "preset.yaml", small_data)))
    session = tune.open_session(preset, "deepfake", "oom", f"sqlite:///{tmp_path / 'optuna.db'}")
    baseline = _live_models()
    seen_at_build: list[int] = []
    build = recipe.build_model

    def counting_build(cfg):
        seen_at_build.append(_live_models() - baseline)  # models still alive when the next is built
        return build(cfg)

    monkeypatch.setattr(recipe, "build_model", counting_build)
    counts = tune.run_member_study(session, "cnn_v1")
    assert counts == {"COMPLETE": 2, "PRUNED": 0, "FAIL": 1}  # the study went on to its budget
    assert seen_at_build == [0, 0, 0]  # the out-of-memory trial's network was freed before the next
    assert _live_models() == baseline
    trials = load_trials(session.storage_url, "oom.cnn_v1")
    failed = trials[0]
    assert failed.state == TrialState.FAIL and "CUDA out of memory" in failed.user_attrs["error"]
    run = MlflowClient().get_run(failed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert "CUDA out of memory" in run.data.tags["error"] and "lower the batch size" in run.data.tags["error"]
    assert "trial 0 of oom.cnn_v1 failed: CUDA out of memory" in capsys.readouterr().out


# ------------------------------------------------------------------ faults inside trials, end to end

@pytest.mark.slow
def test_a_diverging_trial_and_a_failed_artifact_upload_cost_one_trial_each(small_data, tmp_path):
    """Trial 0 diverges for real (an enqueued lr of 1e30 makes the loss NaN); trial 1's artifact
    upload fails (test hook). Both end FAILED with the reason; the study reaches its budget and the
    ensemble is registered."""
    preset = write_preset(tmp_path / "preset.yaml", small_data)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="faults.cnn_v1", storage=storage, direction="maximize")
    study.enqueue_trial({"lr": 1e30})  # outside the space on purpose: a user's bad guess
    log = tmp_path / "tune.log"
    proc = start_worker(tune_args(preset, "faults", storage), tmp_path, log,
                        DEEPFAKE_TUNE_FAULT="artifact_failure@cnn_v1#1")
    out = finish(proc, log)
    assert proc.returncode == 0, out
    trials = load_trials(storage, "faults.cnn_v1")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    diverged = client.get_run(trials[0].user_attrs["mlflow_run_id"])
    assert diverged.info.status == "FAILED"
    assert diverged.data.tags["error"].startswith("NonFiniteLossError: training loss is nan")
    upload = client.get_run(trials[1].user_attrs["mlflow_run_id"])
    assert upload.info.status == "FAILED" and "could not upload artifacts" in upload.data.tags["error"]
    assert "trial 0 of faults.cnn_v1 failed: NonFiniteLossError" in out
    assert "trial 1 of faults.cnn_v1 failed: OSError: could not upload artifacts" in out
    assert_one_session(client, storage, ["faults.cnn_v1"], 2)
    assert len(client.search_model_versions("name='deepfake-ensemble'")) == 1


# ------------------------------------------------------------------ signals and lost workers

def _all_mid_training(storage: str, study: str, n: int):
    running = [t for t in load_trials(storage, study) if t.state == TrialState.RUNNING
               and len(t.intermediate_values) >= 2 and t.user_attrs.get("mlflow_run_id")]
    return running if len(running) == n else None


@pytest.mark.slow
@pytest.mark.parametrize("sig, n_jobs", [(signal.SIGTERM, 1), (signal.SIGINT, 2)], ids=["SIGTERM", "SIGINT-2-threads"])
def test_sigterm_or_sigint_mid_trial_closes_everything_and_exits_non_zero(sig, n_jobs, small_data, tmp_path):
    """With ``--n-jobs 2`` the signal reaches the main thread only; both threads' trials must stop."""
    preset = write_preset(tmp_path / "preset.yaml", small_data, trials=3, epochs=500)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    log = tmp_path / "tune.log"
    proc = start_worker(tune_args(preset, "stop", storage, "--n-jobs", str(n_jobs)), tmp_path, log)
    victims = wait_for(lambda: _all_mid_training(storage, "stop.cnn_v1", n_jobs), 300, "trials mid-training",
                       proc, log)
    os.kill(proc.pid, sig)
    out = finish(proc, log, timeout=120)
    assert proc.returncode == 130, out  # non-zero: the job did not finish
    assert "interrupted" in out
    trials = load_trials(storage, "stop.cnn_v1")
    assert not [t for t in trials if t.state == TrialState.RUNNING]  # nothing left RUNNING
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    queued = {RETRY.retried_trial_number(t): t for t in trials if t.state == TrialState.WAITING}
    assert sorted(queued) == sorted(v.number for v in victims)
    for victim in victims:
        stopped = trials[victim.number]
        assert stopped.state == TrialState.FAIL and "interrupted" in stopped.user_attrs["error"]
        # Re-queued with the same parameters for the next `tune` on this study.
        assert queued[victim.number].params == stopped.params
        run = client.get_run(stopped.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED"
        assert run.data.tags["stopped_by"] == "interrupt" and "interrupted" in run.data.tags["error"]
        assert f"trial {victim.number} of stop.cnn_v1 failed: interrupted" in out
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED" and parent.data.tags["stopped_by"].startswith("interrupt")
    assert all(r.info.status != "RUNNING" for r in session_runs(client))


@pytest.mark.slow
def test_a_sigkilled_worker_costs_one_trial_and_the_next_tune_resumes(small_data, tmp_path):
    preset = write_preset(tmp_path / "preset.yaml", small_data, trials=3, epochs=25)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = "killed.cnn_v1"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    log1 = tmp_path / "tune-1.log"
    first = start_worker(tune_args(preset, "killed", storage), tmp_path, log1)
    victim = wait_for(lambda: mid_trial(storage, study, 1), 600, "trial 0 done and a trial mid-training", first, log1)
    before = {t.number: t for t in load_trials(storage, study) if t.state == TrialState.COMPLETE}
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    killed_at = time.time()
    assert first.returncode == -signal.SIGKILL
    assert client.get_run(victim.user_attrs["mlflow_run_id"]).info.status == "RUNNING"  # as the kill left it

    log2 = tmp_path / "tune-2.log"
    second = start_worker(tune_args(preset, "killed", storage), tmp_path, log2)
    out = finish(second, log2)
    assert second.returncode == 0, out

    trials = load_trials(storage, study)
    killed = trials[victim.number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials if RETRY.retried_trial_number(t) == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params  # the same configuration, run again
    # Finished trials are untouched: same value, same run, checkpoint still there and loadable.
    for number, t in before.items():
        assert trials[number].state == TrialState.COMPLETE and trials[number].value == t.value
        assert trials[number].user_attrs["mlflow_run_id"] == t.user_attrs["mlflow_run_id"]
        ckpt = load_checkpoint(client.download_artifacts(t.user_attrs["mlflow_run_id"], M.CHECKPOINT_ARTIFACT,
                                                         str(tmp_path / f"ckpt-{number}")))
        assert ckpt["val_accuracy"] == pytest.approx(t.value)
    lost = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert lost.info.status == "FAILED" and lost.data.tags["stopped_by"] == "heartbeat"
    assert "worker lost: no heartbeat" in lost.data.tags["error"]
    assert f"retried as trial {retries[0].number}" in lost.data.tags["error"]
    retry_run = client.get_run(retries[0].user_attrs["mlflow_run_id"])
    assert retry_run.data.tags["optuna.retried_from_trial"] == str(victim.number)
    session = assert_one_session(client, storage, [study], 3)
    assert session["parent"].info.status == "FINISHED"
    assert len(client.search_model_versions("name='deepfake-ensemble'")) == 1

    # Figures for the closing note.
    new_runs = sorted((r for r in session["trial_runs"] if r.info.start_time / 1000 > killed_at),
                      key=lambda r: r.info.start_time)
    first_new = new_runs[0].info.start_time / 1000 - killed_at
    retried = retry_run.info.start_time / 1000 - killed_at
    print(f"\nSIGKILL survived: {len(trials)} trials ({sum(t.state == TrialState.COMPLETE for t in trials)} complete, "
          f"1 lost and retried), {len(session['trial_runs'])} trial runs; kill -> first new trial "
          f"{first_new:.1f} s, kill -> retry of the lost trial {retried:.1f} s (process start included)")


@pytest.mark.slow
def test_two_workers_started_at_once_on_sqlite_run_exactly_the_budget(small_data, tmp_path):
    """No --setup-only first: the storage lock serialises schema creation and admission."""
    preset = write_preset(tmp_path / "preset.yaml", small_data, members=("cnn_v1", "cnn_v2"), trials=2)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    started = time.monotonic()
    workers = [start_worker(tune_args(preset, "pair", storage), tmp_path, log) for log in logs]
    outs = [finish(w, log) for w, log in zip(workers, logs)]
    seconds = time.monotonic() - started
    assert [w.returncode for w in workers] == [0, 0], outs
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    session = assert_one_session(client, storage, ["pair.cnn_v1", "pair.cnn_v2"], 2)
    assert session["parent"].info.status == "FINISHED"
    assert len(session["trial_runs"]) == 4
    assert len(client.search_model_versions("name='deepfake-ensemble'")) == 1
    assert sum("already registered" in out for out in outs) <= 1
    print(f"\nSQLite: 2 workers x 2 members x 2 trials: 4 trials, 4 trial runs, 1 parent, 1 model version "
          f"in {seconds:.0f} s")
