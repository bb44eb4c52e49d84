"""Two-member ensembles: voting rules on stored probabilities, and the pyfunc model that serves them.

Voting rules work on probabilities alone, so the pair and weight search needs no retraining. The
pyfunc model rebuilds both networks from their checkpoints (``weights_only=True``) in
``load_context``; no torch module is ever pickled into the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .config import NUM_CLASSES

METHODS = ("soft", "confidence")


def combine(p_a: np.ndarray, p_b: np.ndarray, weight: float, method: str) -> np.ndarray:
    """Member A gets ``weight``, member B ``1 - weight``.

    ``soft``: weighted average of probabilities. ``confidence`` (the second reference's rule): each
    member's vote is further scaled per image by its own confidence (its top probability), so the
    surer model wins disagreements.
    """
    if method == "soft":
        return weight * p_a + (1.0 - weight) * p_b
    if method == "confidence":
        c_a = weight * p_a.max(axis=1, keepdims=True)
        c_b = (1.0 - weight) * p_b.max(axis=1, keepdims=True)
        total = np.clip(c_a + c_b, 1e-12, None)
        return (c_a * p_a + c_b * p_b) / total
    raise ValueError(f"unknown ensemble method {method!r}; choose one of {', '.join(METHODS)}")


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def weight_curve(p_a: np.ndarray, p_b: np.ndarray, labels: np.ndarray, method: str,
                 points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    weights = np.linspace(0.0, 1.0, points)
    return weights, np.array([accuracy(combine(p_a, p_b, w, method), labels) for w in weights])


def stratified_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint, class-balanced halves of the validation indices (for an honest estimate)."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        first.append(idx[: len(idx) // 2])
        second.append(idx[len(idx) // 2:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


# ---------------------------------------------------------------------------------------------
# The pyfunc model

import mlflow.pyfunc  # noqa: E402 - kept below the pure-numpy part, which needs no MLflow
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import ModelSignature  # noqa: E402
from mlflow.types import ColSpec, Schema  # noqa: E402

MAX_IMAGE_BYTES = 10 * 1024 * 1024  # one image; larger payloads are refused before decoding
MAX_IMAGE_PIXELS = 4096 * 4096


def signature(num_classes: int = NUM_CLASSES) -> ModelSignature:
    inputs = Schema([ColSpec("binary", "image")])
    outputs = Schema([ColSpec("long", "label")] + [ColSpec("float", f"prob_{i}") for i in range(num_classes)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _bad_input(message: str) -> MlflowException:
    # invalid_parameter_value makes `mlflow models serve` answer 400 with this message.
    return MlflowException.invalid_parameter_value(message)


def _header_size(value: bytes) -> tuple[int, int]:
    """(width, height) from the file header alone; (0, 0) when the header is unreadable (decoding
    then reports the problem)."""
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(value)) as image:  # lazy: reads the header, not the pixels
                return image.size
    except Image.DecompressionBombError:
        return 1 << 16, 1 << 16  # Pillow's own bomb limit: far beyond ours
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return 0, 0


def decode_request_image(value: Any, row: int) -> torch.Tensor:
    """Encoded PNG/JPEG bytes → uint8 3xHxW RGB, or a 400-style error naming the row."""
    from torchvision.io import ImageReadMode, decode_image

    if isinstance(value, str):
        import base64
        import binascii

        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _bad_input(f"row {row}: 'image' must be encoded image bytes (or base64 text), "
                             "got a string that is not base64") from None
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if not isinstance(value, bytes):
        raise _bad_input(f"row {row}: 'image' must be encoded image bytes, got {type(value).__name__}")
    if not value:
        raise _bad_input(f"row {row}: 'image' is empty")
    if len(value) > MAX_IMAGE_BYTES:
        raise _bad_input(f"row {row}: image of {len(value)} bytes exceeds the {MAX_IMAGE_BYTES}-byte limit")
    if not (value.startswith(b"\x89PNG") or value.startswith(b"\xff\xd8")):
        raise _bad_input(f"row {row}: 'image' is not a PNG or JPEG file")
    width, height = _header_size(value)
    if width * height > MAX_IMAGE_PIXELS:  # from the header: a decompression bomb is never decoded
        raise _bad_input(f"row {row}: image of {width}x{height} pixels is too large")
    try:
        image = decode_image(torch.frombuffer(bytearray(value), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise _bad_input(f"row {row}: cannot decode image ({str(exc).splitlines()[0][:200]}); "
                         "truncated or corrupt") from None
    if image.shape[-1] * image.shape[-2] > MAX_IMAGE_PIXELS:
        raise _bad_input(f"row {row}: image of {image.shape[-1]}x{image.shape[-2]} pixels is too large")
    if image.dtype != torch.uint8:
        # 16-bit PNGs decode as uint16: scale to uint8 as the dataset layer does, never feed raw 0..65535
        from torchvision.transforms.v2 import functional as F

        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


class Member:
    """One network with the preprocessing it was trained with."""

    def __init__(self, checkpoint_path: str, device: torch.device):
        from .checkpoint import load_checkpoint, model_from_checkpoint
        from .data import Normalizer

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
        from .train import resolve_device, resolve_precision

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
        from .train import predict_probs

        outs = []
        for member in self.members:
            batch = member.prepare(images)
            outs.append(predict_probs(member.model, batch, member.normalizer, self.device, self.precision,
                                      self.batch_size).numpy())
        return outs

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            raise _bad_input(f"input must be a table with an 'image' column, got {type(model_input).__name__}")
        if "image" not in model_input.columns:
            raise _bad_input(f"input must have a column 'image' (got columns {list(model_input.columns)})")
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
