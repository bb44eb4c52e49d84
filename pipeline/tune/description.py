"""What the session's parent run says in the MLflow UI's Description (markdown, a few lines): the plan
from when it is made, then the plan and the outcome once the session ends, each figure named for the
images it was measured on (selection accuracy: in-sample; audit accuracy: images no choice read)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import metrics as M
from ..config import Preset
from .plan import Plan

if TYPE_CHECKING:
    from .console import EnsembleOutcome

# Until the session ends; one stopped early keeps it (its run's status and error tag say why).
PENDING = "**Outcome**: none yet; written here when the session ends"


def plan_lines(plan: Plan | None, preset: Preset) -> list[str]:
    """The plan of a time budget (its reasons stay in ``plan.json``), or the search the preset asks for."""
    if plan is None:
        s, t = preset.study, preset.train
        refit = f"; then each member's best trial refitted for {s.refit_epochs} epochs" if s.refit_epochs > 0 else ""
        return [f"**Plan**: search {', '.join(s.members)}, {s.trials} finished trials each (at most {t.epochs} "
                f"epochs a trial, pruner {s.pruner}){refit}"]
    first, *rest = [line.strip() for line in plan.lines() if not line.strip().startswith("why:")]
    return [f"**Plan** {first.removeprefix('plan ')}", *(f"- {line}" for line in rest),
            "- why: the reasons are in the run's plan.json"]


def outcome_lines(members: dict[str, dict[str, Any]], ensemble: EnsembleOutcome | None, version: str | None,
                  model_name: str, budget_note: str = "") -> list[str]:
    """What the session registered and how good it is, then each member's best trial and the time used."""
    if ensemble is None:
        lines = ["**Outcome**: no ensemble (too few finished trials); nothing registered"]
    else:
        e, audit = ensemble.result, ensemble.audit
        how = e.kind if e.single else f"{e.kind}, {e.method} vote"
        lines = [f"**Outcome**: {how}, registered as {model_name} version {version} (@challenger)",
                 f"- selection accuracy {_pct(e.selection_accuracy)}: {e.selection_note}"]
        if audit:
            low, high = audit[f"{M.AUDIT_ACCURACY}_low"], audit[f"{M.AUDIT_ACCURACY}_high"]
            lines.append(f"- audit accuracy {_pct(audit[M.AUDIT_ACCURACY])} (95% interval {_pct(low)} to "
                         f"{_pct(high)}): no choice read these {int(audit[M.AUDIT_IMAGES])} images")
        else:
            lines.append("- no audit split: every figure is in-sample and flatters the model")
    best = [f"{arch} {_pct(m['best_val_accuracy'])} (trial {m['best_trial']})" for arch, m in members.items()
            if m["best_val_accuracy"] is not None]
    lines.append(f"- best selection accuracy of each member: {', '.join(best)}" if best else
                 "- no member finished a trial")
    if budget_note:
        lines.append(f"- {budget_note}")
    return lines


def description(*sections: list[str]) -> str:
    """Markdown: each section's first line, then its other lines as a list. Blank lines between them:
    the UI's renderer (showdown, GitHub flavour) starts a list only after one."""
    blocks = []
    for head, *items in sections:
        blocks += [head, "\n".join(items)] if items else [head]
    return "\n\n".join(blocks)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"
