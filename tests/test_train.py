"""The training loop, checkpoints, and the `train` / `baseline` commands read back through MlflowClient."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_learnable, seed_store

from pipeline import metrics as M
from pipeline.config import DataConfig, ModelConfig, TrainConfig
from pipeline.data import load_dataset
from pipeline.models import build_model
from pipeline.train import DeviceError, class_weight_tensor, fit, predict_probs, resolve_device, resolve_precision
from pipeline.train.checkpoint import ModelInterface, load_checkpoint, model_from_checkpoint, save_checkpoint
from pipeline.train.host_memory import _malloc_trim, trim_heap


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> Path:
    return make_learnable(tmp_path_factory.mktemp("learnable"))


def _cfgs(root: Path, tmp: Path, **train):
    data_cfg = DataConfig(root=str(root), augment="none", normalize="half", cache_dir=str(tmp / "cache"))
    train_cfg = TrainConfig(**{"epochs": 4, "batch_size": 16, "lr": 3e-3, "precision": "fp32", "seed": 0, **train})
    return data_cfg, train_cfg


def test_fit_learns_and_reports_every_epoch(learnable, tmp_path):
    data_cfg, train_cfg = _cfgs(learnable, tmp_path, evaluations=4, eval_share=1.0)
    data = load_dataset(data_cfg)
    seen = []
    result = fit(build_model(ModelConfig(arch="cnn_v1", convs_per_block=1)), data, data_cfg, train_cfg,
                 report=lambda epoch, m: seen.append((epoch, dict(m))), progress=False)
    assert [e for e, _ in seen] == [1, 2, 3, 4]
    assert set(seen[0][1]) == set(M.EPOCH_METRICS)  # 4 evaluations over 4 epochs: every one
    assert result.kept == "last weights" and result.best_epoch == 4  # a schedule that decays to zero
    assert result.best_val_accuracy == seen[-1][1][M.VAL_ACCURACY]
    assert result.best_val_accuracy >= 0.6, result.history  # chance is 0.2
    assert result.val_probs.shape == (40, 5)
    np.testing.assert_allclose(result.val_probs.sum(1), 1.0, atol=1e-5)


def test_plateau_keeps_best_state_not_last(learnable, tmp_path):
    data_cfg, train_cfg = _cfgs(learnable, tmp_path, epochs=5, lr=0.05,  # a high lr makes epochs wobble
                                schedule="plateau")
    data = load_dataset(data_cfg)
    model = build_model(ModelConfig(arch="cnn_v1", convs_per_block=1))
    result = fit(model, data, data_cfg, train_cfg, progress=False)
    accs = [h[M.VAL_ACCURACY] for h in result.history]
    assert result.best_val_accuracy == max(accs)
    assert result.best_epoch == accs.index(max(accs)) + 1
    # The returned state reproduces the stored best-epoch probabilities.
    fresh = build_model(ModelConfig(arch="cnn_v1", convs_per_block=1))
    fresh.load_state_dict(result.best_state)
    from pipeline.data import Normalizer

    probs = predict_probs(fresh, data.validation.images, Normalizer("half", torch.device("cpu")),
                          torch.device("cpu"), "fp32")
    np.testing.assert_allclose(probs.numpy(), result.val_probs, atol=1e-5)


# Every randomness path of a run: per-image geometric draws, v2 colour transforms and CutMix/MixUp
# (global-generator draws), shuffling, Dropout and Dropout2d masks, weight init.
THREAD_RUNS = {"geometric": {"augment": "geometric"},
               "color-mix": {"augment": "color", "cutmix_alpha": 1.0, "mixup_alpha": 0.4}}


def _thread_run(root: Path, tmp: Path, name: str, seed: int):
    from pipeline.train import build_and_fit

    data_cfg = DataConfig(root=str(root), normalize="half", cache_dir=str(tmp / "cache"), **THREAD_RUNS[name])
    # Every epoch evaluated whatever it costs: which epochs are read must not depend on timing here.
    train_cfg = TrainConfig(epochs=2, batch_size=16, lr=3e-3, precision="fp32", device="cpu", seed=seed,
                            evaluations=2, eval_share=1.0)
    model_cfg = ModelConfig(arch="cnn_v1", convs_per_block=1, dropout_features=0.3, dropout_fc=0.4)
    return build_and_fit(model_cfg, load_dataset(data_cfg), data_cfg, train_cfg)


def test_runs_are_repeatable_and_independent_of_other_threads(learnable, tmp_path):
    """What ``tune --n-jobs 2`` relies on: a run in a thread, next to another, gives exactly what it
    gives alone (fp32 on the CPU), and neither reads nor moves torch's global generator."""
    import threading

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    alone = {name: _thread_run(learnable, tmp_path, name, seed) for seed, name in enumerate(THREAD_RUNS)}
    assert torch.equal(torch.random.get_rng_state(), before)  # no global reseeding, no global draws

    together: dict = {}

    def run(name: str, seed: int) -> None:
        together[name] = _thread_run(learnable, tmp_path, name, seed)

    threads = [threading.Thread(target=run, args=(name, seed)) for seed, name in enumerate(THREAD_RUNS)]
    torch.manual_seed(999)  # whatever the global state, the runs do not see it
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    def learning(history):  # timing figures differ run to run even when the learning is repeatable
        return [{k: v for k, v in row.items() if k not in M.TIMING_METRICS} for row in history]

    for name, run in alone.items():
        assert learning(together[name].history) == learning(run.history), name
        for key, value in run.best_state.items():
            assert torch.equal(together[name].best_state[key], value), (name, key)
    other_seed = _thread_run(learnable, tmp_path, "geometric", 7)
    assert learning(other_seed.history) != learning(alone["geometric"].history)  # the seed makes runs equal


