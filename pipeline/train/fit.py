"""``fit``: one run of the training loop, for every architecture.

``fit`` knows nothing of MLflow or Optuna: it calls ``report(epoch, metrics)`` after each epoch and
returns a ``FitResult``. A listener may raise to stop training (the tuner's pruner does); the
exception propagates unchanged. The run's length is known before it starts (a deadline, or a number
of images: ``schedule.RunLength``) and a decaying schedule reaches zero at its end.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .. import metrics as M
from ..config import DataConfig, TrainConfig
from ..data import BatchAugmenter, Dataset
from ..rng import RunRandom, seeded_dropout
from .device import on_device, resolve_device, resolve_precision
from .host_memory import trim_heap
from .loop import (
    EpochStats,
    FitResult,
    Report,
    StopTraining,
    TrainStep,
    _progress,
    class_weight_tensor,
    evaluate,
    make_optimizer,
    predict_logits,
    train_one_epoch,
)
from .schedule import Deadline, RunLength, lr_factor


def fit(model: nn.Module, data: Dataset, data_cfg: DataConfig, cfg: TrainConfig,
        report: Report | None = None, progress: bool = True, deadline: Deadline | None = None) -> FitResult:
    """Train ``model``. The run's length is ``deadline`` when given, else ``cfg.epochs`` epochs; a decaying
    schedule reaches zero at its end and the last weights (or their EMA) are the run's model, ``plateau``
    keeps the best epoch instead.
    Shuffling, augmentation and dropout draw from the run's own generators (seeded by ``cfg.seed``),
    never from torch's global one: runs in threads (``tune --n-jobs``) neither perturb nor depend on
    each other."""
    run_random = RunRandom(cfg.seed, resolve_device(cfg.device))
    with seeded_dropout(model, run_random.device):
        return _Run(model, data, data_cfg, cfg, run_random, report, progress, deadline).fit()


class _Run:
    """One ``fit``: the set-up, then epochs until the run's length is used, evaluations at its cadence."""

    def __init__(self, model: nn.Module, data: Dataset, data_cfg: DataConfig, cfg: TrainConfig,
                 run_random: RunRandom, report: Report | None, progress: bool, deadline: Deadline | None):
        clock = deadline.clock if deadline is not None else time.time
        self.cfg, self.data, self.report, self.progress, self.clock = cfg, data, report, progress, clock
        self.random = run_random
        self.device = device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
        self.model = model.to(device, memory_format=torch.channels_last)
        # On CUDA the whole uint8 dataset lives on the GPU, copied once and shared by every thread's run.
        self.train_x, self.train_y = on_device(data.train.images, device), on_device(data.train.labels, device)
        self.val_x, self.val_y = on_device(data.validation.images, device), data.validation.labels
        self.augment = BatchAugmenter(data_cfg.augment, data_cfg.normalize, device, data.num_classes,
                                      data_cfg.cutmix_alpha, data_cfg.mixup_alpha, random=run_random)
        weights = class_weight_tensor(cfg.class_weights, data.train.labels, data.num_classes)
        self.loss_fn = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None,
                                           label_smoothing=cfg.label_smoothing)
        self.optimizer = make_optimizer(self.model, cfg, device)
        self.plateau = cfg.schedule == "plateau"
        self.scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="max",
                                                                      patience=cfg.lr_patience, factor=cfg.lr_factor)
                          if self.plateau else None)
        self.ema = (torch.optim.swa_utils.AveragedModel(
            self.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
            if cfg.ema > 0 else None)
        self.per_epoch = min(cfg.images_per_epoch or len(self.train_y), len(self.train_y))
        self.started = clock()
        self.eval_seconds = 0.0
        self.deadline = deadline
        self.seconds_per_eval_image = self._eval_seconds_per_image()
        self._set_length()
        self.images = 0
        self.tally = _Tally(stop_reason="deadline" if self.length.timed else "max_epochs")

    def _set_length(self) -> None:
        """The run's length. With a deadline, the final evaluation (plain and mirrored images) and the
        caller's scoring happen inside it: training ends early enough for them, with a margin."""
        if self.deadline is None:
            self.length = RunLength(images=self.cfg.epochs * self.per_epoch)
            return
        images = 2 * len(self.val_y) + self.deadline.after_images
        end = max(self.started, self.deadline.at - 1.25 * images * self.seconds_per_eval_image)
        self.length = RunLength(deadline=end, start=self.started, clock=self.clock)

    def _eval_seconds_per_image(self) -> float:
        """One evaluation batch, timed after an untimed one (the first pass of a process pays for
        kernel selection): the first estimate of what the run must keep for its last evaluation."""
        n = min(len(self.val_y), self.cfg.eval_batch_size)
        predict_logits(self.model, self.val_x[:min(n, 8)], self.augment.normalizer, self.device, self.precision, n)
        t0 = time.perf_counter()
        predict_logits(self.model, self.val_x[:n], self.augment.normalizer, self.device, self.precision, n)
        seconds = time.perf_counter() - t0
        self.eval_seconds += seconds
        return seconds / max(n, 1)

    def _before_step(self, seen_this_epoch: int) -> bool:
        seen = self.images + seen_this_epoch
        if self.length.timed and self.length.over(seen):
            return False
        if not self.plateau:
            factor = lr_factor(self.cfg.schedule, self.length.fraction(seen), self.cfg.warmup)
            for group in self.optimizer.param_groups:
                group["lr"] = self.cfg.applied_lr * factor
        return True

    def _step(self, *args) -> None:
        self.optimizer.step(*args)
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    @property
    def network(self) -> nn.Module:
        """The run's model: the weights' EMA when averaging, else the trained weights."""
        return self.ema.module if self.ema is not None else self.model

    def _evaluate(self):
        """(loss, accuracy, probabilities, logits) of the selection split, timed on the run's clock:
        evaluation is paid for out of the run's time."""
        t0, p0 = self.clock(), time.perf_counter()
        out = evaluate(self.network, self.val_x, self.val_y, self.augment.normalizer, self.device,
                       self.precision, self.cfg.eval_batch_size)
        self.eval_seconds += self.clock() - t0
        # A whole split's pass measures evaluation better than the first probe: the deadline's reserve follows.
        self.seconds_per_eval_image = (time.perf_counter() - p0) / max(1, len(self.val_y))
        self._set_length()
        return out

    def _kept(self, probs: torch.Tensor, logits: torch.Tensor) -> tuple:
        """What the run keeps of its current weights: their selection outputs, the mirror images'
        logits (the ensemble may choose a test-time flip) and a host copy of the weights."""
        t0 = self.clock()
        flipped = predict_logits(self.network, self.val_x, self.augment.normalizer, self.device, self.precision,
                                 self.cfg.eval_batch_size, flip=True)
        self.eval_seconds += self.clock() - t0
        weights = {k: v.detach().to("cpu", copy=True) for k, v in self.network.state_dict().items()}
        return probs, logits, flipped, weights

    def _due(self, evaluated: int, fraction: float) -> bool:
        """An intermediate evaluation at this epoch boundary: every epoch with ``plateau`` (it needs
        one); otherwise at each of ``cfg.evaluations - 1`` even points of the run, while evaluation
        stays under ``cfg.eval_share`` of the run's projected time (evaluation is paid for out of the
        run's time; the final one always happens)."""
        if self.plateau:
            return True
        if fraction <= 0 or (evaluated + 1) / self.cfg.evaluations > fraction:
            return False
        elapsed = self.clock() - self.started
        projected = elapsed / min(fraction, 1.0)
        per_eval = (self.eval_seconds / evaluated if evaluated
                    else len(self.val_y) * self.seconds_per_eval_image)
        return self.eval_seconds + per_eval <= self.cfg.eval_share * projected

    def fit(self) -> FitResult:
        epochs = _progress(itertools.count(1), self.progress, desc="epochs",
                           total=None if self.length.timed else self.cfg.epochs)
        for epoch in epochs:
            row, last = self._epoch(epoch)
            self.data.release_pages()  # the cached images this epoch read stop counting in the resident set
            self.tally.history.append(row)
            if hasattr(epochs, "set_postfix"):
                epochs.set_postfix(loss=f"{self.tally.epoch_stats[-1].loss:.3f}",
                                   best=f"{max(self.tally.best_acc, 0):.3f}")
            # In this order: a listener's stop first, then the run's end, then plateau's early stopping.
            if not self._reported(epoch, row) or last or self._stops_early(epoch):
                break
        trim_heap()  # the steps' freed activations go back to the system: the caller's next phase starts lean
        return self._result()

    def _epoch(self, epoch: int) -> tuple[dict[str, float], bool]:
        """One epoch of training, then an evaluation when due: (the epoch's row of metrics, whether it is
        the run's last)."""
        t = self.tally
        lr = self.optimizer.param_groups[0]["lr"]
        before = None if self.plateau and not self.length.timed else self._before_step
        # Not kept on the run: _StepOptimizer points back at it, and a cycle would outlive the run until a gc pass.
        step = TrainStep(self.model, _StepOptimizer(self), self.loss_fn, self.augment, self.device, self.precision,
                         self.cfg.micro_batch)
        stats = train_one_epoch(step, self.train_x, self.train_y, self.cfg.batch_size, self.random.cpu,
                                self.progress, self.cfg.images_per_epoch, before)
        self.images += stats.images
        t.epoch_stats.append(stats)
        t.train_seconds += stats.seconds
        t.data_seconds += stats.data_seconds
        fraction = self.length.fraction(self.images)
        last = stats.ended or fraction >= 1.0 or (not self.length.timed and epoch >= self.cfg.epochs)
        row = {M.LR: lr if self.plateau else self.optimizer.param_groups[0]["lr"]}
        if stats.images:  # a deadline can fall on an epoch boundary: nothing trained in this one
            row |= {M.TRAIN_LOSS: stats.loss, M.TRAIN_ACCURACY: stats.accuracy,
                    M.EPOCH_IMAGES_PER_SECOND: stats.images / stats.seconds if stats.seconds else 0.0}
        if last or self._due(t.evaluated, fraction):
            row |= self._evaluate_epoch(epoch, keep=self.plateau or last)
        return row, last

    def _evaluate_epoch(self, epoch: int, keep: bool) -> dict[str, float]:
        """Evaluate the selection split (stepping ``plateau``'s scheduler) and, when ``keep``, keep these
        weights: ``plateau`` only when they are the best so far."""
        t = self.tally
        t.evaluated += 1
        val_loss, val_acc, probs, logits = self._evaluate()
        if self.plateau:
            self.scheduler.step(val_acc)
        if keep and (not self.plateau or val_acc > t.best_acc):
            t.best_acc, t.best_epoch, t.best = val_acc, epoch, self._kept(probs, logits)
        return {M.VAL_LOSS: val_loss, M.VAL_ACCURACY: val_acc}

    def _reported(self, epoch: int, row: dict[str, float]) -> bool:
        """Pass the epoch's row to the listener; False when it stops the run."""
        if self.report is None:
            return True
        t = self.tally
        try:
            self.report(epoch, row)
        except StopTraining as stop:
            t.stop_reason = str(stop) or "stopped by a listener"
            if t.best is None:  # a listener stopped a decaying run early: its current weights
                _, t.best_acc, probs, logits = self._evaluate()
                t.best_epoch, t.best = epoch, self._kept(probs, logits)
            return False
        return True

    def _stops_early(self, epoch: int) -> bool:
        """``plateau``'s early stopping: no better epoch for ``cfg.early_stop_patience`` epochs."""
        patience = self.cfg.early_stop_patience
        if self.plateau and patience and epoch - self.tally.best_epoch >= patience:
            self.tally.stop_reason = "early_stopping"
            return True
        return False

    def _result(self) -> FitResult:
        t = self.tally
        assert t.best is not None
        probs, logits, flipped, state = t.best
        wall = self.clock() - self.started
        return FitResult(
            best_state=state,
            best_epoch=t.best_epoch,
            best_val_accuracy=t.best_acc,
            epochs_run=len(t.history),
            val_probs=probs.numpy().astype(np.float32),
            val_logits=logits.numpy().astype(np.float32),
            val_logits_flipped=flipped.numpy().astype(np.float32),
            history=t.history,
            train_seconds=t.train_seconds,
            images_per_second=self.images / t.train_seconds if t.train_seconds else 0.0,
            data_fraction=t.data_seconds / t.train_seconds if t.train_seconds else 0.0,
            epoch_stats=t.epoch_stats,
            stop_reason=t.stop_reason,
            device=str(self.device),
            precision=self.precision,
            images=self.images,
            eval_seconds=self.eval_seconds,
            wall_seconds=wall,
            kept="best epoch" if self.plateau else ("EMA of the weights" if self.ema is not None else "last weights"),
        )


@dataclass
class _Tally:
    """What a run accumulates epoch by epoch: the metrics rows and timings, the count of evaluations, and
    the weights it keeps so far (``best``: probabilities, logits, mirrored logits, host state)."""

    stop_reason: str
    history: list[dict[str, float]] = field(default_factory=list)
    epoch_stats: list[EpochStats] = field(default_factory=list)
    train_seconds: float = 0.0
    data_seconds: float = 0.0
    evaluated: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    best: tuple | None = None


class _StepOptimizer:
    """The run's optimiser as ``train_one_epoch`` sees it: each step also updates the weights' EMA."""

    def __init__(self, run: _Run):
        self.run = run

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.run.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.run._step()
