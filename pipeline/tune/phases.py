"""The session's phases around the search: the plan (measured, printed and logged before the
search), each member's default configuration as its first trial, then the final runs or refits.

A final run (time budget) is a trial of its member study (a nested run tagged ``phase=final``, an
ensemble candidate) with the member's best search configuration, or its default when there was no
search, trained from scratch with a schedule that ends at its share of the final phase. A refit (no
budget, ``study.refit_epochs``) continues the best search trial's checkpoint. Neither counts against
the member's search quota, and neither is pruned; each is enqueued once per session.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import replace
from typing import Any

import optuna
from optuna.trial import TrialState

from .. import metrics as M
from .. import tracking
from ..config import Preset, TrainConfig, param_name
from ..data import Dataset
from ..data.crossfit import with_selection_half
from ..models import arch_args
from ..progress import say
from ..train.checkpoint import load_checkpoint
from ..train.speed import measure_speed_shared
from . import keys
from .budget import Budget
from .description import PENDING, description, plan_lines
from .plan import Plan, PlanSettings, Speed, make_plan, pair_affordable
from .session import Session
from .storage import storage_lock

# Standard errors by which the search's best configuration must beat the default to replace it in the
# final runs: the best of ~9 noisy scores beats the default by about two standard errors by chance alone
# (measured: on small UniBuc a 5-pass search's winner scored below the default at 54 passes).
SEARCH_MARGIN = 2.0


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
    """The session's plan: made by the first worker (speeds measured here, a few seconds per member,
    with this machine's ``n_jobs`` processes stepping at once as its workers will) and stored on the first
    member study; every other worker reads it. Call under the session lock. Returns (plan, made here)."""
    first = session.first_study
    stored = first.user_attrs.get(keys.PLAN)
    if stored:
        return Plan.from_dict(stored), False
    preset, data, s = session.preset, session.data, session.preset.study
    settings = PlanSettings(s.final_fraction, s.rung_fraction, s.min_rung_passes, s.min_configs, s.pair_min_passes,
                            s.final_min_passes, s.plan_workers)
    sizes = (len(data.train), len(data.validation), settings, len(session.audit) if session.audit is not None else 0)
    speeds = {}
    for arch in s.members:
        model_cfg = replace(preset.model, arch=arch, num_classes=data.num_classes)
        rate, eval_rate, together = measure_speed_shared(model_cfg, data, preset.data, preset.train, s.n_jobs)
        speeds[arch] = Speed(rate, eval_rate)
        say(f"speed of {arch}: {rate:.0f} training images/s, {1 / eval_rate:.0f} evaluated images/s"
            + (f" (each of {together} processes stepping at once)" if together > 1 else "")
            + (f" (measured alone: the other {s.n_jobs - 1} probe process(es) did not start)"
               if together < s.n_jobs else ""))
        if not pair_affordable(speeds, budget.seconds, session.clock() - budget.started, budget.tail_seconds, *sizes):
            rest = [a for a in s.members if a not in speeds]
            if rest:
                say(f"speed of {', '.join(rest)}: not measured ({arch} cannot get {s.pair_min_passes:g} passes "
                    f"a run as one of a pair in this budget, so no slower member can: no pair of members)")
            break
    plan = make_plan(speeds, budget.seconds, session.clock() - budget.started, budget.tail_seconds, *sizes)
    first.set_user_attr(keys.PLAN, plan.to_dict())
    log_plan(session, plan, speeds)
    return plan, True


def log_plan(session: Session, plan: Plan, speeds: dict[str, Speed]) -> None:
    """``plan.json``, the plan's figures as params of the parent run, and the plan as its Description
    (the outcome follows when the session ends: ``run.close_session``)."""
    session.client.log_dict(session.parent_run_id, {**plan.to_dict(), "speeds": {a: vars(s) for a, s in speeds.items()},
                                                    "text": plan.lines()}, "plan.json")
    tracking.log_params(session.client, session.parent_run_id, {
        "plan.search_seconds": round(plan.search_seconds), "plan.final_seconds": round(plan.final_seconds),
        "plan.final_members": ",".join(plan.final_members), "plan.rung_passes": plan.rung_passes,
        **{f"plan.configs.{a}": n for a, n in plan.configs.items()},
        **{f"plan.speed.{a}": round(s.images_per_second, 1) for a, s in speeds.items()}})
    tracking.describe_run(session.client, session.parent_run_id,
                          description(plan_lines(plan, session.preset), [PENDING]))


def enqueue_defaults(session: Session, plan: Plan) -> None:
    """Each searching member's first trial is the preset's default configuration (once per session)."""
    for arch, study in session.studies.items():
        if not plan.configs.get(arch):
            continue
        with storage_lock(session.storage_url, keys.admit_lock(study.study_name)):
            if study.user_attrs.get(keys.DEFAULTS_ENQUEUED):
                continue
            study.set_user_attr(keys.DEFAULTS_ENQUEUED, True)
            if not study.get_trials(deepcopy=False):
                study.enqueue_trial(default_params(session.preset, arch), user_attrs={keys.DEFAULT_CONFIG: True})


def enqueue_finals(session: Session, plan: Plan) -> dict[str, str]:
    """The plan's final runs (once per session): each member's best search configuration, or its
    default; a member named twice gets two runs (their seeds differ with their trial numbers).
    Returns arch -> where its configuration came from."""
    enqueued = {}
    crossfit = crossfit_finals(session, plan)
    for arch in sorted(set(plan.final_members), key=plan.final_members.index):
        study = session.studies[arch]
        with storage_lock(session.storage_url, keys.admit_lock(study.study_name)):
            if study.user_attrs.get(keys.FINALS_ENQUEUED):
                continue
            study.set_user_attr(keys.FINALS_ENQUEUED, True)
            best = final_choice(study, SEARCH_MARGIN * plan.selection_noise)
            params = best.params if best is not None else default_params(session.preset, arch)
            # A pair's run at position i of the plan is scored on selection half i (and trains on the other).
            halves = [i for i, member in enumerate(plan.final_members) if member == arch]
            for half in halves:
                attrs = {keys.PHASE: keys.FINAL, keys.FINAL_OF: best.number if best else -1}
                study.enqueue_trial(params, user_attrs={**attrs, keys.SELECTION_HALF: half} if crossfit else attrs)
            runs = plan.final_members.count(arch)
            enqueued[arch] = ((f"trial {best.number}'s configuration" if best is not None else
                               "its default configuration") + (f" ({runs} runs, two seeds)" if runs > 1 else ""))
    return enqueued


def crossfit_finals(session: Session, plan: Plan) -> bool:
    """Whether the plan's final runs are a pair that shares the selection split (``data.crossfit``)."""
    return session.preset.study.finals_crossfit and len(plan.final_members) == 2


