"""`tune` end to end: member studies, nested runs, trials in threads, pruning, the ensemble run and
the registered pyfunc model. Most tests read the session fixture ``tuned`` (one ``mlflow run . -e
tune``); pruning and lost-worker bookkeeping run in this process on their own small stores."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from conftest import make_learnable
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from PIL import Image
from workers import load_trials, write_preset

from pipeline import metrics as M
from pipeline.config import Choice, DataConfig, ModelConfig, Range, SearchSpace, TrainConfig
from pipeline.config.space import default_space
from pipeline.ensemble.evidence import PROCEDURES
from pipeline.ensemble.rules import RULES
from pipeline.tune import suggest
from pipeline.tune.workers import run_search

pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")]


def test_suggest_returns_plain_configs_within_the_space():
    space = SearchSpace.of({"train.lr": Range(1e-4, 3e-3, log=True), "train.batch_size": Choice((16, 32)),
                            "model.dropout_features": Range(0.1, 0.5), "model.dropout_fc": Range(0.25, 0.6),
                            "train.weight_decay": Range(1e-6, 1e-3, log=True),
                            "train.label_smoothing": Range(0.0, 0.1), "data.augment": Choice(("geometric", "color"))})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        model, train, data = suggest(trial, space, ModelConfig(arch="cnn_v2"), TrainConfig(), DataConfig())
        assert isinstance(model, ModelConfig) and isinstance(train, TrainConfig) and isinstance(data, DataConfig)
        assert 1e-4 <= train.lr <= 3e-3 and train.batch_size in (16, 32)
        assert 0.1 <= model.dropout_features <= 0.5 and 0.25 <= model.dropout_fc <= 0.6
        assert 0.0 <= train.label_smoothing <= 0.1 and data.augment in ("geometric", "color")
        study.tell(trial, 0.0)
    # vgg16 has no feature dropout: the space must not hand it one.
    model, _, _ = suggest(optuna.trial.FixedTrial({"lr": 1e-3, "batch_size": 16, "dropout_fc": 0.3,
                                                   "weight_decay": 1e-5}),
                          default_space(), ModelConfig(arch="vgg16"), TrainConfig(), DataConfig())
    assert model.dropout_features is None and model.dropout_fc == 0.3


def _challenger(tuned, monkeypatch):
    """The tuned session's @challenger version, which carries every tag promote and predict rely on."""
    tuned.use(monkeypatch)
    client = _client(tuned)
    version = client.get_model_version_by_alias("deepfake-ensemble", "challenger")
    tags = version.tags
    for key in ("member_a_run_id", "member_b_run_id", "weight", "method", "tta_a", "temperature_a",
                M.SELECTION_ACCURACY, M.AUDIT_ACCURACY, f"{M.AUDIT_ACCURACY}_low", M.AUDIT_ECE, "dataset_digest",
                "audit_split"):
        assert key in tags, key
    return client, version, tags


def _client(tuned) -> MlflowClient:
    return MlflowClient(tracking_uri=tuned.tracking_uri, registry_uri=tuned.tracking_uri)


def _runs(tuned):
    client = _client(tuned)
    experiment = client.get_experiment_by_name("deepfake")
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def _studies(tuned) -> dict[str, optuna.Study]:
    storage = optuna.storages.RDBStorage(tuned.storage)
    return {arch: optuna.load_study(study_name=f"e2e.{arch}", storage=storage) for arch in ("cnn_v1", "cnn_v2")}


