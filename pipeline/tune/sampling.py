"""Suggest first, then build: one trial's configuration sampled from the preset's search space.

The space is data (``config.space``); this loop turns each entry into one ``trial.suggest_*`` call,
so a new searched setting is one preset line. Models never see a trial.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import optuna

from ..config import Choice, DataConfig, ModelConfig, Range, SearchSpace, TrainConfig, field_type, param_name
from ..models import arch_args

Suggester = Callable[[optuna.trial.BaseTrial, str, Any, bool], Any]


def _range(trial: optuna.trial.BaseTrial, name: str, dist: Range, integer: bool) -> Any:
    if integer:
        return trial.suggest_int(name, int(dist.low), int(dist.high), log=dist.log, step=int(dist.step or 1))
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)


def _choice(trial: optuna.trial.BaseTrial, name: str, dist: Choice, integer: bool) -> Any:
    return trial.suggest_categorical(name, list(dist.values))


SUGGEST: dict[type, Suggester] = {Range: _range, Choice: _choice}


def suggest(trial: optuna.trial.BaseTrial, space: SearchSpace, model: ModelConfig, train: TrainConfig,
            data: DataConfig) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    """Sample one configuration. Returns plain configs: models never see a trial."""
    configs: dict[str, Any] = {"model": model, "train": train, "data": data}
    accepted = arch_args(model.arch)
    changes: dict[str, dict[str, Any]] = {section: {} for section in configs}
    for key, dist in space.items():
        section, name = key.split(".", 1)
        if section == "model" and name not in accepted:
            continue  # the architecture has no such setting (vgg16: no feature dropout)
        integer = field_type(type(configs[section]), name) is int
        changes[section][name] = SUGGEST[type(dist)](trial, param_name(key), dist, integer)
    return (replace(model, **changes["model"]), replace(train, **changes["train"]),
            replace(data, **changes["data"]))


def trial_configs(trial: optuna.trial.BaseTrial, space: SearchSpace, model: ModelConfig, train: TrainConfig,
                  data: DataConfig, origin: int | None = None) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    """A trial's configuration: the sampled settings, and the trial's own seed (seed + trial number),
    so equal configurations start from equal weights and every trial is repeatable. A retry passes
    its ``origin`` (the number of the trial it re-runs): same parameters, same seed, same run."""
    number = trial.number if origin is None else origin
    return suggest(trial, space, model, replace(train, seed=train.seed + number), data)
