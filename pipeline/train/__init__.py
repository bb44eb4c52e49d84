"""Training: device and precision (``device``), a run (``fit``: it reports, never logs) made of the
loop's pieces (``loop``), schedules that end where the run does (``schedule``), a speed probe for
budget plans (``speed``), self-describing checkpoints (``checkpoint``) and the seeded build-and-fit
every command shares (``recipe``). Imports neither MLflow nor Optuna."""

from .device import DeviceError, autocast, bf16_native, bf16_supported, resolve_device, resolve_precision, synchronize
from .fit import fit
from .loop import (
                   EpochStats,
                   FitResult,
                   NonFiniteLossError,
                   Report,
                   StopTraining,
                   TrainStep,
                   class_weight_tensor,
                   evaluate,
                   predict_logits,
                   predict_probs,
                   seed_everything,
                   train_one_epoch,
)
from .recipe import build_and_fit
from .schedule import Deadline, lr_factor

__all__ = ["DeviceError", "autocast", "bf16_native", "bf16_supported", "resolve_device", "resolve_precision",
           "synchronize",
           "fit", "EpochStats", "FitResult", "NonFiniteLossError", "Report", "StopTraining", "TrainStep",
           "class_weight_tensor", "evaluate", "predict_logits", "predict_probs", "seed_everything", "train_one_epoch",
           "build_and_fit", "Deadline", "lr_factor"]