def test_tune_under_mlflow_run_logs_one_parent_with_nested_trials(tuned):
    client, runs = _runs(tuned)
    # `mlflow run . -e tune`: the launcher's run is the session's parent, not an empty run beside it.
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(top) == 1
    parent = top[0]
    assert parent.data.tags["kind"] == "tune-session"
    assert parent.data.tags["mlflow.source.type"] == "PROJECT"
    assert parent.data.tags["mlflow.project.entryPoint"] == "tune"
    assert parent.info.status == "FINISHED"
    assert parent.data.params["n_jobs"] == "2"  # the launcher's entry-point parameter ...
    assert parent.data.params["session.study"] == "e2e"  # ... and the session's own, side by side
    assert parent.data.params["session.trials_per_member"] == "2"
    assert parent.data.params["session.storage"].endswith("optuna.db")
    assert "e2e.cnn_v1" in parent.data.params["session.member_studies"]
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna/cnn_v1")}
    assert "optuna/cnn_v1/optimization_history.html" in parent_artifacts
    assert "optuna/cnn_v1/intermediate_values.html" in parent_artifacts

    trials = [r for r in runs if r.data.tags.get("kind") == "trial"]
    assert len(trials) == 4  # 2 members x 2 trials
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    for arch, study in _studies(tuned).items():
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
        runs_of = [client.get_run(t.user_attrs["mlflow_run_id"]) for t in study.trials]  # trial -> run
        # n_jobs 2: the member's two trials ran at the same time, in two threads.
        assert max(r.info.start_time for r in runs_of) < min(r.info.end_time for r in runs_of)
        for t, run in zip(study.trials, runs_of, strict=True):
            assert run.data.tags["optuna.study"] == f"e2e.{arch}"  # run -> trial
            assert run.data.tags["optuna.trial"] == str(t.number)
            assert run.info.status == "FINISHED"
            assert run.data.metrics[M.BEST_VAL_ACCURACY] == pytest.approx(t.value)
            assert [m.step for m in client.get_metric_history(run.info.run_id, M.VAL_ACCURACY)] == [1, 2]
            paths = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {M.CONFUSION_PNG, M.CONFUSION_JSON, M.REPORT_JSON, "checkpoints", "predictions"} <= paths
            assert "optuna.lr" in run.data.params and run.data.params["train.seed"] == str(t.number)

    # The UI's Description of the session: its plan (no time budget: the preset's search), then its outcome,
    # each figure named for the images it was measured on.
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("**Plan**: search cnn_v1, cnn_v2, 2 finished trials each (at most 2 epochs a trial")
    assert "deepfake-ensemble version 1 (@challenger)" in note
    figures = parent.data.metrics
    assert f"- selection accuracy {100 * figures[M.SELECTION_ACCURACY]:.2f}%: in-sample" in note
    assert f"- audit accuracy {100 * figures[M.AUDIT_ACCURACY]:.2f}% (95% interval" in note
    for arch in ("cnn_v1", "cnn_v2"):
        assert f"{arch} {100 * figures[f'{arch}_best_val_accuracy']:.2f}% (trial" in note
    # The runs table's Dataset column: every trial run links the session's dataset, as the parent does.
    (dataset,) = [d.dataset for d in client.get_run(parent.info.run_id).inputs.dataset_inputs]
    for run in trials:
        inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
        assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [(dataset.name, dataset.digest)]
        assert [(t.key, t.value) for t in inputs[0].tags] == [("mlflow.data.context", "training")]


def test_trials_in_threads_match_their_configuration_trained_alone(tuned, tmp_path):
    """Each member's trials ran two at a time in threads; each gives exactly (fp32, CPU) what its
    configuration, read back from its checkpoint, gives when trained alone in this process: the
    threads took nothing from each other's shuffling, augmentation, dropout or initial weights."""
    from pipeline.config import data_from_dict, model_from_dict, train_from_dict
    from pipeline.data import load_dataset
    from pipeline.train import build_and_fit
    from pipeline.train.checkpoint import load_checkpoint

    client = _client(tuned)
    for t in _studies(tuned)["cnn_v1"].trials[:1]:  # its sibling ran beside it; cnn_v2's cost 4x more to repeat
        run_id = t.user_attrs["mlflow_run_id"]
        ckpt = load_checkpoint(client.download_artifacts(run_id, M.CHECKPOINT_ARTIFACT, str(tmp_path / run_id)))
        data_cfg = data_from_dict(ckpt["data"])
        assert data_cfg.augment == "geometric" and ckpt["model"]["dropout_fc"] > 0  # random paths in play
        alone = build_and_fit(model_from_dict(ckpt["model"]), load_dataset(data_cfg), data_cfg,
                              train_from_dict(ckpt["train"]))
        assert alone.best_val_accuracy == t.value
        logged = [m.value for m in sorted(client.get_metric_history(run_id, M.TRAIN_LOSS), key=lambda m: m.step)]
        assert [h[M.TRAIN_LOSS] for h in alone.history] == logged


