"""The training loop, checkpoints, and the `train` / `baseline` commands read back through MlflowClient."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROJECT_DIR, cli_env, run_cli, write_csv, write_png

from pipeline import metric_names as M
from pipeline.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from pipeline.config import DataConfig, ModelConfig, TrainConfig
from pipeline.data import load_dataset
from pipeline.models import build_model
from pipeline.train import (DeviceError, class_weight_tensor, fit, predict_probs, resolve_device,
                            resolve_precision, seed_everything)

torch.set_num_threads(2)


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


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> Path:
    return make_learnable(tmp_path_factory.mktemp("learnable"))


def _cfgs(root: Path, tmp: Path, **train):
    data_cfg = DataConfig(root=str(root), augment="none", normalize="half", cache_dir=str(tmp / "cache"))
    train_cfg = TrainConfig(**{"epochs": 4, "batch_size": 16, "lr": 3e-3, "precision": "fp32", "seed": 0, **train})
    return data_cfg, train_cfg


def test_fit_learns_and_reports_every_epoch(learnable, tmp_path):
    data_cfg, train_cfg = _cfgs(learnable, tmp_path)
    data = load_dataset(data_cfg)
    seen = []
    result = fit(build_model(ModelConfig(arch="cnn_v1")), data, data_cfg, train_cfg,
                 report=lambda epoch, m: seen.append((epoch, dict(m))), progress=False)
    assert [e for e, _ in seen] == [1, 2, 3, 4]
    assert set(seen[0][1]) == set(M.EPOCH_METRICS)
    assert result.best_val_accuracy >= 0.6, result.history  # chance is 0.2
    assert result.val_probs.shape == (40, 5)
    np.testing.assert_allclose(result.val_probs.sum(1), 1.0, atol=1e-5)


def test_fit_keeps_best_state_not_last(learnable, tmp_path):
    data_cfg, train_cfg = _cfgs(learnable, tmp_path, epochs=5, lr=0.05)  # a high lr makes epochs wobble
    data = load_dataset(data_cfg)
    model = build_model(ModelConfig(arch="cnn_v1"))
    result = fit(model, data, data_cfg, train_cfg, progress=False)
    accs = [h[M.VAL_ACCURACY] for h in result.history]
    assert result.best_val_accuracy == max(accs)
    assert result.best_epoch == accs.index(max(accs)) + 1
    # The returned state reproduces the stored best-epoch probabilities.
    fresh = build_model(ModelConfig(arch="cnn_v1"))
    fresh.load_state_dict(result.best_state)
    from pipeline.data import Normalizer

    probs = predict_probs(fresh, data.validation.images, Normalizer("half", torch.device("cpu")),
                          torch.device("cpu"), "fp32")
    np.testing.assert_allclose(probs.numpy(), result.val_probs, atol=1e-5)


def test_fit_is_repeatable_in_fp32_on_cpu(learnable, tmp_path):
    data_cfg, train_cfg = _cfgs(learnable, tmp_path, epochs=2)
    data = load_dataset(data_cfg)
    runs = []
    for _ in range(2):
        seed_everything(0)
        runs.append(fit(build_model(ModelConfig(arch="cnn_v1")), data, data_cfg, train_cfg, progress=False))
    learning = [[{k: v for k, v in h.items() if k not in M.TIMING_METRICS} for h in r.history] for r in runs]
    assert learning[0] == learning[1]
    seed_everything(0)
    other = fit(build_model(ModelConfig(arch="cnn_v1")), data, data_cfg, TrainConfig(**{**train_cfg.__dict__, "seed": 1}),
                progress=False)
    assert other.history != runs[0].history


def test_fit_with_mix_augmentation_class_weights_and_bf16(learnable, tmp_path):
    data_cfg = DataConfig(root=str(learnable), augment="color", normalize="imagenet", cutmix_alpha=1.0,
                          mixup_alpha=0.2, cache_dir=str(tmp_path / "cache"))
    precision = "bf16" if resolve_precision("auto", torch.device("cpu")) == "bf16" else "fp32"
    train_cfg = TrainConfig(epochs=2, batch_size=16, class_weights="1.9,1,1,1,1.7", label_smoothing=0.1,
                            optimizer="adamw", precision=precision)
    result = fit(build_model(ModelConfig(arch="deepfakenet")), load_dataset(data_cfg), data_cfg, train_cfg,
                 progress=False)
    assert result.precision == precision
    assert all(np.isfinite(h[M.TRAIN_LOSS]) for h in result.history)


def test_class_weights():
    labels = torch.tensor([0, 0, 0, 1, 2, 3, 4, 4])
    balanced = class_weight_tensor("balanced", labels, 5)
    assert balanced[0] < balanced[1] and torch.isclose(balanced[1], balanced[2])
    assert class_weight_tensor("none", labels, 5) is None
    assert class_weight_tensor("1.9,1,1,1,1.7", labels, 5).tolist() == pytest.approx([1.9, 1, 1, 1, 1.7])
    with pytest.raises(ValueError, match="class_weights"):
        TrainConfig(class_weights="1,2")


def test_device_and_precision_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")
    expected = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_checkpoint_round_trip_weights_only(tmp_path):
    model_cfg = ModelConfig(arch="cnn_v2", dropout_fc=0.3)
    model = build_model(model_cfg)
    path = save_checkpoint(tmp_path / "best.pt", model.state_dict(), model_cfg, DataConfig(), TrainConfig(),
                           ("0", "1", "2", "3", "4"), epoch=3, val_accuracy=0.5, input_size=(32, 32))
    raw = torch.load(path, weights_only=True)  # plain tensors and builtins only
    assert raw["arch"] == "cnn_v2" and raw["epoch"] == 3 and raw["input_size"] == [32, 32]
    rebuilt, data_cfg = model_from_checkpoint(load_checkpoint(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, rebuilt.state_dict()[key]), key
    assert data_cfg == DataConfig()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_run_guard_closes_runs_by_outcome(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    exp = tracking.ensure_experiment(client, "guard")
    for exc, status in ((RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED"), (None, "FINISHED")):
        run_id = tracking.start_run(client, exp, "r")
        with pytest.raises(type(exc)) if exc else _nothing():
            with tracking.run_guard(client, run_id):
                if exc:
                    raise exc
        run = client.get_run(run_id)
        assert run.info.status == status
        if status == "FAILED":
            assert "boom" in run.data.tags["error"]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _mlflow_client(workdir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


@pytest.mark.slow
def test_mlflow_run_train_end_to_end(learnable, tmp_path):
    """`mlflow run . -e train --env-manager local`, then read everything back through MlflowClient."""
    env = cli_env(tmp_path)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(PROJECT_DIR), "-e", "train", "--env-manager",
           "local", "--experiment-name", "deepfake", "-P", f"data={learnable}", "-P", "epochs=3",
           "-P", "arch=cnn_v1", "-P", "batch_size=16", "-P", "augment=none", "-P", "precision=fp32",
           "-P", "lr=0.003", "-P", "no_progress=true"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = _mlflow_client(tmp_path)
    experiment = client.get_experiment_by_name("deepfake")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "one call, one run (the mlflow-run launcher's run is reused)"
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    for key in ("model.arch", "train.epochs", "train.batch_size", "train.lr", "train.weight_decay",
                "model.dropout_features", "model.dropout_fc", "train.label_smoothing", "train.class_weights",
                "data.augment", "data.image_size", "train.precision", "train.device", "train.seed"):
        assert key in params, key
    assert params["model.arch"] == "cnn_v1" and params["train.epochs"] == "3"
    for name in M.EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [1, 2, 3], name
    for name in M.SUMMARY_METRICS:
        assert name in run.data.metrics, name
    assert run.data.metrics[M.EPOCHS_RUN] == 3
    best = max(m.value for m in client.get_metric_history(run.info.run_id, M.VAL_ACCURACY))
    assert run.data.metrics[M.BEST_VAL_ACCURACY] == pytest.approx(best)
    for tag in ("git_commit", "device", "torch_version"):
        assert tag in run.data.tags
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {M.CONFUSION_PNG, M.CONFUSION_JSON, M.REPORT_JSON, "checkpoints", "predictions"} <= paths
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
    ckpt = load_checkpoint(local / M.CHECKPOINT_ARTIFACT)
    assert ckpt["arch"] == "cnn_v1" and ckpt["epoch"] == run.data.metrics[M.BEST_EPOCH]
    stored = np.load(local / M.PREDICTIONS_ARTIFACT)
    assert stored["probs"].shape == (40, 5) and len(stored["ids"]) == 40
    report = __import__("json").loads((local / M.REPORT_JSON).read_text())
    assert set(["0", "1", "2", "3", "4", "macro avg"]) <= set(report)
    dataset = run.inputs.dataset_inputs[0].dataset
    assert '"train": 120' in dataset.profile and dataset.digest


def test_baseline_logs_like_a_training_run(learnable, tmp_path):
    run_cli(["baseline", "--data", str(learnable), "--pixels", "16"], tmp_path)
    client = _mlflow_client(tmp_path)
    run = client.search_runs([client.get_experiment_by_name("deepfake").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["arch"] == "svm_rbf"
    assert 0.2 < run.data.metrics[M.BEST_VAL_ACCURACY] <= 1.0
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {M.CONFUSION_PNG, M.CONFUSION_JSON, M.REPORT_JSON} <= paths


def test_train_cli_rejects_bad_flags(learnable, tmp_path):
    proc = run_cli(["train", "--data", str(learnable), "--precision", "fp8"], tmp_path, check=False)
    assert proc.returncode != 0 and "train.precision" in proc.stderr
    if not torch.cuda.is_available():
        proc = run_cli(["train", "--data", str(learnable), "--device", "cuda", "--epochs", "1"], tmp_path, check=False)
        assert proc.returncode != 0 and "CUDA is not available" in proc.stderr
