"""What a session says: a line per phase and per finished trial while it runs (``progress.say``:
stderr, silent with --quiet), then the summary at its end, every figure named for the images it was
measured on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlflow
import optuna
from optuna.trial import TrialState

from .. import metrics as M
from ..ensemble.stage import EnsembleResult
from ..progress import duration, pct, say
from ..tracking import redact
from ..tracking.links import format_links, session_links
from . import keys
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
        why = str(trial.user_attrs.get(keys.ERROR) or "").splitlines()
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
        done = sum(t.state in keys.FINISHED and not keys.is_refit(t) for t in trials)
    except Exception:  # noqa: BLE001 - a progress line never fails a trial
        return
    if keys.is_refit(frozen):
        say(trial_line(f"{arch} #{trial.number} {keys.phase_of(frozen)}", frozen))
    else:
        say(trial_line(f"{arch} #{trial.number}", frozen, done, session.preset.study.trials))


# ----------------------------------------------------------------------------- the summary

@dataclass(frozen=True)
class EnsembleOutcome:
    result: EnsembleResult
    audit: dict[str, float] | None  # None: the audit split is off, every figure is in-sample


@dataclass(frozen=True)
class TuneSummary:
    parent_run_id: str
    members: dict[str, dict[str, Any]]
    ensemble: EnsembleOutcome | None
    model_version: str | None
    seconds: float
    audit_note: str = ""  # how the audit split was drawn, or that it is off
    budget_note: str = ""  # how much of the time budget the session used


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _interval(audit: dict, name: str, scale: float = 100.0, unit: str = "%") -> str:
    low, high = audit[f"{name}_low"], audit[f"{name}_high"]
    return f"{scale * audit[name]:.2f}{unit} [{scale * low:.2f}, {scale * high:.2f}]"


def print_summary(summary: TuneSummary) -> None:
    rows = [("member", "study", "complete/pruned/failed", "best trial", "best selection acc")]
    for arch, m in summary.members.items():
        rows.append((arch, m["study"], f"{m['complete']}/{m['pruned']}/{m['failed']}",
                     str(m["best_trial"]), _pct(m["best_val_accuracy"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(f"\n{summary.audit_note}")
    outcome = summary.ensemble
    if outcome is not None:
        e, audit = outcome.result, outcome.audit
        a, b = e.member_a, e.member_b
        print(f"\nensemble  {e.kind}: {a.label} ({e.variant_a}, T={e.temperature_a:.2f}) x {e.weight:.2f} + {b.label} "
              f"({e.variant_b}, T={e.temperature_b:.2f}) x {1 - e.weight:.2f} ({e.method} vote)")
        if e.decision is not None:
            print(f"          why: {e.decision.reason}")
        print(f"          selection ({e.selection_note}): "
              f"accuracy {_pct(e.selection_accuracy)}, members {_pct(e.member_a_accuracy)} and "
              f"{_pct(e.member_b_accuracy)}")
        if audit:
            print(f"          audit (no choice read these {int(audit[M.AUDIT_IMAGES])} images, 95% intervals): "
                  f"accuracy {_interval(audit, M.AUDIT_ACCURACY)}, macro-F1 {_interval(audit, M.AUDIT_MACRO_F1)}")
            print(f"          audit NLL {audit[M.AUDIT_NLL]:.3f} (uncalibrated {audit[M.AUDIT_NLL_UNCALIBRATED]:.3f}), "
                  f"ECE {_pct(audit[M.AUDIT_ECE])} (uncalibrated {_pct(audit[M.AUDIT_ECE_UNCALIBRATED])}); "
                  f"members alone {_pct(audit[M.MEMBER_A_AUDIT_ACCURACY])} and "
                  f"{_pct(audit[M.MEMBER_B_AUDIT_ACCURACY])}")
        else:
            print("          no audit split: these figures are in-sample and flatter the model")
        print(f"          registered as version {summary.model_version} (alias @challenger)")
    print(f"\nparent run {summary.parent_run_id}; {summary.seconds:.0f}s"
          + (f"; {summary.budget_note}" if summary.budget_note else ""))
    print(f"open the UI:  mlflow ui --backend-store-uri {redact(mlflow.get_tracking_uri())}")
    print_links(summary.parent_run_id)


def print_links(parent_run_id: str) -> None:
    """Where the session is in the UI, in its model-training view (the default view is GenAI's)."""
    try:
        links = session_links(mlflow.MlflowClient(), parent_run_id)
    except Exception as exc:  # noqa: BLE001 - the summary above is what matters
        print(f"(no UI links: {exc})")
        return
    print("then, in the UI's model-training view:")
    print(format_links(links))