def test_tune_logs_the_ensemble_run_over_every_pair_and_rule(tuned, tmp_path):
    client, runs = _runs(tuned)
    ensembles = [r for r in runs if r.data.tags.get("kind") == "ensemble"]
    assert len(ensembles) == 1
    run = ensembles[0]
    assert run.info.status == "FINISHED"
    for key in ("member_a_run_id", "member_b_run_id", "weight", "method", "tta_a", "tta_b", "temperature_a"):
        assert key in run.data.params
    assert run.data.params["method"] in RULES  # ensemble_method best: the search picked one of them
    metrics = run.data.metrics
    studies = _studies(tuned)
    run_ids = {arch: {t.user_attrs["mlflow_run_id"]: t.value for t in study.trials} for arch, study in studies.items()}
    members = {run.data.params["member_a_run_id"], run.data.params["member_b_run_id"]}
    # The choice is a procedure scored out of fold: the equal-weight pair unless another beats it by its noise.
    procedure = run.data.params["procedure"]
    assert procedure in PROCEDURES
    assert {M.crossfit_metric(p) for p in PROCEDURES} <= set(metrics)
    assert run.data.tags["ensemble_decision"].startswith("cross-fitted selection accuracy")
    if procedure == "single":
        assert len(members) == 1 and run.data.params["ensemble_kind"].startswith("single member")
    else:
        assert len(members & set(run_ids["cnn_v1"])) == 1 and len(members & set(run_ids["cnn_v2"])) == 1
    if procedure == "equal":
        assert float(run.data.params["weight"]) == 0.5 and run.data.params["method"] == "soft"
    # The member accuracies it reports are those trials' own (selection) accuracies.
    everyone = {**run_ids["cnn_v1"], **run_ids["cnn_v2"]}
    assert metrics[M.MEMBER_A_SELECTION_ACCURACY] == pytest.approx(everyone[run.data.params["member_a_run_id"]])
    assert metrics[M.MEMBER_B_SELECTION_ACCURACY] == pytest.approx(everyone[run.data.params["member_b_run_id"]])
    # The searched combination never loses accuracy against the better member (weights 0 and 1 are candidates).
    if procedure == "searched":
        assert metrics[M.SELECTION_ACCURACY] >= max(metrics[M.MEMBER_A_SELECTION_ACCURACY],
                                                    metrics[M.MEMBER_B_SELECTION_ACCURACY])
    # Its in-sample accuracy is that of the predictions it logged.
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "ensemble")))
    stored = np.load(local / M.PREDICTIONS_ARTIFACT)
    assert metrics[M.SELECTION_ACCURACY] == pytest.approx(float((stored["probs"].argmax(1) == stored["labels"]).mean()))
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.metrics[M.SELECTION_ACCURACY] == metrics[M.SELECTION_ACCURACY]
    # The session's dataset in its Dataset column: the ensemble chose on its selection split.
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert [d.dataset.digest for d in inputs] == [parent.data.tags["dataset_digest"]]
    assert [(t.key, t.value) for t in inputs[0].tags] == [("mlflow.data.context", "validation")]
    # The synthetic test split is labelled, so it is the audit split: 50 images no choice read.
    assert metrics[M.AUDIT_IMAGES] == 50 and run.data.tags["audit_source"] == "test"
    assert parent.data.metrics[M.AUDIT_ACCURACY] == metrics[M.AUDIT_ACCURACY]
    for name in M.AUDIT_FIGURES:
        assert metrics[f"{name}_low"] <= metrics[name] <= metrics[f"{name}_high"], name
    assert metrics[f"{M.AUDIT_ACCURACY}_high"] - metrics[f"{M.AUDIT_ACCURACY}_low"] > 0.1  # 50 images: wide
    assert {"weight_curve.png", "reliability_audit.png", "reliability_selection.png", "best_pairs.json",
            M.CONFUSION_PNG, M.REPORT_JSON, "audit"} <= {p.name for p in local.iterdir()}
    # top_k 2 per member: 2 x 2 cross-member pairs, each under both rules and both test-time variants
    # of each member, one row each (its best weight; none when every weight loses accuracy against the
    # better member, which a plain pair at weight 0 or 1 never does).
    pairs = json.loads((local / "best_pairs.json").read_text())
    combos = [(frozenset((r["member_a_run_id"], r["member_b_run_id"])), r["method"], r["tta_a"], r["tta_b"])
              for r in pairs]
    assert len(set(combos)) == len(combos) <= 8 * 4
    plain = {(pair, rule) for pair, rule, ta, tb in combos if ta == tb == "none"}
    expected = {(frozenset((a, b)), rule) for a in run_ids["cnn_v1"] for b in run_ids["cnn_v2"] for rule in RULES}
    assert plain == expected
    if procedure == "searched":  # the searched combination is the search's first row
        chosen = pairs[0]
        assert chosen["weight"] == pytest.approx(float(run.data.params["weight"]))
        assert chosen["selection_accuracy"] == pytest.approx(metrics[M.SELECTION_ACCURACY])


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _member(logits: np.ndarray, flipped: np.ndarray, tta: str, temperature: float) -> np.ndarray:
    """A member as the README states it: its test-time variant, then its temperature."""
    logp = _log_softmax(logits)
    if tta == "hflip":
        logp = np.log((np.exp(logp) + np.exp(_log_softmax(flipped))) / 2)
    return np.exp(_log_softmax(logp / temperature))


