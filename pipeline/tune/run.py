"""``tune``: one session as a list of steps, each one call with the progress line it prints.

set up (studies, parent run, data) → start the clock (budget and plan) → start the other worker
processes of ``--n-jobs`` (``launcher``) → search the member studies → final runs (or refits) → wait
for other workers → ensemble search → audit and registration → summary. Each member study is an
Optuna study whose trials are nested MLflow runs under the session's parent run; once every member
study holds its budget (in this worker or others), exactly one worker builds the ensemble from the
top trials' stored probabilities and registers it as ``@challenger``.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .. import metrics as M
from .. import tracking
from ..config import Preset
from ..data.roles import ids_digest
from ..ensemble.audit_scoring import audit_ensemble
from ..ensemble.stage import build_ensemble, enough_candidates
from ..progress import hushed, say
from ..registry.register import register_ensemble
from ..train import resolve_device
from . import keys
from .budget import Clock
from .candidates import candidate_fingerprint, load_candidates
from .console import EnsembleOutcome, TuneSummary, members_phase, phase, print_summary
from .description import description, outcome_lines, plan_lines
from .figures import log_session_figures, log_study_figures
from .launcher import launched, share_cores
from .phases import enqueue_defaults, enqueue_finals, enqueue_refits, refit_enabled, session_plan
from .plan import mirror_fits, mirror_seconds
from .session import Session, open_session, session_budget
from .storage import storage_lock
from .trial import best_effort
from .workers import budget_state, close_lost_runs, run_members, settle

# We drive trials with ask/tell plus our own heartbeat thread (for exact budgets across workers);
# Optuna warns that heartbeats are meant for Study.optimize, which we knowingly replace.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass(frozen=True)
class WorkerOptions:
    """How this worker runs the session (what to tune is the preset: study name, storage, model
    name, ``n_jobs`` and the time budget are ``preset.study`` settings)."""

    experiment: str | None = None  # default: preset.tracking.experiment
    progress: bool = True  # progress bars on a terminal
    setup_only: bool = False  # create the storage, studies and parent run, then stop
    trials_only: bool = False  # run trials until none is left to admit, then stop (no waiting, no ensemble)
    clock: Clock = time.time  # the wall clock of the time budget (a fake in tests)


def run_tuning(preset: Preset, options: WorkerOptions = WorkerOptions()) -> TuneSummary | None:
    entered, start = options.clock(), time.perf_counter()  # a budget counts from here, data loading included
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    session = open_session(preset, options.experiment, clock=options.clock)
    say(f"tuning session {session.study_name}: parent run {session.parent_run_id}, "
        f"storage {tracking.redact(session.storage_url)}, {preset.study.trials} trials per member")
    if options.setup_only:
        return None
    share_cores(preset)  # --n-jobs as processes on the CPU: this worker's share, before the plan measures speeds
    session = start_clock(session, entered)  # prints the plan of a time budget
    with parent_closed_on_failure(session), launched(session) as jobs:  # --n-jobs as processes: starts them
        search(session, options.progress, jobs.threads)  # [1/3] member studies
        final_runs(session, options.progress, jobs.threads)  # "final runs: ..." or "refit: ..."
        jobs.wait()  # the worker processes started here, if any
        if options.trials_only:
            say("this worker's trials are done; the ensemble is left to the session's other workers")
            return None
        finish_others_work(session, options.progress, jobs.threads)
        members = {arch: member_summary(session, arch) for arch in preset.study.members}
        ensemble, version = ensemble_and_register(session)  # [2/3] ensemble search, [3/3] registration
        close_session(session, members, ensemble, version)
    return summarise(session, members, ensemble, version, time.perf_counter() - start)


def start_clock(session: Session, entered: float) -> Session:
    """The session's time budget and plan: the first worker starts the clock and makes the plan
    (measured speeds, printed and logged); every other worker reads them from the storage."""
    s = session.preset.study
    with storage_lock(session.storage_url, keys.session_lock(session.study_name)):
        budget = session_budget(session.first_study, s.time_budget, s.tail_seconds, session.clock, entered)
        if budget is None:
            return session
        plan, made = session_plan(session, budget)
    for line in plan.lines() if made else plan.lines()[:1]:
        say(line)
    budget = replace(budget, final_seconds=plan.final_seconds, tail_seconds=plan.tail_seconds)
    return replace(session, budget=budget, plan=plan)


@contextlib.contextmanager
def parent_closed_on_failure(session: Session) -> Iterator[None]:
    """An interrupted or failed worker closes the parent run (KILLED or FAILED, with why) unless
    other workers still have trials running, and re-raises."""
    try:
        yield
    except KeyboardInterrupt as exc:
        close_parent(session, "KILLED", {"stopped_by": f"interrupt ({exc or 'SIGINT'})"})
        raise
    except BaseException as exc:
        close_parent(session, "FAILED", {"error": session.scrub(f"{type(exc).__name__}: {exc}")[:5000]})
        raise


def search(session: Session, progress: bool, threads: int) -> None:
    """Each member study's search trials (its default configuration first in a time budget)."""
    members_phase(session)
    if session.plan is not None:
        enqueue_defaults(session, session.plan)
    run_members(session, threads, progress)


