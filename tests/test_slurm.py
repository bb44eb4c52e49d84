"""The Slurm recipe (``docs/slurm/tune-array.sbatch``) on a real single-node Slurm (``tests/slurm.py``)
with a real PostgreSQL Optuna storage and a real ``mlflow server``: the README's two commands, as
written, run a budgeted toy session as a 2-task job array; one task is cancelled (``scancel``) in the
middle of a trial, and nothing is lost: its trial's run is closed, the trial runs again in the other
task, the session ends and one model version is registered.

Skipped (with the install command) without Slurm, munge or PostgreSQL's server binaries.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import cli_env, fresh_checkout
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from slurm import missing, slurm_cluster, submitted_job
from test_readme_commands import readme_block_with
from workers import load_trials, session_runs, wait_for, write_preset

from pipeline.tune.keys import RETRY

pytestmark = [pytest.mark.postgres, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

STUDY = "slurm"
EXPERIMENT, MODEL = "slurm", "slurm-ensemble"  # on the tracking server test_postgres uses too


@pytest.fixture(scope="module")
def cluster():
    reason = missing()
    if reason:
        pytest.skip(reason)
    with slurm_cluster() as slurm:
        yield slurm


def _running(storage: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in load_trials(storage, f"{STUDY}.cnn_v1")
            if t.state == TrialState.RUNNING and t.user_attrs.get("mlflow_run_id")]


def test_a_two_task_job_array_runs_one_budgeted_session_and_a_cancelled_task_loses_nothing(cluster, postgres,
                                                                                           tracking_server, small_data,
                                                                                           tmp_path):
    pg, tracking = postgres, tracking_server
    checkout = fresh_checkout(tmp_path / "checkout")
    # A budget long enough for a search of several runs per worker (70 % of it: the cancelled trial's retry
    # must still fit), a pair of final runs and the ensemble.
    preset = write_preset(checkout / "toy.yaml", small_data, trials=100, epochs=2, time_budget="60s",
                          final_fraction=0.3, tail_seconds=5.0, min_rung_passes=20.0, model_name=MODEL)
    preset.write_text(preset.read_text() + f"tracking: {{experiment: {EXPERIMENT}}}\n")  # its own, on the shared server
    storage = pg.url("slurm")
    env = cluster.env(cli_env(tmp_path, PRESET=str(preset), STUDY=STUDY, TUNE_STORAGE=storage,
                              MLFLOW_TRACKING_URI=tracking.url, PATH=f"{Path(sys.executable).parent}:"
                                                                     f"{cli_env(tmp_path)['PATH']}"))
    setup, submit = readme_block_with("sbatch ")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", setup], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    sent = subprocess.run(["bash", "-euo", "pipefail", "-c", submit], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=60)
    job = submitted_job(sent.stdout + sent.stderr)
    logs = [checkout / f"deepfake-tune-{job}_{task}.log" for task in (0, 1)]

    def both_mid_trial():
        running = _running(storage)
        return running if len(running) == 2 else None

    try:
        wait_for(both_mid_trial, 240, "both array tasks in a trial")
        cancelled_at = time.monotonic()
        cluster.run("scancel", f"{job}_1")
        wait_for(lambda: not cluster.states(job), 300, "the job array to end")
    finally:
        cluster.run("scancel", job, check=False)
    outs = [log.read_text(errors="replace") if log.exists() else "" for log in logs]
    ended = time.monotonic() - cancelled_at

    # The task that was cancelled stopped its trial; the other one finished the session.
    assert "interrupted" in outs[1], outs[1] + cluster.logs()
    assert "2 workers:" in outs[0] + outs[1]  # the plan was made for the array's two tasks
    trials = load_trials(storage, f"{STUDY}.cnn_v1")
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    victims = [t for t in trials if t.state == TrialState.FAIL and "interrupted" in t.user_attrs.get("error", "")]
    assert len(victims) == 1, [(t.number, t.state.name, t.user_attrs.get("error")) for t in trials]
    retries = [t for t in trials if RETRY.retried_trial_number(t) == victims[0].number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE, "the cancelled trial ran again"
    assert retries[0].params == victims[0].params

    client = MlflowClient(tracking_uri=tracking.url, registry_uri=tracking.url)
    runs = session_runs(client, EXPERIMENT)
    assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    parents = [r for r in runs if r.data.tags.get("kind") == "tune-session"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    lost = client.get_run(victims[0].user_attrs["mlflow_run_id"])
    assert lost.info.status == "KILLED" and lost.data.tags["stopped_by"] == "interrupt"
    assert len({r.data.tags["worker"] for r in runs if r.data.tags.get("kind") == "trial"}) == 2  # both tasks
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert len(versions) == 1, [v.version for v in versions]
    finals = [t for t in trials if t.user_attrs.get("phase") == "final" and t.state == TrialState.COMPLETE]
    assert finals, "a final run finished"
    print(f"\nSlurm array of 2 tasks, task 1 cancelled mid-trial: {len(trials)} trials, {len(finals)} final run(s), "
          f"1 model version; the session ended {ended:.0f} s after the cancel")


def test_the_kubernetes_manifest_runs_the_slurm_recipes_workers():
    """The Indexed Job in the docs was not run on a cluster: at least its two Jobs parse, the setup Job is
    `tune --setup-only` of the workers' session, every worker is counted in `--workers`, and the workers
    run what the Slurm recipe runs."""
    import shlex

    import yaml

    from pipeline.cli import build_parser

    root = Path(__file__).resolve().parents[1]
    docs = list(yaml.safe_load_all((root / "docs/kubernetes/tune-indexed-job.yaml").read_text()))
    jobs = {d["metadata"]["labels"]["role"]: d for d in docs}
    assert set(jobs) == {"setup", "workers"}
    setup = jobs["setup"]["spec"]["template"]["spec"]["containers"][0]["command"]
    workers_spec = jobs["workers"]["spec"]
    worker = workers_spec["template"]["spec"]["containers"][0]["command"]
    assert workers_spec["completionMode"] == "Indexed"
    parser = build_parser()
    s, w = parser.parse_args(setup[3:]), parser.parse_args(worker[3:])
    assert setup[:4] == worker[:4] == ["python", "-m", "pipeline", "tune"]
    assert s.options__setup_only and not w.options__setup_only
    same = ("study__name", "study__storage", "common__config", "data__root")
    assert [getattr(s, k) for k in same] == [getattr(w, k) for k in same]
    assert w.study__workers == workers_spec["parallelism"] == workers_spec["completions"]
    sbatch = (root / "docs/slurm/tune-array.sbatch").read_text()
    command = sbatch[sbatch.index("exec python"):].replace("\\\n", " ").split("\n")[0]
    flags = {word for word in shlex.split(command) if word.startswith("--")}
    assert flags <= {word for word in worker if word.startswith("--")}, flags
