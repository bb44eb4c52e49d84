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
from pathlib import Path

import optuna
import pytest
from conftest import seed_store
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from workers import (
    assert_one_session,
    finish,
    load_trials,
    mid_trial,
    session_runs,
    start_worker,
    tune_args,
    wait_for,
    write_preset,
)

from pipeline import metrics as M
from pipeline.train.checkpoint import load_checkpoint
from pipeline.tune.workers import run_search

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
    # No lock for admission there: refused up front rather than run with budgets that are not exact.
    ("mysql+pymysql://tuner:s3cret-pw@127.0.0.1/optuna", "only SQLite files (sqlite:///path/optuna.db) and PostgreSQL"),
    ("sqlite:///:memory:", "only SQLite files"),
], ids=["postgres-down", "sqlite-missing-folder", "not-a-url", "mysql-unsupported", "sqlite-in-memory"])
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


# Every command that talks to the tracking store, with arguments that are otherwise fine.
TRACKING_COMMANDS = {
    "train": ["train", "--epochs", "1"],
    "baseline": ["baseline"],
    "tune": ["tune", "--config", "{preset}", "--study", "s", "--storage", "sqlite:///{tmp}/optuna.db"],
    "promote": ["promote"],
    "predict": ["predict", "--out", "{tmp}/submission.csv"],
    "bench": ["bench", "--skip", "reference,ours,ceiling,inference,search"],
}


@pytest.mark.parametrize("store", ["unreachable-server", "unsupported-uri"])
@pytest.mark.parametrize("command", list(TRACKING_COMMANDS))
def test_every_command_ends_a_tracking_problem_with_one_line(command, store, small_data, tmp_path, tracking_here,
                                                              capsys):
    """An unreachable tracking server (MLflow would back off for minutes) and a URI MLflow cannot use
    (it raises its own exception): one ``error:`` line, exit 2, no traceback, no password, nothing
    trained or written."""
    from pipeline.cli import main

    uri = {"unreachable-server": f"http://tuner:s3cret-pw@127.0.0.1:{_closed_port()}",
           "unsupported-uri": "foo://tuner:s3cret-pw@somewhere"}[store]
    tracking_here(uri)
    preset = write_preset(tmp_path / "preset.yaml", small_data)
    args = [a.format(preset=preset, tmp=tmp_path) for a in TRACKING_COMMANDS[command]]
    if "--config" not in args:
        args += ["--data", str(small_data)]
    before = sorted(tmp_path.iterdir())
    started = time.monotonic()
    code = main(args)
    out = capsys.readouterr()
    assert code == 2, out.err
    assert time.monotonic() - started < 60
    lines = [line for line in out.err.splitlines() if line.startswith("error:")]
    expected = "unreachable (Connection refused)" if store == "unreachable-server" else "foo"
    assert len(lines) == 1 and expected in lines[0], out.err
    assert "Traceback" not in out.err and "s3cret-pw" not in out.out + out.err and "tuner:***@" in lines[0]
    assert sorted(tmp_path.iterdir()) == before  # no storage, no CSV, nothing half-written


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
    counts = run_search(session)
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


# ------------------------------------------------------------------ in-process: how a trial is told

