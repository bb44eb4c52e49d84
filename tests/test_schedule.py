"""Schedules that end where the run ends: the learning rate against the run's fraction, a run with a
deadline on an injected clock (it ends within one step of it, its schedule near zero), the
evaluation cadence, and ``train --time-budget`` using its budget without going over."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import make_competition_dataset, make_learnable
from workers import FakeClock

from pipeline import metrics as M
from pipeline.config import DataConfig, ModelConfig, TrainConfig, load_preset
from pipeline.data import load_dataset
from pipeline.models import build_model
from pipeline.train import Deadline, fit, lr_factor
from pipeline.train.schedule import RunLength


def test_linear_and_cosine_warm_up_then_reach_zero_at_the_end():
    assert lr_factor("linear", 0.0, 0.1) == pytest.approx(0.01)  # never 0: the first step would be wasted
    assert lr_factor("linear", 0.05, 0.1) == pytest.approx(0.5)
    assert lr_factor("linear", 0.1, 0.1) == pytest.approx(1.0)  # warm-up ends at the peak
    assert lr_factor("linear", 0.55, 0.1) == pytest.approx(0.5)  # halfway down: (1 - 0.55) / 0.9
    assert lr_factor("linear", 1.0, 0.1) == 0.0
    assert lr_factor("linear", 1.7, 0.1) == 0.0  # past the end: still zero, never negative
    assert lr_factor("cosine", 0.1, 0.1) == pytest.approx(1.0)
    assert lr_factor("cosine", 0.55, 0.1) == pytest.approx(0.5)  # cos(pi/2) halfway down
    assert lr_factor("cosine", 0.325, 0.1) == pytest.approx(0.5 * (1 + 2 ** -0.5))  # a quarter down
    assert lr_factor("cosine", 1.0, 0.1) == pytest.approx(0.0)
    assert lr_factor("linear", 0.25, 0.0) == pytest.approx(0.75)  # no warm-up


def test_a_run_length_is_images_or_a_deadline():
    clock = iter([10.0, 25.0, 40.0]).__next__
    timed = RunLength(deadline=40.0, start=10.0, clock=clock)
    assert [timed.fraction(0), timed.fraction(0), timed.over(0)] == [0.0, 0.5, True]
    counted = RunLength(images=200)
    assert (counted.fraction(50), counted.over(199), counted.over(200)) == (0.25, False, True)
    with pytest.raises(ValueError, match="exactly one"):
        RunLength(images=10, deadline=5.0, clock=clock)


class StepClock:
    """Time that passes only when the network runs: a second per training forward pass, half a
    second per evaluation forward pass (one evaluation of these few images is one pass)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def attach(self, model):
        def tick(module, args, output):
            self.now += 1.0 if module.training else 0.5
        model.register_forward_hook(tick)
        return model


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    return make_learnable(tmp_path_factory.mktemp("learnable"), per_class=16, val_per_class=4, size=16)


def _data(root, tmp_path):
    cfg = DataConfig(root=str(root), augment="shift", normalize="half", cache_dir=str(tmp_path / "c"),
                     audit_fraction=0.0)
    return cfg, load_dataset(cfg)


def _model(data, clock=None):
    model = build_model(ModelConfig(arch="cnn_v1", num_classes=data.num_classes))
    return clock.attach(model) if clock is not None else model


def test_a_deadline_ends_the_run_within_one_step_with_its_schedule_near_zero(learnable, tmp_path):
    data_cfg, data = _data(learnable, tmp_path)
    cfg = TrainConfig(batch_size=16, lr=2e-3, precision="fp32", device="cpu", epochs=1, warmup=0.1, evaluations=1)
    clock = StepClock()
    lrs = []
    result = fit(_model(data, clock), data, data_cfg, cfg, report=lambda epoch, row: lrs.append(row[M.LR]),
                 progress=False, deadline=Deadline(30.5, clock))
    # The timing probe's two evaluation passes read 1.0; 80 training images make 5 steps an epoch; steps
    # start while the clock reads under 30.5 (less a real-time reserve of milliseconds for the last
    # evaluation): at 1, 2 ... 30, 30 steps in 6 epochs. train.epochs=1 caps nothing.
    assert result.images == 30 * 16
    assert result.stop_reason == "deadline" and result.kept == "last weights"
    assert result.epochs_run == 6
    assert clock.now == 31.0 + 0.5 + 0.5  # then the last evaluation, plain and mirrored
    assert result.eval_seconds == pytest.approx(1.0, abs=0.05)  # those two passes (and the real-time probe)
    # The last step's rate: the schedule's at 30/30.5 of the run, (1 - 30/30.5) / 0.9 of the peak at
    # most (the reserve ends the run a little earlier, so the rate is a little lower).
    assert 0 < lrs[-1] <= 2e-3 * (1 - 30 / 30.5) / 0.9 + 1e-12
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))  # down every epoch after the warm-up
    assert result.best_epoch == 6  # the last weights are the model