def final_data(session: Session, trial: optuna.Trial) -> Dataset:
    """What a run trains and is scored on: the session's data, or for a pair's final run the training
    images plus the selection half it is not scored on."""
    half = trial.user_attrs.get(keys.SELECTION_HALF)
    if half is None:
        return session.data
    return with_selection_half(session.data, int(half), session.preset.study.sampler_seed)


def final_choice(study: optuna.Study, noise: float) -> optuna.trial.FrozenTrial | None:
    """The search trial whose configuration a final run trains: the best one, unless it beat the
    member's default configuration (its first trial) by less than ``noise`` on the selection split,
    where the default is kept (a maximum over noisy scores flatters the winner). None: no search."""
    best = best_search_trial(study)
    default = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if t.user_attrs.get(keys.DEFAULT_CONFIG) and t.value is not None), None)
    if best is None or default is None or best.number == default.number:
        return best
    return best if best.value - default.value >= noise else default


def search_epochs(plan: Plan, preset: Preset, train_images: int) -> int:
    """A search run's length in epochs: the plan's rung, in whole passes over the training data."""
    per_epoch = min(preset.train.images_per_epoch or train_images, train_images)
    return max(1, math.ceil(plan.rung_passes * train_images / per_epoch))


def waiting_finals(session: Session) -> int:
    return sum(keys.is_final(t) for study in session.studies.values()
               for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def search_run_fits(plan: Plan, seconds_per_epoch: float | None, epochs: int, now: float, search_end: float) -> bool:
    """A search run may start when most of it (its measured epochs, or the plan's estimate) fits
    before the search phase ends; the safety stop ends the rest at an epoch boundary."""
    if now >= search_end:
        return False
    if seconds_per_epoch is None:
        return True
    return now + 0.8 * seconds_per_epoch * epochs <= search_end



def best_search_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The member's best finished search trial with a run (refits and final runs excluded, NaN
    values skipped; ties to the earlier trial)."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if not keys.is_refit(t) and t.value is not None and not math.isnan(t.value)
                and t.user_attrs.get(keys.RUN)]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def refit_enabled(session: Session) -> bool:
    """Without a time budget: refits when ``study.refit_epochs`` asks (a budget has final runs instead)."""
    return session.budget is None and session.preset.study.refit_epochs > 0


def enqueue_refits(session: Session) -> dict[str, int]:
    """One refit per member study (once per session), continuing its best search trial; returns
    arch -> the trial it continues."""
    enqueued = {}
    for arch, study in session.studies.items():
        with storage_lock(session.storage_url, keys.admit_lock(study.study_name)):
            if study.user_attrs.get(keys.FINALS_ENQUEUED):
                continue
            best = best_search_trial(study)
            study.set_user_attr(keys.FINALS_ENQUEUED, True)
            if best is None:
                continue
            study.enqueue_trial(best.params, user_attrs={keys.PHASE: keys.REFIT, keys.REFIT_OF: best.number,
                                                         keys.REFIT_OF_RUN: best.user_attrs[keys.RUN]})
            enqueued[arch] = best.number
    return enqueued


def refit_start(session: Session, trial: optuna.Trial, train_cfg: TrainConfig) -> tuple[TrainConfig, dict]:
    """(training settings, initial weights) of a refit: the best trial's checkpoint, continued for
    ``study.refit_epochs`` at the learning rate its plateau schedule would drop to next."""
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_artifact(session.client, trial.user_attrs[keys.REFIT_OF_RUN],
                                          M.CHECKPOINT_ARTIFACT, tmp)
        state = load_checkpoint(path)["state_dict"]
    epochs = session.preset.study.refit_epochs
    return replace(train_cfg, epochs=epochs, lr=train_cfg.lr * train_cfg.lr_factor), state