def final_runs(session: Session, progress: bool, threads: int) -> None:
    """The plan's final runs in a time budget; refits of each member's best trial when asked for."""
    if session.plan is not None:
        finals = enqueue_finals(session, session.plan)
        if finals:
            say("final runs: " + ", ".join(f"{a} with {origin}" for a, origin in finals.items())
                + (", side by side, each with a schedule ending at the final phase's end" if session.plan.side_by_side
                   else ", each with a schedule ending at its share of the final phase"))
    elif refit_enabled(session):
        continued = enqueue_refits(session)
        if continued:
            say("refit: " + ", ".join(f"{a} #{n}" for a, n in continued.items()) + " continue from their best "
                "checkpoints")
    else:
        return
    run_members(session, threads, progress, refit=True)


def finish_others_work(session: Session, progress: bool, threads: int) -> None:
    """Wait for trials running in other workers; run here what a lost worker left re-queued; close
    the runs lost workers left open."""
    while settle(session):
        run_members(session, threads, progress)
        run_members(session, threads, progress, refit=True)
    for arch in session.preset.study.members:
        close_lost_runs(session, arch)


def ensemble_and_register(session: Session) -> tuple[EnsembleOutcome | None, str | None]:
    """One worker at a time: Optuna's figures, then the ensemble built and registered (once per set
    of candidate trials), then the session's own figures."""
    with storage_lock(session.storage_url, keys.ensemble_lock(session.study_name)):
        log_study_figures(session)
        phase(2, ("the final runs" if session.plan is not None else f"the top {session.preset.study.top_k} trials "
                  "of each member") + ": the equal-weight pair unless the selection split shows a better choice "
                 "(the best member alone, or a searched pair, flips, rule and weight), then the audit")
        with hushed():
            outcome = ensemble_once(session, session.preset.study.model_name)
        log_session_figures(session)
    return outcome


def close_session(session: Session, members: dict[str, dict[str, Any]], ensemble: EnsembleOutcome | None,
                  version: str | None) -> None:
    tracking.log_metrics(session.client, session.parent_run_id, {
        f"{arch}_best_val_accuracy": m["best_val_accuracy"] for arch, m in members.items()
        if m["best_val_accuracy"] is not None})
    if session.budget is not None:
        tracking.log_metrics(session.client, session.parent_run_id, {
            "budget_seconds": session.budget.seconds, "budget_used_seconds": session.clock() - session.budget.started})
    describe_session(session, members, ensemble, version)
    tracking.end_run(session.client, session.parent_run_id, "FINISHED")


def describe_session(session: Session, members: dict[str, dict[str, Any]], ensemble: EnsembleOutcome | None,
                     version: str | None) -> None:
    """The parent run's Description: the plan and the outcome. A worker that registered nothing
    leaves the Description of the one that did (this session's, or an earlier one's on these trials)."""
    if ensemble is None and session.first_study.user_attrs.get(keys.ENSEMBLE_VERSION):
        return
    budget_note = session.budget.describe_use(session.clock()) if session.budget else ""
    outcome = outcome_lines(members, ensemble, version, session.preset.study.model_name, budget_note)
    tracking.describe_run(session.client, session.parent_run_id,
                          description(plan_lines(session.plan, session.preset), outcome))


