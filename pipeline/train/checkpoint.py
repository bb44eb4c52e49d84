"""Self-describing checkpoints: weights, architecture, configs, epoch and metric, in tensors and plain
types only, so ``torch.load(..., weights_only=True)`` reads them without unpickling code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DataConfig, ModelConfig, TrainConfig, data_from_dict, model_from_dict, to_dict
from ..models import build_model

FORMAT = "deepfake-tune/checkpoint/1"


@dataclass(frozen=True)
class ModelInterface:
    """What a served checkpoint reads and answers besides its weights: the class names of its outputs, in
    order, and the (height, width) serving resizes input images to."""

    classes: tuple[str, ...]
    input_size: tuple[int, int]


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], model_cfg: ModelConfig, data_cfg: DataConfig,
                    train_cfg: TrainConfig, interface: ModelInterface, epoch: int, val_accuracy: float) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "format": FORMAT,
        "arch": model_cfg.arch,
        "state_dict": state,
        "model": to_dict(model_cfg),
        "data": to_dict(data_cfg),
        "train": to_dict(train_cfg),
        "classes": list(interface.classes),
        "input_size": [int(interface.input_size[0]), int(interface.input_size[1])],  # serving resizes inputs to this
        "epoch": epoch,
        "val_accuracy": val_accuracy,
    }, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal or corruption is the same problem
        raise ValueError(f"{path}: not a loadable checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a deepfake-tune checkpoint (format {found})")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[nn.Module, DataConfig]:
    """Rebuild the network (no pretrained file needed: the weights are in the checkpoint)."""
    model_cfg = model_from_dict({**ckpt["model"], "weights": None})
    model = build_model(model_cfg)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, data_from_dict(ckpt["data"])