def test_registered_model_serves_what_was_searched(tuned, tmp_path, monkeypatch):
    """The registered model, fed the validation PNG bytes, returns the ensemble of the two members'
    stored validation logits (temperatures, test-time flips, weight and rule from the version),
    computed here with numpy alone."""
    import mlflow.pyfunc

    from pipeline.data.layout import index_dataset

    client, version, tags = _challenger(tuned, monkeypatch)
    model = mlflow.pyfunc.load_model("models:/deepfake-ensemble@challenger")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["image"]
    # Served where it is loaded: CUDA on a GPU host, the CPU on this one, no device named at load time.
    assert model.metadata.flavors["python_function"]["config"]["device"] == "auto"  # as stored in MLmodel
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert model.unwrap_python_model().device.type == expected
    members = []
    for side in ("a", "b"):
        npz = np.load(client.download_artifacts(tags[f"member_{side}_run_id"], M.PREDICTIONS_ARTIFACT,
                                                str(tmp_path / side)))
        members.append(_member(npz["logits"], npz["logits_flipped"], tags[f"tta_{side}"],
                               float(tags[f"temperature_{side}"])))
        ids = list(npz["ids"])
    expected = _vote(tags["method"], float(tags["weight"]), *members)

    index = index_dataset(tuned.data)
    paths = dict(zip(index.splits["validation"].ids, index.splits["validation"].paths, strict=True))
    out = model.predict(pd.DataFrame({"image": [paths[i].read_bytes() for i in ids]}))
    assert list(out.columns) == ["label", *[f"prob_{i}" for i in range(5)]]
    probs = out[[f"prob_{i}" for i in range(5)]].to_numpy()
    np.testing.assert_allclose(probs, expected, atol=2e-5)
    assert (out["label"].to_numpy() == probs.argmax(1)).all()


def _png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def _encoded(image: np.ndarray, fmt: str, size: int | None = None) -> bytes:
    picture = Image.fromarray(image)
    if size is not None:
        picture = picture.resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    picture.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _vote(method: str, w: float, p_a: np.ndarray, p_b: np.ndarray) -> np.ndarray:
    """The two voting rules as the README states them, written out here."""
    if method == "soft":
        return w * p_a + (1 - w) * p_b
    c_a = w * p_a.max(1, keepdims=True)
    c_b = (1 - w) * p_b.max(1, keepdims=True)
    return (c_a * p_a + c_b * p_b) / (c_a + c_b)


