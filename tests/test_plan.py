"""The plan's arithmetic on given speeds, budgets and data sizes (hand-computed expectations):
no search when the budget cannot pay for runs long enough to rank configurations, a search sized to
what it can, one member or a pair for the final runs, and the default kept over a winner within noise."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
from workers import FakeClock

from pipeline import metrics as M
from pipeline.tune.phases import final_choice
from pipeline.tune.plan import Plan, PlanSettings, Speed, make_plan, mirror_fits

pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")]

SETTINGS = PlanSettings(final_fraction=0.6, rung_fraction=0.1, min_rung_passes=2, min_configs=3,
                        pair_min_passes=12)


def test_a_small_budget_buys_no_search_and_one_member_for_the_whole_time():
    # 2,500 training and 500 selection images; a: 50 img/s (a pass in 50 s), b: 25 img/s (100 s);
    # a run's overhead: 2 x 500 evaluated images + 6 s = 8 s for a, 10 s for b. 600 s - 20 - 60 = 520 usable.
    speeds = {"a": Speed(50.0, 0.002), "b": Speed(25.0, 0.004)}
    plan = make_plan(speeds, 600, 20, 60, 2500, 500, SETTINGS)
    # A pair would get (260 - 8) / 50 = 5.0 and (260 - 10) / 100 = 2.5 passes (a twice: 5.0): under 12,
    # so one member. With a search, a's final run gets (312 - 8) / 50 = 6.1 passes; search runs of 2
    # passes (108 s) fit once in the 208 s left: under 3 configurations, so no search, all 520 s to a.
    assert not plan.search and plan.configs == {"a": 0, "b": 0} and plan.rung_passes == 0
    assert plan.final_members == ("a",)
    assert plan.final_seconds == pytest.approx(520) and plan.search_seconds == 0
    assert plan.final_passes == {"a": pytest.approx((520 - 8) / 50)}
    assert plan.selection_noise == pytest.approx((0.75 * 0.25 / 500) ** 0.5)
    text = "\n".join(plan.lines())
    assert "no search" in text and "one member" in text


def test_a_large_budget_searches_what_it_can_judge():
    # a: a pass in 25 s, b in 50 s, 7 s of overhead each; 3,600 s - 30 - 60 = 3,510 usable.
    speeds = {"a": Speed(100.0, 0.001), "b": Speed(50.0, 0.001)}
    plan = make_plan(speeds, 3600, 30, 60, 2500, 500, PlanSettings(0.6, 0.1, 2, 3, pair_min_passes=75))
    # No pair: even with the whole time halved, b gets (1,755 - 7) / 50 = 35.0 and a (1,748) / 25 = 69.9 < 75.
    assert plan.final_members == ("a",)
    # a's final run: (2,106 - 7) / 25 = 84.0 passes; search runs of ceil(8.4) = 9 passes (232 s) fit
    # 6 times in the 1,404 s of search.
    assert plan.final_seconds == pytest.approx(2106) and plan.search_seconds == pytest.approx(1404)
    assert plan.rung_passes == 9 and plan.configs == {"a": 6, "b": 0}
    assert plan.final_passes == {"a": pytest.approx(2099 / 25)}


def test_a_pair_when_each_final_run_still_learns_enough():
    speeds = {"a": Speed(100.0, 0.001), "b": Speed(100.0, 0.001)}
    plan = make_plan(speeds, 3600, 30, 60, 2500, 500, SETTINGS)
    # Each of two final runs: (1,053 - 7) / 25 = 41.8 passes >= 12; search runs of ceil(4.18) = 5 passes
    # (132 s) fit 5 times in each member's 702 s.
    assert plan.final_members == ("a", "b") and plan.configs == {"a": 5, "b": 5} and plan.rung_passes == 5
    # A smaller budget: no search, and the pair only if each still gets enough of the whole time.
    small = make_plan(speeds, 600, 20, 60, 2500, 500, PlanSettings(0.6, 0.1, 2, 3, pair_min_passes=5))
    assert not small.search and small.final_members == ("a", "b")
    assert small.final_passes == {"a": pytest.approx(253 / 25), "b": pytest.approx(253 / 25)}  # 260 s each
    alone = make_plan(speeds, 600, 20, 60, 2500, 500, PlanSettings(0.6, 0.1, 2, 3, pair_min_passes=11))
    assert alone.final_members == ("a",)  # 10.1 passes each would be under 11
    # ... and a's final run of (312 - 7) / 25 = 12.2 passes leaves 208 s for 3 runs of 2 passes (57 s).
    assert alone.configs == {"a": 3, "b": 0} and alone.rung_passes == 2


def test_no_search_while_the_final_run_would_still_learn_more_from_the_passes():
    # The large budget above: a's final run after a search gets 84.0 passes, the whole time
    # (3,510 - 7) / 25 = 140.1. Asking 90 passes of a final run after a search leaves no search.
    speeds = {"a": Speed(100.0, 0.001), "b": Speed(50.0, 0.001)}
    searched = make_plan(speeds, 3600, 30, 60, 2500, 500, PlanSettings(0.6, 0.1, 2, 3, 75, final_min_passes=83))
    assert searched.search and searched.final_seconds == pytest.approx(2106)
    whole = make_plan(speeds, 3600, 30, 60, 2500, 500, PlanSettings(0.6, 0.1, 2, 3, 75, final_min_passes=90))
    assert not whole.search and whole.final_members == ("a",)
    assert whole.final_seconds == pytest.approx(3510) and whole.final_passes == {"a": pytest.approx(3503 / 25)}
    assert any("84.0 passes, under the 90" in r for r in whole.reasons)


def test_a_slow_second_member_gives_way_to_a_second_seed_of_the_first():
    # b: a pass in 100 s. Each of two final runs after a search: a (1,053 - 7) / 25 = 41.8 passes,
    # b (1,046) / 100 = 10.5 < 12: the pair is a twice (two seeds), and only a is searched.
    speeds = {"a": Speed(100.0, 0.001), "b": Speed(25.0, 0.001)}
    plan = make_plan(speeds, 3600, 30, 60, 2500, 500, SETTINGS)
    assert plan.final_members == ("a", "a") and plan.configs == {"a": 10, "b": 0}
    assert "two seeds" in "\n".join(plan.lines())


def test_the_tail_pays_for_one_audit_pass_of_each_final_run():
    # 2,000 audit images, plain only, at 0.002 s an image: 4 s a final run on top of the 20 s.
    speeds = {"a": Speed(50.0, 0.002), "b": Speed(25.0, 0.004)}
    one = make_plan(speeds, 600, 20, 20, 2500, 500, SETTINGS, audit_images=2000)
    assert one.final_members == ("a",) and one.tail_seconds == pytest.approx(20 + 4)
    assert one.audit_pass_seconds == pytest.approx(4)
    assert one.final_seconds == pytest.approx(600 - 20 - 24)
    both = make_plan({"a": Speed(100.0, 0.001), "b": Speed(100.0, 0.001)}, 3600, 30, 20, 2500, 500, SETTINGS,
                     audit_images=2000)
    assert both.final_members == ("a", "b") and both.tail_seconds == pytest.approx(20 + 2 + 2)
    assert both.audit_pass_seconds == pytest.approx(4)


def test_a_mirror_vote_is_allowed_only_when_the_time_left_pays_for_its_audit_pass():
    # 30 s for the ensemble and registration, a 36-s audit pass plain and one mirrored: 102 s.
    assert mirror_fits(102.0, 30.0, 36.0)
    assert not mirror_fits(101.9, 30.0, 36.0)
    assert not mirror_fits(66.0, 30.0, 36.0)  # what the plan kept: one pass
    assert mirror_fits(30.0, 30.0, 0.0)  # no audit split: nothing to pay


def test_a_plan_survives_the_storage_round_trip():
    speeds = {"a": Speed(100.0, 0.001), "b": Speed(100.0, 0.001)}
    plan = make_plan(speeds, 3600, 30, 60, 2500, 500, SETTINGS)
    assert Plan.from_dict(plan.to_dict()) == plan


def test_the_final_run_keeps_the_default_unless_the_winner_beat_it_by_the_noise(tmp_path):
    study = optuna.create_study(direction="maximize", storage=f"sqlite:///{tmp_path / 'o.db'}")
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}

    def add(lr, value, **attrs):
        study.add_trial(optuna.trial.create_trial(params={"lr": lr}, distributions=dist, value=value,
                                                  user_attrs={"mlflow_run_id": f"r{lr}", **attrs}))

    add(2e-3, 0.70, default_config=True)
    add(3e-3, 0.72)
    assert final_choice(study, noise=0.03).params["lr"] == 2e-3  # +2 points < 3: the default stays
    assert final_choice(study, noise=0.02).params["lr"] == 3e-3  # +2 points >= 2: the winner
    add(1e-3, 0.69, phase="final")  # final runs are never search winners
    assert final_choice(study, noise=0.01).params["lr"] == 3e-3
    assert final_choice(optuna.create_study(direction="maximize"), 0.01) is None


# ----------------------------------------------------------------------------- a budgeted session

def _budget_preset(tmp_path, **study):
    import yaml
    from conftest import make_competition_dataset

    from pipeline.config import load_preset

    root = make_competition_dataset(tmp_path / "d", size=16, counts={"train": 4, "validation": 6}, test_count=5,
                                    test_labels=True)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"root": str(root), "augment": "shift", "normalize": "half"},
        "model": {"convs_per_block": 1},
        "train": {"epochs": 3, "batch_size": 10, "precision": "fp32", "device": "cpu", "lr": 2e-3},
        "study": {"trials": 9, "pruner": "none", "top_k": 2, "ensemble_method": "soft", "time_budget": "40s",
                  "tail_seconds": 10, "space": {"train.lr": {"low": 1e-3, "high": 4e-3, "log": True}}, **study}}))
    return load_preset(str(path))


def test_a_budgeted_session_follows_its_plan(tmp_path, tracking_here):
    """Through the real storage and tracking store, with the session's plan given: the default
    configuration is each searching member's first trial, each member runs its quota of search runs
    (their schedules end with them, nothing pruned), and the final runs (cnn_v1 twice: two seeds)
    train until their deadlines and are the ensemble's candidates."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import override
    from pipeline.tune import WorkerOptions, run_tuning
    from pipeline.tune.keys import PLAN
    from pipeline.tune.phases import default_params

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    preset = _budget_preset(tmp_path)
    preset = override(preset, study=override(preset.study, name="s", storage=storage))
    run_tuning(preset, WorkerOptions("plan", progress=False, setup_only=True))
    # Budget 40 s: tail 10, final runs 10, search 20 (this clock moves 0.05 s a reading).
    plan = Plan(40, 0, 10, 20, 10, ("cnn_v1", "cnn_v1"), 1.0, {"cnn_v1": 2, "cnn_v2": 1}, {"cnn_v1": 5.0}, 0.5)
    optuna.load_study(study_name="s.cnn_v1", storage=storage).set_user_attr(PLAN, plan.to_dict())
    summary = run_tuning(preset, WorkerOptions("plan", progress=False, clock=FakeClock(50_000.0, 0.05)))
    assert summary.model_version is not None

    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("plan").experiment_id])
    trials = {r.data.tags["mlflow.runName"]: r for r in runs if r.data.tags.get("kind") == "trial"}
    assert sorted(trials) == ["cnn_v1-final-2", "cnn_v1-final-3", "cnn_v1-search-0", "cnn_v1-search-1",
                              "cnn_v2-search-0"]
    for name, run in trials.items():
        assert run.data.tags["phase"] == name.split("-")[1] and run.info.status == "FINISHED"
    for arch in ("cnn_v1", "cnn_v2"):
        first = optuna.load_study(study_name=f"s.{arch}", storage=storage).trials[0]
        assert first.user_attrs["default_config"] and first.params == default_params(preset, arch)
    assert trials["cnn_v1-search-0"].data.params["train.lr"] == "0.002"  # the preset's own
    # Search runs last the plan's rung (one pass over the 20 training images) and end with their
    # schedule; final runs end at their deadlines, with different seeds.
    assert trials["cnn_v1-search-1"].data.tags["stop_reason"] == "max_epochs"
    finals = [trials["cnn_v1-final-2"], trials["cnn_v1-final-3"]]
    assert all(f.data.tags["stop_reason"] == "deadline" for f in finals)
    assert finals[0].data.params["train.seed"] != finals[1].data.params["train.seed"]
    assert finals[0].data.params["train.lr"] == trials["cnn_v1-search-0"].data.params["train.lr"] or \
        finals[0].data.params["train.lr"] == trials["cnn_v1-search-1"].data.params["train.lr"]
    # A pair's final runs share the selection split (study.finals_crossfit): each trains on the training
    # images plus one half and is scored on the other; the halves are disjoint, stratified, and cover it.
    client = MlflowClient()
    selection = np.load(client.download_artifacts(trials["cnn_v1-search-0"].info.run_id, M.PREDICTIONS_ARTIFACT,
                                                  str(tmp_path / "search")))
    held = []
    for k, final in enumerate(finals):
        stored = np.load(client.download_artifacts(final.info.run_id, M.PREDICTIONS_ARTIFACT, str(tmp_path / f"f{k}")))
        held.append(list(stored["ids"]))
        lent = len(selection["ids"]) - len(held[-1])
        assert final.data.tags["trained_on"] == f"train + selection half {2 - k} ({20 + lent} images)"
        per_class, whole = (np.bincount(y, minlength=5) for y in (stored["labels"], selection["labels"]))
        assert (np.abs(per_class - whole / 2) <= 0.5).all()  # stratified: half of each class, give or take one
    assert not set(held[0]) & set(held[1]) and sorted(held[0] + held[1]) == sorted(selection["ids"])
    # The ensemble is their equal-weight pair or the better alone, its selection figures out of fold.
    ensemble = next(r for r in runs if r.data.tags.get("kind") == "ensemble")
    assert {ensemble.data.params["member_a_run_id"], ensemble.data.params["member_b_run_id"]} <= \
        {f.info.run_id for f in finals}
    assert ensemble.data.params["procedure"] in ("equal", "single")
    assert ensemble.data.tags["ensemble_decision"].startswith("each final run also trained on half")
    assert ensemble.data.metrics[M.SELECTION_IMAGES] == len(selection["ids"])


