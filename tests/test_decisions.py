"""The tuning session's small decisions, each read from a real storage the way workers read it: which
search trial a member's final run or refit takes, what a refit starts from, how long a final or a
search run lasts, and what the allocator counts. Trials are written with ``optuna.trial.create_trial``
and ``study.add_trial`` (or asked and enqueued) into an Optuna SQLite storage under ``tmp_path``; the
refit's checkpoint is a real artifact of a real MLflow run."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from workers import FakeClock

from pipeline import metrics as M
from pipeline.config import DataConfig, ModelConfig, TrainConfig
from pipeline.train import Deadline
from pipeline.train.checkpoint import ModelInterface, save_checkpoint
from pipeline.tune import keys
from pipeline.tune.budget import Budget, MemberStats
from pipeline.tune.candidates import session_candidates, top_trials
from pipeline.tune.phases import best_search_trial, enqueue_refits, final_choice, refit_start
from pipeline.tune.plan import Plan
from pipeline.tune.trial import budgeted_configs
from pipeline.tune.workers import member_stats, taken

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

LR = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}


def sqlite_study(tmp_path, name: str = "s.cnn_v1") -> optuna.Study:
    return optuna.create_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")


def add(study: optuna.Study, lr: float, value: float | None = None, state: TrialState = TrialState.COMPLETE,
        run: str | None = "run", **attrs) -> None:
    """A trial of configuration ``lr`` (its run ``run``, None: no run) with ``attrs`` as user attributes."""
    user_attrs = {**({keys.RUN: run} if run else {}), **attrs}
    study.add_trial(optuna.trial.create_trial(params={"lr": lr}, distributions=LR, value=value, state=state,
                                              user_attrs=user_attrs))


# ----------------------------------------------------------------------------- which search trial

def test_the_best_search_trial_leaves_out_refits_finals_runless_and_unfinished_trials(tmp_path):
    study = sqlite_study(tmp_path)
    add(study, 1e-3, 0.60, default_config=True)  # 0
    add(study, 2e-3, 0.99, phase=keys.REFIT)  # 1: a refit scores best, but is no search trial
    add(study, 3e-3, 0.98, phase=keys.FINAL)  # 2: nor is a final run
    add(study, 4e-3, 0.97, run=None)  # 3: finished without a run (no checkpoint to refit, no candidate)
    add(study, 5e-3, state=TrialState.PRUNED)  # 4
    add(study, 6e-3, state=TrialState.FAIL)  # 5
    add(study, 7e-3, 0.80)  # 6: the best search trial...
    add(study, 8e-3, 0.80)  # 7: ... tied with a later one: the earlier wins
    add(study, 9e-3, 0.79)  # 8
    assert best_search_trial(study).number == 6
    assert best_search_trial(sqlite_study(tmp_path, "empty")) is None


def test_a_nan_value_is_never_the_best():
    """A COMPLETE trial with a NaN value: Optuna's SQLite storage cannot hold one (``tell`` fails such a
    trial, ``create_trial`` refuses it), its in-memory storage can. First in the study, a NaN that were
    not skipped would win: no value compares greater than it."""
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="m", storage=storage, direction="maximize")
    trial_id = storage.create_new_trial(storage.get_study_id_from_name("m"))
    storage.set_trial_user_attr(trial_id, keys.RUN, "nan-run")
    storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [math.nan])
    add(study, 1e-3, 0.5)
    add(study, 2e-3, 0.4)
    assert math.isnan(study.trials[0].value)
    assert best_search_trial(study).number == 1


def test_the_final_run_trains_the_default_unless_a_search_beat_it_by_the_noise(tmp_path):
    """Values exact in binary: 0.75 - 0.5 is exactly 0.25, so "by at least the noise" is tested at the noise."""
    study = sqlite_study(tmp_path)
    add(study, 1e-3, 0.50, default_config=True)  # 0
    add(study, 2e-3, 0.625)  # 1
    add(study, 3e-3, 0.75)  # 2: the best search trial, 0.25 above the default
    add(study, 4e-3, 0.95, phase=keys.FINAL)  # 3: a final run beats everything, and is not a search result
    assert final_choice(study, noise=0.25).number == 2  # exactly at the noise: the searched configuration
    assert final_choice(study, noise=0.25 + 2 ** -20).number == 0  # just above it: the default stays
    assert final_choice(study, noise=0.0).number == 2

    # No default among the finished trials (it was pruned): the best search trial, whatever the noise.
    other = sqlite_study(tmp_path, "s.cnn_v2")
    add(other, 1e-3, state=TrialState.PRUNED, default_config=True)
    add(other, 2e-3, 0.51)
    assert final_choice(other, noise=0.5).number == 1
    # The default is the best search trial itself: it.
    best_default = sqlite_study(tmp_path, "s.cnn_v3")
    add(best_default, 1e-3, 0.9, default_config=True)
    add(best_default, 2e-3, 0.7)
    assert final_choice(best_default, noise=0.0).number == 0


# ----------------------------------------------------------------------------- what a refit starts from

def logged_checkpoint(client: MlflowClient, experiment: str, folder, fill: float) -> str:
    """A run holding a real checkpoint (at ``checkpoints/best.pt``) whose one weight is ``fill``."""
    path = save_checkpoint(folder / "best.pt", {"fc.weight": torch.full((2, 3), fill)}, ModelConfig(),
                           DataConfig(), TrainConfig(), ModelInterface(("a", "b"), (16, 16)), 3, 0.5)
    run_id = client.create_run(experiment).info.run_id
    client.log_artifact(run_id, str(path), M.CHECKPOINT_ARTIFACT.rsplit("/", 1)[0])
    client.set_terminated(run_id)
    return run_id


def test_a_refit_continues_the_best_search_trials_checkpoint_at_the_dropped_lr(tmp_path, tracking_here):
    client = MlflowClient()
    experiment = client.create_experiment("refits")
    worse = logged_checkpoint(client, experiment, tmp_path / "worse", 1.0)
    best = logged_checkpoint(client, experiment, tmp_path / "best", 2.0)
    final = logged_checkpoint(client, experiment, tmp_path / "final", 3.0)
    study = sqlite_study(tmp_path)
    add(study, 1e-3, 0.6, run=worse)
    add(study, 2e-3, 0.8, run=best)
    add(study, 3e-3, 0.9, run=final, phase=keys.FINAL)  # never continued: not a search trial
    session = SimpleNamespace(studies={"cnn_v1": study}, storage_url=f"sqlite:///{tmp_path / 'optuna.db'}",
                              client=client, preset=SimpleNamespace(study=SimpleNamespace(refit_epochs=3)))
    assert enqueue_refits(session) == {"cnn_v1": 1}
    assert enqueue_refits(session) == {}  # once per session
    refit = study.ask()
    assert (refit.user_attrs[keys.REFIT_OF], refit.user_attrs[keys.REFIT_OF_RUN]) == (1, best)
    assert study.trials[refit.number].system_attrs["fixed_params"] == {"lr": 2e-3}  # its configuration

    train_cfg = TrainConfig(epochs=30, lr=0.008, lr_factor=0.25, batch_size=16)
    cfg, state = refit_start(session, refit, train_cfg)
    # study.refit_epochs epochs, at the lr the plateau schedule would drop to next (0.008 x 0.25); the rest kept.
    assert cfg == replace(train_cfg, epochs=3, lr=0.002)
    assert list(state) == ["fc.weight"] and torch.equal(state["fc.weight"], torch.full((2, 3), 2.0))


# ----------------------------------------------------------------------------- how long a run lasts

def test_budget_phases_keep_at_most_half_the_budget_for_the_tail():
    # A tail longer than half the budget is cut to half: the final phase ends at 150, not 120.
    budget = Budget(started=100.0, seconds=100.0, final_seconds=20.0, tail_seconds=80.0)
    assert (budget.end, budget.final_end, budget.search_end) == (200.0, 150.0, 130.0)
    assert [budget.phase(t) for t in (129.5, 130.0, 149.5, 150.0)] == ["search", "final", "final", "tail"]
    # A short tail is kept whole; the phases count from the session's start, not from 0.
    short = Budget(started=100.0, seconds=100.0, final_seconds=20.0, tail_seconds=10.0)
    assert (short.final_end, short.search_end) == (190.0, 170.0)


def test_a_final_run_ends_at_its_share_of_the_final_phase_and_a_search_run_lasts_the_rung(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    a = optuna.create_study(study_name="s.a", storage=storage, direction="maximize")
    b = optuna.create_study(study_name="s.b", storage=storage, direction="maximize")
    search = a.ask()  # a search trial (no phase)
    for _ in range(3):
        a.enqueue_trial({}, user_attrs={keys.PHASE: keys.FINAL})
    a.enqueue_trial({})  # a waiting search trial: not a final run
    final = a.ask()  # the first final run starts; two of its member's wait...
    b.enqueue_trial({}, user_attrs={keys.PHASE: keys.FINAL})  # ... and one of another member's
    assert keys.is_final(final) and not keys.is_final(search)

    clock = FakeClock(start=790.0)
    budget = Budget(started=0.0, seconds=1000.0, final_seconds=200.0, tail_seconds=60.0)  # final phase 740-940
    plan = Plan(1000, 0, 60, 740, 200, ("a", "b"), 2.5, {"a": 4, "b": 4}, {"a": 5.0, "b": 5.0}, 0.02)
    preset = SimpleNamespace(train=SimpleNamespace(images_per_epoch=8))
    session = SimpleNamespace(studies={"a": a, "b": b}, budget=budget, plan=plan, clock=clock, preset=preset,
                              data=SimpleNamespace(train=range(20)))
    train_cfg = TrainConfig(epochs=30)

    # 150 s of the final phase left, three final runs waiting: this one gets a quarter of it.
    cfg, deadline = budgeted_configs(session, final, train_cfg)
    assert cfg == train_cfg and deadline == Deadline(790.0 + 150.0 / 4, clock)
    # A search run: the rung's 2.5 passes over 20 images, in epochs of 8 images: ceil(50 / 8) = 7 epochs.
    cfg, deadline = budgeted_configs(session, search, train_cfg)
    assert cfg == replace(train_cfg, epochs=7) and deadline is None
    # An epoch of the whole training set: ceil(2.5) = 3 epochs.
    whole_epochs = SimpleNamespace(train=SimpleNamespace(images_per_epoch=None))
    whole = SimpleNamespace(**{**vars(session), "preset": whole_epochs})
    assert budgeted_configs(whole, search, train_cfg)[0].epochs == 3
    # No budget, or no plan: the preset's epochs and no deadline, final run or not.
    for unbudgeted in ({"budget": None}, {"plan": None}):
        other = SimpleNamespace(**{**vars(session), **unbudgeted})
        assert budgeted_configs(other, final, train_cfg) == (train_cfg, None)
        assert budgeted_configs(other, search, train_cfg) == (train_cfg, None)


# ----------------------------------------------------------------------------- what the allocator counts

def test_the_allocator_counts_finished_and_running_search_trials_only(tmp_path):
    """Read from a real storage: complete, pruned and running search trials are taken; failed and waiting
    trials, refits and final runs (finished or running) are not. The cap is the plan's configurations,
    at most study.trials; a member the plan gives nothing has a cap of 0; without a plan, study.trials."""
    a, b = sqlite_study(tmp_path, "s.a"), sqlite_study(tmp_path, "s.b")
    add(a, 1e-3, 0.5)
    add(a, 2e-3, state=TrialState.PRUNED)
    add(a, 3e-3, state=TrialState.FAIL)
    add(a, 4e-3, 0.9, phase=keys.REFIT)
    add(a, 5e-3, 0.9, phase=keys.FINAL)
    a.ask()  # a running search trial
    a.enqueue_trial({}, user_attrs={keys.PHASE: keys.FINAL})
    a.ask()  # a running final run
    a.enqueue_trial({})  # a waiting search trial
    add(b, 1e-3, state=TrialState.FAIL)

    trials = a.get_trials(deepcopy=False)
    assert [t.state for t in trials].count(TrialState.RUNNING) == 2 and taken(trials) == 3
    plan = Plan(600, 10, 60, 200, 330, ("a",), 2.0, {"a": 6}, {"a": 9.0}, 0.02)
    session = SimpleNamespace(studies={"a": a, "b": b}, plan=plan,
                              preset=SimpleNamespace(study=SimpleNamespace(trials=4)))
    assert member_stats(session) == [MemberStats("a", 3, 4), MemberStats("b", 0, 0)]
    session.plan = replace(plan, configs={"a": 2, "b": 5})
    assert member_stats(session) == [MemberStats("a", 3, 2), MemberStats("b", 0, 4)]
    session.plan = None
    assert member_stats(session) == [MemberStats("a", 3, 4), MemberStats("b", 0, 4)]


def test_a_budgets_candidates_are_its_final_runs_not_its_search_runs(tmp_path):
    """Short search runs rank configurations; the final runs (equal, long schedules) are the members,
    and a member study without a final run gives none. Without a final run (no budget), the ``k``
    best search trials and every refit are."""
    study = sqlite_study(tmp_path)
    add(study, 1e-3, 0.90, default_config=True)  # 0: a search run scoring above both final runs
    add(study, 2e-3, 0.60)  # 1
    add(study, 2e-3, 0.80, phase=keys.FINAL)  # 2
    add(study, 2e-3, 0.85, phase=keys.FINAL)  # 3
    other = sqlite_study(tmp_path, "s.cnn_v2")
    add(other, 1e-3, 0.95)  # 0: the best run of the session, a search run
    session = SimpleNamespace(studies={"cnn_v1": study, "cnn_v2": other}, preset=SimpleNamespace(
        study=SimpleNamespace(top_k=3)))
    assert {a: [t.number for t in ts] for a, ts in session_candidates(session).items()} == {
        "cnn_v1": [2, 3], "cnn_v2": []}
    plain = sqlite_study(tmp_path, "p.cnn_v1")
    add(plain, 1e-3, 0.5)  # 0
    add(plain, 2e-3, 0.7)  # 1
    add(plain, 3e-3, 0.6)  # 2
    add(plain, 3e-3, 0.4, phase=keys.REFIT)  # 3
    assert [t.number for t in top_trials(plain, k=2)] == [1, 2, 3]
    session = SimpleNamespace(studies={"cnn_v1": plain, "cnn_v2": other}, preset=session.preset)
    assert {a: [t.number for t in ts] for a, ts in session_candidates(session).items()} == {
        "cnn_v1": [1, 2, 0, 3], "cnn_v2": [0]}
