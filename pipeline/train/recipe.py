"""The one trial mechanic every command shares: seed, build the network, fit it.

``train``, every ``tune`` trial and ``bench`` call this, so what ``bench`` measures is what ``tune``
runs. The network lives only in this frame: once ``fit`` returns or raises, it can be freed.
"""

from __future__ import annotations

import torch

from ..config import DataConfig, ModelConfig, TrainConfig
from ..data import Dataset
from ..models import build_model
from ..rng import global_draws
from .fit import fit
from .loop import FitResult, Report
from .schedule import Deadline


def build_and_fit(model_cfg: ModelConfig, data: Dataset, data_cfg: DataConfig, train_cfg: TrainConfig,
                  report: Report | None = None, progress: bool = False,
                  initial_state: dict[str, torch.Tensor] | None = None, deadline: Deadline | None = None) -> FitResult:
    """``initial_state``: continue from these weights instead of a fresh initialisation; ``deadline``:
    the run's length is wall-clock time (see ``fit``)."""
    # Weight init is part of the seeded run. nn.init draws from torch's global generator, so the
    # network is built while this run holds it (seeded, then restored): threads cannot interleave.
    with global_draws(train_cfg.seed):
        model = build_model(model_cfg)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    return fit(model, data, data_cfg, train_cfg, report=report, progress=progress, deadline=deadline)
