"""`tune` end to end: member studies, nested runs, the ensemble run and the registered pyfunc model."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from conftest import cli_env, run_cli
from mlflow.tracking import MlflowClient

from pipeline import metric_names as M
from pipeline.config import Choice, DataConfig, ModelConfig, Range, SearchSpace, TrainConfig
from pipeline.config.space import default_space
from pipeline.tune import suggest


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


def _client(tuned) -> MlflowClient:
    return MlflowClient(tracking_uri=tuned.tracking_uri, registry_uri=tuned.tracking_uri)


def _runs(tuned):
    client = _client(tuned)
    experiment = client.get_experiment_by_name("deepfake")
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def test_tune_logs_one_parent_with_nested_trials(tuned):
    client, runs = _runs(tuned)
    parents = [r for r in runs if r.data.tags.get("kind") == "tune-session"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["session.study"] == "e2e"
    assert parent.data.params["session.trials_per_member"] == "2"
    assert parent.data.params["session.storage"].endswith("optuna.db")
    assert "e2e.cnn_v1" in parent.data.params["session.member_studies"]
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna/cnn_v1")}
    assert "optuna/cnn_v1/optimization_history.html" in parent_artifacts
    assert "optuna/cnn_v1/intermediate_values.html" in parent_artifacts

    trials = [r for r in runs if r.data.tags.get("kind") == "trial"]
    assert len(trials) == 4  # 2 members x 2 trials
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    storage = optuna.storages.RDBStorage(tuned.storage)
    for arch in ("cnn_v1", "cnn_v2"):
        study = optuna.load_study(study_name=f"e2e.{arch}", storage=storage)
        states = sorted(t.state.name for t in study.trials)
        assert states == ["COMPLETE", "PRUNED"], states  # the "always" pruner prunes the second trial
        for t in study.trials:
            run = client.get_run(t.user_attrs["mlflow_run_id"])  # trial -> run
            assert run.data.tags["optuna.study"] == f"e2e.{arch}"  # run -> trial
            assert run.data.tags["optuna.trial"] == str(t.number)
            if t.state.name == "COMPLETE":
                assert run.info.status == "FINISHED"
                assert run.data.metrics[M.BEST_VAL_ACCURACY] == pytest.approx(t.value)
                assert [m.step for m in client.get_metric_history(run.info.run_id, M.VAL_ACCURACY)] == [1, 2]
                paths = {a.path for a in client.list_artifacts(run.info.run_id)}
                assert {M.CONFUSION_PNG, M.CONFUSION_JSON, M.REPORT_JSON, "checkpoints", "predictions"} <= paths
                assert "optuna.lr" in run.data.params and "train.lr" in run.data.params
            else:
                assert run.info.status == "KILLED"
                assert run.data.tags["optuna.state"] == "PRUNED"
                assert run.data.tags["pruned_at_epoch"] == "1"


def test_tune_logs_the_ensemble_run(tuned):
    client, runs = _runs(tuned)
    ensembles = [r for r in runs if r.data.tags.get("kind") == "ensemble"]
    assert len(ensembles) == 1
    run = ensembles[0]
    assert run.info.status == "FINISHED"
    for key in ("member_a_run_id", "member_b_run_id", "weight", "method", "tta_a", "tta_b", "temperature_a"):
        assert key in run.data.params
    metrics = run.data.metrics
    # Weights 0 and 1 are candidates and a weight must not lose accuracy: never below the better member.
    assert metrics[M.SELECTION_ACCURACY] >= max(metrics[M.MEMBER_A_SELECTION_ACCURACY],
                                                metrics[M.MEMBER_B_SELECTION_ACCURACY])
    # The synthetic test split is labelled, so it is the audit split: 50 images no choice read.
    assert metrics[M.AUDIT_IMAGES] == 50 and run.data.tags["audit_source"] == "test"
    for name in M.AUDIT_FIGURES:
        assert metrics[f"{name}_low"] <= metrics[name] <= metrics[f"{name}_high"], name
    assert metrics[f"{M.AUDIT_ACCURACY}_high"] - metrics[f"{M.AUDIT_ACCURACY}_low"] > 0.1  # 50 images: wide
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"weight_curve.png", "reliability_audit.png", "reliability_selection.png", "best_pairs.json",
            M.CONFUSION_PNG, M.REPORT_JSON, "audit"} <= paths
    pairs = json.loads(Path(client.download_artifacts(run.info.run_id, "best_pairs.json",
                                                      str(tuned.workdir / "dl-pairs"))).read_text())
    chosen = pairs[0]
    assert chosen["weight"] == pytest.approx(float(run.data.params["weight"]))
    assert chosen["selection_accuracy"] == pytest.approx(metrics[M.SELECTION_ACCURACY])


def test_registered_model_serves_what_was_searched(tuned, tmp_path, monkeypatch):
    """The registered model, fed the validation PNG bytes, returns the ensemble of the two members'
    stored validation logits (temperatures, test-time flips, weight and rule from the version),
    computed here with numpy alone."""
    import mlflow.pyfunc

    from pipeline.data.layout import index_dataset

    tuned.use(monkeypatch)
    client = _client(tuned)
    version = client.get_model_version_by_alias("deepfake-ensemble", "challenger")
    tags = version.tags
    for key in ("member_a_run_id", "member_b_run_id", "weight", "method", "tta_a", "temperature_a",
                M.SELECTION_ACCURACY, M.AUDIT_ACCURACY, f"{M.AUDIT_ACCURACY}_low", M.AUDIT_ECE, "dataset_digest",
                "audit_split"):
        assert key in tags, key
    model = mlflow.pyfunc.load_model("models:/deepfake-ensemble@challenger")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["image"]

    def log_softmax(z):
        z = z.astype(np.float64) - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    members = []
    for side in ("a", "b"):
        npz = np.load(client.download_artifacts(tags[f"member_{side}_run_id"], M.PREDICTIONS_ARTIFACT,
                                                str(tmp_path / side)))
        logp = log_softmax(npz["logits"])
        if tags[f"tta_{side}"] == "hflip":
            logp = np.log((np.exp(logp) + np.exp(log_softmax(npz["logits_flipped"]))) / 2)
        members.append(np.exp(log_softmax(logp / float(tags[f"temperature_{side}"]))))
        ids = list(npz["ids"])
    w = float(tags["weight"])
    assert tags["method"] == "soft"  # the tiny preset's rule
    expected = w * members[0] + (1 - w) * members[1]

    index = index_dataset(tuned.data)
    paths = dict(zip(index.splits["validation"].ids, index.splits["validation"].paths))
    out = model.predict(pd.DataFrame({"image": [paths[i].read_bytes() for i in ids]}))
    assert list(out.columns) == ["label", *[f"prob_{i}" for i in range(5)]]
    probs = out[[f"prob_{i}" for i in range(5)]].to_numpy()
    np.testing.assert_allclose(probs, expected, atol=2e-5)
    assert (out["label"].to_numpy() == probs.argmax(1)).all()


def test_second_tune_on_a_finished_study_adds_no_trials(tuned):
    storage = optuna.storages.RDBStorage(tuned.storage)
    before = {a: len(optuna.load_study(study_name=f"e2e.{a}", storage=storage).trials) for a in ("cnn_v1", "cnn_v2")}
    proc = run_cli(["tune", "--config", "tiny", "--data", str(tuned.data), "--study", "e2e", "--pruner", "always",
                    "--storage", tuned.storage, "--no-progress"], tuned.workdir)
    after = {a: len(optuna.load_study(study_name=f"e2e.{a}", storage=storage).trials) for a in ("cnn_v1", "cnn_v2")}
    assert after == before
    assert "already registered" in proc.stdout
    client = _client(tuned)
    assert len(client.search_model_versions("name='deepfake-ensemble'")) == 1


@pytest.mark.slow
def test_two_concurrent_tune_processes_run_exactly_the_budget(tuned, tmp_path):
    """Two workers started together on one fresh SQLite storage share 3 trials of one member."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = [sys.executable, "-m", "pipeline", "tune", "--config", "tiny", "--data", str(tuned.data),
            "--study", "pair", "--members", "cnn_v1", "--trials", "3", "--epochs", "1", "--storage", storage,
            "--no-progress"]
    env = cli_env(tmp_path)
    workers = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = optuna.load_study(study_name="pair.cnn_v1", storage=storage)
    assert len(study.trials) == 3
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("deepfake").experiment_id])
    trial_runs = [r for r in runs if r.data.tags.get("kind") == "trial"]
    parents = {r.data.tags["mlflow.parentRunId"] for r in trial_runs}
    assert len(trial_runs) == 3 and len(parents) == 1
    assert parents == {study.user_attrs["mlflow_parent_run_id"]}