def test_the_first_worker_measures_makes_prints_and_logs_the_plan(tmp_path, tracking_here, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline.tune import open_session
    from pipeline.tune.phases import session_plan
    from pipeline.tune.session import session_budget

    preset = _budget_preset(tmp_path)
    session = open_session(preset, "plan", "m", f"sqlite:///{tmp_path / 'optuna.db'}",
                           clock=FakeClock(50_000.0, 0.05))
    budget = session_budget(session.studies["cnn_v1"], "40s", 10, session.clock)
    plan, made = session_plan(session, budget)
    assert made and plan.budget_seconds == 40
    assert 10 < plan.tail_seconds < 12  # 10 s, and the audit of 25 test images at the measured speed
    again, made_again = session_plan(session, budget)  # another worker: reads it, measures nothing
    assert again == plan and not made_again
    run = MlflowClient().get_run(session.parent_run_id)
    assert run.data.params["plan.final_members"] == ",".join(plan.final_members)
    assert float(run.data.params["plan.speed.cnn_v1"]) > 0
    logged = json.loads(Path(MlflowClient().download_artifacts(session.parent_run_id, "plan.json",
                                                               str(tmp_path / "dl"))).read_text())
    assert logged["final_seconds"] == plan.final_seconds and logged["text"] == plan.lines()
    err = capsys.readouterr().err
    assert "speed of cnn_v1" in err and "speed of cnn_v2: not measured" not in err
    assert set(logged["speeds"]) == {"cnn_v1", "cnn_v2"}  # a pair of 20-image passes is affordable: both


def test_a_budget_where_no_pair_can_get_its_passes_measures_the_primary_member_only(tmp_path, tracking_here, capsys):
    from pipeline.tune import open_session
    from pipeline.tune.phases import session_plan
    from pipeline.tune.session import session_budget

    preset = _budget_preset(tmp_path, pair_min_passes=1_000_000)
    session = open_session(preset, "plan", "m", f"sqlite:///{tmp_path / 'optuna.db'}",
                           clock=FakeClock(50_000.0, 0.05))
    plan, made = session_plan(session, session_budget(session.studies["cnn_v1"], "40s", 10, session.clock))
    err = capsys.readouterr().err
    assert made and plan.final_members == ("cnn_v1",)
    assert "speed of cnn_v1: " in err and "speed of cnn_v2: not measured" in err
    assert "training images/s" not in err.split("speed of cnn_v2")[1]


def test_the_other_members_speeds_are_measured_only_when_a_pair_could_use_them():
    from pipeline.tune.plan import pair_affordable

    fast = {"cnn_v1": Speed(100.0, 0.002)}
    forty = PlanSettings(0.6, 0.1, 2, 3, pair_min_passes=40)
    # 10 minutes on a CPU core: 2,500 images at 100/s is 25 s a pass; half of (600 - 20 - 60) s minus a
    # run's overhead (2 x 500 x 0.002 + 6 = 8 s) is 252 s: ~10 passes, under the 40 a pair needs.
    assert not pair_affordable(fast, 600, 20, 60, 2500, 500, forty)
    # Two hours: half of 7,120 s minus 8 s is ~142 passes each: a pair may be planned, so measure the rest.
    assert pair_affordable(fast, 7200, 20, 60, 2500, 500, forty)
    # The boundary, by hand: 40 passes = 1,000 s; + 8 s overhead = 1,008 s a run; x 2 + 80 s = 2,096 s.
    assert pair_affordable(fast, 2096.0, 20, 60, 2500, 500, forty)
    assert not pair_affordable(fast, 2095.0, 20, 60, 2500, 500, forty)
    # A plan made from the primary member alone says why there is no pair.
    plan = make_plan(fast, 600, 20, 60, 2500, 500, forty)
    assert plan.final_members == ("cnn_v1",)
    assert "no other member's speed measured" in " ".join(plan.reasons)


def test_the_ensemble_leaves_mirror_votes_out_when_their_audit_does_not_fit_the_time_left(tmp_path, tracking_here,
                                                                                           capsys):
    from dataclasses import replace

    from pipeline.tune import open_session
    from pipeline.tune.phases import session_plan
    from pipeline.tune.run import mirror_votes
    from pipeline.tune.session import session_budget

    clock = FakeClock(50_000.0, 0.0)
    session = open_session(_budget_preset(tmp_path), "plan", "m", f"sqlite:///{tmp_path / 'optuna.db'}", clock=clock)
    budget = session_budget(session.studies["cnn_v1"], "40s", 10, clock)
    plan, _ = session_plan(session, budget)
    session = replace(session, budget=budget, plan=plan)
    assert plan.audit_pass_seconds > 0  # 5 labelled test images: the audit split
    need = 10 + 2 * plan.audit_pass_seconds  # the preset's 10-s tail, the audit plain and mirrored
    clock.now = budget.end - need - 1e-6  # a hair inside: the clock's 50,000 s would round an exact boundary
    assert mirror_votes(session)
    clock.now = budget.end - need + 0.5
    assert not mirror_votes(session)
    assert "mirror-image votes left out" in capsys.readouterr().err
    assert mirror_votes(replace(session, budget=None))  # no budget: the search tries them
    assert mirror_votes(replace(session, audit=None))  # no audit split: nothing to pay for


def test_two_workers_train_the_pair_side_by_side_and_search_two_configurations_at_a_time():
    # The large budget of test_a_large_budget_searches_what_it_can_judge (a pass of a in 25 s, of b in 50 s,
    # 7 s overhead; 3,510 s usable), with two workers: each final run has a worker of its own, so it gets
    # the whole final phase of 0.6 x 3,510 = 2,106 s: a (2,106 - 7) / 25 = 84.0 passes, b 2,099 / 50 = 42.0,
    # both >= 40: the pair a + b. One worker runs a pair in turn, half the phase each: b would get 20.9
    # passes, so it trains two seeds of a, 41.8 passes each.
    speeds = {"a": Speed(100.0, 0.001), "b": Speed(50.0, 0.001)}
    settings = PlanSettings(0.6, 0.1, 2, 3, pair_min_passes=40)
    one = make_plan(speeds, 3600, 30, 60, 2500, 500, settings)
    two = make_plan(speeds, 3600, 30, 60, 2500, 500, replace(settings, workers=2))
    assert one.final_members == ("a", "a") and one.workers == 1
    assert one.final_passes == {"a": pytest.approx(1046 / 25)}
    assert two.final_members == ("a", "b") and two.workers == 2
    assert two.final_seconds == pytest.approx(2106) and two.search_seconds == pytest.approx(1404)
    assert two.final_passes == {"a": pytest.approx(2099 / 25), "b": pytest.approx(2099 / 50)}
    # Search runs of ceil(0.1 x 42.0) = 5 passes: a 132 s, b 257 s; two workers' 2 x 1,404 s split between
    # the two members: 1,404 s each, 10 runs of a and 5 of b (one worker's plan would fit half as many).
    assert two.rung_passes == 5 and two.configs == {"a": 10, "b": 5}
    text = "\n".join(two.lines())
    assert "2 workers: the search runs 2 configurations at a time; each trains one of the final runs, side by " \
           "side; one builds the ensemble" in text
    assert "ends at the phase's end, side by side" in text
    assert "workers" not in "\n".join(one.lines())  # one worker: the plan reads as before
    assert Plan.from_dict(two.to_dict()) == two


def test_with_two_workers_a_second_seed_costs_no_time_so_there_is_always_a_pair():
    # The small budget of the first test: one worker trains a alone for all 520 s, no search (a pair would
    # get 5.0 passes a run, under 12; a search 1 run of 2 passes). Two workers: two runs of a side by side
    # cost no time over one, and b stays out ((312 - 10) / 100 = 3.0 < 12 passes); the 208 s of search
    # now hold 2 x 208 / 108 = 3 runs of 2 passes (100 s + 8 s), enough for a search of a.
    speeds = {"a": Speed(50.0, 0.002), "b": Speed(25.0, 0.004)}
    one = make_plan(speeds, 600, 20, 60, 2500, 500, SETTINGS)
    two = make_plan(speeds, 600, 20, 60, 2500, 500, replace(SETTINGS, workers=2))
    assert one.final_members == ("a",) and not one.search
    assert two.final_members == ("a", "a") and two.final_seconds == pytest.approx(312)
    assert two.final_passes == {"a": pytest.approx(304 / 50)}
    assert two.configs == {"a": 3, "b": 0} and two.rung_passes == 2


def test_four_workers_search_four_at_a_time_and_two_of_them_train_the_pair():
    speeds = {"a": Speed(100.0, 0.001), "b": Speed(100.0, 0.001)}
    one = make_plan(speeds, 3600, 30, 60, 2500, 500, SETTINGS)
    four = make_plan(speeds, 3600, 30, 60, 2500, 500, replace(SETTINGS, workers=4))
    # One worker: the pair's runs in turn, 41.8 passes each. Four: side by side, (2,106 - 7) / 25 = 84.0 each;
    # search runs of ceil(8.4) = 9 passes (232 s) in 4 x 1,404 s / 2 members: 12 each.
    assert one.final_passes == {"a": pytest.approx(1046 / 25), "b": pytest.approx(1046 / 25)}
    assert four.final_passes == {"a": pytest.approx(2099 / 25), "b": pytest.approx(2099 / 25)}
    assert four.rung_passes == 9 and four.configs == {"a": 12, "b": 12}
    assert "2 of them train the final runs side by side, 2 stop after the search" in "\n".join(four.lines())


def test_with_two_jobs_the_plan_is_made_for_two_workers_from_speeds_measured_two_at_a_time(tmp_path, tracking_here,
                                                                                          capsys):
    import multiprocessing

    from pipeline.tune import open_session
    from pipeline.tune.phases import session_plan
    from pipeline.tune.session import session_budget

    preset = _budget_preset(tmp_path, members=["cnn_v1"], n_jobs=2, jobs_as="processes")
    session = open_session(preset, "plan2", "m", f"sqlite:///{tmp_path / 'optuna.db'}",
                           clock=FakeClock(50_000.0, 0.05))
    plan, made = session_plan(session, session_budget(session.studies["cnn_v1"], "40s", 10, session.clock))
    assert made and plan.workers == 2 and plan.final_members == ("cnn_v1", "cnn_v1")
    assert "speed of cnn_v1" in (err := capsys.readouterr().err) and "(each of 2 processes stepping at once)" in err
    assert not multiprocessing.active_children()  # the probe's other process is gone
    # Workers started elsewhere count too (study.workers): the plan is made for all of them.
    more = _budget_preset(tmp_path / "w", members=["cnn_v1"], workers=3)
    session = open_session(more, "plan3", "m", f"sqlite:///{tmp_path / 'optuna3.db'}", clock=FakeClock(50_000.0, 0.05))
    plan, _ = session_plan(session, session_budget(session.studies["cnn_v1"], "40s", 10, session.clock))
    assert plan.workers == 3 and "3 workers:" in "\n".join(plan.lines())
    assert "processes stepping at once" not in capsys.readouterr().err  # one process here: measured alone


def test_a_probe_whose_other_processes_cannot_start_in_time_is_measured_alone_and_says_so(tmp_path):
    from pipeline.data import load_dataset
    from pipeline.train.speed import measure_speed_shared

    preset = _budget_preset(tmp_path)

    data = load_dataset(preset.data)
    model = replace(preset.model, arch="cnn_v1", num_classes=data.num_classes)
    rate, eval_seconds, together = measure_speed_shared(model, data, preset.data, preset.train, 2,
                                                        start_seconds=0.01)
    assert together == 1 and rate > 0 and eval_seconds > 0
    rate, eval_seconds, together = measure_speed_shared(model, data, preset.data, preset.train, 2)
    assert together == 2 and rate > 0


def test_a_final_fraction_of_one_is_named_a_pair_with_the_whole_time():
    speeds = {"a": Speed(100.0, 0.001), "b": Speed(100.0, 0.001)}
    plan = make_plan(speeds, 3600, 30, 60, 2500, 500, PlanSettings(1.0, 0.1, 2, 3, pair_min_passes=12))
    assert not plan.search and plan.final_members == ("a", "b")
    assert plan.reasons[-1].startswith("chose a pair with the whole time"), plan.reasons
