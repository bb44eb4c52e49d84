"""The time budget's logic, with a fake clock and given epoch times (no timed tests): admission, the
stop at an epoch boundary, one budget for every worker, the plan's quotas between members, final
runs sharing their phase, warm start."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from workers import FakeClock

from pipeline.config import ConfigError, DataConfig, ModelConfig, TrainConfig, parse_duration
from pipeline.data import load_dataset
from pipeline.train import build_and_fit
from pipeline.tune.budget import (
    Budget,
    EpochBudget,
    MemberStats,
    admits,
    choose_member,
    epoch_estimates,
    projected_epoch,
)
from pipeline.tune.keys import EPOCH_SECONDS
from pipeline.tune.session import TuneError, session_budget
from pipeline.tune.warm_start import warm_start

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def test_durations():
    assert [parse_duration(t) for t in ("30m", "2h", "1h30m", "90s", "45")] == [1800, 7200, 5400, 90, 45]
    for bad in ("soon", "10x", "0", "-5m"):
        with pytest.raises(ConfigError, match="study.time_budget"):
            parse_duration(bad)


def test_admission_stops_when_the_projected_epoch_would_end_after_the_phase():
    budget = Budget(started=0.0, seconds=1000.0, final_seconds=200.0, tail_seconds=60.0)
    assert (budget.search_end, budget.final_end, budget.end) == (740.0, 940.0, 1000.0)
    assert [budget.phase(t) for t in (0, 739, 740, 939, 940)] == ["search", "search", "final", "final", "tail"]
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
    b1 = session_budget(first, "30m", 60, FakeClock(5000.0))
    # Another worker, ten minutes later, another process: the same clock start and length.
    other = optuna.load_study(study_name="s.cnn_v1", storage=storage)
    b2 = session_budget(other, None, 60, FakeClock(5600.0))
    assert b1 == b2 and b2.started == 5000.0 and b2.seconds == 1800.0
    with pytest.raises(TuneError, match="differs from the session's"):
        session_budget(other, "1h", 60, FakeClock(5700.0))
    # The first worker's clock starts where it entered tune (data loading included), not after set-up.
    entered = optuna.create_study(study_name="t.cnn_v1", storage=storage)
    assert session_budget(entered, "30m", 60, FakeClock(9000.0), started=8950.0).started == 8950.0
    # Epoch times a worker records on its trial reach every worker's projection.
    trial = first.ask({"batch_size": optuna.distributions.CategoricalDistribution([32])})
    EpochBudget(trial, phase_end=1e9, clock=FakeClock(0.0, 42.0))(1, {})
    assert projected_epoch(epoch_estimates(other.get_trials(deepcopy=False)), 32) == 42.0
    assert session_budget(optuna.create_study(storage=storage), None, 60, FakeClock()) is None


def test_the_next_trial_goes_to_the_member_furthest_from_its_quota():
    """The plan gives each member a number of configurations; the allocator fills the quotas together.
    What the trials did (pruned after one cheap epoch, say) draws no trial to their member: before
    this, a member whose pruned trials were cheap took every trial from the leading member."""
    # b has taken 4 of 6 (its cheap trials were pruned), a 1 of 3 -> a (1/3 < 4/6).
    assert choose_member([MemberStats("a", 1, 3), MemberStats("b", 4, 6)]) == "a"
    assert choose_member([MemberStats("a", 2, 3), MemberStats("b", 3, 6)]) == "b"  # 2/3 > 3/6
    assert choose_member([MemberStats("a", 1, 2), MemberStats("b", 2, 4)]) == "a"  # a tie: the earlier member
    assert choose_member([MemberStats("a", 3, 3), MemberStats("b", 5, 6)]) == "b"  # a at its quota
    assert choose_member([MemberStats("a", 0, 0), MemberStats("b", 0, 0)]) is None  # no search planned
    # Without a plan (no time budget): the members' own order.
    assert choose_member([MemberStats("a", 2, 3), MemberStats("b", 0, 3)], by_plan=False) == "a"


def test_member_stats_come_from_the_storage_and_leave_final_runs_out(tmp_path):
    """The allocator's counts, read from a real storage: finished, pruned and running search trials
    count; final runs and waiting trials do not; the cap is the plan's configurations."""
    from types import SimpleNamespace

    from pipeline.tune.plan import Plan
    from pipeline.tune.workers import member_stats

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s.cnn_v1", storage=storage, direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.7))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED))
    study.ask()  # running
    study.enqueue_trial({}, user_attrs={"phase": "final"})  # waiting final run
    final = study.ask()
    study.tell(final, 0.8)  # a finished final run
    study.enqueue_trial({})  # a waiting search trial: not taken yet
    plan = Plan(600, 10, 60, 200, 330, ("cnn_v1",), 2.0, {"cnn_v1": 5}, {"cnn_v1": 9.0}, 0.02)
    session = SimpleNamespace(studies={"cnn_v1": study}, plan=plan,
                              preset=SimpleNamespace(study=SimpleNamespace(trials=100)))
    assert member_stats(session) == [MemberStats("cnn_v1", 3, 5)]


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
    search run is admitted while most of it ends before the search phase does, and not after."""
    from dataclasses import replace

    import mlflow
    import yaml
    from conftest import make_competition_dataset

    from pipeline.config import load_preset
    from pipeline.tune import open_session
    from pipeline.tune.plan import Plan
    from pipeline.tune.workers import admit_trial

    root = make_competition_dataset(tmp_path / "d", size=16, counts={"train": 2, "validation": 2}, test_count=2,
                                    test_labels=True)
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"data": {"root": str(root)}, "study": {"members": ["cnn_v1"], "trials": 5}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    clock = FakeClock(start=10_000.0)
    session = open_session(load_preset(str(preset)), "b", "s", f"sqlite:///{tmp_path / 'optuna.db'}", clock=clock)
    budget = session_budget(session.studies["cnn_v1"], "1000s", 60, clock)
    # Search runs of one pass: 20 training images in epochs of 20, one epoch each.
    session = replace(session, budget=replace(budget, final_seconds=200.0),  # search ends at 10,740
                      plan=Plan(1000, 0, 60, 740, 200, ("cnn_v1",), 1.0, {"cnn_v1": 5}, {"cnn_v1": 9.0}, 0.1))
    study = session.studies["cnn_v1"]
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={EPOCH_SECONDS: [100.0, 100.0]}))
    clock.now = 10_650.0
    admitted = admit_trial(session, "cnn_v1")
    assert admitted is not None  # 80 % of its run (80 s) ends at 10,730
    study.tell(admitted, state=TrialState.FAIL)
    clock.now = 10_670.0
    assert admit_trial(session, "cnn_v1") is None  # ... at 10,750: after the search phase


def test_final_runs_in_turn_share_the_final_phase_evenly():
    from pipeline.tune.budget import final_deadline

    # 300 s of final phase left, two members waiting in one worker: the first gets 100 s, then the
    # second (one waiting) half of what is left, the last all of it.
    assert final_deadline(1000.0, 1300.0, waiting=2) == 1100.0
    assert final_deadline(1100.0, 1300.0, waiting=1) == 1200.0
    assert final_deadline(1200.0, 1300.0, waiting=0) == 1300.0
    assert final_deadline(1400.0, 1300.0, waiting=1) == 1400.0  # past the phase: stop at once


def test_with_a_worker_per_final_run_each_trains_to_the_phases_end():
    from pipeline.tune.budget import final_deadline

    # Two workers, two final runs: the first to start (one still waiting) and the second both end at
    # the phase's end; a third run waiting goes to a second round, so each of the first two takes half.
    assert final_deadline(1000.0, 1300.0, waiting=1, workers=2) == 1300.0
    assert final_deadline(1005.0, 1300.0, waiting=0, workers=2) == 1300.0
    assert final_deadline(1000.0, 1300.0, waiting=2, workers=2) == 1150.0
    assert final_deadline(1000.0, 1300.0, waiting=1, workers=1) == 1150.0  # one worker: in turn, as before


def test_the_parent_runs_description_tells_the_plan_then_the_outcome(tracking_here):
    """The session as the MLflow UI's Description shows it: the plan when it is made (``log_plan``, in a
    real tracking store), then the outcome, each figure named for its images (selection accuracy is
    in-sample, audit accuracy is not) and the time the budget left."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from pipeline import metrics as M
    from pipeline.config import load_preset
    from pipeline.tune.description import outcome_lines
    from pipeline.tune.phases import log_plan
    from pipeline.tune.plan import Plan, Speed

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("described")).info.run_id
    plan = Plan(600, 12, 40, 300, 248, ("cnn_v1", "cnn_v2"), 2.0, {"cnn_v1": 4, "cnn_v2": 2},
                {"cnn_v1": 9.0, "cnn_v2": 4.0}, 0.014, ("chose a pair after a search: cnn_v1 ~9.0 passes",))
    log_plan(SimpleNamespace(client=client, parent_run_id=run_id, preset=load_preset("cpu")), plan,
             {"cnn_v1": Speed(150.0, 0.002)})
    lines = client.get_run(run_id).data.tags["mlflow.note.content"].splitlines()
    assert lines[0] == ("**Plan** for a 10.0-minute budget (12 s of set-up spent, 40 s kept for ensemble, audit "
                        "and registration):")
    assert lines[1] == ""  # markdown: a list starts after a blank line
    assert lines[2].startswith("- search 5.0 min: configurations cnn_v1 4, cnn_v2 2 (each member's default first)")
    assert lines[3].startswith("- final runs 4.1 min: cnn_v1 ~9.0 passes, cnn_v2 ~4.0 passes")
    assert lines[5] == "- why: the reasons are in the run's plan.json"  # not the reasons themselves
    assert lines[6:] == ["", "**Outcome**: none yet; written here when the session ends"]

    result = SimpleNamespace(kind="pair cnn_v1#3 + cnn_v2#5", single=False, method="soft",
                             selection_accuracy=0.9125, selection_images=160,
                             selection_note="in-sample: every choice read these 160 images")
    audit = {M.AUDIT_ACCURACY: 0.89, f"{M.AUDIT_ACCURACY}_low": 0.8134, f"{M.AUDIT_ACCURACY}_high": 0.9376,
             M.AUDIT_IMAGES: 100.0}
    members = {"cnn_v1": {"best_val_accuracy": 0.9, "best_trial": 3},
               "cnn_v2": {"best_val_accuracy": None, "best_trial": None}}
    assert outcome_lines(members, SimpleNamespace(result=result, audit=audit), "7", "deepfake-ensemble",
                         "time budget 10m00s: used 9m50s (0m10s to spare)") == [
        "**Outcome**: pair cnn_v1#3 + cnn_v2#5, soft vote, registered as deepfake-ensemble version 7 (@challenger)",
        "- selection accuracy 91.25%: in-sample: every choice read these 160 images",
        "- audit accuracy 89.00% (95% interval 81.34% to 93.76%): no choice read these 100 images",
        "- best selection accuracy of each member: cnn_v1 90.00% (trial 3)",
        "- time budget 10m00s: used 9m50s (0m10s to spare)"]
    alone = SimpleNamespace(result=SimpleNamespace(**{**vars(result), "kind": "single member cnn_v1#3",
                                                      "single": True}), audit=None)
    assert outcome_lines(members, alone, "8", "deepfake-ensemble")[:3] == [
        "**Outcome**: single member cnn_v1#3, registered as deepfake-ensemble version 8 (@challenger)",
        "- selection accuracy 91.25%: in-sample: every choice read these 160 images",
        "- no audit split: every figure is in-sample and flatters the model"]
    assert outcome_lines(members, None, None, "deepfake-ensemble")[0] == \
        "**Outcome**: no ensemble (too few finished trials); nothing registered"
