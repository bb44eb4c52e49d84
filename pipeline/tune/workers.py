"""Workers: admit trials atomically against the budget, run member studies (in threads with
``n_jobs``), close runs that lost workers left open, and wait for trials running elsewhere.

There is no scheduler: each worker admits its next trial under the storage lock (count, then ask),
so together any number of workers run exactly ``study.trials`` finished trials per member. In a
time budget, a search trial is also admitted only while most of its run fits in the search phase,
and the member that gets the next one is the furthest from its plan's quota.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import optuna
from optuna.trial import TrialState

from .. import tracking
from . import keys
from .budget import MemberStats, admits, choose_member, epoch_estimates, projected_epoch
from .console import trial_finished
from .keys import FINISHED, is_refit
from .phases import search_epochs, search_run_fits
from .session import Session, TuneError, sampler
from .storage import heartbeat_enabled, storage_lock
from .trial import retried_from, run_trial, trial_configs


def taken(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Trials that count against ``study.trials``: finished (complete or pruned) and running ones
    (refits do not count: they continue a finished trial)."""
    return sum((t.state in FINISHED or t.state == TrialState.RUNNING) and not is_refit(t) for t in trials)


def _refit_waiting(trials: list[optuna.trial.FrozenTrial]) -> bool:
    return any(t.state == TrialState.WAITING and is_refit(t) for t in trials)


def time_allows(session: Session, trials: list[optuna.trial.FrozenTrial], refit: bool) -> bool:
    """No budget; or a final run while the final phase lasts; or a search run, most of which (at its
    member's measured pace) fits in the search phase."""
    budget, now = session.budget, session.clock()
    if budget is None:
        return True
    if refit:
        return admits(budget, now, None, budget.final_end)
    estimate = projected_epoch(epoch_estimates([t for t in trials if not is_refit(t)]))
    epochs = search_epochs(session.plan, session.preset, len(session.data.train))
    return search_run_fits(session.plan, estimate, epochs, now, budget.search_end)


def search_cap(session: Session, arch: str) -> int:
    """Search trials a member study may hold: the plan's configurations in a budget, else study.trials."""
    if session.plan is not None:
        return min(session.preset.study.trials, session.plan.configs.get(arch, 0))
    return session.preset.study.trials


def admit_trial(session: Session, arch: str, refit: bool = False) -> optuna.Trial | None:
    """Atomically: start the next trial if the budget allows, else None (``refit``: a waiting refit).

    Under the storage lock: trials of lost workers (no heartbeat) are failed and re-queued with the
    same parameters, finished and running trials are counted, and the next trial is asked (a
    re-queued one first), given its first heartbeat and its parameters."""
    study = session.studies[arch]
    with storage_lock(session.storage_url, keys.admit_lock(study.study_name)):
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        if refit and not _refit_waiting(trials):
            return None
        if not refit and taken(trials) >= search_cap(session, arch):
            return None
        if not time_allows(session, trials, refit):
            return None
        study.sampler = sampler(session.preset, session.preset.study.members.index(arch), len(trials))
        trial = study.ask()  # pops a waiting (re-queued or enqueued) trial first
        if heartbeat_enabled(session.storage):
            # A worker killed before its heartbeat thread starts is detected too.
            session.storage.record_heartbeat(trial._trial_id)
        # Sampled now, under the lock: the next ask sees its parameters.
        trial_configs(session, arch, trial, retried_from(session, trial))
        return trial


def close_lost_runs(session: Session, arch: str, now: Callable[[], datetime] = datetime.now) -> int:
    """Runs left RUNNING by a worker that died: a FAIL trial's run is closed as FAILED with why
    (and the retry's number); a trial that its worker told just before dying gets the status that
    worker would have set, once the tell is more than a minute old (``now``: the clock). Each trial
    is looked at once per process."""
    closed = 0
    trials = session.studies[arch].get_trials(deepcopy=False)
    grace = 2 * (session.preset.study.heartbeat_seconds or 0)
    settled = now() - timedelta(seconds=max(60, grace))  # a live worker closes its run within ms
    for t in trials:
        run_id = t.user_attrs.get(keys.RUN)
        if t.state not in (TrialState.FAIL, *FINISHED) or not run_id or t._trial_id in session.closed_runs:
            continue
        told_by_its_worker = t.state in FINISHED or bool(t.user_attrs.get(keys.ERROR))  # not failed by a heartbeat
        if told_by_its_worker and (t.datetime_complete is None or t.datetime_complete > settled):
            continue  # its worker closes the run right after the tell, perhaps right now
        try:
            if session.client.get_run(run_id).info.status != "RUNNING":
                session.closed_runs.add(t._trial_id)
                continue
            if t.state == TrialState.FAIL:
                retries = [r.number for r in trials
                           if t.number in keys.RETRY.retry_history(r)]
                recorded = t.user_attrs.get(keys.ERROR)
                why = recorded or (f"worker lost: no heartbeat for more than {grace} s (killed, preempted or "
                                   "disconnected); " + (f"retried as trial {retries[0]} with the same parameters"
                                                        if retries else "not retried (retry limit reached)"))
                tracking.set_tags(session.client, run_id, {"optuna.state": "FAIL", "error": why,
                                                           **({} if recorded else {"stopped_by": "heartbeat"})})
                tracking.end_run(session.client, run_id, "FAILED")
            else:
                tracking.set_tags(session.client, run_id, {"optuna.state": t.state.name,
                                                           "closed_by": "another worker: the trial's worker was lost "
                                                                        "after reporting its result"})
                tracking.end_run(session.client, run_id, "FINISHED" if t.state == TrialState.COMPLETE else "KILLED")
            session.closed_runs.add(t._trial_id)
            closed += 1
        except Exception:  # noqa: BLE001 - best effort; the next check tries again
            pass
    if closed:
        print(f"closed {closed} run(s) of {session.member_study_name(arch)} left open by a lost worker")
    return closed


