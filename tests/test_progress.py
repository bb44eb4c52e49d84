"""What a person sees: progress lines where there is no terminal (and none with --quiet), UI links
that open the session in the model-training view, the session's PNG figures, and no
library's lines (warnings, log lines, notices) in any command's output (`quiet.third_party_lines`)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import optuna
import pytest
from conftest import PROJECT_DIR, cli_env, seed_store
from mlflow.tracking import MlflowClient
from PIL import Image
from quiet import drop_launcher_lines, kind_of, third_party_lines, without_launcher

from pipeline import metrics as M
from pipeline import progress
from pipeline.tracking import links


def _session(tuned):
    client = MlflowClient(tracking_uri=tuned.tracking_uri, registry_uri=tuned.tracking_uri)
    experiment = client.get_experiment_by_name("deepfake")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("kind") == "tune-session")
    return client, experiment, parent


# ----------------------------------------------------------------------------- progress lines

def test_a_tune_without_a_terminal_says_where_it_is(tuned):
    """The session fixture runs `tune --no-progress` with output to pipes: one line per epoch of each
    trial, per finished trial (as the storage holds it) and per phase."""
    out = tuned.output
    storage = optuna.storages.RDBStorage(tuned.storage)
    for arch in ("cnn_v1", "cnn_v2"):
        for t in optuna.load_study(study_name=f"e2e.{arch}", storage=storage).trials:
            label = re.escape(f"{arch} #{t.number}")
            epochs = re.findall(rf"^{label} epoch (\d+)/2 loss [\d.]+ val ([\d.]+)% best ([\d.]+)% lr \S+ \d+ img/s$",
                                out, re.M)
            assert [int(e) for e, _, _ in epochs] == sorted(t.intermediate_values), (arch, t.number, out)
            for (epoch, val, _best) in epochs:
                assert float(val) == pytest.approx(100 * t.intermediate_values[int(epoch)], abs=0.051)
            if t.state.name == "COMPLETE":
                done = re.search(rf"^{label} COMPLETE selection accuracy ([\d.]+)%, \d+(m\d\ds)?s? \[\d/2 finished\]$",
                                 out, re.M)
                assert done, out
                assert float(done.group(1)) == pytest.approx(100 * t.value, abs=0.051)
            else:  # the "always" pruner stops the second trial after its first epoch
                done = re.search(rf"^{label} PRUNED at epoch 1 \(best [\d.]+% at epoch 1\)", out, re.M)
                assert done, out
            last_epoch = max(m.start() for m in re.finditer(rf"^{label} epoch", out, re.M))
            assert last_epoch < done.start(), "a trial's line comes after its epochs"
    phases = [out.index(f"[{i}/3] {name}:") for i, name in enumerate(progress_phases(), start=1)]
    assert phases == sorted(phases)


def progress_phases():
    from pipeline.tune.console import PHASES

    return PHASES


def _train_args(data: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--arch", "cnn_v1", "--epochs", "1", "--batch-size", "8",
            "--augment", "none", "--precision", "fp32", "--image-size", "16", "--audit-fraction", "0", *extra]


@pytest.fixture
def restore_progress(monkeypatch):
    """cli.main sets the process-wide progress mode (and MLflow's log level): restore both."""
    monkeypatch.setattr(progress, "_mode", progress._mode)
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "INFO")  # --quiet sets it; undone after the test
    level = logging.getLogger("mlflow").level
    yield
    logging.getLogger("mlflow").setLevel(level)


def test_train_progress_lines_and_quiet(tiny_dataset, tmp_path, monkeypatch, capsys, restore_progress):
    """`train --no-progress` says each epoch on stderr; `--quiet` leaves only the result on stdout."""
    import mlflow

    from pipeline.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        assert main(_train_args(tiny_dataset, "--no-progress")) == 0
        loud = capsys.readouterr()
        assert main(_train_args(tiny_dataset, "--quiet")) == 0
        quiet = capsys.readouterr()
    finally:
        mlflow.set_tracking_uri(previous)
    assert re.search(r"^train cnn_v1 epoch 1/1 loss [\d.]+ val [\d.]+% best [\d.]+% lr \S+ \d+ img/s$", loud.err,
                     re.M), loud.err
    assert "epoch 1/1" not in loud.out  # progress goes to stderr; stdout is the result
    assert re.search(r"^run [0-9a-f]{32}: ", quiet.out, re.M), quiet.out
    assert quiet.err == "", quiet.err


