"""The served ensemble: a pyfunc model that decodes image bytes, runs both members and votes.

The model rebuilds both networks from their checkpoints (``weights_only=True``) in
``load_context``; no torch module is ever pickled into the model.
"""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from ..config import EVAL_BATCH, NUM_CLASSES
from .calibration import calibrated, variant_logprobs
from .request import decode_request_images, invalid_input
from .rules import combine


def signature(num_classes: int = NUM_CLASSES) -> ModelSignature:
    inputs = Schema([ColSpec("binary", "image")])
    outputs = Schema([ColSpec("long", "label")] + [ColSpec("float", f"prob_{i}") for i in range(num_classes)])
    return ModelSignature(inputs=inputs, outputs=outputs)


class Member:
    """One network with what the ensemble chose for it: its preprocessing (from the checkpoint), the
    precision its stored probabilities were computed in, a test-time variant and a temperature."""

    def __init__(self, checkpoint_path: str, device: torch.device, precision: str = "fp32", tta: str = "none",
                 temperature: float = 1.0):
        from ..data import Normalizer
        from ..train import bf16_supported
        from ..train.checkpoint import load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(checkpoint_path)
        model, data_cfg = model_from_checkpoint(ckpt)
        self.model = model.to(device, memory_format=torch.channels_last).eval()
        self.device = device
        self.input_size = tuple(ckpt["input_size"])
        self.normalizer = Normalizer(data_cfg.normalize, device)
        self.arch = ckpt["arch"]
        # Served as searched: the precision the stored probabilities had, where this hardware has it.
        self.precision = "bf16" if precision == "bf16" and bf16_supported(device) else "fp32"
        self.tta, self.temperature = tta, float(temperature)

    def prepare(self, images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """uint8 images at the input size, stacked; a batch tensor already at that size is used as it is."""
        from torchvision.transforms.v2 import functional as F

        if isinstance(images, torch.Tensor) and tuple(images.shape[-2:]) == self.input_size:
            return images
        size = list(self.input_size)
        resized = [img if tuple(img.shape[-2:]) == self.input_size else F.resize(img, size, antialias=True)
                   for img in images]
        return torch.stack(resized)

    def logits(self, batch: torch.Tensor, batch_size: int = EVAL_BATCH, flip: bool = False) -> np.ndarray:
        """Logits of uint8 images at the input size (``flip``: of their mirror images)."""
        from ..train import predict_logits

        return predict_logits(self.model, batch, self.normalizer, self.device, self.precision, batch_size,
                              flip=flip).numpy()

    def logprobs(self, batch: torch.Tensor, batch_size: int = EVAL_BATCH) -> np.ndarray:
        """Uncalibrated log-probabilities of uint8 images at the input size, under the test-time variant."""
        flipped = self.logits(batch, batch_size, flip=True) if self.tta == "hflip" else None
        return variant_logprobs(self.logits(batch, batch_size), flipped, self.tta)

    def probs(self, images: list[torch.Tensor], batch_size: int = EVAL_BATCH) -> np.ndarray:
        return calibrated(self.logprobs(self.prepare(images), batch_size), self.temperature)


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with a column ``image`` of encoded image bytes (PNG or JPEG).
    Output: ``label`` and ``prob_0`` … ``prob_{C-1}``: calibrated ensemble probabilities."""

    def load_context(self, context) -> None:
        from ..train import resolve_device

        spec = json.loads(Path(context.artifacts["ensemble"]).read_text())
        config = dict(getattr(context, "model_config", None) or {})
        self.device = resolve_device(str(config.get("device", "auto")))
        self.batch_size = int(config.get("batch_size", 256))
        self.weight = float(spec["weight"])
        self.method = spec["method"]
        self.classes = spec["classes"]
        self.members = []
        for key, member in zip(("member_a", "member_b"), spec["members"], strict=False):
            # model_config may override the recorded precision (e.g. "fp32" everywhere)
            precision = str(config.get("precision") or member.get("precision") or spec.get("precision", "fp32"))
            self.members.append(Member(context.artifacts[key], self.device, precision, member.get("tta", "none"),
                                       member.get("temperature", 1.0)))

    def member_probs(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        return [member.probs(images, self.batch_size) for member in self.members]

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
        images = decode_request_images(model_input["image"].tolist())
        p_a, p_b = self.member_probs(images)
        probs = combine(p_a, p_b, self.weight, self.method).astype(np.float32)
        frame = pd.DataFrame({"label": probs.argmax(1).astype(np.int64)})
        for i in range(probs.shape[1]):
            frame[f"prob_{i}"] = probs[:, i]
        return frame


def write_spec(path: Path, weight: float, method: str, classes: list[str], members: list[dict]) -> Path:
    """``ensemble.json``: the weight and rule, and per member its test-time variant, temperature and the
    precision its stored probabilities were computed in (the served model uses them by default)."""
    path.write_text(json.dumps({"weight": weight, "method": method, "classes": classes, "members": members},
                               indent=2))
    return path


def pip_requirements() -> list[str]:
    pins = []
    for name in ("torch", "torchvision", "mlflow", "pandas", "numpy", "scipy", "pillow", "pyyaml", "scikit-learn",
                 "tqdm"):
        try:
            version = md.version(name).split("+")[0]
            pins.append(f"{name}=={version}")
        except md.PackageNotFoundError:
            pins.append(name)
    return pins
