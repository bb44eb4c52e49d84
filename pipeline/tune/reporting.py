"""What a session says while it runs (``progress.say``: stderr, silent with --quiet): a line per
phase and a line per finished trial, read back from the trial as the storage holds it."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from ..progress import duration, pct, say
from .refit import is_refit
from .session import Session

PHASES = ("member studies", "ensemble search", "registration")


def phase(number: int, text: str) -> None:
    say(f"[{number}/{len(PHASES)}] {PHASES[number - 1]}: {text}")


def members_phase(session: Session) -> None:
    s, t = session.preset.study, session.preset.train
    if session.plan is not None:
        searched = {a: n for a, n in session.plan.configs.items() if n}
        phase(1, (f"search {', '.join(f'{a} {n} configurations' for a, n in searched.items())} of "
                  f"{session.plan.rung_passes:g} passes each" if searched else "no search")
              + f", then final runs of {', '.join(session.plan.final_members)}; {len(session.data.train)} training "
                f"images, {t.schedule} schedule")
        return
    phase(1, f"{', '.join(s.members)}; {s.trials} finished trials each, at most {t.epochs} epochs per trial, "
             f"{s.pruner} pruning, {len(session.data.train)} training images")


def trial_line(label: str, trial: optuna.trial.FrozenTrial, done: int | None = None, budget: int | None = None) -> str:
    """``cnn_v1 #3 COMPLETE best 71.2% at epoch 2, 3m41s``, or PRUNED/FAIL with where and why."""
    values = trial.intermediate_values
    best_epoch = max(values, key=lambda e: (values[e], -e)) if values else None
    best = values[best_epoch] if best_epoch is not None else None
    took = ""
    if trial.datetime_start is not None and trial.datetime_complete is not None:
        took = duration((trial.datetime_complete - trial.datetime_start).total_seconds())
    state = trial.state.name
    if trial.state == TrialState.COMPLETE:
        text = f"{label} COMPLETE selection accuracy {pct(trial.value)}, {took}"
    elif trial.state == TrialState.PRUNED:
        last = max(values) if values else 0
        text = f"{label} PRUNED at epoch {last} (best {pct(best)} at epoch {best_epoch or '?'}), {took}"
    else:
        why = str(trial.user_attrs.get("error") or "").splitlines()
        text = f"{label} {state} after {took or '?'}" + (f": {why[0][:200]}" if why else "")
    if done is not None and budget:
        text += f" [{done}/{budget} finished]"
    return text


def trial_finished(session: Session, arch: str, trial: optuna.Trial) -> None:
    """Say how the trial ended, with how far its member study is."""
    try:
        frozen = session.storage.get_trial(trial._trial_id)
        trials = session.studies[arch].get_trials(deepcopy=False)
        # refits do not count against study.trials, so the count leaves them out
        done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) and not is_refit(t) for t in trials)
    except Exception:  # noqa: BLE001 - a progress line never fails a trial
        return
    if is_refit(frozen):
        say(trial_line(f"{arch} #{trial.number} {frozen.user_attrs.get('phase')}", frozen))
    else:
        say(trial_line(f"{arch} #{trial.number}", frozen, done, session.preset.study.trials))
