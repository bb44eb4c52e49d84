"""The time budget's logic, with a fake clock and given epoch times (no timed tests): admission, the
stop at an epoch boundary, one budget for every worker, the split between members, warm start."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from pipeline.config import ConfigError, DataConfig, ModelConfig, TrainConfig, parse_duration
from pipeline.data import load_dataset
from pipeline.train import build_and_fit
from pipeline.tune.budget import (EPOCH_SECONDS, Budget, EpochBudget, MemberStats, admits, choose_member,
                                  epoch_estimates, projected_epoch, session_budget)
from pipeline.tune.session import TuneError
from pipeline.tune.warm_start import warm_start
from workers import tracking_here  # noqa: F401 - fixture

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


class FakeClock:
    def __init__(self, start: float = 1000.0, step: float = 0.0):
        self.now, self.step = start, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_durations():
    assert [parse_duration(t) for t in ("30m", "2h", "1h30m", "90s", "45")] == [1800, 7200, 5400, 90, 45]
    for bad in ("soon", "10x", "0", "-5m"):
        with pytest.raises(ConfigError, match="study.time_budget"):
            parse_duration(bad)


def test_admission_stops_when_the_projected_epoch_would_end_after_the_phase():
    budget = Budget(started=0.0, seconds=1000.0, refit_fraction=0.2, tail_seconds=60.0)
    assert (budget.search_end, budget.refit_end, budget.end) == (740.0, 940.0, 1000.0)
    assert [budget.phase(t) for t in (0, 739, 740, 939, 940)] == ["search", "search", "refit", "refit", "tail"]
    assert admits(budget, now=600.0, epoch_seconds=100.0, phase_end=budget.search_end)  # ends at 700
    assert not admits(budget, now=660.0, epoch_seconds=100.0, phase_end=budget.search_end)  # would end at 760
    assert admits(budget, now=739.0, epoch_seconds=None, phase_end=budget.search_end)  # never measured: a probe
    assert not admits(budget, now=740.0, epoch_seconds=None, phase_end=budget.search_end)
    assert "to spare" in budget.describe_use(990.0) and "OVER by 0m05s" in budget.describe_use(1005.0)


def test_estimates_come_from_every_trials_measured_epochs():
    def trial(bs, times):
        return optuna.trial.create_trial(params={"batch_size": bs}, value=0.5, user_attrs={EPOCH_SECONDS: times},
                                         distributions={"batch_size": optuna.distributions.CategoricalDistribution(
                                             [32, 64])})

    est = epoch_estimates([trial(32, [10.0, 12.0]), trial(64, [8.0]), trial(32, [11.0])])
    assert projected_epoch(est, 32) == 11.0 and projected_epoch(est, 64) == 8.0
    assert projected_epoch(est, 128) == 10.5  # an unmeasured size: the architecture's median
    assert projected_epoch(epoch_estimates([]), 32) is None


def test_a_trial_stops_at_an_epoch_boundary_as_finished_with_its_best_state(tmp_path):
    from conftest import make_competition_dataset

    root = make_competition_dataset(tmp_path / "d", size=16, counts={"train": 4, "validation": 2})
    data = load_dataset(DataConfig(root=str(root), augment="none", normalize="half",
                                   cache_dir=str(tmp_path / "c")))
    clock = FakeClock(start=0.0, step=10.0)  # every reading is 10 s later: every epoch "takes" 10 s
    listener = EpochBudget(None, phase_end=45.0, clock=clock)  # starts at 10: epochs end at 20, 30, 40; a 4th at 50
    result = build_and_fit(ModelConfig(convs_per_block=1), data, DataConfig(augment="none", normalize="half"),
                           TrainConfig(epochs=10, batch_size=10, precision="fp32", device="cpu"), listener)
    assert result.epochs_run == 3 and result.stop_reason.startswith("time budget")
    assert listener.times == [10.0, 10.0, 10.0]
    assert result.best_state and 1 <= result.best_epoch <= 3


def test_two_workers_share_one_budget(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = optuna.create_study(study_name="s.cnn_v1", storage=storage)
    b1 = session_budget(first, "30m", 0.2, 60, FakeClock(5000.0))
    # Another worker, ten minutes later, another process: the same clock start and length.
    other = optuna.load_study(study_name="s.cnn_v1", storage=storage)
    b2 = session_budget(other, None, 0.2, 60, FakeClock(5600.0))
    assert b1 == b2 and b2.started == 5000.0 and b2.seconds == 1800.0
    with pytest.raises(TuneError, match="differs from the session's"):
        session_budget(other, "1h", 0.2, 60, FakeClock(5700.0))
    # Epoch times a worker records on its trial reach every worker's projection.
    trial = first.ask({"batch_size": optuna.distributions.CategoricalDistribution([32])})
    EpochBudget(trial, phase_end=1e9, clock=FakeClock(0.0, 42.0))(1, {})
    assert projected_epoch(epoch_estimates(other.get_trials(deepcopy=False)), 32) == 42.0
    assert session_budget(optuna.create_study(storage=storage), None, 0.2, 60, FakeClock()) is None


def _stats(arch, taken, cap, seconds, best):
    return MemberStats(arch, taken, cap, seconds, best)


def test_the_next_trial_goes_where_a_second_buys_the_most():
    # Every member is explored first, fewest trials first.
    assert choose_member([_stats("a", 3, 50, 10, [.5, .6, .7]), _stats("b", 1, 50, 20, [.4])]) == "b"
    # Then: equal gains, one member twice as slow -> the cheap one.
    cheap_and_slow = [_stats("a", 6, 50, 60.0, [.5, .6, .65, .7, .72, .74]),
                      _stats("b", 6, 50, 30.0, [.5, .6, .65, .7, .72, .74])]
    assert choose_member(cheap_and_slow) == "b"
    # Equal cost; one still improving, one flat -> the improving one.
    assert choose_member([_stats("a", 6, 50, 30.0, [.5, .6, .6, .6, .6, .6]),
                          _stats("b", 6, 50, 30.0, [.5, .55, .6, .65, .7, .75])]) == "b"
    # A slow member must earn its cost: twice the price, but more than twice the gain -> it wins.
    assert choose_member([_stats("a", 6, 50, 30.0, [.5, .55, .56, .57, .58, .59]),
                          _stats("b", 6, 50, 60.0, [.5, .6, .65, .7, .76, .82])]) == "b"
    # Caps still hold; without a budget the order is the members' own.
    assert choose_member([_stats("a", 50, 50, 1.0, [.9] * 6), _stats("b", 6, 50, 99.0, [.1] * 6)]) == "b"
    assert choose_member([_stats("a", 2, 3, None, []), _stats("b", 0, 3, None, [])], by_value=False) == "a"
    assert choose_member([_stats("a", 3, 3, 1.0, [.5])]) is None


def test_warm_start_enqueues_the_best_k_configurations_of_an_earlier_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    earlier = optuna.create_study(study_name="quick.cnn_v1", storage=storage, direction="maximize")
    for lr, value in ((1e-3, 0.6), (2e-3, 0.9), (3e-3, 0.7), (4e-3, 0.8), (5e-3, 0.5)):
        earlier.add_trial(optuna.trial.create_trial(params={"lr": lr}, distributions=dist, value=value))
    new = {"cnn_v1": optuna.create_study(study_name="full.cnn_v1", storage=storage, direction="maximize"),
           "cnn_v2": optuna.create_study(study_name="full.cnn_v2", storage=storage, direction="maximize")}
    assert warm_start(new, storage, "quick", 3) == {"cnn_v1": 3}  # quick.cnn_v2 does not exist: cold
    waiting = new["cnn_v1"].get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"]["lr"] for t in waiting] == [2e-3, 4e-3, 3e-3]  # best first
    assert waiting[0].user_attrs["warm_start_from"] == "quick.cnn_v1#1"
    assert warm_start(new, storage, f"quick@{storage}", 3) == {}  # once per session
    assert new["cnn_v1"].ask().suggest_float("lr", 1e-4, 1e-1, log=True) == 2e-3  # the queue comes first


def test_admission_in_a_session_follows_the_shared_clock_and_the_measured_epochs(tmp_path, monkeypatch):
    """The real admission path, on a real storage: with 100 s epochs measured by an earlier trial, a
    trial is admitted while its first epoch ends before the search phase does, and not after."""
    import mlflow
    import yaml
    from conftest import make_competition_dataset

    from pipeline.config import load_preset
    from pipeline.tune import open_session
    from pipeline.tune.workers import admit_trial

    root = make_competition_dataset(tmp_path / "d", size=16, counts={"train": 2, "validation": 2}, test_count=2,
                                    test_labels=True)
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"data": {"root": str(root)}, "study": {"members": ["cnn_v1"], "trials": 5}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    session = open_session(load_preset(str(preset)), "b", "s", f"sqlite:///{tmp_path / 'optuna.db'}")
    clock = FakeClock(start=10_000.0)
    session.clock = clock
    session.budget = session_budget(session.studies["cnn_v1"], "1000s", 0.2, 60, clock)  # search ends at 10,740
    study = session.studies["cnn_v1"]
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={EPOCH_SECONDS: [100.0, 100.0]}))
    clock.now = 10_600.0
    admitted = admit_trial(session, "cnn_v1")
    assert admitted is not None  # its first epoch would end at 10,700
    study.tell(admitted, state=TrialState.FAIL)
    clock.now = 10_650.0
    assert admit_trial(session, "cnn_v1") is None  # ... at 10,750: after the search phase


def test_train_with_a_time_budget_stops_at_the_epoch_boundary(tmp_path, tracking_here):
    """``train --time-budget``: the same clock as ``tune``'s, started before the data loads; the run
    records why it stopped."""
    from dataclasses import replace

    from conftest import make_competition_dataset
    from mlflow.tracking import MlflowClient

    from pipeline.commands.train import run_training
    from pipeline.config import load_preset

    root = make_competition_dataset(tmp_path / "d", size=16, counts={"train": 4, "validation": 6})
    preset = load_preset("tiny")
    preset = replace(preset, data=replace(preset.data, root=str(root), cache_dir=str(tmp_path / "c"),
                                          audit_fraction=0.0),
                     train=replace(preset.train, epochs=10, early_stop_patience=10, lr_patience=10, device="cpu"),
                     study=replace(preset.study, time_budget="45s"))
    # Every reading 10 s later: the clock starts at 10 (budget ends at 55), the listener's at 20,
    # epochs end at 30, 40, 50; a 4th would end at 60.
    outcome = run_training(preset, "budget", progress=False, clock=FakeClock(start=0.0, step=10.0))
    run = MlflowClient().get_run(outcome.run_id)
    assert run.data.tags["stop_reason"].startswith("time budget")
    assert len(MlflowClient().get_metric_history(outcome.run_id, "val_accuracy")) == 3
    # Without a budget the same run trains every epoch.
    unbounded = run_training(replace(preset, study=replace(preset.study, time_budget=None)), "budget",
                             progress=False, clock=FakeClock(start=0.0, step=10.0))
    assert len(MlflowClient().get_metric_history(unbounded.run_id, "val_accuracy")) == 10


def test_refits_in_turn_share_the_refit_phase_evenly():
    from pipeline.tune.budget import refit_deadline

    # 300 s of refit phase left, two members waiting in one worker: the first gets 100 s, then the
    # second (one waiting) half of what is left, the last all of it.
    assert refit_deadline(1000.0, 1300.0, waiting=2) == 1100.0
    assert refit_deadline(1100.0, 1300.0, waiting=1) == 1200.0
    assert refit_deadline(1200.0, 1300.0, waiting=0) == 1300.0
    assert refit_deadline(1400.0, 1300.0, waiting=1) == 1400.0  # past the phase: stop at once


def test_exploration_trials_get_an_even_share_of_the_search_phase():
    from pipeline.tune.budget import search_deadline

    budget = Budget(started=0.0, seconds=1000.0, refit_fraction=0.2, tail_seconds=100.0)  # search ends at 700
    # 2 members x 3 exploration trials: each may run ~116.7 s from its start, never past the phase.
    assert search_deadline(budget, 50.0, exploring=True, members=2, explore=3) == pytest.approx(50.0 + 700.0 / 6)
    assert search_deadline(budget, 650.0, exploring=True, members=2, explore=3) == 700.0
    # After exploration the pruner decides how far a trial goes, up to the end of the phase.
    assert search_deadline(budget, 50.0, exploring=False, members=2, explore=3) == 700.0
