"""``train``: one architecture, one MLflow run (params, epoch curves, evaluation, checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .. import tracking
from ..config import Preset, flat_params, override
from ..data import load_dataset
from ..models import model_kwargs
from ..progress import EpochLines
from ..train import build_and_fit, resolve_device


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    summary: dict[str, float]


def run_training(preset: Preset, experiment: str, run_name: str | None = None,
                 progress: bool = True) -> TrainOutcome:
    client = tracking.client()
    tracking.check_tracking(client)
    data = load_dataset(preset.data)
    preset = replace(preset, model=override(preset.model, num_classes=data.num_classes))
    model_kwargs(preset.model)  # a bad model setting is an error before any run exists
    device = resolve_device(preset.train.device)
    run_id, _ = tracking.open_run(client, experiment, run_name or f"train-{preset.model.arch}",
                                  tags={**tracking.standard_tags(str(device)), "kind": "train",
                                        "arch": preset.model.arch})
    with tracking.run_guard(client, run_id):
        tracking.log_params(client, run_id, {**flat_params(preset), "preset": preset.name})
        tracking.log_dataset(client, run_id, data)
        logger = tracking.EpochLogger(client, run_id)
        lines = EpochLines(f"train {preset.model.arch}", preset.train.epochs)

        def report(epoch: int, values: dict[str, float]) -> None:
            logger(epoch, values)
            lines(epoch, values)

        result = build_and_fit(preset.model, data, preset.data, preset.train, report=report, progress=progress)
        summary = tracking.log_training_outputs(client, run_id, result, data, preset.model, preset.data,
                                                preset.train)
        tracking.set_tags(client, run_id, {"precision": result.precision, "stop_reason": result.stop_reason})
    return TrainOutcome(run_id, summary)