def test_counter_lines_at_most_every_interval_and_only_for_slow_loops(capsys, monkeypatch):
    """predict, promote and data inspect loop over images with a Counter: in lines mode it speaks
    every `every` seconds and once at the end, a quick loop says nothing, quiet says nothing."""
    now = [0.0]
    monkeypatch.setattr(progress, "_mode", progress.LINES)
    with progress.Counter(100, "predict test", every=10, clock=lambda: now[0]) as counter:
        for _ in range(100):
            now[0] += 0.25  # 25 s in all
            counter.update()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["predict test: 40/100 img (40%), 4 img/s, ~15s left",
                     "predict test: 80/100 img (80%), 4 img/s, ~5s left",
                     "predict test: 100/100 img in 25s"]
    with progress.Counter(100, "quick", every=10, clock=lambda: now[0]) as counter:
        counter.update(100)
    monkeypatch.setattr(progress, "_mode", progress.QUIET)
    with progress.Counter(100, "hushed", every=1, clock=lambda: now[0]) as counter:
        for _ in range(10):
            now[0] += 5
            counter.update(10)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- UI links

def _printed_links(output: str) -> dict[str, str]:
    block = output[output.index("then, in the UI's model-training view:"):]
    return dict(re.findall(r"^  (\S.*?)\s{2,}(http\S+)$", block, re.M))


def test_printed_links_open_the_session_in_model_training_mode(tuned):
    client, experiment, parent = _session(tuned)
    printed = _printed_links(tuned.output)
    assert set(printed) == {"session runs", "chart comparison", "parent run", "session figures", "model version"}
    exp, run = experiment.experiment_id, parent.info.run_id
    for label, url in printed.items():
        parts = urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}" == links.DEFAULT_UI
        route = urlsplit(parts.fragment)  # the UI routes with a hash: /#/experiments/1/runs?...
        query = parse_qs(route.query)
        assert query["workflowType"] == ["machine_learning"], label
        if label != "model version":
            assert route.path.startswith(f"/experiments/{exp}/runs"), label
    for label in ("session runs", "chart comparison"):
        query = parse_qs(urlsplit(urlsplit(printed[label]).fragment).query)
        assert query["searchFilter"] == [f"tags.`mlflow.parentRunId` = '{run}'"]
        assert query["orderByKey"] == ["tags.`mlflow.runName`"]  # any sort but start time: trials flat
        assert runs_matching(client, exp, query["searchFilter"][0]) >= 5  # 4 trials and the ensemble
    assert parse_qs(urlsplit(urlsplit(printed["chart comparison"]).fragment).query)["compareRunsMode"] == ["CHART"]
    assert urlsplit(urlsplit(printed["parent run"]).fragment).path == f"/experiments/{exp}/runs/{run}"
    figure = unquote(urlsplit(urlsplit(printed["session figures"]).fragment).path)
    assert figure == f"/experiments/{exp}/runs/{run}/artifacts/{M.EPOCH_CURVES_PNG}"
    version = client.get_model_version_by_alias(tuned.model_name, "challenger").version
    assert urlsplit(urlsplit(printed["model version"]).fragment).path == \
        f"/models/{tuned.model_name}/versions/{version}"


def runs_matching(client, experiment_id: str, search_filter: str) -> int:
    return len(client.search_runs([experiment_id], filter_string=search_filter, max_results=100))


def test_ui_base_follows_the_tracking_uri_and_the_override(monkeypatch):
    monkeypatch.delenv(links.UI_ENV, raising=False)
    assert links.ui_base("sqlite:///mlflow.db") == "http://127.0.0.1:5000"
    assert links.ui_base("https://tracker:s3cret@mlflow.example:8443/base/") == "https://mlflow.example:8443/base"
    monkeypatch.setenv(links.UI_ENV, "http://127.0.0.1:5055/")
    assert links.ui_base("http://other:5000") == "http://127.0.0.1:5055"
    url = links.model_version(links.ui_base(), "my model", "3")
    assert url == "http://127.0.0.1:5055/#/models/my%20model/versions/3?workflowType=machine_learning"


