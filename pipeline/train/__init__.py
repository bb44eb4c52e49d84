"""Training: device and precision (``device``), the loop (``loop``: ``fit`` reports, never logs),
self-describing checkpoints (``checkpoint``) and the seeded build-and-fit every command shares
(``recipe``). Imports neither MLflow nor Optuna."""

from .device import DeviceError, autocast, bf16_supported, resolve_device, resolve_precision, synchronize
from .loop import (EpochStats, FitResult, NonFiniteLossError, Report, StopTraining, class_weight_tensor, evaluate, fit,
                   predict_logits, predict_probs, seed_everything, train_one_epoch)
from .recipe import build_and_fit
from .schedule import Deadline, lr_factor

__all__ = ["DeviceError", "autocast", "bf16_supported", "resolve_device", "resolve_precision", "synchronize",
           "EpochStats", "FitResult", "NonFiniteLossError", "Report", "StopTraining", "class_weight_tensor", "evaluate", "fit",
           "predict_logits", "predict_probs", "seed_everything", "train_one_epoch", "build_and_fit", "Deadline", "lr_factor"]
