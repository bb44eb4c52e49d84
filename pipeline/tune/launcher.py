"""``--n-jobs N`` as N worker processes on this machine (``study.jobs_as``).

Threads of one process share the GIL, one CUDA context with its default stream, and the process's
locks, so on a GPU their trials barely overlap. Worker processes on the session's storage (the
scale-out path) share none of these. Once the storage, studies, parent run and the time budget's
plan exist, this worker starts N - 1 ``tune --trials-only`` processes with its resolved settings (a
preset file naming the same study, storage, experiment and device; the same tracking URI and working
directory) and runs trials itself as the N-th. All admit trials under the storage lock like any
workers; this one then waits for them, runs what a lost one left re-queued, and builds the ensemble
once. Each started worker writes to its own log file (also logged on the parent run); if this worker
stops (a signal or an error) it stops them first, and one that fails is reported with the end of its
log while the session goes on.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import torch

from ..config import Preset, StudyConfig, preset_yaml
from ..progress import say
from ..train import resolve_device
from .session import Session
from .trial import best_effort, release_interrupted

STOP_SECONDS = 30  # after SIGTERM a worker closes its trial's run and re-queues the trial; then SIGKILL
TAIL_LINES = 20  # of a failed worker's log, shown by the launcher


def runs_processes(study: StudyConfig, device: torch.device) -> bool:
    """Whether ``n_jobs`` > 1 are worker processes: asked for, or ``auto`` on CUDA (threads would share
    one stream and the GIL). On the CPU ``auto`` keeps threads: no CUDA context to gain, one process's
    memory."""
    mode = study.jobs_as if study.jobs_as != "auto" else ("processes" if device.type == "cuda" else "threads")
    return study.n_jobs > 1 and mode == "processes"


def cpu_share(n_jobs: int) -> int:
    """Intra-op threads of each of ``n_jobs`` CPU workers: the cores split evenly."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // n_jobs)


def child_preset(session: Session, device: torch.device) -> Preset:
    """The launcher's settings with every default a worker could resolve differently made explicit
    (the session's study, storage and experiment, the device), one trial at a time each."""
    p = session.preset
    study = replace(p.study, name=session.study_name, storage=session.storage_url, n_jobs=1, jobs_as="threads",
                    workers=p.study.plan_workers)
    experiment = session.client.get_experiment(session.experiment_id).name
    return replace(p, study=study, train=replace(p.train, device=str(device)),
                   tracking=replace(p.tracking, experiment=experiment))


def child_env(environ: Mapping[str, str], tracking_uri: str, device: torch.device, n_jobs: int) -> dict[str, str]:
    """A started worker's environment: this one's, with its tracking URI made explicit, without
    ``MLFLOW_RUN_ID`` (under ``mlflow run`` that run is the launcher's, the session's parent), and on
    the CPU its share of the cores unless the user set ``OMP_NUM_THREADS``."""
    env = {k: v for k, v in environ.items() if k != "MLFLOW_RUN_ID"}
    env.update({"MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"})
    if device.type == "cpu" and "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = str(cpu_share(n_jobs))
    return env


@dataclass(frozen=True)
class Child:
    number: int
    proc: subprocess.Popen
    log: Path


def start_child(number: int, preset_file: Path, env: dict[str, str]) -> Child:
    log = preset_file.parent / f"worker-{number}.log"
    args = [sys.executable, "-m", "pipeline", "tune", "--config", str(preset_file), "--trials-only", "--no-progress"]
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        # A session of its own: a terminal's Ctrl-C reaches the launcher only, which stops each worker
        # once (a second signal would cut short the worker's own closing of its trial). In this
        # process's working directory, the user's: the preset's relative data root and sqlite storage,
        # and a relative tracking URI, name the files they name here.
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                cwd=os.getcwd(), start_new_session=True)
    return Child(number, proc, log)


def failure_report(child: Child) -> str:
    code = child.proc.returncode
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    tail = child.log.read_text(errors="replace").splitlines()[-TAIL_LINES:]
    return (f"worker process {child.number} (pid {child.proc.pid}) {how}; the session goes on without it (a trial "
            f"it left running is re-queued once its heartbeat stops). The end of {child.log}:\n"
            + "\n".join(f"  | {line}" for line in tail))


@dataclass(frozen=True)
class Jobs:
    """This worker's share of ``n_jobs``: its trial threads, and the worker processes it started."""

    threads: int
    children: tuple[Child, ...] = ()

    def wait(self) -> list[Child]:
        """Wait for the started workers; report each that failed (how, and its log's end). Returns those."""
        if self.children:
            say(f"waiting for the {len(self.children)} worker process(es) started here to finish their trials")
        failed = [child for child in self.children if child.proc.wait() != 0]
        for child in failed:
            say(failure_report(child))
        return failed

    def stop(self) -> None:
        """Stop the started workers still running: SIGTERM (each closes its trial's run as KILLED and
        re-queues the trial, as Ctrl-C does), SIGKILL for any still running ``STOP_SECONDS`` later."""
        alive = [child.proc for child in self.children if child.proc.poll() is None]
        if not alive:
            return
        say(f"stopping {len(alive)} worker process(es) started here")
        for proc in alive:
            proc.terminate()
        deadline = time.monotonic() + STOP_SECONDS
        with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):  # a second Ctrl-C: kill now
            for proc in alive:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in alive:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def share_cores(preset: Preset) -> None:
    """With ``n_jobs`` worker processes on the CPU, this one's intra-op threads are its share of the
    cores (as the started workers' are, unless the user set ``OMP_NUM_THREADS``): set before the plan
    measures speeds, which are then the speeds the workers will see."""
    device, study = resolve_device(preset.train.device), preset.study
    if runs_processes(study, device) and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_share(study.n_jobs))


@contextlib.contextmanager
def launched(session: Session) -> Iterator[Jobs]:
    """This worker's jobs. With processes: the other N - 1 workers started (after the session and its
    plan exist, so they join them and the plan is measured undisturbed), and on the way out, normal
    or not, any still running stopped and each one's log attached to the parent run."""
    device = resolve_device(session.preset.train.device)
    n_jobs = session.preset.study.n_jobs
    if not runs_processes(session.preset.study, device):
        yield Jobs(n_jobs)
        return
    folder = Path(tempfile.mkdtemp(prefix=f"tune-{re.sub(r'[^A-Za-z0-9_.-]', '_', session.study_name)}-"))
    preset_file = folder / "preset.yaml"  # in a private folder: the storage URL may hold a password
    preset_file.write_text(preset_yaml(child_preset(session, device)))
    env = child_env(os.environ, mlflow.get_tracking_uri(), device, n_jobs)
    children: list[Child] = []
    try:
        for number in range(1, n_jobs):
            children.append(start_child(number, preset_file, env))
        say(f"--n-jobs {n_jobs} as processes: started {n_jobs - 1} worker(s) beside this one (pid "
            + ", ".join(str(c.proc.pid) for c in children) + f"), their output in {folder}/worker-N.log; "
            "this one builds the ensemble once all are done")
        yield Jobs(1, tuple(children))
    except BaseException as exc:
        release_interrupted(exc)  # a lock it held would stall the workers closing their trials
        raise
    finally:
        Jobs(1, tuple(children)).stop()
        for child in children:
            best_effort(lambda child=child: session.client.log_artifact(session.parent_run_id, str(child.log),
                                                                        "workers"))