# ----------------------------------------------------------------------------- figures and warnings

def test_the_parent_run_holds_the_session_figures_as_png(tuned, tmp_path):
    client, _, parent = _session(tuned)
    stored = {a.path for a in client.list_artifacts(parent.info.run_id, M.FIGURES_DIR)}
    wanted = {M.EPOCH_CURVES_PNG, M.PARAMS_PNG, M.SESSION_WEIGHT_CURVE_PNG}
    assert wanted <= stored, stored
    for path in sorted(wanted):
        local = client.download_artifacts(parent.info.run_id, path, str(tmp_path))
        with Image.open(local) as image:
            assert image.format == "PNG"
            assert image.width >= 500 and image.height >= 300, (path, image.size)
            assert len(image.convert("L").getcolors(1 << 16) or []) > 20, f"{path} is blank"
    # Optuna's HTML figures are still there beside them.
    assert client.list_artifacts(parent.info.run_id, "optuna/cnn_v1")


def test_a_tune_prints_only_its_own_lines(tuned):
    """The session ran with PYTHONWARNINGS=default (deprecations our code triggers show too): no Python
    warning (MLflow's "add type hints to predict", the pandas and SQLAlchemy deprecations MLflow trips
    over when we call it), no MLflow INFO line (a store's tables created, an input example validated:
    its bookkeeping, hidden unless MLFLOW_LOGGING_LEVEL asks), no other library's log line or notice.
    The `mlflow run` launcher's own lines (mlflow.projects, before our process starts) are MLflow's."""
    found = third_party_lines(drop_launcher_lines(tuned.output))
    assert not found, [(kind_of(line), line) for line in found]
    assert "[3/3] registration" in tuned.output  # the session's own lines are still there


# ----------------------------------------------------------------------------- every command, quietly

THIRD_PARTY = [
    "/x/site-packages/sklearn/svm/_base.py:236: FutureWarning: The `probability` parameter was deprecated in 1.9",
    "/x/site-packages/mlflow/store/tracking/sqlalchemy_store.py:356: SADeprecationWarning: The ``noload`` loader",
    "UserWarning: The given NumPy array is not writable",
    "2026/12/07 16:51:13 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
    "2026/12/07 16:51:13 WARNING mlflow.models.model: Input example should be provided",
    "INFO  [alembic.runtime.migration] Context impl SQLiteImpl.",
    "INFO:alembic.runtime.migration:Will assume non-transactional DDL.",
    "WARNING:root:something",
    "WARNING urllib3.connectionpool: Retrying (Retry(total=4)) after connection broken",
    "[I 2026-12-07 16:51:13,123] Trial 0 finished with value: 0.2 and parameters: {}.",
    "[W 2026-12-07 16:51:13,123] Trial 1 failed with parameters: {}",
    "[W1207 16:51:13.123456 1234 torch/csrc/utils/tensor_numpy.cpp:206] Warning: The given NumPy array",
    "[W NNPACK.cpp:64] Could not initialize NNPACK! Reason: Unsupported hardware.",
    "E1207 16:51:13.123456  1234 ProfilerController.cpp:71] failed",
    "ERROR:2026-12-07 16:51:13 1234:1234 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35",
    "USDT: profiler_start",
    "STAGE:2026-12-07 16:51:13 1234:1234 ActivityProfilerController.cpp:312] Completed Stage: Warm Up",
    "Traceback (most recent call last):",
    '  File "/x/pipeline/cli/__init__.py", line 12, in main',
    "Successfully registered model 'deepfake-ensemble'.",
    "Registered model 'deepfake-ensemble' already exists. Creating a new version of this model...",
    "Created version '3' of model 'deepfake-ensemble'.",
]