def test_registered_model_votes_its_members_and_resizes_any_png_or_jpeg(tuned, tmp_path, monkeypatch):
    import mlflow.pyfunc
    from torchvision.io import decode_image
    from torchvision.transforms.v2 import functional as F

    from pipeline.data.layout import index_dataset
    from pipeline.train.checkpoint import load_checkpoint, model_from_checkpoint

    client, version, tags = _challenger(tuned, monkeypatch)
    assert tags["method"] in RULES
    model = mlflow.pyfunc.load_model("models:/deepfake-ensemble@challenger", model_config={"precision": "fp32"})
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["image"]
    paths = list(index_dataset(tuned.data).splits["validation"].paths[:6])
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    assert pixels[0].shape == (32, 32, 3)  # the members were trained at 32 px
    # As stored (PNG, 32 px), PNG at 24 and 48 px, and JPEG: the model decodes and resizes itself.
    blobs = ([_png_bytes(p) for p in paths[:3]] + [_encoded(pixels[3], "PNG", 24), _encoded(pixels[4], "PNG", 48)]
             + [_encoded(pixels[5], "JPEG")])
    out = model.predict(pd.DataFrame({"image": blobs}))
    assert list(out.columns) == ["label", *[f"prob_{i}" for i in range(5)]]
    probs = out[[f"prob_{i}" for i in range(5)]].to_numpy()
    assert (out["label"].to_numpy() == probs.argmax(1)).all()

    # The members' own outputs, from their checkpoints, with plain torch on the images decoded and
    # resized by torchvision (none of the model's own preprocessing code).
    decoded = [decode_image(torch.frombuffer(bytearray(b), dtype=torch.uint8)) for b in blobs]
    assert [tuple(d.shape[-2:]) for d in decoded] == [(32, 32)] * 3 + [(24, 24), (48, 48), (32, 32)]
    resized = torch.stack([F.resize(d, [32, 32], antialias=True) for d in decoded])
    member_probs, unresized = [], []
    for side in ("a", "b"):
        net, data_cfg = model_from_checkpoint(load_checkpoint(
            client.download_artifacts(tags[f"member_{side}_run_id"], M.CHECKPOINT_ARTIFACT, str(tmp_path / side))))
        assert data_cfg.normalize == "half"  # the tiny preset's: x / 255 scaled to [-1, 1]
        tta, temperature = tags[f"tta_{side}"], float(tags[f"temperature_{side}"])
        with torch.no_grad():
            def logits(x: torch.Tensor, net: torch.nn.Module = net) -> np.ndarray:
                return net((x.float() / 255 - 0.5) / 0.5).numpy()

            member_probs.append(_member(logits(resized), logits(resized.flip(-1)), tta, temperature))
            one = decoded[3][None]
            unresized.append(_member(logits(one), logits(one.flip(-1)), tta, temperature))
    expected = _vote(tags["method"], float(tags["weight"]), *member_probs)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    # The 24 px image really went through the resize: fed as is, the networks answer otherwise.
    assert not np.allclose(probs[3], _vote(tags["method"], float(tags["weight"]), *unresized)[0], atol=1e-3)


def test_second_tune_on_a_finished_study_adds_no_trials(tuned, monkeypatch, capsys):
    import signal

    from pipeline.cli import main

    before = {arch: len(study.trials) for arch, study in _studies(tuned).items()}
    tuned.use(monkeypatch)
    monkeypatch.chdir(tuned.workdir)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["tune", "--config", "tiny", "--data", str(tuned.data), "--study", "e2e", "--storage",
                     tuned.storage, "--no-progress"]) == 0
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert {arch: len(study.trials) for arch, study in _studies(tuned).items()} == before
    assert "already registered" in capsys.readouterr().out
    assert len(_client(tuned).search_model_versions("name='deepfake-ensemble'")) == 1
    # The parent's Description still tells the outcome of the session that registered it.
    parent = _client(tuned).get_run(_studies(tuned)["cnn_v1"].user_attrs["mlflow_parent_run_id"])
    assert "deepfake-ensemble version 1 (@challenger)" in parent.data.tags["mlflow.note.content"]


