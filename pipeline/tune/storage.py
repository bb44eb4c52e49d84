"""The Optuna storage: URLs, opening it with heartbeats, and the cross-process lock that serialises
schema creation and trial admission.

Two processes creating a fresh Optuna or MLflow schema at once fail (SQLite and PostgreSQL alike),
and "exactly N trials" across workers needs an atomic count-then-ask. A SQLite storage is guarded
by a lock file beside the database; a PostgreSQL storage by a session advisory lock in the server
itself, so workers on different machines are serialised too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import optuna

from ..tracking import redact, scrub


def sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    return Path(url[len("sqlite:///"):])


def default_storage(tracking_uri: str) -> str:
    """A SQLite file beside the MLflow database (or in the working directory for a server)."""
    db = sqlite_path(tracking_uri)
    if db is not None:
        return f"sqlite:///{db.parent / 'optuna.db'}" if str(db.parent) not in ("", ".") else "sqlite:///optuna.db"
    return "sqlite:///optuna.db"


def check_url(url: str) -> None:
    """A storage URL ``tune`` can keep exact budgets on, or a ``ValueError`` saying why not."""
    scheme = urlsplit(url).scheme
    if not scheme or "://" not in url:
        raise ValueError(f"--storage {url!r} is not a storage URL (e.g. sqlite:///optuna.db or "
                         "postgresql+psycopg2://user@host/db)")
    db = sqlite_path(url)
    if (db is None or str(db) in ("", ":memory:")) and scheme.split("+")[0] != "postgresql":
        # Workers admit trials under a lock held in the storage (storage_lock); only these two have one here.
        raise ValueError(f"--storage {redact(url)}: only SQLite files (sqlite:///path/optuna.db) and PostgreSQL "
                         "(postgresql+psycopg2://user@host/db) are supported: workers admit trials under a lock "
                         "held in the storage, a lock file or an advisory lock, which only these two have here")
    if db is not None and db.parent != Path("") and not db.parent.exists():
        raise ValueError(f"--storage {url!r}: folder {db.parent} does not exist")


@contextlib.contextmanager
def storage_lock(url: str, name: str) -> Iterator[None]:
    """Hold an exclusive lock named ``name`` for the storage at ``url``. A no-op for other engines:
    ``check_url`` refuses them as Optuna storages; as a tracking store (``mlflow-schema``), a server
    or a file store creates its own schema."""
    db = sqlite_path(url)
    if db is not None:
        lock_path = Path(f"{db}.{hashlib.sha1(name.encode()).hexdigest()[:10]}.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if url.startswith("postgresql"):
        import sqlalchemy

        key = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big", signed=True)
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()
        return
    yield


def retry(action, attempts: int = 5, delay: float = 0.5):
    """Run ``action`` with a few retries: a concurrent schema creation elsewhere is transient."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(delay * (attempt + 1) + (os.getpid() % 7) * 0.05)


def open_storage(url: str, heartbeat: int, max_retry: int) -> optuna.storages.BaseStorage:
    """An RDB storage (``check_url``: SQLite or PostgreSQL) with heartbeats: a lost worker's trial is
    failed and re-queued with the same parameters and seed, at most ``max_retry`` times."""
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else {"connect_args": {"timeout": 60}},
        heartbeat_interval=heartbeat,
        grace_period=heartbeat * 2,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
    )


def heartbeat_enabled(storage: optuna.storages.BaseStorage) -> bool:
    return isinstance(storage, optuna.storages.RDBStorage) and bool(storage.get_heartbeat_interval())


def storage_error(url: str, exc: BaseException) -> str | None:
    """A clear one-line message for a storage that cannot be opened (None: not a storage problem)."""
    if isinstance(exc, (optuna.exceptions.OptunaError, ImportError)) or type(exc).__module__.startswith("sqlalchemy"):
        text = scrub(str(exc).strip(), url)
        first = text.splitlines()[0][:300] if text else type(exc).__name__
        return f"Optuna storage {redact(url)} is not usable: {first}"
    return None


class Heartbeat:
    """Record a trial's heartbeat while it runs (Optuna only does this inside ``study.optimize``)."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.is_set():
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # noqa: BLE001 - a missed beat is retried; the trial goes on
                pass
            self.stop.wait(self.interval)

    def __enter__(self) -> Heartbeat:
        if heartbeat_enabled(self.storage):
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
