"""``train``: one architecture, one MLflow run (params, epoch curves, evaluation, checkpoint)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import metrics as M
from .. import tracking
from ..config import Preset, flat_params, override, parse_duration
from ..data import Normalizer, load_dataset
from ..data.roles import partition
from ..metrics import wilson
from ..models import build_model, model_kwargs
from ..progress import EpochLines, pct, say
from ..train import Deadline, build_and_fit, predict_probs, resolve_device
from ..train.schedule import Clock
from .options import TrainOptions

# Seconds of a time budget kept after the audit for writing the run's artifacts (checkpoint, figures).
LOG_SECONDS = 5.0


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    summary: dict[str, float]


def run_training(preset: Preset, experiment: str, run_name: str | None = None,
                 progress: bool = True, clock: Clock = time.time) -> TrainOutcome:
    """With ``study.time_budget``: the clock starts here (data loading included, as for ``tune``) and
    the budget is the run's length: its schedule decays to zero at the deadline, which also leaves the
    time to evaluate, audit and log (``train.epochs`` does not cap it)."""
    started = clock()
    client = tracking.client()
    tracking.check_tracking(client)
    roles = partition(load_dataset(preset.data), preset.data)
    data = roles.data  # validation is the selection split: best epoch and early stopping read only it
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
        deadline = budget_deadline(preset, started, roles, clock)
        lines = EpochLines(f"train {preset.model.arch}", 0 if deadline else preset.train.epochs)

        def report(epoch: int, values: dict[str, float]) -> None:
            logger(epoch, values)
            lines(epoch, values)

        result = build_and_fit(preset.model, data, preset.data, preset.train, report=report, progress=progress,
                               deadline=deadline)
        summary = tracking.log_training_outputs(client, run_id, result, data, preset.model, preset.data,
                                                preset.train)
        if deadline is not None and not summary.get(M.TRAIN_IMAGES):
            say(f"note: the time budget ({preset.study.time_budget}) left no time to train: loading the data and "
                f"the evaluations it reserves ({len(data.validation)} selection images twice"
                + (f", {len(roles.audit)} audit images" if roles.audit is not None else "")
                + ") took all of it; give a longer --time-budget")
        tracking.set_tags(client, run_id, {"precision": result.precision, "stop_reason": result.stop_reason,
                                           "audit_split": roles.info.spec, "kept_weights": result.kept})
        if roles.audit is not None:
            summary |= audit_accuracy(result, preset, roles.audit, device)
            tracking.log_metrics(client, run_id, summary, step=result.best_epoch)
        summary |= {M.WALL_SECONDS: clock() - started}
        tracking.log_metrics(client, run_id, {M.WALL_SECONDS: summary[M.WALL_SECONDS]}, step=result.best_epoch)
        tracking.describe_run(client, run_id, description(preset, data, result, summary))
    return TrainOutcome(run_id, summary)


def budget_deadline(preset: Preset, started: float, roles, clock: Clock) -> Deadline | None:
    """With ``study.time_budget``: where the run's schedule ends (its audit and logging paid for)."""
    if not preset.study.time_budget:
        return None
    end = started + parse_duration(preset.study.time_budget) - LOG_SECONDS
    say(f"train {preset.model.arch}: {preset.train.schedule} schedule to the deadline in {end - clock():.0f} s (the "
        f"time budget sets the length; train.epochs={preset.train.epochs} does not cap it)")
    return Deadline(end, clock, after_images=len(roles.audit) if roles.audit is not None else 0)


def description(preset: Preset, data, result, summary: dict[str, float]) -> str:
    """The run's one line in the UI's Description: what was trained, and its figures named for their images."""
    text = (f"{preset.model.arch} trained on {Path(data.root).name} ({len(data.train)} images, {result.epochs_run} "
            f"epochs): best selection accuracy {pct(result.best_val_accuracy)} at epoch {result.best_epoch} "
            f"({len(data.validation)} images)")
    if M.AUDIT_ACCURACY in summary:
        text += (f", audit accuracy {pct(summary[M.AUDIT_ACCURACY])} ({int(summary[M.AUDIT_IMAGES])} images no "
                 "choice read)")
    return text


def audit_accuracy(result, preset: Preset, audit, device) -> dict[str, float]:
    """The best epoch's accuracy on the audit images, which neither the epoch choice nor early stopping read."""
    model = build_model(preset.model)
    model.load_state_dict(result.best_state)
    model = model.to(device, memory_format=torch.channels_last)
    probs = predict_probs(model, audit.images, Normalizer(preset.data.normalize, device), device, result.precision,
                          preset.train.eval_batch_size)
    audit.release_pages()
    correct = int((probs.argmax(1) == audit.labels).sum())
    low, high = wilson(correct, len(audit))
    return {M.AUDIT_ACCURACY: correct / len(audit), f"{M.AUDIT_ACCURACY}_low": low,
            f"{M.AUDIT_ACCURACY}_high": high, M.AUDIT_IMAGES: float(len(audit))}


def main(preset: Preset, opts: TrainOptions, progress: bool) -> int:
    outcome = run_training(preset, preset.tracking.experiment, opts.run_name, progress=progress)
    print(f"run {outcome.run_id}: " + ", ".join(f"{k}={v:.4g}" for k, v in outcome.summary.items()
                                                if not k.startswith("val_recall")))
    return 0