def test_evaluations_come_at_the_cadence_and_at_the_end(learnable, tmp_path):
    data_cfg, data = _data(learnable, tmp_path)
    cfg = TrainConfig(batch_size=16, lr=2e-3, precision="fp32", device="cpu", epochs=8, evaluations=4)
    rows = []
    fit(_model(data), data, data_cfg, cfg, report=lambda epoch, row: rows.append((epoch, M.VAL_ACCURACY in row)),
        progress=False)
    evaluated = [epoch for epoch, has in rows if has]
    assert len(rows) == 8 and evaluated[-1] == 8  # the end is always evaluated
    assert set(evaluated) <= {2, 4, 6, 8}  # intermediate ones only at the quarter points (when cheap enough)
    plateau = []
    fit(_model(data), data, data_cfg, replace(cfg, schedule="plateau", epochs=3, early_stop_patience=0),
        report=lambda epoch, row: plateau.append(M.VAL_ACCURACY in row), progress=False)
    assert plateau == [True, True, True]  # plateau reads the selection split every epoch


def test_intermediate_evaluations_stop_when_they_would_cost_over_five_percent(learnable, tmp_path):
    """An epoch costs 5 s on this clock and an evaluation 0.5 s: asked for 8 evaluations in a 40 s
    run (4 s of evaluation, over 10 %), the run stops the intermediate ones at 5 % of its time."""
    data_cfg, data = _data(learnable, tmp_path)
    cfg = TrainConfig(batch_size=16, lr=2e-3, precision="fp32", device="cpu", epochs=2, evaluations=8)
    clock = StepClock()
    rows = []
    result = fit(_model(data, clock), data, data_cfg, cfg, report=lambda e, row: rows.append(M.VAL_ACCURACY in row),
                 progress=False, deadline=Deadline(40.0, clock))
    assert rows[-1] and 1 < sum(rows) < 8
    assert result.eval_fraction < 0.1


def test_train_uses_its_budget_without_going_over(tmp_path, tracking_here):
    """``train --time-budget``: the clock starts before the data loads; the schedule ends at the
    deadline less the time to audit and log; the command's whole wall time is within the budget and
    uses nearly all of it (a clock that moves 0.2 s at every reading)."""
    from mlflow.tracking import MlflowClient

    from pipeline.commands.train_command import run_training

    root = make_competition_dataset(tmp_path / "d", size=16, counts={"train": 4, "validation": 6}, test_count=10,
                                    test_labels=True)  # a labelled test split: the audit the deadline leaves time for
    preset = load_preset("tiny")
    preset = replace(preset, data=replace(preset.data, root=str(root), cache_dir=str(tmp_path / "c")),
                     train=replace(preset.train, epochs=2, device="cpu"),
                     study=replace(preset.study, time_budget="60s"))

    clock = FakeClock(0.0, 0.2)
    outcome = run_training(preset, "budget", progress=False, clock=clock)
    wall = outcome.summary[M.WALL_SECONDS]
    assert 0.9 * 60 <= wall <= 60
    run = MlflowClient().get_run(outcome.run_id)
    assert run.data.tags["stop_reason"] == "deadline"
    assert run.data.metrics[M.EPOCHS_RUN] > 2  # the budget, not train.epochs, set the length


def test_a_budget_too_small_to_train_says_so(tmp_path, tracking_here, capsys):
    """A budget that the data loading and the reserved evaluations use up trains no image, and the
    command says why instead of logging a model that never learned as if it were a result."""
    from pipeline.commands.train_command import run_training

    root = make_competition_dataset(tmp_path / "d", size=16, counts={"train": 4, "validation": 6}, test_count=10,
                                    test_labels=True)
    preset = load_preset("tiny")
    preset = replace(preset, data=replace(preset.data, root=str(root), cache_dir=str(tmp_path / "c")),
                     train=replace(preset.train, device="cpu"), study=replace(preset.study, time_budget="5s"))
    outcome = run_training(preset, "budget", progress=False, clock=FakeClock(0.0, 0.2))
    assert outcome.summary[M.TRAIN_IMAGES] == 0
    assert "left no time to train" in capsys.readouterr().err
    # With a minute the same run trains and says nothing of the kind.
    preset = replace(preset, study=replace(preset.study, time_budget="60s"))
    outcome = run_training(preset, "budget", progress=False, clock=FakeClock(0.0, 0.2))
    assert outcome.summary[M.TRAIN_IMAGES] > 0 and "left no time" not in capsys.readouterr().err