OURS = [  # the commands' own lines (README "Progress and output"), which must never match
    "speed of cnn_v1: 41 training images/s, 134 evaluated images/s",
    "plan for a 10.0-minute budget (11 s of set-up spent, 45 s kept for ensemble, audit and registration):",
    "  why: chose one member with the whole time: cnn_v1 ~8.7 passes",
    "[1/3] member studies: no search, then final runs of cnn_v1; 2500 training images, linear schedule",
    "cnn_v1 #0 final epoch 13 loss 0.886 val 64.6% best 64.6% lr 0.0015 45 img/s",
    "cnn_v1 #0 final COMPLETE selection accuracy 82.8%, 9m02s",
    "cnn_v2 #1 PRUNED at epoch 1 (best 20.0% at epoch 1)",
    "[3/3] registration: cnn_v1#0 + cnn_v1#0 as a new version of deepfake-ensemble",
    "train cnn_v1 epoch 2/4 loss 1.2 val 40.0% best 40.0% lr 0.001 300 img/s",
    "predict test: 2600/6500 img (40%), 410 img/s, ~16s left",
    "          registered as version 1 (alias @challenger)",
    "promoted deepfake-ensemble v1 to @champion (no champion yet)",
    "error: dataset root data/x does not exist or is not a directory",
    "warning: the selection split has 5 images: its accuracy moves in steps of 20 points",
    "cache     /tmp/cache/train-e40d8b2a246c3066a0efded8.npy (written)",
    "ceiling: matmul 2048^3 fp32 106.4 GFLOP/s, bf16 447.9 GFLOP/s",
    "  session runs      http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning",
    "run 49b556c96d724ee685e378b0c2e8520f: best_val_accuracy=0.22, best_epoch=1, epochs_run=1",
]


def test_the_checker_finds_library_lines_and_none_of_ours():
    assert third_party_lines("\n".join(THIRD_PARTY)) == THIRD_PARTY
    assert all(kind_of(line) for line in THIRD_PARTY)
    assert third_party_lines("\n".join(OURS)) == []
    launched = "\n".join([
        "2026/12/07 16:51:13 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
        "2026/12/07 16:51:16 INFO mlflow.projects: 'deepfake' does not exist. Creating a new experiment",
        "2026/12/07 16:51:16 INFO mlflow.projects.backend.local: === Running command 'python -m pipeline "
        "tune' in run with ID 'abc' === ",
        "tuning session tiny: parent run abc",
        "2026/12/07 16:51:20 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
        "2026/12/07 16:52:09 INFO mlflow.projects: === Run (ID 'abc') succeeded ===",
    ])
    # Before our command starts, the launcher's; after, only its mlflow.projects lines.
    assert third_party_lines(without_launcher(launched)) == [
        "2026/12/07 16:51:20 INFO mlflow.store.db.utils: Creating initial MLflow database tables..."]
    assert "tuning session tiny" in without_launcher(launched)


def test_registration_notices_are_hushed_and_progress_is_not(capsys, monkeypatch):
    """MLflow print()s "Successfully registered model ..." when the ensemble registers: the session's
    own registration line says it; hushed() drops those lines and nothing else (quiet: everything)."""
    from mlflow.utils.logging_utils import eprint

    monkeypatch.setattr(progress, "_mode", progress.LINES)
    with progress.hushed():
        eprint("Successfully registered model 'deepfake-ensemble'.")
        progress.say("[3/3] registration: a + b")
        eprint("Created version '1' of model 'deepfake-ensemble'.")
        print("partial", end="", file=sys.stderr)
        print(" line", file=sys.stderr)
    assert capsys.readouterr().err == "[3/3] registration: a + b\npartial line\n"
    monkeypatch.setattr(progress, "_mode", progress.QUIET)
    with progress.hushed():
        print("anything", file=sys.stderr)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("per_class", [3, 8])
def test_the_baseline_svm_gives_probabilities_without_a_warning(per_class):
    """scikit-learn 1.9 deprecates SVC(probability=True) with a FutureWarning naming its replacement:
    the baseline uses that (Platt scaling on out-of-fold decision values, the SVM refitted on all), with
    fewer folds when a class has fewer than 5 images."""
    import warnings

    import numpy as np

    from pipeline.commands.baseline_command import fit_svm

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), per_class)
    x = (rng.normal(size=(len(y), 12)) + y[:, None]).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = fit_svm(x, y, c=10.0, seed=0)
        probs = model.predict_proba(x)
    assert probs.shape == (len(y), 3) and np.allclose(probs.sum(1), 1)
    assert (probs.argmax(1) == y).mean() > 0.6
    assert np.array_equal(probs, fit_svm(x, y, c=10.0, seed=0).predict_proba(x))  # the seed fixes the folds