class OtherWorker:
    """What every other worker does when it admits a trial: fail the trials whose heartbeat is stale
    (older than the 2 s grace) and re-queue them, here every 0.2 s, through its own storage."""

    def __init__(self, storage: str, study: str):
        import threading

        from pipeline.tune.keys import MAX_RETRY
        from pipeline.tune.storage import open_storage

        self.study = optuna.load_study(study_name=study, storage=open_storage(storage, 1, MAX_RETRY))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop.is_set():
            optuna.storages.fail_stale_trials(self.study)
            self.stop.wait(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def _session(preset_path: Path, study: str, storage: str):
    from pipeline import tune
    from pipeline.config import load_preset

    return tune.open_session(load_preset(str(preset_path)), "deepfake", study, storage)


def test_failed_trials_cost_one_trial_each_and_are_never_retried_even_on_a_slow_tracking_server(
        small_data, tmp_path, tracking_here, monkeypatch, capsys):
    """Trial 0 diverges for real (an enqueued lr of 1e30 makes the loss NaN) and closing it takes 3 s,
    longer than the 2 s grace (a slow tracking server: test hook), while another worker keeps
    failing stale trials; trial 1's artifact upload fails (test hook). The heartbeat beats until a
    trial is told, so nobody takes them for lost: each is FAIL once with its reason, never re-queued
    (a diverging configuration would diverge again), and the study goes on to its budget."""

    monkeypatch.setenv("DEEPFAKE_TUNE_FAULT", "slow_tracking@cnn_v1#0,artifact_failure@cnn_v1#1")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    session = _session(write_preset(tmp_path / "preset.yaml", small_data, trials=2, epochs=1), "faults", storage)
    session.studies["cnn_v1"].enqueue_trial({"lr": 1e30})  # outside the space on purpose: a user's bad guess
    with OtherWorker(storage, "faults.cnn_v1"):
        counts = run_search(session)
    assert counts == {"COMPLETE": 2, "PRUNED": 0, "FAIL": 2}
    trials = load_trials(storage, "faults.cnn_v1")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert [RETRY.retried_trial_number(t) for t in trials] == [None] * 4  # nothing re-queued
    assert trials[0].user_attrs["error"].startswith("NonFiniteLossError: training loss is nan")
    client = MlflowClient()
    diverged = client.get_run(trials[0].user_attrs["mlflow_run_id"])
    assert diverged.info.status == "FAILED"
    assert diverged.data.tags["error"].startswith("NonFiniteLossError: training loss is nan")
    assert "stopped_by" not in diverged.data.tags
    upload = client.get_run(trials[1].user_attrs["mlflow_run_id"])
    assert upload.info.status == "FAILED" and "could not upload artifacts" in upload.data.tags["error"]
    assert all(client.get_run(t.user_attrs["mlflow_run_id"]).info.status == "FINISHED" for t in trials[2:])
    out = capsys.readouterr().out
    assert "trial 0 of faults.cnn_v1 failed: NonFiniteLossError" in out
    assert "trial 1 of faults.cnn_v1 failed: OSError: could not upload artifacts" in out


def test_a_trial_another_worker_already_failed_is_closed_and_the_worker_goes_on(small_data, tmp_path,
                                                                                tracking_here, capsys):
    """A worker silent past the grace period has its trial failed and re-queued by another worker.
    When it then reports (``study.tell`` would raise) or writes mid-trial, the trial is left as the
    other worker set it, the run is closed FAILED saying why, and the worker goes on. The retries
    keep the original trial's parameters and seed."""
    from pipeline import tracking
    from pipeline.tune.keys import RUN as RUN_ATTR
    from pipeline.tune.trial import Outcome, conclude, run_trial
    from pipeline.tune.workers import admit_trial

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    session = _session(write_preset(tmp_path / "preset.yaml", small_data, trials=1, epochs=1), "lost", storage)
    client = MlflowClient()

    def lose(trial) -> None:  # no heartbeat for longer than the grace; another worker fails it
        time.sleep(2.5)
        with OtherWorker(storage, "lost.cnn_v1"):
            wait_for(lambda: load_trials(storage, "lost.cnn_v1")[trial.number].state == TrialState.FAIL, 30,
                     f"trial {trial.number} failed by the other worker")

    # 1. The result comes in after the trial was failed elsewhere: the tell itself.
    first = admit_trial(session, "cnn_v1")
    run_id = tracking.start_run(client, session.experiment_id, "cnn_v1-trial-0", parent_run_id=session.parent_run_id,
                                tags={"kind": "trial"})  # as run_trial opens it
    first.set_user_attr(RUN_ATTR, run_id)
    lose(first)
    assert conclude(session, "cnn_v1", first, run_id, Outcome(value=0.5)) == TrialState.FAIL
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["stopped_by"] == "heartbeat"
    assert "before this worker reported its outcome" in run.data.tags["error"]
    assert "retried as trial 1 with the same parameters" in run.data.tags["error"]

    # 2. Mid-trial: the retry is failed elsewhere before its worker links its run.
    retry = admit_trial(session, "cnn_v1")
    assert retry.number == 1
    lose(retry)
    assert run_trial(session, "cnn_v1", retry) == TrialState.FAIL  # no exception: the worker goes on

    # 3. ... to the budget: the second retry completes, with trial 0's parameters and seed.
    assert run_search(session) == {"COMPLETE": 1, "PRUNED": 0, "FAIL": 0}
    trials = load_trials(storage, "lost.cnn_v1")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert [RETRY.retried_trial_number(t) for t in trials] == [None, 0, 0]
    assert trials[2].params == trials[0].params
    done = client.get_run(trials[2].user_attrs["mlflow_run_id"])
    assert done.data.params["train.seed"] == "0"  # the preset's seed 0 + trial 0, not + trial 2
    runs = [r for r in session_runs(client) if r.data.tags.get("kind") == "trial"]
    assert len(runs) == 3 and all(r.info.status != "RUNNING" for r in runs)
    out = capsys.readouterr().out
    assert "trial 0 of lost.cnn_v1: another worker marked trial 0 FAIL" in out
    assert "trial 1 of lost.cnn_v1: another worker marked trial 1 FAIL" in out


# ------------------------------------------------------------------ faults inside trials, end to end

# ------------------------------------------------------------------ signals and lost workers

def _all_mid_training(storage: str, study: str, n: int):
    running = [t for t in load_trials(storage, study) if t.state == TrialState.RUNNING
               and len(t.intermediate_values) >= 2 and t.user_attrs.get("mlflow_run_id")]
    return running if len(running) == n else None


@pytest.mark.slow
@pytest.mark.parametrize("sig, n_jobs", [(signal.SIGTERM, 1), (signal.SIGINT, 2)], ids=["SIGTERM", "SIGINT-2-threads"])
def test_sigterm_or_sigint_mid_trial_closes_everything_and_exits_non_zero(sig, n_jobs, small_data, tmp_path,
                                                                         mlflow_template):
    """With ``--n-jobs 2`` the signal reaches the main thread only; both threads' trials must stop."""
    seed_store(mlflow_template, tmp_path)
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
def test_a_sigkilled_worker_costs_one_trial_and_the_next_tune_resumes(small_data, tmp_path, mlflow_template):
    seed_store(mlflow_template, tmp_path)
    # 12 epochs: a trial is mid-training (>= 2 epochs logged) for a second or more, long enough to catch.
    preset = write_preset(tmp_path / "preset.yaml", small_data, trials=3, epochs=12)
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
    # ... and the same seed: the retry is the lost run again, not a new one with the same parameters.
    assert retry_run.data.params["train.seed"] == lost.data.params["train.seed"] == str(victim.number)
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
    outs = [finish(w, log) for w, log in zip(workers, logs, strict=True)]
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
