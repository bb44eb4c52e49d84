"""The served ensemble: a pyfunc model that decodes image bytes, runs both members and votes.

The model rebuilds both networks from their checkpoints (``weights_only=True``) in
``load_context``; no torch module is ever pickled into the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import mlflow.pyfunc
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from ..config import NUM_CLASSES
from .request import decode_request_image, invalid_input
from .rules import combine


def signature(num_classes: int = NUM_CLASSES) -> ModelSignature:
    inputs = Schema([ColSpec("binary", "image")])
    outputs = Schema([ColSpec("long", "label")] + [ColSpec("float", f"prob_{i}") for i in range(num_classes)])
    return ModelSignature(inputs=inputs, outputs=outputs)


class Member:
    """One network with the preprocessing it was trained with."""

    def __init__(self, checkpoint_path: str, device: torch.device):
        from ..data import Normalizer
        from ..train.checkpoint import load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(checkpoint_path)
        model, data_cfg = model_from_checkpoint(ckpt)
        self.model = model.to(device, memory_format=torch.channels_last).eval()
        self.input_size = tuple(ckpt["input_size"])
        self.normalizer = Normalizer(data_cfg.normalize, device)
        self.arch = ckpt["arch"]

    def prepare(self, images: list[torch.Tensor]) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        size = list(self.input_size)
        resized = [img if tuple(img.shape[-2:]) == self.input_size else F.resize(img, size, antialias=True)
                   for img in images]
        return torch.stack(resized)


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with a column ``image`` of encoded image bytes (PNG or JPEG).
    Output: ``label`` and ``prob_0`` … ``prob_{C-1}``."""

    def load_context(self, context) -> None:
        from ..train import resolve_device, resolve_precision

        spec = json.loads(Path(context.artifacts["ensemble"]).read_text())
        config = dict(getattr(context, "model_config", None) or {})
        self.device = resolve_device(str(config.get("device", "cpu")))
        self.precision = resolve_precision(str(config.get("precision", spec.get("precision", "auto"))), self.device)
        self.batch_size = int(config.get("batch_size", 256))
        self.weight = float(spec["weight"])
        self.method = spec["method"]
        self.classes = spec["classes"]
        self.members = [Member(context.artifacts["member_a"], self.device),
                        Member(context.artifacts["member_b"], self.device)]

    def member_probs(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        from ..train import predict_probs

        outs = []
        for member in self.members:
            batch = member.prepare(images)
            outs.append(predict_probs(member.model, batch, member.normalizer, self.device, self.precision,
                                      self.batch_size).numpy())
        return outs

    # The DataFrame hint is what MLflow asks for (no "add type hints" warning); it infers no schema
    # from it, so the logged signature (a binary ``image`` column) still validates the input.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            raise invalid_input(f"input must be a table with an 'image' column, got {type(model_input).__name__}")
        if "image" not in model_input.columns:
            raise invalid_input(f"input must have a column 'image' (got columns {list(model_input.columns)})")
        if len(model_input) == 0:
            return pd.DataFrame({"label": np.zeros(0, dtype=np.int64),
                                 **{f"prob_{i}": np.zeros(0, np.float32) for i in range(len(self.classes))}})
        images = [decode_request_image(v, i) for i, v in enumerate(model_input["image"].tolist())]
        p_a, p_b = self.member_probs(images)
        probs = combine(p_a, p_b, self.weight, self.method).astype(np.float32)
        frame = pd.DataFrame({"label": probs.argmax(1).astype(np.int64)})
        for i in range(probs.shape[1]):
            frame[f"prob_{i}"] = probs[:, i]
        return frame


def write_spec(path: Path, weight: float, method: str, classes: list[str], members: list[dict]) -> Path:
    path.write_text(json.dumps({"weight": weight, "method": method, "classes": classes, "members": members},
                               indent=2))
    return path


def pip_requirements() -> list[str]:
    import importlib.metadata as md

    pins = []
    for name in ("torch", "torchvision", "mlflow", "pandas", "numpy", "pillow", "pyyaml", "scikit-learn", "tqdm"):
        try:
            version = md.version(name).split("+")[0]
            pins.append(f"{name}=={version}")
        except md.PackageNotFoundError:
            pins.append(name)
    return pins
