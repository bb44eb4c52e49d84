"""``tune``: member studies, then the ensemble stage, then registration, as one session.

Each member study is an Optuna study whose trials are nested MLflow runs under the session's parent
run; once every member study holds its budget (in this worker or others), exactly one worker builds
the ensemble from the top trials' stored probabilities and registers it as ``@challenger``.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .. import metrics as M
from .. import tracking
from ..config import Preset
from ..data.audit import ids_digest
from ..ensemble.audit import audit_ensemble
from ..progress import hushed, say
from ..ensemble.stage import EnsembleResult, build_ensemble, enough_candidates
from ..registry.register import register_ensemble
from ..train import resolve_device
from .budget import Clock, session_budget
from .candidates import candidate_fingerprint, load_candidates
from .refit import enqueue_refits, refit_enabled
from .figures import log_session_figures
from .phases import enqueue_defaults, enqueue_finals, session_plan
from .reporting import members_phase, phase
from .session import RUN_ATTR, Session, open_session
from .storage import storage_lock
from .summary import print_summary
from .trial import quietly
from .workers import budget_state, close_lost_runs, run_members, settle

# We drive trials with ask/tell plus our own heartbeat thread (for exact budgets across workers);
# Optuna warns that heartbeats are meant for Study.optimize, which we knowingly replace.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass
class TuneSummary:
    parent_run_id: str
    members: dict[str, dict[str, Any]]
    ensemble: EnsembleOutcome | None
    model_version: str | None
    seconds: float
    audit_note: str = ""  # how the audit split was drawn, or that it is off
    budget_note: str = ""  # how much of the time budget the session used


def run_tuning(preset: Preset, experiment: str | None = None, study_name: str | None = None,
               storage: str | None = None, model_name: str | None = None, n_jobs: int | None = None,
               progress: bool = True, setup_only: bool = False, clock: Clock = time.time) -> TuneSummary | None:
    start, entered = time.perf_counter(), clock()  # a budget counts from here, data loading included (as train's)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    model_name = model_name or preset.study.model_name
    n_jobs = n_jobs or preset.study.n_jobs
    session = open_session(preset, experiment, study_name, storage)
    say(f"tuning session {session.study_name}: parent run {session.parent_run_id}, "
        f"storage {tracking.redact(session.storage_url)}, {preset.study.trials} trials per member")
    if setup_only:
        return None
    session.clock = clock
    with storage_lock(session.storage_url, f"session:{session.study_name}"):  # the first worker starts the clock
        s = preset.study
        session.budget = session_budget(session.studies[s.members[0]], s.time_budget, s.tail_seconds, clock,
                                        entered)
        if session.budget is not None:  # the plan: measured and made once, read by every other worker
            session.plan, made = session_plan(session, session.budget)
            session.budget = replace(session.budget, final_seconds=session.plan.final_seconds,
                                     tail_seconds=session.plan.tail_seconds)
            for line in session.plan.lines() if made else session.plan.lines()[:1]:
                say(line)
    try:
        members_phase(session)
        if session.plan is not None:
            enqueue_defaults(session, session.plan)
        run_members(session, n_jobs, progress)
        if session.plan is not None:
            finals = enqueue_finals(session, session.plan)
            if finals:
                say("final runs: " + ", ".join(f"{a} with {origin}" for a, origin in finals.items())
                    + ", each with a schedule ending at its share of the final phase")
            run_members(session, n_jobs, progress, refit=True)
        if refit_enabled(session):
            continued = enqueue_refits(session.studies, session.storage_url)
            if continued:
                say("refit: " + ", ".join(f"{a} #{n}" for a, n in continued.items()) + " continue from their best "
                    "checkpoints" + (" until the refit phase ends" if session.budget else ""))
            run_members(session, n_jobs, progress, refit=True)
        while settle(session):  # a lost worker's trial was re-queued meanwhile: run it here
            run_members(session, n_jobs, progress)
            run_members(session, n_jobs, progress, refit=True)
        for arch in preset.study.members:
            close_lost_runs(session, arch)
        members = {arch: member_summary(session, arch) for arch in preset.study.members}
        with storage_lock(session.storage_url, f"ensemble:{session.study_name}"):
            log_study_figures(session)
            phase(2, f"pair, test-time flips, voting rule and weight over the top {preset.study.top_k} trials of "
                     "each member (calibrated, on their stored selection-split logits), then the audit")
            with hushed():
                ensemble, version = ensemble_once(session, model_name)
            log_session_figures(session)
        tracking.log_metrics(session.client, session.parent_run_id, {
            f"{arch}_best_val_accuracy": m["best_val_accuracy"] for arch, m in members.items()
            if m["best_val_accuracy"] is not None})
        tracking.end_run(session.client, session.parent_run_id, "FINISHED")
    except KeyboardInterrupt as exc:
        close_parent(session, "KILLED", {"stopped_by": f"interrupt ({exc or 'SIGINT'})"})
        raise
    except BaseException as exc:
        close_parent(session, "FAILED", {"error": session.scrub(f"{type(exc).__name__}: {exc}")[:5000]})
        raise
    summary = TuneSummary(session.parent_run_id, members, ensemble, version, time.perf_counter() - start,
                          session.audit_info.describe(),
                          session.budget.describe_use(clock()) if session.budget else "")
    if session.budget is not None:
        tracking.log_metrics(session.client, session.parent_run_id, {
            "budget_seconds": session.budget.seconds, "budget_used_seconds": clock() - session.budget.started})
    print_summary(summary)
    return summary


def close_parent(session: Session, status: str, tags: dict[str, str]) -> None:
    """A worker that stops early closes the shared parent run only when no other worker still has
    a trial running; otherwise the parent stays open for them (and the last one closes it)."""
    try:
        others, _ = budget_state(session)
    except Exception:  # noqa: BLE001 - the storage itself may be what failed
        others = 0
    quietly(lambda: tracking.set_tags(session.client, session.parent_run_id, tags))
    if not others:
        quietly(lambda: tracking.end_run(session.client, session.parent_run_id, status))


@dataclass(frozen=True)
class EnsembleOutcome:
    result: EnsembleResult
    audit: dict[str, float] | None  # None: the audit split is off, every figure is in-sample


def ensemble_once(session: Session, model_name: str) -> tuple[EnsembleOutcome | None, str | None]:
    """Build and register the ensemble unless this exact set of candidate trials already was."""
    fingerprint = candidate_fingerprint(session, model_name)
    first = session.studies[session.preset.study.members[0]]
    if first.user_attrs.get("ensemble_fingerprint") == fingerprint:
        print(f"the ensemble of these trials is already registered as {model_name} version "
              f"{first.user_attrs.get('ensemble_version')}; nothing new to register")
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
            result = build_ensemble(candidates, data.validation.labels.numpy(), data.validation.ids, data.classes,
                                    session.preset.study, client, run_id)
            audit = None
            if session.audit is not None:  # every choice is made: now, and only now, the audit images
                audit = audit_ensemble(result, session.audit.images, session.audit.labels.numpy(),
                                       session.audit.ids, data.classes, session.audit_info.source, client,
                                       resolve_device(session.preset.train.device))
            phase(3, f"{result.member_a.label} + {result.member_b.label} as a new version of {model_name}")
            version = register_ensemble(client, result, data.classes, data.validation.images, data.digest,
                                        model_name, audit, session.audit_info.spec, ids_digest(session.audit))
    first.set_user_attr("ensemble_fingerprint", fingerprint)
    first.set_user_attr("ensemble_version", version)
    tracking.log_metrics(client, session.parent_run_id, {
        M.SELECTION_ACCURACY: result.selection_accuracy,
        **({M.AUDIT_ACCURACY: audit[M.AUDIT_ACCURACY]} if audit else {})})
    return EnsembleOutcome(result, audit), version


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
        "best_run_id": best.user_attrs.get(RUN_ATTR) if best else None,
        "best_params": best.params if best else {},
    }


def log_study_figures(session: Session) -> None:
    """Optuna's own figures (history, importances, intermediate values) into the parent run."""
    from optuna import visualization as vis

    for arch, study in session.studies.items():
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        figures = {"optimization_history": vis.plot_optimization_history,
                   "intermediate_values": vis.plot_intermediate_values}
        if len(complete) >= 2 and len({tuple(sorted(t.params.items())) for t in complete}) >= 2:
            figures["param_importances"] = vis.plot_param_importances
        for name, plot in figures.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fig = plot(study)
                session.client.log_figure(session.parent_run_id, fig, f"optuna/{arch}/{name}.html")
            except Exception as exc:  # noqa: BLE001 - a figure must never fail the session
                print(f"note: could not draw {name} for {arch}: {exc}")