def summarise(session: Session, members: dict[str, dict[str, Any]], ensemble: EnsembleOutcome | None,
              version: str | None, seconds: float) -> TuneSummary:
    summary = TuneSummary(session.parent_run_id, members, ensemble, version, seconds, session.audit_info.describe(),
                          session.budget.describe_use(session.clock()) if session.budget else "")
    print_summary(summary)
    return summary


def close_parent(session: Session, status: str, tags: dict[str, str]) -> None:
    """A worker that stops early closes the shared parent run only when no other worker still has
    a trial running; otherwise the parent stays open for them (and the last one closes it)."""
    try:
        others, _ = budget_state(session)
    except Exception:  # noqa: BLE001 - the storage itself may be what failed
        others = 0
    best_effort(lambda: tracking.set_tags(session.client, session.parent_run_id, tags))
    if not others:
        best_effort(lambda: tracking.end_run(session.client, session.parent_run_id, status))


def ensemble_once(session: Session, model_name: str) -> tuple[EnsembleOutcome | None, str | None]:
    """Build and register the ensemble unless this exact set of candidate trials already was."""
    fingerprint = candidate_fingerprint(session, model_name)
    first = session.first_study
    if first.user_attrs.get(keys.ENSEMBLE_FINGERPRINT) == fingerprint:
        print(f"the ensemble of these trials is already registered as {model_name} version "
              f"{first.user_attrs.get(keys.ENSEMBLE_VERSION)}; nothing new to register")
        return None, None
    data, client = session.data, session.client
    with tempfile.TemporaryDirectory() as tmp:
        candidates = load_candidates(session, Path(tmp))
        if not enough_candidates(candidates, session.preset.study, planned=session.plan is not None):
            print("not enough finished trials for an ensemble: nothing registered")
            return None, None
        run_id = tracking.start_run(client, session.experiment_id, f"ensemble-{session.study_name}",
                                    parent_run_id=session.parent_run_id,
                                    tags={**tracking.standard_tags("cpu"), "kind": "ensemble",
                                          "optuna.study": session.study_name})
        with tracking.run_guard(client, run_id):
            tracking.log_dataset(client, run_id, data, context="validation")  # it chooses on the selection split
            result = build_ensemble(candidates, data.validation.labels.numpy(), data.validation.ids, data.classes,
                                    session.preset.study, client, run_id, mirror_votes(session))
            audit = None
            if session.audit is not None:  # every choice is made: now, and only now, the audit images
                audit = audit_ensemble(result, session.audit.images, session.audit.labels.numpy(),
                                       session.audit.ids, data.classes, session.audit_info.source, client,
                                       resolve_device(session.preset.train.device))
            phase(3, f"{result.member_a.label} + {result.member_b.label} as a new version of {model_name}")
            version = register_ensemble(client, result, data, model_name, audit, session.audit_info.spec,
                                        ids_digest(session.audit))
    first.set_user_attr(keys.ENSEMBLE_FINGERPRINT, fingerprint)
    first.set_user_attr(keys.ENSEMBLE_VERSION, version)
    tracking.log_metrics(client, session.parent_run_id, {
        M.SELECTION_ACCURACY: result.selection_accuracy,
        **({M.AUDIT_ACCURACY: audit[M.AUDIT_ACCURACY]} if audit else {})})
    return EnsembleOutcome(result, audit), version


def mirror_votes(session: Session) -> bool:
    """Whether the ensemble may choose mirror-image votes: always without a budget; within one, when
    the time left pays for the audit of the mirror images too (the plan kept one audit pass)."""
    budget, plan = session.budget, session.plan
    if budget is None or plan is None or session.audit is None:
        return True
    tail, audit_pass, left = session.preset.study.tail_seconds, plan.audit_pass_seconds, budget.end - session.clock()
    if mirror_fits(left, tail, audit_pass):
        return True
    say(f"mirror-image votes left out: {left:.0f} s left, and auditing them needs "
        f"{mirror_seconds(tail, audit_pass):.0f} s with the ensemble and registration")
    return False


def member_summary(session: Session, arch: str) -> dict[str, Any]:
    study = session.studies[arch]
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    return {
        "study": study.study_name,
        "complete": len(complete),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "best_trial": best.number if best else None,
        "best_val_accuracy": best.value if best else None,
        "best_run_id": best.user_attrs.get(keys.RUN) if best else None,
        "best_params": best.params if best else {},
    }
