"""A throw-away single-node Slurm for the job-array test: Debian's ``munged``, ``slurmctld`` and
``slurmd``, all real, configured in a temporary folder (their own munge key and socket, ports, state
and spool), started in the foreground as our children and stopped by pid. Clients (``sbatch``,
``squeue``, ``scancel``) find the cluster through ``SLURM_CONF`` in the environment ``env()`` returns.

Slurm's daemons run as root here (``SlurmUser=root``): the test run is root in CI, as the PostgreSQL
test's is. Without root or without the binaries the test skips with the install command.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pg import _stop, free_port

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")
INSTALL_HINT = "Slurm not found: install it with `apt-get install -y slurmctld slurmd slurm-client munge` (Debian)"


def missing() -> str | None:
    """None when a single-node Slurm can be started here, else the reason to skip."""
    absent = [b for b in BINARIES if not (shutil.which(b) or Path(f"/usr/sbin/{b}").exists())]
    if absent:
        return f"{INSTALL_HINT} (missing: {', '.join(absent)})"
    if os.geteuid() != 0:
        return "the single-node Slurm of this test runs its daemons as root"
    return None


def _bin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class Slurm:
    folder: Path
    conf: Path

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([_bin(args[0]), *args[1:]], env=self.env(), capture_output=True, text=True,
                              check=check, timeout=60)

    def states(self, job: str) -> dict[str, str]:
        """Array task id -> state (PENDING, RUNNING, ...; tasks that ended drop out of squeue)."""
        done = self.run("squeue", "--noheader", "--array", "--jobs", job, "--format", "%i %T", check=False)
        if done.returncode != 0:  # a job that ended a while ago is unknown to squeue
            return {}
        out = done.stdout
        return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.folder.glob("*.log")))


def _write_conf(folder: Path, node: str, cpus: int) -> Path:
    conf = folder / "slurm.conf"
    conf.write_text(f"""ClusterName=deepfake-tune-test
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={folder / 'munge.socket'}
CredType=cred/munge
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder / 'spool'}
SlurmctldPidFile={folder / 'slurmctld.pid'}
SlurmdPidFile={folder / 'slurmd.pid'}
SlurmctldLogFile={folder / 'slurmctld.log'}
SlurmdLogFile={folder / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=30
InactiveLimit=0
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


@contextlib.contextmanager
def slurm_cluster(timeout: float = 60) -> Iterator[Slurm]:
    """munged, slurmctld and slurmd on this machine; the node is up and idle when this yields."""
    folder = Path(tempfile.mkdtemp(prefix="deepfake-tune-slurm-"))
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    node, cpus = socket.gethostname().split(".")[0], os.cpu_count() or 1
    conf = _write_conf(folder, node, cpus)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: list[subprocess.Popen] = []
    try:
        key = folder / "munge.key"
        subprocess.run([_bin("mungekey"), "--create", "--keyfile", str(key)], check=True, capture_output=True)
        key.chmod(0o600)
        munged = [_bin("munged"), "--foreground", "--force", f"--key-file={key}",
                  f"--socket={folder / 'munge.socket'}", f"--pid-file={folder / 'munged.pid'}",
                  f"--log-file={folder / 'munged.log'}", f"--seed-file={folder / 'munge.seed'}"]
        procs.append(subprocess.Popen(munged, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        _wait(lambda: (folder / "munge.socket").exists(), timeout, "munged", folder)
        for daemon in ([_bin("slurmctld"), "-D", "-i", "-f", str(conf)], [_bin("slurmd"), "-D", "-N", node,
                                                                          "-f", str(conf)]):
            with open(folder / f"{Path(daemon[0]).name}.out.log", "wb") as out:
                procs.append(subprocess.Popen(daemon, stdout=out, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True))
        cluster = Slurm(folder, conf)

        def idle() -> bool:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{cluster.logs()}")
            out = cluster.run("sinfo", "--noheader", "--format", "%T", check=False).stdout
            return out.strip() == "idle"

        _wait(idle, timeout, "the Slurm node", folder)
        yield cluster
    finally:
        for proc in reversed(procs):
            _stop(proc, signal.SIGTERM, timeout=20)
        shutil.rmtree(folder, ignore_errors=True)


def _wait(check, timeout: float, what: str, folder: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s:\n"
                       + Slurm(folder, folder / "slurm.conf").logs())


def submitted_job(sbatch_output: str) -> str:
    """The job id in ``sbatch``'s "Submitted batch job N"."""
    found = re.search(r"Submitted batch job (\d+)", sbatch_output)
    if not found:
        raise AssertionError(f"sbatch did not submit: {sbatch_output}")
    return found.group(1)
