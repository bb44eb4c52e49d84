"""The budgeted session's phases around the search: the plan (measured, printed and logged before
the search), each member's default configuration as its first trial, and the final runs.

A final run is a trial of its member study (a nested run tagged ``phase=final``, an ensemble
candidate) with the member's best search configuration, or its default when there was no search,
trained from scratch with a schedule that ends at its share of the final phase. It does not count
against the member's search quota and is never pruned.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from optuna.trial import TrialState

from .. import tracking
from ..config import Preset, param_name
from ..models import arch_args
from ..progress import say
from ..train.speed import measure_speed
from .budget import Budget
from .plan import Plan, PlanSettings, Speed, make_plan
from .refit import DONE, FINAL, PHASE, best_search_trial
from .session import Session
from .storage import storage_lock

PLAN_ATTR = "plan"  # first member study's user attribute: the session's plan, as a dict
DEFAULTS_DONE = "defaults_enqueued"  # member study user attribute


def default_params(preset: Preset, arch: str) -> dict[str, Any]:
    """The preset's own value of every searched setting for ``arch``: its default configuration as
    Optuna parameters (a model setting left to the architecture takes the architecture's default)."""
    sections = {"data": preset.data, "model": replace(preset.model, arch=arch), "train": preset.train}
    accepted = arch_args(arch)
    out = {}
    for key, _ in preset.study.space.items():
        section, name = key.split(".", 1)
        if section == "model" and name not in accepted:
            continue
        value = getattr(sections[section], name)
        if value is None and section == "model":
            value = accepted[name]
        if value is not None:
            out[param_name(key)] = value
    return out


def session_plan(session: Session, budget: Budget) -> tuple[Plan, bool]:
    """The session's plan: made by the first worker (speeds measured here, a few seconds per member)
    and stored on the first member study; every other worker reads it. Call under the session lock.
    Returns (plan, made here)."""
    first = session.studies[session.preset.study.members[0]]
    stored = first.user_attrs.get(PLAN_ATTR)
    if stored:
        return Plan.from_dict(stored), False
    preset, data = session.preset, session.data
    speeds = {}
    for arch in preset.study.members:
        model_cfg = replace(preset.model, arch=arch, num_classes=data.num_classes)
        rate, eval_rate = measure_speed(model_cfg, data, preset.data, preset.train)
        speeds[arch] = Speed(rate, eval_rate)
        say(f"speed of {arch}: {rate:.0f} training images/s, {1 / eval_rate:.0f} evaluated images/s")
    s = preset.study
    settings = PlanSettings(s.final_fraction, s.rung_fraction, s.min_rung_passes, s.min_configs, s.pair_min_passes,
                            s.final_min_passes)
    plan = make_plan(speeds, budget.seconds, session.clock() - budget.started, budget.tail_seconds,
                     len(data.train), len(data.validation), settings,
                     len(session.audit) if session.audit is not None else 0)
    first.set_user_attr(PLAN_ATTR, plan.to_dict())
    log_plan(session, plan, speeds)
    return plan, True


def log_plan(session: Session, plan: Plan, speeds: dict[str, Speed]) -> None:
    """``plan.json`` and the plan's figures as params of the parent run."""
    session.client.log_dict(session.parent_run_id, {**plan.to_dict(), "speeds": {a: vars(s) for a, s in speeds.items()},
                                                    "text": plan.lines()}, "plan.json")
    tracking.log_params(session.client, session.parent_run_id, {
        "plan.search_seconds": round(plan.search_seconds), "plan.final_seconds": round(plan.final_seconds),
        "plan.final_members": ",".join(plan.final_members), "plan.rung_passes": plan.rung_passes,
        **{f"plan.configs.{a}": n for a, n in plan.configs.items()},
        **{f"plan.speed.{a}": round(s.images_per_second, 1) for a, s in speeds.items()}})


def enqueue_defaults(session: Session, plan: Plan) -> None:
    """Each searching member's first trial is the preset's default configuration (once per session)."""
    for arch, study in session.studies.items():
        if not plan.configs.get(arch):
            continue
        with storage_lock(session.storage_url, f"admit:{study.study_name}"):
            if study.user_attrs.get(DEFAULTS_DONE):
                continue
            study.set_user_attr(DEFAULTS_DONE, True)
            if not study.get_trials(deepcopy=False):
                study.enqueue_trial(default_params(session.preset, arch), user_attrs={"default_config": True})


def enqueue_finals(session: Session, plan: Plan) -> dict[str, str]:
    """The plan's final runs (once per session): each member's best search configuration, or its
    default; a member named twice gets two runs (their seeds differ with their trial numbers).
    Returns arch -> where its configuration came from."""
    enqueued = {}
    for arch in sorted(set(plan.final_members), key=plan.final_members.index):
        study = session.studies[arch]
        with storage_lock(session.storage_url, f"admit:{study.study_name}"):
            if study.user_attrs.get(DONE):
                continue
            study.set_user_attr(DONE, True)
            best = final_choice(study, plan.selection_noise)
            params = best.params if best is not None else default_params(session.preset, arch)
            for _ in range(plan.final_members.count(arch)):
                study.enqueue_trial(params, user_attrs={PHASE: FINAL, "final_of": best.number if best else -1})
            runs = plan.final_members.count(arch)
            enqueued[arch] = ((f"trial {best.number}'s configuration" if best is not None else
                               "its default configuration") + (f" ({runs} runs, two seeds)" if runs > 1 else ""))
    return enqueued


def final_choice(study, noise: float):
    """The search trial whose configuration a final run trains: the best one, unless it beat the
    member's default configuration (its first trial) by less than ``noise`` on the selection split,
    where the default is kept (a maximum over noisy scores flatters the winner). None: no search."""
    best = best_search_trial(study)
    default = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if t.user_attrs.get("default_config") and t.value is not None), None)
    if best is None or default is None or best.number == default.number:
        return best
    return best if best.value - default.value >= noise else default


def search_epochs(plan: Plan, preset: Preset, train_images: int) -> int:
    """A search run's length in epochs: the plan's rung, in whole passes over the training data."""
    per_epoch = min(preset.train.images_per_epoch or train_images, train_images)
    return max(1, math.ceil(plan.rung_passes * train_images / per_epoch))


def waiting_finals(session: Session) -> int:
    return sum(t.user_attrs.get(PHASE) == FINAL for study in session.studies.values()
               for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def search_run_fits(plan: Plan, seconds_per_epoch: float | None, epochs: int, now: float, search_end: float) -> bool:
    """A search run may start when most of it (its measured epochs, or the plan's estimate) fits
    before the search phase ends; the safety stop ends the rest at an epoch boundary."""
    if now >= search_end:
        return False
    if seconds_per_epoch is None:
        return True
    return now + 0.8 * seconds_per_epoch * epochs <= search_end

