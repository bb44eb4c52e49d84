"""Throw-away servers for the scale-out tests: a real PostgreSQL and a real ``mlflow server``.

``postgres_server()`` runs ``initdb`` into a temporary folder and starts ``postgres`` on 127.0.0.1
(a free port, password authentication), creates a login role WITH a password and the databases
asked for, and stops the server by its pid. ``mlflow_server()`` starts ``mlflow server`` with a
PostgreSQL backend store and proxied artifacts on 127.0.0.1, waits for ``/health`` and stops its
process group by pid. Both leave nothing behind.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` OS user (created
by Debian's package; a system user of that name is created if missing).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = ("PostgreSQL server binaries (initdb, postgres) not found: install them with "
                "`apt-get install -y postgresql` (Debian/Ubuntu; they land in /usr/lib/postgresql/<version>/bin)")


def find_bin(name: str) -> str | None:
    """A PostgreSQL server binary on PATH or in Debian's versioned folder (newest first)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return candidates[-1] if candidates else None


def missing_binaries() -> str | None:
    """None when PostgreSQL can be started here, else the reason to skip."""
    if not (find_bin("initdb") and find_bin("postgres")):
        return INSTALL_HINT
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_user() -> str | None:
    """The OS user that runs postgres: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"],
                       check=True, capture_output=True)
    return "postgres"


def _chown_tree(path: Path, user: str | None) -> None:
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)]:
            os.chown(name, entry.pw_uid, entry.pw_gid)


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    pid: int
    folder: Path

    def url(self, database: str, password: str | None = None, driver: str = "postgresql+psycopg2") -> str:
        secret = self.password if password is None else password
        return f"{driver}://{self.user}:{secret}@{self.host}:{self.port}/{database}"


class ServerExited(RuntimeError):
    """The server process ended while we waited for it."""


def _wait_for(check, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ServerExited:
            raise
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s ({last})\n{tail}")


def _stop(proc: subprocess.Popen, sig: int, group: bool = False, timeout: float = 30) -> None:
    """Stop a process we started, by its pid (or its process group, led by that pid)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig) if group else os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL) if group else os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def postgres_server(databases: tuple[str, ...] = ("optuna", "mlflow"), user: str = "tuner",
                    timeout: float = 120) -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster on 127.0.0.1:<free port>; ``user`` owns ``databases``."""
    import psycopg2

    reason = missing_binaries()
    if reason:
        raise RuntimeError(reason)
    os_user = _server_user()
    folder = Path(tempfile.mkdtemp(prefix="deepfake-tune-pg-"))  # not under pytest's root-only tmp
    data, log = folder / "data", folder / "postgres.log"
    superuser_password, password = secrets.token_hex(12), "pw-" + secrets.token_hex(12)
    (folder / "pwfile").write_text(superuser_password + "\n")
    _chown_tree(folder, os_user)
    as_server = {"user": os_user, "group": pwd.getpwnam(os_user).pw_gid} if os_user else {}
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    subprocess.run([find_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
                    f"--pwfile={folder / 'pwfile'}", "--encoding=UTF8", "--no-sync"],
                   check=True, capture_output=True, env=env, cwd=folder, **as_server)
    port = free_port()
    with open(log, "ab") as log_handle:
        proc = subprocess.Popen(
            [find_bin("postgres"), "-D", str(data), "-c", "listen_addresses=127.0.0.1", "-p", str(port),
             "-c", f"unix_socket_directories={folder}", "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=log_handle, stderr=subprocess.STDOUT, env=env, cwd=folder, **as_server)
    try:
        def admin():
            if proc.poll() is not None:
                raise ServerExited(f"postgres exited with {proc.returncode}: {log.read_text(errors='replace')[-3000:]}")
            return psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password=superuser_password,
                                    dbname="postgres", connect_timeout=3)

        _wait_for(lambda: admin().close() or True, timeout, "PostgreSQL", log)
        conn = admin()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE ROLE {user} LOGIN PASSWORD %s", (password,))
            for db in databases:
                cur.execute(f"CREATE DATABASE {db} OWNER {user}")
        conn.close()
        yield Postgres("127.0.0.1", port, user, password, proc.pid, folder)
    finally:
        _stop(proc, signal.SIGINT)  # "fast" shutdown: disconnect clients, stop cleanly
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class MlflowServer:
    url: str
    pid: int
    log: Path
    artifacts: Path


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, folder: Path, timeout: float = 240) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1:<free port>: ``backend_store_uri`` for runs and models,
    artifacts proxied by the server into ``folder/artifacts``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    artifacts, log = folder / "artifacts", folder / "mlflow-server.log"
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runners: tracking only
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "ab") as log_handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
             "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "2"],
            stdout=log_handle, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            if proc.poll() is not None:
                raise ServerExited(f"mlflow server exited with {proc.returncode}: "
                                   f"{log.read_text(errors='replace')[-3000:]}")
            with urllib.request.urlopen(f"{url}/health", timeout=3) as response:
                return response.status == 200

        _wait_for(healthy, timeout, "mlflow server", log)
        yield MlflowServer(url, proc.pid, log, artifacts)
    finally:
        _stop(proc, signal.SIGTERM, group=True)  # the server and the workers it forked