def _copy_of_the_checkout(dest: Path) -> Path:
    """What a command needs from a fresh clone (the package, presets, MLproject): commands run in it
    with their default relative paths (data/tiny, ./mlflow.db, ./optuna.db) and nothing lands in the
    real checkout."""
    for name in ("pipeline", "experiments"):
        shutil.copytree(PROJECT_DIR / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("MLproject", "conda.yaml", "pyproject.toml"):
        shutil.copy2(PROJECT_DIR / name, dest / name)
    return dest


# The documented commands at toy size, in the order a new user meets them, from a fresh copy of the
# checkout. `tune` and `make demo` (`mlflow run . -e tune ... -P config=demo`, minutes) are the `tuned`
# session: the same launcher and entry point with the tiny preset (test_a_tune_prints_only_its_own_lines);
# tests/test_readme_commands.py runs make demo's own recipe at toy size too.
COMMANDS = [
    ["data", "synth", "--out", "data/tiny", "--preset", "tiny", "--seed", "0"],
    ["data", "inspect", "--data", "data/tiny"],
    ["train", "--config", "tiny", "--arch", "cnn_v1", "--data", "data/tiny", "--epochs", "1"],  # creates ./mlflow.db
    ["baseline", "--data", "data/tiny"],
    ["bench", "--config", "tiny", "--data", "data/tiny", "--skip", "reference,ours,inference,search"],
    ["mlflow", "run", ".", "-e", "data", "--env-manager", "local", "-P", "action=inspect", "-P", "data=data/tiny"],
]
AFTER_A_SESSION = [  # on a copy of the `tuned` session's store, which holds a registered ensemble
    ["promote", "--data", "{data}"],
    ["predict", "--data", "{data}", "--out", "submission.csv"],
]


def _own_lines_only(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    name = " ".join(cmd[2:5] if cmd[0] == sys.executable else cmd[:5])
    assert proc.returncode == 0, (name, proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.stdout.strip(), f"{name}: no result on stdout"
    stderr = without_launcher(proc.stderr) if cmd[:2] == ["mlflow", "run"] else proc.stderr
    found = third_party_lines(proc.stdout + stderr)
    assert not found, (name, [(kind_of(line), line) for line in found])


@pytest.mark.slow
def test_every_command_prints_only_its_own_lines(tuned, tmp_path):
    """~70 s: each command in a fresh copy of the checkout, one after another, with the default
    stores (./mlflow.db does not exist until `train`: creating a store is when MLflow and alembic speak),
    output to pipes, PYTHONWARNINGS=default: stdout and stderr hold the command's own lines and no
    library's (sklearn's SVC(probability=True) FutureWarning in `baseline`, MLflow's store set-up...)."""
    checkout = _copy_of_the_checkout(tmp_path / "deepfake-tune")
    env = cli_env(checkout, PYTHONWARNINGS="default")  # MLFLOW_TRACKING_URI: ./mlflow.db, the default
    env.pop("MLFLOW_LOGGING_LEVEL", None)  # as a person's shell has it (an in-process CLI test may have set it here)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # as `. .venv/bin/activate`
    for args in COMMANDS:
        assert (checkout / "mlflow.db").exists() == (args[0] not in ("data", "train")), args
        _own_lines_only(args if args[0] == "mlflow" else [sys.executable, "-m", "pipeline", *args], checkout, env)
    session = seed_store(tuned.workdir / "mlflow.db", tmp_path / "session")
    for args in AFTER_A_SESSION:
        _own_lines_only([sys.executable, "-m", "pipeline", *[a.format(data=tuned.data) for a in args]], checkout,
                        {**env, "MLFLOW_TRACKING_URI": session})
    assert (checkout / "submission.csv").exists()
