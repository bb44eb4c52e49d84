"""Shared pieces of the reliability and PostgreSQL tests: a small dataset and preset, ``tune``
workers as real processes, and the checks every multi-worker session must pass."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from conftest import cli_env, make_competition_dataset, seed_store
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # two workers on two shared cores


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 train / 10 validation / 5 test images, 32 px: a trial epoch takes a fraction of a second."""
    return make_competition_dataset(tmp_path_factory.mktemp("reliability") / "data", size=32,
                                    counts={"train": 4, "validation": 2}, test_count=5)


def write_preset(path: Path, data: Path, members=("cnn_v1",), trials: int = 2, epochs: int = 2,
                 heartbeat: int = 1, **study) -> Path:
    """A preset for these tests: small networks, fixed batch size, no early stop, 1 s heartbeat;
    ``study`` overrides study settings (pruner, pruner_warmup_epochs, ...)."""
    preset = {
        "name": "reliability",
        "data": {"root": str(data), "augment": "none", "normalize": "half", "audit_min_per_class": 1},
        "model": {"convs_per_block": 1},
        "train": {"epochs": epochs, "batch_size": 16, "precision": "fp32", "device": "cpu",
                  "eval_batch_size": 64, "early_stop_patience": 1000,
                  "evaluations": epochs, "eval_share": 1.0},  # every epoch read, as the pruning tests expect
        "study": {"members": list(members), "trials": trials, "pruner": "none", "top_k": 2,
                  "ensemble_method": "soft", "heartbeat_seconds": heartbeat,
                  "space": {"train.lr": {"low": 1e-3, "high": 3e-3, "log": True}, "train.batch_size": [16],
                            "model.dropout_features": {"low": 0.1, "high": 0.3},
                            "model.dropout_fc": {"low": 0.2, "high": 0.4},
                            "train.weight_decay": {"low": 1e-6, "high": 1e-4, "log": True}}, **study},
    }
    path.write_text(yaml.safe_dump(preset))
    return path


def tune_args(preset: Path, study: str, storage: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "tune", "--config", str(preset), "--study", study,
            "--storage", storage, "--no-progress", *extra]


def start_worker(args: list[str], workdir: Path, log: Path, **env: str) -> subprocess.Popen:
    """A ``tune`` worker process, stdout and stderr into ``log``."""
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, cwd=workdir, env=cli_env(workdir, **THREADS, **env), stdout=handle,
                                stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> str:
    proc.wait(timeout=timeout)
    return log.read_text()


def load_trials(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited ({proc.returncode}) while waiting for {what}:\n"
                                 f"{log.read_text()[-4000:] if log else ''}")
        try:
            value = condition()
        except Exception:  # noqa: BLE001 - the stores may not exist yet
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def mid_trial(storage: str, study: str, finished_before: int):
    """The running trial once ``finished_before`` trials are complete and it has logged 2 epochs."""
    trials = load_trials(storage, study)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    running = [t for t in trials if t.state == TrialState.RUNNING and len(t.intermediate_values) >= 2
               and t.user_attrs.get("mlflow_run_id")]
    return running[0] if len(done) >= finished_before and running else None


def session_runs(client: MlflowClient, experiment: str = "deepfake"):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def assert_one_session(client: MlflowClient, storage: str, studies: list[str], trials_per_member: int) -> dict:
    """Exactly the budget of finished trials per member, one run per trial, one parent, all closed."""
    runs = session_runs(client)
    by_id = {r.info.run_id: r for r in runs}
    parents = [r for r in runs if r.data.tags.get("kind") == "tune-session"]
    assert len(parents) == 1, [r.data.tags.get("mlflow.runName") for r in parents]
    parent = parents[0]
    trial_runs = [r for r in runs if r.data.tags.get("kind") == "trial"]
    counted = 0
    for name in studies:
        trials = load_trials(storage, name)
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(finished) == trials_per_member, (name, [(t.number, t.state.name) for t in trials])
        assert not [t for t in trials if t.state == TrialState.RUNNING]
        for t in trials:
            if t.state == TrialState.WAITING:
                continue
            run = by_id[t.user_attrs["mlflow_run_id"]]
            assert run.data.tags["optuna.trial"] == str(t.number) and run.data.tags["optuna.study"] == name
            assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(t.state.name, run.info.status)
            counted += 1
        # No worker ran a configuration twice (per-trial sampler seeds).
        configs = [tuple(sorted(t.params.items())) for t in finished]
        assert len(set(configs)) == len(configs), configs
    assert len(trial_runs) == counted, "one MLflow run per trial, no orphans"
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parent.info.run_id}
    assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    return {"parent": parent, "trial_runs": trial_runs, "runs": runs}


@pytest.fixture
def tracking_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_template: Path):
    """Point this process's MLflow at a store under tmp_path (a copy of the empty template store);
    restore the SIGTERM handler after."""
    def use(uri: str) -> str:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        return uri

    from mlflow.tracking._tracking_service import utils

    handler, previous = signal.getsignal(signal.SIGTERM), utils._tracking_uri
    monkeypatch.chdir(tmp_path)  # a new experiment's artifact root is ./mlruns of the working directory
    use(seed_store(mlflow_template, tmp_path))
    yield use
    signal.signal(signal.SIGTERM, handler)  # cli.main installs its own
    mlflow.set_tracking_uri(previous)  # then monkeypatch restores the environment


class FakeClock:
    """A clock that moves ``step`` seconds at every reading (0: only when a test sets ``now``)."""

    def __init__(self, start: float = 1000.0, step: float = 0.0):
        self.now, self.step = start, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now
