"""Inference: the ensemble pyfunc's ``predict`` on PNG bytes against its members' raw forward passes."""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig, ModelConfig, TrainConfig
from ..data import Dataset
from ..data.layout import index_dataset
from ..train import build_and_fit, predict_probs, synchronize
from .settings import DEFAULT_ARCHS, BenchSettings
from .training import bench_train_config


def train_members(data: Dataset, data_cfg: DataConfig, base: TrainConfig, settings: BenchSettings,
                  archs: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """One quick epoch per member when the training sections were skipped (weights do not change speed)."""
    cfg = bench_train_config(base, settings, 1)
    states = {}
    for arch in archs:
        states[arch] = build_and_fit(ModelConfig(arch=arch, num_classes=data.num_classes), data, data_cfg,
                                     cfg).best_state
    return states


def _ensemble_module():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mlflow's advice on predict type hints, given when the class is defined
        import mlflow.pyfunc  # noqa: F401

        from ..ensemble import pyfunc
    return pyfunc


def save_ensemble(data: Dataset, data_cfg: DataConfig, base: TrainConfig, settings: BenchSettings,
                  states: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> Path:
    """An ensemble saved with ``mlflow.pyfunc.save_model``: the artifacts (two checkpoints and the spec),
    signature and requirements ``registry.register_ensemble`` logs, weight 0.5, soft voting."""
    import mlflow.pyfunc

    from ..train.checkpoint import ModelInterface, save_checkpoint

    ens = _ensemble_module()

    arch_a, arch_b = list(states)[:2]
    cfg = bench_train_config(base, settings, settings.epochs)
    paths = {}
    for key, arch in (("member_a", arch_a), ("member_b", arch_b)):
        paths[key] = str(save_checkpoint(out_dir / f"{key}.pt", states[arch],
                                         ModelConfig(arch=arch, num_classes=data.num_classes), data_cfg, cfg,
                                         ModelInterface(data.classes, data.image_shape[1:]), settings.epochs, 0.0))
    precision = settings.precision
    spec = ens.write_spec(out_dir / "ensemble.json", 0.5, "soft", list(data.classes),
                          [{"arch": arch, "trial": 0, "run_id": "", "tta": "none", "temperature": 1.0,
                            "precision": precision} for arch in (arch_a, arch_b)])
    model_dir = out_dir / "ensemble"
    mlflow_logger = logging.getLogger("mlflow")
    level = mlflow_logger.level
    mlflow_logger.setLevel(logging.ERROR)  # the registry's own choices (cloudpickle, no type hints) are not news here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.pyfunc.save_model(path=str(model_dir), python_model=ens.EnsembleModel(),
                                     artifacts={**paths, "ensemble": str(spec)},
                                     signature=ens.signature(data.num_classes), pip_requirements=ens.pip_requirements(),
                                     model_config={"device": settings.device})
    finally:
        mlflow_logger.setLevel(level)
    return model_dir


def _median_seconds(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_inference(data: Dataset, data_cfg: DataConfig, base: TrainConfig, settings: BenchSettings,
                    members: dict[str, dict[str, torch.Tensor]], tmp_dir: Path,
                    model_uri: str | None) -> dict[str, Any]:
    """Pyfunc ``predict`` on a DataFrame of PNG bytes (decode included) against the members' raw
    forward passes on preloaded uint8 tensors (same device, precision and batch size)."""
    import mlflow.pyfunc
    import pandas as pd

    from ..ensemble.request import decode_request_image

    if model_uri is None:
        if len(members) < 2:
            pair = tuple(dict.fromkeys(settings.archs + DEFAULT_ARCHS))[:2]
            members = {**train_members(data, data_cfg, base, settings, tuple(a for a in pair if a not in members)),
                       **members}
        model_uri = str(save_ensemble(data, data_cfg, base, settings, members, tmp_dir))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = mlflow.pyfunc.load_model(model_uri)
    load_s = time.perf_counter() - t0
    ensemble = loaded.unwrap_python_model()
    paths = index_dataset(data.root).splits["validation"].paths[:settings.inference_images]
    frame = pd.DataFrame({"image": [Path(p).read_bytes() for p in paths]})
    n = len(frame)
    device = ensemble.device

    loaded.predict(frame)  # warm-up: first-call kernel selection for these batch shapes
    predict_s = _median_seconds(lambda: loaded.predict(frame), settings.inference_reps, device)
    decode_s = _median_seconds(lambda: [decode_request_image(v, i) for i, v in enumerate(frame["image"])],
                               settings.inference_reps, device)
    images = [decode_request_image(v, i) for i, v in enumerate(frame["image"])]
    forward_s = 0.0
    for member in ensemble.members:
        batch = member.prepare(images).to(device)
        forward_s += _median_seconds(lambda member=member, batch=batch: predict_probs(
                                         member.model, batch, member.normalizer, device, member.precision,
                                         ensemble.batch_size),
                                     settings.inference_reps, device)
    return {"model_uri": model_uri, "images": n, "precision": ensemble.members[0].precision,
            "batch_size": ensemble.batch_size,
            "members": [m.arch for m in ensemble.members], "load_seconds": load_s,
            "pyfunc_images_per_second": n / predict_s, "members_raw_images_per_second": n / forward_s,
            "decode_images_per_second": n / decode_s, "pyfunc_seconds": predict_s, "raw_seconds": forward_s,
            "decode_seconds": decode_s, "ratio": forward_s / predict_s}
