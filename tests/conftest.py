"""Shared test fixtures: tiny on-disk datasets under ``tmp_path`` and an isolated cache directory.

Everything a test writes lives under pytest's temporary directories; nothing touches the user's
``~/.cache`` (the autouse fixture points ``DEEPFAKE_TUNE_CACHE`` at a fresh temporary folder).
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# One intra-op thread per process (set before torch is imported; subprocesses inherit it): the tests'
# networks are tiny, and on 2 cores shared with worker subprocesses or other jobs, spinning OpenMP
# threads made the same epochs up to 5x slower than one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# The session fixtures (tracking_here, small_data, mlflow_template...) live in workers.py with the helpers
# that use them; as a plugin they reach every test without an import.
pytest_plugins = ["workers"]

TINY_CLASSES = 5
TINY_SIZE = 16
TINY_COUNTS = {"train": 3, "validation": 1}  # images per class
TINY_TEST = 4  # unlabelled (or labelled) test images


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` (H x W, H x W x 3 or H x W x 4, uint8) as a PNG, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, format="PNG")
    return path


def random_image(rng: np.random.Generator, size: int = TINY_SIZE, channels: int = 3) -> np.ndarray:
    shape = (size, size) if channels == 1 else (size, size, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def write_csv(path: Path, rows: list[tuple], header: tuple[str, ...] = ("image_id", "label")) -> Path:
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


def make_competition_dataset(root: Path, size: int = TINY_SIZE, counts: dict[str, int] | None = None,
                             test_count: int = TINY_TEST, test_labels: bool = False, seed: int = 0) -> Path:
    """The competition layout: ``{train,validation,test}.csv`` (``image_id,label``) and
    ``<split>/<image_id>.png``. Rows are deliberately not sorted by id or by label, so a loader that
    sorts instead of keeping CSV order is caught. Every image has distinct random pixels."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    counts = counts or TINY_COUNTS
    serial = 0
    for split, per_class in counts.items():
        rows = []
        for _ in range(per_class):
            for label in range(TINY_CLASSES):
                rows.append((f"{split[:2]}{rng.integers(1 << 30):09x}-{serial}", label))
                serial += 1
        order = rng.permutation(len(rows))
        rows = [rows[i] for i in order]
        for image_id, _ in rows:
            write_png(root / split / f"{image_id}.png", random_image(rng, size))
        write_csv(root / f"{split}.csv", rows)
    if test_count:
        rows = []
        for k in range(test_count):
            image_id = f"te{rng.integers(1 << 30):09x}-{serial}"
            serial += 1
            write_png(root / "test" / f"{image_id}.png", random_image(rng, size))
            rows.append((image_id, k % TINY_CLASSES) if test_labels else (image_id,))
        write_csv(root / "test.csv", rows, ("image_id", "label") if test_labels else ("image_id",))
    return root


def make_imagefolder_dataset(root: Path, classes: tuple[str, ...] = ("real", "gan", "Diffusion", "faceswap", "morph"),
                             size: int = TINY_SIZE, counts: dict[str, int] | None = None,
                             test: str | None = "flat", test_count: int = TINY_TEST, seed: int = 0) -> Path:
    """The ImageFolder layout: ``<split>/<class_name>/<id>.png``; ``test`` is ``"flat"``
    (unlabelled ``test/<id>.png``), ``"classes"`` (by class) or ``None`` (no test split)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    counts = counts or TINY_COUNTS
    serial = 0
    for split, per_class in counts.items():
        for name in classes:
            for _ in range(per_class):
                write_png(root / split / name / f"{name}-{serial:03d}.png", random_image(rng, size))
                serial += 1
    if test == "flat":
        for _ in range(test_count):
            write_png(root / "test" / f"t{serial:03d}.png", random_image(rng, size))
            serial += 1
    elif test == "classes":
        for k in range(test_count):
            name = classes[k % len(classes)]
            write_png(root / "test" / name / f"t{serial:03d}.png", random_image(rng, size))
            serial += 1
    return root


def make_learnable(root: Path, per_class: int = 24, val_per_class: int = 8, size: int = 32, seed: int = 0) -> Path:
    """Five classes told apart by a colour cast under heavy noise: a small CNN learns it in a few epochs."""
    rng = np.random.default_rng(seed)
    casts = np.array([[60, 0, 0], [0, 60, 0], [0, 0, 60], [60, 60, 0], [0, 60, 60]])
    for split, n in (("train", per_class), ("validation", val_per_class), ("test", 4)):
        rows = []
        for label in range(5):
            for i in range(n):
                image_id = f"{split[:2]}{label}{i:03d}"
                noise = rng.integers(0, 160, (size, size, 3))
                write_png(root / split / f"{image_id}.png", np.clip(noise + casts[label], 0, 255))
                rows.append((image_id, label))
        rng.shuffle(rows)
        write_csv(root / f"{split}.csv", rows)
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """A valid competition-layout dataset (5 classes, 16x16 RGB, 15/5/4 images); returns its root."""
    return make_competition_dataset(tmp_path / "data")


@pytest.fixture
def tiny_imagefolder(tmp_path: Path) -> Path:
    """A valid ImageFolder dataset (5 named classes, flat unlabelled test/); returns its root."""
    return make_imagefolder_dataset(tmp_path / "folders")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test may write the decode cache (or anything else) under the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("deepfake-tune-cache")
    monkeypatch.setenv("DEEPFAKE_TUNE_CACHE", str(cache))
    # MLflow puts a new experiment's artifacts in ./mlruns of the working directory: never the repo's.
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    return cache


# ------------------------------------------------------------------ end-to-end helpers

@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow store whose schema is created once per session. Migrating a fresh SQLite store
    takes 3-8 s here, most of a small test, so tests start from a copy of this one (``seed_store``);
    the tests of schema creation itself (workers started at once on nothing) do not."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{path}", f"sqlite:///{path}")
    client.search_experiments(max_results=1)
    client.search_registered_models(max_results=1)
    return path


def seed_store(template: Path, folder: Path) -> str:
    """``folder/mlflow.db`` as a copy of the template store (unless it exists); returns its URI."""
    import shutil

    target = Path(folder) / "mlflow.db"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(template, target)
    return f"sqlite:///{target}"


PROJECT_DIR = Path(__file__).resolve().parents[1]


def cli_env(workdir: Path, **extra: str) -> dict[str, str]:
    """Environment for a ``python -m pipeline`` subprocess: tracking store, cache and telemetry
    all under ``workdir``."""
    env = dict(os.environ)
    env.update({
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "DEEPFAKE_TUNE_CACHE": str(workdir / "cache"),
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("MLFLOW_RUN_ID", None)
    env.update(extra)
    return env


def run_cli(args: list[str], workdir: Path, timeout: float = 600, check: bool = True, **env_extra: str):
    """Run ``python -m pipeline ARGS`` in ``workdir`` as a user would; returns the CompletedProcess."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=workdir, env=cli_env(workdir, **env_extra),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


