"""What a person sees: progress lines where there is no terminal (and none with --quiet), UI links
that open the session in the model-training view, the session's PNG figures, no warnings."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import optuna
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

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


def test_a_tune_prints_no_warnings(tuned):
    """No `...Warning:` line in the session's stdout and stderr, which ran with PYTHONWARNINGS=default
    (MLflow's "add type hints to predict", the pandas and SQLAlchemy deprecations MLflow trips over
    when we call it, and anything our own code triggers)."""
    found = re.findall(r"^.*\b\w*Warning\b.*$", tuned.output, re.M)
    assert not found, found


def test_a_tune_prints_no_mlflow_info_lines(tuned):
    """MLflow's INFO lines (a store's tables created, an input example validated) are its bookkeeping,
    not the session's progress: the command hides them unless MLFLOW_LOGGING_LEVEL asks. The `mlflow
    run` launcher's own lines (mlflow.projects, before our process starts) are MLflow's to print."""
    found = [line for line in tuned.output.splitlines()
             if re.search(r"\bINFO mlflow\.", line) and "INFO mlflow.projects" not in line]
    assert not found, found
    assert "[3/3] registration" in tuned.output  # the session's own lines are still there
