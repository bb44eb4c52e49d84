"""The one trial mechanic every command shares: seed, build the network, fit it.

``train``, every ``tune`` trial and ``bench`` call this, so what ``bench`` measures is what ``tune``
runs. The network lives only in this frame: once ``fit`` returns or raises, it can be freed.
"""

from __future__ import annotations

from ..config import DataConfig, ModelConfig, TrainConfig
from ..data import Dataset
from ..models import build_model
from .loop import FitResult, Report, fit, seed_everything


def build_and_fit(model_cfg: ModelConfig, data: Dataset, data_cfg: DataConfig, train_cfg: TrainConfig,
                  report: Report | None = None, progress: bool = False) -> FitResult:
    seed_everything(train_cfg.seed)  # weight init is part of the seeded run
    return fit(build_model(model_cfg), data, data_cfg, train_cfg, report=report, progress=progress)