class Tuned:
    """A finished tiny tuning session: its folder, data, stores and the CLI output."""

    def __init__(self, workdir: Path, data: Path, output: str):
        self.workdir, self.data, self.output = workdir, data, output
        self.tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
        self.storage = f"sqlite:///{workdir / 'optuna.db'}"
        self.study = "e2e"
        self.model_name = "deepfake-ensemble"

    def use(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point this process's MLflow at the session's store for the rest of the test."""
        import mlflow

        monkeypatch.setenv("MLFLOW_TRACKING_URI", self.tracking_uri)
        mlflow.set_tracking_uri(self.tracking_uri)
        monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", self.tracking_uri,
                            raising=False)


def mlflow_run(entry: str, params: dict[str, str], workdir: Path, timeout: float = 600, **env_extra: str):
    """``mlflow run <project> -e ENTRY --env-manager local --experiment-name deepfake -P k=v …`` in
    ``workdir``, as the README shows; returns the CompletedProcess."""
    import subprocess
    import sys

    env = cli_env(workdir, **env_extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # mlflow runs `python` from here
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(PROJECT_DIR), "-e", entry, "--env-manager",
           "local", "--experiment-name", "deepfake", *[x for k, v in params.items() for x in ("-P", f"{k}={v}")]]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"mlflow run -e {entry} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def tuned(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Tuned:
    """One tiny end-to-end tuning session through ``mlflow run . -e tune`` (the launcher's run becomes
    the parent): 2 members x 2 trials x 2 epochs at 32 px (one conv per block: half the cost), the two
    trials of a member at once in threads (``n_jobs 2``), every voting rule searched over the 2 x 2
    pairs (``ensemble_method best``). Shared by every test that needs tuning results or a registered
    model; nothing relies on its accuracy."""
    from pipeline.data.synth import synthesize

    workdir = tmp_path_factory.mktemp("tuned")
    seed_store(mlflow_template, workdir)
    data = workdir / "data"
    synthesize(data, "tiny", 1)
    # PYTHONWARNINGS=default: deprecations our code triggers show too (they are hidden outside __main__).
    # The one exception is the `mlflow run` launcher's own store set-up (MLflow's code, before ours runs),
    # which trips SQLAlchemy's noload deprecation; our process filters it where it opens a store.
    proc = mlflow_run("tune", {"config": "tiny", "data": str(data), "study": "e2e", "n_jobs": "2",
                               "ensemble_method": "best", "augment": "geometric", "convs_per_block": "1",
                               "storage": f"sqlite:///{workdir / 'optuna.db'}", "no_progress": "true"}, workdir,
                      PYTHONWARNINGS="default,ignore:The ``noload`` loader strategy is deprecated")
    return Tuned(workdir, data, proc.stdout + proc.stderr)


def fresh_checkout(dest: Path) -> Path:
    """``dest`` as a fresh clone of this checkout's working tree (the files git tracks or would track),
    using this venv: ``make`` finds it at ``.venv`` and, its stamp newer than ``pyproject.toml``,
    installs nothing."""
    venv = Path(sys.prefix)
    stamp = venv / ".installed-stamp"
    if not stamp.exists() or not (PROJECT_DIR / ".git").exists():
        pytest.skip("needs a git checkout and the venv `make install` builds (its .installed-stamp)")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=PROJECT_DIR,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (PROJECT_DIR / name).is_file():  # a tracked file another change deleted is not in the clone
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_DIR / name, dest / name)
    (dest / ".venv").symlink_to(venv)
    os.utime(dest / "pyproject.toml", (stamp.stat().st_mtime - 1,) * 2)  # never a reinstall into the venv
    return dest


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL for the scale-out tests (tests/pg.py), shared by them: each test uses databases of
    its own (``optuna`` and ``spare``: test_postgres; ``slurm``: test_slurm)."""
    from pg import missing_binaries, postgres_server

    reason = missing_binaries()
    if reason:
        pytest.skip(reason)
    with postgres_server(databases=("optuna", "mlflow", "spare", "slurm")) as server:
        yield server


@pytest.fixture(scope="session")
def tracking_server(postgres, tmp_path_factory):
    """A real ``mlflow server`` on PostgreSQL, shared: each test logs to an experiment and registers a model
    name of its own."""
    from pg import mlflow_server

    with mlflow_server(postgres.url("mlflow"), tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server