def test_close_lost_runs_closes_a_finished_trials_run_its_worker_left_open(tuned, tmp_path, tracking_here):
    """A worker that died between telling its trial COMPLETE and closing the run leaves the run
    RUNNING; another worker closes it FINISHED, once the trial has been finished for a minute (a live
    worker closes its run within milliseconds). Time comes from an injectable clock."""
    from pipeline import tune
    from pipeline.config import load_preset
    from pipeline.tune.workers import close_lost_runs

    shutil.copy2(tuned.workdir / "optuna.db", tmp_path / "optuna.db")
    shutil.copy2(tuned.workdir / "mlflow.db", tmp_path / "mlflow.db")
    tracking_here(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    finished = load_trials(storage, "e2e.cnn_v1")[1]
    run_id = finished.user_attrs["mlflow_run_id"]
    client.update_run(run_id, status="RUNNING")  # as the dead worker left it
    preset = load_preset("tiny")
    session = tune.open_session(replace(preset, data=replace(preset.data, root=str(tuned.data))), "deepfake", "e2e",
                                storage)

    at = finished.datetime_complete
    assert close_lost_runs(session, "cnn_v1", now=lambda: at + timedelta(seconds=30)) == 0  # it may be closing
    assert client.get_run(run_id).info.status == "RUNNING"
    assert close_lost_runs(session, "cnn_v1", now=lambda: at + timedelta(minutes=2)) == 1
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
    assert "worker was lost after reporting its result" in run.data.tags["closed_by"]
    assert close_lost_runs(session, "cnn_v1", now=lambda: datetime.now() + timedelta(days=1)) == 0  # once


@pytest.fixture(scope="module")
def learnable_data(tmp_path_factory) -> Path:
    """Colour casts under noise: trials with a sane learning rate reach 0.8+ after one epoch."""
    return make_learnable(tmp_path_factory.mktemp("learnable"))


@pytest.mark.parametrize("pruner, expected", [("median", optuna.pruners.MedianPruner),
                                              ("hyperband", optuna.pruners.HyperbandPruner)])
def test_tune_prunes_a_hopeless_trial(pruner, expected, learnable_data, tmp_path, tracking_here):
    """The pruner a preset names is the member study's, fed by each epoch of each trial: after two
    ordinary trials, an enqueued trial that cannot learn (lr 1e-7) is pruned after its first epoch,
    its run KILLED with the epoch."""
    from pipeline import tune
    from pipeline.config import load_preset
    from pipeline.tune.trial import run_trial
    from pipeline.tune.workers import admit_trial

    preset = write_preset(tmp_path / "preset.yaml", learnable_data, trials=3, epochs=2, pruner=pruner,
                          pruner_warmup_epochs=1, space={"train.lr": {"low": 2e-3, "high": 4e-3, "log": True}})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    session = tune.open_session(load_preset(str(preset)), "deepfake", "prune", storage)
    study = session.studies["cnn_v1"]
    assert isinstance(study.pruner, expected)
    for _ in range(2):  # what the pruner compares with
        run_trial(session, "cnn_v1", admit_trial(session, "cnn_v1"))
    study.enqueue_trial({"lr": 1e-7})
    assert run_search(session)["PRUNED"] == 1
    trials = load_trials(storage, "prune.cnn_v1")
    hopeless = trials[2]
    assert trials[0].state == TrialState.COMPLETE and hopeless.params["lr"] == 1e-7
    assert hopeless.state == TrialState.PRUNED and sorted(hopeless.intermediate_values) == [1]
    client = MlflowClient()
    run = client.get_run(hopeless.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
    assert run.data.tags["optuna.state"] == "PRUNED" and run.data.tags["pruned_at_epoch"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, M.VAL_ACCURACY)] == [1]