def test_dropout_masks_come_from_the_runs_generator():
    from torch import nn

    from pipeline.rng import seeded_dropout

    model = nn.Sequential(nn.Dropout2d(0.5), nn.Flatten(), nn.Dropout(0.25)).train()
    x = torch.ones(64, 8, 4, 4)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed + 100)  # the global generator must not matter
        with seeded_dropout(model, torch.Generator().manual_seed(seed)):
            outs.append(model(x))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    channels = outs[0].view(64, 8, 16)
    # Dropout2d zeroes whole channels; what survives both layers is scaled by 1/(1-p) each.
    kept = channels[channels != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (0.5 * 0.75)))
    channel_zero = (channels == 0).all(-1).float().mean().item()
    element_zero = (outs[0] == 0).float().mean().item()
    assert 0.4 < channel_zero < 0.6 and 0.55 < element_zero < 0.70  # 1 - 0.5 * 0.75 = 0.625
    assert "forward" not in model[0].__dict__ and "forward" not in model[2].__dict__  # restored after
    model.eval()
    with seeded_dropout(model, torch.Generator().manual_seed(1)):
        assert torch.equal(model(x), x.flatten(1))  # evaluation: no dropout


def test_a_dataset_is_copied_to_a_device_once_and_shared_by_threads():
    """The CUDA path of ``fit`` (``on_device``), on the ``meta`` device: every thread gets the same
    copy, a tensor already on the device is itself, and the copy goes with its source."""
    import gc
    import threading

    from pipeline.train.device import _COPIES, on_device

    images = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    got: list[torch.Tensor] = []

    def copy(source: torch.Tensor, into: list) -> None:
        into.append(on_device(source, "meta"))

    threads = [threading.Thread(target=copy, args=(images, got)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(copy is got[0] for copy in got) and got[0].device.type == "meta"
    assert on_device(images, torch.device("cpu")) is images
    other = torch.zeros_like(images)
    assert on_device(other, "meta") is not got[0]
    key = (id(images), "meta")
    assert key in _COPIES
    del images, got, threads
    gc.collect()
    assert key not in _COPIES


def test_early_stopping_and_the_learning_rate_schedule(learnable, tmp_path):
    """ReduceLROnPlateau multiplies the lr by lr_factor after every epoch without a better validation
    accuracy (lr_patience 0); early stopping ends the run at the second such epoch in a row."""
    data_cfg, train_cfg = _cfgs(learnable, tmp_path, epochs=40, lr=4e-3, lr_patience=0, lr_factor=0.5,
                                early_stop_patience=2, schedule="plateau")
    result = fit(build_model(ModelConfig(arch="cnn_v1", convs_per_block=1)), load_dataset(data_cfg), data_cfg,
                 train_cfg, progress=False)
    assert result.stop_reason == "early_stopping" and result.epochs_run < 40
    best, without_gain, lr = -1.0, 0, 4e-3
    for epoch, row in enumerate(result.history, start=1):
        assert row[M.LR] == pytest.approx(lr), (epoch, result.history)
        if row[M.VAL_ACCURACY] > best:
            best, without_gain = row[M.VAL_ACCURACY], 0
        else:
            without_gain += 1
            lr *= 0.5
        assert without_gain < 2 or epoch == result.epochs_run, (epoch, result.history)
    assert without_gain == 2  # it stopped exactly there
    assert result.history[-1][M.LR] < 4e-3  # the schedule acted before the stop
    assert result.best_val_accuracy == best


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
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_auto_precision_picks_bf16_only_where_the_cpu_has_it_in_hardware():
    # AVX512 alone lets oneDNN emulate bf16 (slower than fp32): auto must read the CPU's own flags.
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("needs Linux /proc/cpuinfo")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_checkpoint_round_trip_weights_only(tmp_path):
    model_cfg = ModelConfig(arch="cnn_v2", dropout_fc=0.3)
    model = build_model(model_cfg)
    path = save_checkpoint(tmp_path / "best.pt", model.state_dict(), model_cfg, DataConfig(), TrainConfig(),
                           ModelInterface(("0", "1", "2", "3", "4"), input_size=(32, 32)), epoch=3, val_accuracy=0.5)
    raw = torch.load(path, weights_only=True)  # plain tensors and builtins only
    assert raw["arch"] == "cnn_v2" and raw["epoch"] == 3 and raw["input_size"] == [32, 32]
    rebuilt, data_cfg = model_from_checkpoint(load_checkpoint(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, rebuilt.state_dict()[key]), key
    assert data_cfg == DataConfig()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_run_guard_closes_runs_by_outcome(tmp_path, monkeypatch, mlflow_template):
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", seed_store(mlflow_template, tmp_path))
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


def test_train_under_mlflow_run_logs_into_the_launchers_run(learnable, tmp_path, tracking_here, monkeypatch):
    """What `mlflow run . -e train` hands the command: a run it created (MLFLOW_RUN_ID) holding the
    entry point's parameters. train logs into that run (one call, one run), and everything reads back
    through MlflowClient. The real `mlflow run` launcher runs in the session fixture ``tuned`` (-e tune)."""
    from pipeline.cli import main

    client = _mlflow_client(tmp_path)
    experiment_id = client.create_experiment("deepfake")
    launcher = client.create_run(experiment_id, tags={"mlflow.source.type": "PROJECT",
                                                      "mlflow.project.entryPoint": "train"})
    client.log_param(launcher.info.run_id, "epochs", "3")
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    assert main(["train", "--data", str(learnable), "--epochs", "3", "--arch", "cnn_v1", "--convs-per-block", "1",
                 "--batch-size", "16", "--augment", "none", "--precision", "fp32", "--lr", "0.003",
                 "--evaluations", "3", "--eval-share", "1", "--no-progress"]) == 0
    runs = client.search_runs([experiment_id])
    assert [r.info.run_id for r in runs] == [launcher.info.run_id], "one call, one run: the launcher's"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "3"
    params = run.data.params
    for key in ("model.arch", "train.epochs", "train.batch_size", "train.lr", "train.weight_decay",
                "model.dropout_features", "model.dropout_fc", "train.label_smoothing", "train.class_weights",
                "data.augment", "data.image_size", "train.precision", "train.device", "train.seed"):
        assert key in params, key
    assert params["model.arch"] == "cnn_v1" and params["train.epochs"] == "3"
    for name in M.EPOCH_METRICS:  # --evaluations 3 over 3 epochs: every epoch read the selection split
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
    assert {"0", "1", "2", "3", "4", "macro avg"} <= set(report)
    dataset = run.inputs.dataset_inputs[0].dataset
    assert '"train": 120' in dataset.profile and dataset.digest


def test_baseline_logs_like_a_training_run(learnable, tmp_path, tracking_here):
    from pipeline.cli import main

    assert main(["baseline", "--data", str(learnable), "--pixels", "16"]) == 0
    client = _mlflow_client(tmp_path)
    run = client.search_runs([client.get_experiment_by_name("deepfake").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["arch"] == "svm_rbf"
    assert 0.2 < run.data.metrics[M.BEST_VAL_ACCURACY] <= 1.0  # above chance on a learnable task
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {M.CONFUSION_PNG, M.CONFUSION_JSON, M.REPORT_JSON} <= paths


def test_train_cli_rejects_bad_flags(learnable, tmp_path, tracking_here, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_info:  # argparse: a value outside the setting's choices
        main(["train", "--data", str(learnable), "--precision", "fp8"])
    assert exit_info.value.code == 2 and "train.precision" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", "--data", str(learnable), "--device", "cuda", "--epochs", "1"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "CUDA is not available" in errors[0]


@pytest.mark.parametrize(("batch", "lr_batch", "expected"), [(256, 64, 2e-3), (16, 64, 5e-4), (64, 64, 1e-3),
                                                             (512, None, 1e-3)])
def test_learning_rate_follows_the_batch_by_the_square_root_rule(batch: int, lr_batch: int | None,
                                                                 expected: float) -> None:
    cfg = TrainConfig(lr=1e-3, batch_size=batch, lr_batch=lr_batch)
    assert cfg.applied_lr == pytest.approx(expected)


def test_a_bad_lr_batch_names_its_setting() -> None:
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="train.lr_batch"):
        TrainConfig(lr_batch=0)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_trim_heap_gives_freed_heap_blocks_back() -> None:
    # What a run's freed activations leave: free blocks between live ones, which glibc keeps until trimmed.
    if _malloc_trim() is None:
        pytest.skip("not glibc")

    def anon() -> int:
        return int(re.search(r"RssAnon:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    blocks = [np.ones(64 * 1024, np.uint8) for _ in range(2000)]  # 128 MB below glibc's mmap threshold
    del blocks[::2]  # 64 MB of holes
    held = anon()
    trim_heap()
    assert held - anon() > 32 * 2 ** 20


@pytest.mark.parametrize(("n", "size", "expected"), [(8, None, [(0, 8)]), (8, 8, [(0, 8)]), (3, 4, [(0, 3)]),
                                                     (6, 2, [(0, 2), (2, 4), (4, 6)]), (5, 2, [(0, 2), (2, 5)]),
                                                     (8, 3, [(0, 3), (3, 6), (6, 8)])])
def test_a_batch_splits_into_micro_batches_without_a_part_of_one(n, size, expected) -> None:
    from pipeline.train.loop import micro_batches

    assert [(s.start, s.stop) for s in micro_batches(n, size)] == expected


def test_micro_batches_give_the_whole_batchs_step() -> None:
    # No BatchNorm here: with it each part is normalised by its own statistics, the one intended difference.
    from pipeline.train.loop import TrainStep

    def one_step(micro_batch: int | None) -> tuple[list[torch.Tensor], float, int]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                    torch.nn.Linear(4 * 6 * 6, 5))
        step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.5), torch.nn.CrossEntropyLoss(
            label_smoothing=0.1), None, torch.device("cpu"), "fp32", micro_batch)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)
        loss, right = step.update(x, y, y)
        return [p.detach().clone() for p in model.parameters()], float(loss), int(right)

    whole, whole_loss, whole_right = one_step(None)
    parts, parts_loss, parts_right = one_step(3)  # parts of 3, 3 and 2
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, parts, strict=True))
    assert parts_loss == pytest.approx(whole_loss, abs=1e-6) and parts_right == whole_right
    moved = one_step(None)[0]
    torch.manual_seed(0)  # the step did change the weights: the comparison above is not of two untouched copies
    assert not torch.allclose(moved[0], torch.nn.Conv2d(3, 4, 3).weight)


def test_a_micro_batch_of_one_image_names_its_setting() -> None:
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="train.micro_batch"):
        TrainConfig(micro_batch=1)