def member_stats(session: Session) -> list[MemberStats]:
    """Each member study's search trials taken (every worker's, from the storage) and its cap."""
    out = []
    for arch, study in session.studies.items():
        trials = [t for t in study.get_trials(deepcopy=False) if not is_refit(t)]
        out.append(MemberStats(arch, taken(trials), search_cap(session, arch)))
    return out


def run_search(session: Session, progress: bool = False, refit: bool = False) -> dict[str, int]:
    """Admit and run trials until no member study admits one: the search (member by member, or by the
    plan's quotas in a time budget), or the waiting refits and final runs. Returns counts by state."""
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    failures: dict[str, int] = {}
    closed: set[str] = set()
    max_failures = max(3, session.preset.study.trials)
    while not session.stopping.is_set():
        stats = [s for s in member_stats(session) if s.arch not in closed]
        if refit:
            arch = stats[0].arch if stats else None
        else:
            arch = choose_member(stats, by_plan=session.plan is not None)
        if arch is None:
            break
        trial = admit_trial(session, arch, refit)
        close_lost_runs(session, arch)
        if trial is None:
            closed.add(arch)  # at its cap, out of time, or no refit waiting
            continue
        state = run_trial(session, arch, trial, progress)
        trial_finished(session, arch, trial)
        counts[state.name] += 1
        failures[arch] = failures.get(arch, 0) + (state == TrialState.FAIL)
        done = counts["COMPLETE"] + counts["PRUNED"]
        if failures[arch] >= max_failures and failures[arch] > done:
            raise TuneError(f"{session.member_study_name(arch)}: {failures[arch]} trials failed in this worker; "
                            "stopping (see the failed runs' 'error' tag)")
    return counts


def run_members(session: Session, n_jobs: int = 1, progress: bool = False, refit: bool = False) -> int:
    """The member studies (or the refits), ``n_jobs`` threads sharing the work (several trials on one
    GPU). Returns the number of trials this worker ran."""
    if n_jobs <= 1:
        return sum(run_search(session, progress, refit).values())
    errors: list[BaseException] = []
    done: list[int] = []
    ended = [threading.Event() for _ in range(n_jobs)]

    def work(end: threading.Event) -> None:
        try:
            done.append(sum(run_search(session, False, refit).values()))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
        finally:
            end.set()

    for end in ended:
        threading.Thread(target=work, args=(end,)).start()
    _await_threads(session, ended)
    if errors:
        raise errors[0]
    return sum(done)


def _await_threads(session: Session, ended: list[threading.Event]) -> None:
    """Wait for the trial threads by polling, not ``Thread.join``: a signal interrupting ``join``
    can mark a running thread as stopped (CPython before 3.13), and the process would then exit
    under a thread still closing its trial. Signals reach the main thread only, so on SIGINT/SIGTERM
    the other threads are told to stop their trials too."""
    try:
        while not all(end.is_set() for end in ended):
            time.sleep(0.2)
    except KeyboardInterrupt:
        session.stopping.set()
        while not all(end.is_set() for end in ended):
            time.sleep(0.2)
        raise


def budget_state(session: Session) -> tuple[int, bool]:
    """(trials running anywhere, whether some member study still has budget left), after failing
    and re-queueing the trials of lost workers."""
    running, open_budget = 0, False
    for arch, study in session.studies.items():
        with storage_lock(session.storage_url, keys.admit_lock(study.study_name)):
            optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
        running += sum(t.state == TrialState.RUNNING for t in trials)
        open_budget |= ((taken(trials) < search_cap(session, arch) and time_allows(session, trials, False))
                        or (_refit_waiting(trials) and time_allows(session, trials, True)))
    return running, open_budget


def settle(session: Session) -> bool:
    """Wait until no trial of the session runs in another worker. True when work appeared meanwhile
    (a lost worker's trial was re-queued): the caller runs the members again. Without heartbeats
    (non-RDB storages) a lost trial cannot be told from a live one, so nothing is awaited."""
    announced = False
    while True:
        running, open_budget = budget_state(session)
        if open_budget:
            return True
        if not running or not heartbeat_enabled(session.storage):
            return False
        if not announced:
            grace = 2 * session.preset.study.heartbeat_seconds
            print(f"waiting for {running} trial(s) running in other workers (a lost worker's trial is "
                  f"re-queued after {grace} s without heartbeat); the ensemble is built once all are done")
            announced = True
        time.sleep(session.preset.study.heartbeat_seconds)
