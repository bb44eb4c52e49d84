"""``--n-jobs N --jobs-as processes``: N worker processes on one storage, started, awaited and stopped
by the ``tune`` that was asked (``pipeline/tune/launcher.py``). On the CPU here, for correctness: exact
trial counts, one parent run, one registration, two processes at work, no worker outliving its
launcher. The speed argument (separate CUDA contexts on one GPU) is on paper in docs/gpu.md."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import seed_store
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from workers import (
    assert_one_session,
    finish,
    load_trials,
    session_runs,
    start_worker,
    tune_args,
    wait_for,
    write_preset,
)

from pipeline.config import EXPERIMENTS_DIR, StudyConfig, load_preset, preset_yaml
from pipeline.tune.keys import RETRY
from pipeline.tune.launcher import Child, Jobs, child_env, cpu_share, runs_processes

pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")]


@pytest.mark.parametrize("jobs_as, n_jobs, device, processes", [
    ("auto", 4, "cuda", True),  # threads would share one CUDA stream and the GIL
    ("auto", 4, "cuda:1", True),
    ("auto", 4, "cpu", False),
    ("threads", 4, "cuda", False),
    ("processes", 2, "cpu", True),
    ("processes", 1, "cuda", False),  # one job is this process
])
def test_auto_means_processes_on_cuda_and_threads_on_the_cpu(jobs_as, n_jobs, device, processes):
    study = StudyConfig(n_jobs=n_jobs, jobs_as=jobs_as)
    assert runs_processes(study, torch.device(device)) is processes


def test_a_started_worker_gets_the_cores_shared_unless_the_user_chose(monkeypatch):
    base = {"PATH": "/bin", "MLFLOW_RUN_ID": "launchers-run"}
    env = child_env(base, "sqlite:////abs/mlflow.db", torch.device("cpu"), 2)
    assert env["OMP_NUM_THREADS"] == str(cpu_share(2)) == str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:////abs/mlflow.db" and "MLFLOW_RUN_ID" not in env
    assert child_env({**base, "OMP_NUM_THREADS": "3"}, "u", torch.device("cpu"), 2)["OMP_NUM_THREADS"] == "3"
    assert "OMP_NUM_THREADS" not in child_env(base, "u", torch.device("cuda"), 2)


@pytest.mark.parametrize("name", [None, *sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))])
def test_the_preset_handed_to_workers_reads_back_equal(name, tmp_path):
    preset = load_preset(name)
    path = tmp_path / "preset.yaml"
    path.write_text(preset_yaml(preset))
    assert load_preset(str(path)) == preset


def test_a_failed_worker_is_reported_with_the_end_of_its_log(tmp_path, capsys):
    log = tmp_path / "worker-1.log"
    script = "import sys\nfor i in range(30): print(f'line {i}')\nprint('Traceback: boom')\nsys.exit(3)"
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=handle, stderr=subprocess.STDOUT)
    ok = subprocess.Popen([sys.executable, "-c", "pass"])
    failed = Jobs(1, (Child(1, proc, log), Child(2, ok, tmp_path / "other.log"))).wait()
    assert [c.number for c in failed] == [1]
    err = capsys.readouterr().err
    assert f"worker process 1 (pid {proc.pid}) exited with status 3" in err
    assert "  | Traceback: boom" in err and "  | line 29" in err and "line 5\n" not in err  # its last lines only
    assert "worker process 2" not in err


def _worker_pids(client: MlflowClient) -> set[int]:
    return {int(r.data.tags["worker"].rsplit(":", 1)[1]) for r in session_runs(client)
            if r.data.tags.get("kind") == "trial"}


@pytest.mark.slow
def test_n_jobs_2_as_processes_runs_exactly_the_budget_in_two_processes(small_data, tmp_path, mlflow_template):
    """As a person types it in their project folder: the data, the storage and the tracking store all
    relative to it (the started worker must read them as the launcher does)."""
    seed_store(mlflow_template, tmp_path)
    (tmp_path / "data").symlink_to(small_data)
    preset = write_preset(tmp_path / "preset.yaml", tmp_path / "elsewhere", trials=4, epochs=4, heartbeat=3)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"  # the same file, for this test to read
    log = tmp_path / "tune.log"
    # The launcher starts trial 0 before its worker exists; a slow tracking server holds that trial
    # 9 s (3 heartbeats) while it closes, so the worker's start-up (imports, session) cannot lose the
    # race for the rest on a loaded machine.
    args = tune_args(preset, "procs", "sqlite:///optuna.db", "--data", "data", "--n-jobs", "2", "--jobs-as",
                     "processes")
    proc = start_worker(args, tmp_path, log, MLFLOW_TRACKING_URI="sqlite:///mlflow.db",
                        DEEPFAKE_TUNE_FAULT="slow_tracking@cnn_v1#0", TMPDIR=str(tmp_path))  # logs under tmp_path
    out = finish(proc, log, timeout=300)
    assert proc.returncode == 0, out
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    session = assert_one_session(client, storage, ["procs.cnn_v1"], 4)  # one parent, every trial nested
    assert session["parent"].info.status == "FINISHED"
    pids = _worker_pids(client)
    assert len(pids) == 2 and proc.pid in pids, (pids, proc.pid)
    assert len(client.search_model_versions("name='deepfake-ensemble'")) == 1
    child_log = Path(out.split("their output in ")[1].split("/worker-N.log")[0]) / "worker-1.log"
    child_out = child_log.read_text()
    assert "this worker's trials are done" in child_out and "[2/3]" not in child_out  # trials only
    assert "[2/3]" in out and "[3/3]" in out  # the launcher built and registered the ensemble
    assert "workers/worker-1.log" in {a.path for a in client.list_artifacts(session["parent"].info.run_id,
                                                                             "workers")}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_its_workers(small_data, tmp_path, mlflow_template):
    seed_store(mlflow_template, tmp_path)
    preset = write_preset(tmp_path / "preset.yaml", small_data, trials=3, epochs=500)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    log = tmp_path / "tune.log"
    proc = start_worker(tune_args(preset, "stop", storage, "--n-jobs", "2", "--jobs-as", "processes"), tmp_path, log,
                        TMPDIR=str(tmp_path))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    def both_training():
        running = [t for t in load_trials(storage, "stop.cnn_v1")
                   if t.state == TrialState.RUNNING and len(t.intermediate_values) >= 1]
        return len(running) == 2 and len(_worker_pids(client)) == 2 and running

    victims = wait_for(both_training, 120, "a trial mid-training in each process", proc, log)
    child = (_worker_pids(client) - {proc.pid}).pop()
    assert _alive(child)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, log, timeout=90)
    assert proc.returncode == 130, out
    time.sleep(0.5)
    assert not _alive(child), f"worker {child} outlived its launcher"
    trials = load_trials(storage, "stop.cnn_v1")
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for victim in victims:  # each process closed its own trial as interrupted, re-queued for the next tune
        assert trials[victim.number].state == TrialState.FAIL
        assert "interrupted" in trials[victim.number].user_attrs["error"]
    assert len([t for t in trials if t.state == TrialState.WAITING]) == 2
    assert all(r.info.status != "RUNNING" for r in session_runs(client))


@pytest.mark.slow
def test_a_started_worker_killed_mid_trial_loses_nothing(small_data, tmp_path, mlflow_template):
    """Issue 31: a budgeted session, ``--n-jobs 2 --jobs-as processes``; the started worker is SIGKILLed
    mid-trial (no chance to close anything). The launcher re-runs the lost trial, finishes the session
    and builds the ensemble once."""
    seed_store(mlflow_template, tmp_path)
    # Search in 70 % of 45 s (room for the lost trial's retry after the 2 s heartbeat grace), then finals.
    preset = write_preset(tmp_path / "preset.yaml", small_data, trials=100, epochs=2, time_budget="45s",
                          final_fraction=0.3, tail_seconds=5.0, min_rung_passes=20.0)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    log = tmp_path / "tune.log"
    proc = start_worker(tune_args(preset, "kill", storage, "--n-jobs", "2", "--jobs-as", "processes"), tmp_path, log,
                        TMPDIR=str(tmp_path))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    wait_for(lambda: "beside this one (pid " in log.read_text(), 120, "the worker process", proc, log)
    child = int(log.read_text().split("beside this one (pid ")[1].split(")")[0])

    def child_mid_trial():
        running = [t for t in load_trials(storage, "kill.cnn_v1") if t.state == TrialState.RUNNING
                   and t.intermediate_values and t.user_attrs.get("mlflow_run_id")]
        mine = [t for t in running
                if client.get_run(t.user_attrs["mlflow_run_id"]).data.tags.get("worker", "").endswith(f":{child}")]
        return mine[0] if mine else None

    victim = wait_for(child_mid_trial, 120, "a trial mid-training in the started worker", proc, log)
    os.kill(child, signal.SIGKILL)
    out = finish(proc, log, timeout=180)
    assert proc.returncode == 0, out
    assert f"worker process 1 (pid {child}) was killed by SIGKILL" in out
    trials = load_trials(storage, "kill.cnn_v1")
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert trials[victim.number].state == TrialState.FAIL  # failed by the launcher once its heartbeat stopped
    retries = [t for t in trials if RETRY.retried_trial_number(t) == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE, "the lost trial ran again"
    assert retries[0].params == victim.params
    runs = session_runs(client)
    assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    lost = client.get_run(victim.user_attrs["mlflow_run_id"])  # closed by the launcher, saying why
    assert lost.info.status == "FAILED" and lost.data.tags["stopped_by"] == "heartbeat", lost.data.tags
    assert client.get_run(retries[0].user_attrs["mlflow_run_id"]).data.tags["worker"].endswith(f":{proc.pid}")
    parents = [r for r in runs if r.data.tags.get("kind") == "tune-session"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(client.search_model_versions("name='deepfake-ensemble'")) == 1
    assert out.count("[2/3]") == 1 and out.count("[3/3]") == 1  # the ensemble, built and registered once
    finals = [t.state.name for t in trials if t.user_attrs.get("phase") == "final"]
    assert "COMPLETE" in finals, finals  # the survivor's final run, to the phase's end (docs/scale-out.md)
    print(f"\nthe started worker SIGKILLed mid-trial: {len(trials)} trials, trial {victim.number} ran again as "
          f"{retries[0].number}; final runs {finals}; 1 model version")
