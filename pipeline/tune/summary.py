"""The end-of-session summary printed by ``tune``."""

from __future__ import annotations

import mlflow

from ..tracking import redact
from ..tracking.links import format_links, session_links


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def print_summary(summary) -> None:
    rows = [("member", "study", "complete/pruned/failed", "best trial", "best val acc")]
    for arch, m in summary.members.items():
        rows.append((arch, m["study"], f"{m['complete']}/{m['pruned']}/{m['failed']}",
                     str(m["best_trial"]), _pct(m["best_val_accuracy"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    e = summary.ensemble
    if e is not None:
        a, b = e.member_a, e.member_b
        print(f"\nensemble  {a.label} x {e.weight:.2f} + {b.label} x {1 - e.weight:.2f} ({e.method} vote)")
        print(f"          validation accuracy {_pct(e.val_accuracy)} in-sample, "
              f"{_pct(e.holdout_accuracy)} cross-fitted (honest); members {_pct(e.member_a_accuracy)} "
              f"and {_pct(e.member_b_accuracy)}")
        print(f"          registered as version {summary.model_version} (alias @challenger)")
    print(f"\nparent run {summary.parent_run_id}; {summary.seconds:.0f}s")
    print(f"open the UI:  mlflow ui --backend-store-uri {redact(mlflow.get_tracking_uri())}")
    print_links(summary.parent_run_id)


def print_links(parent_run_id: str) -> None:
    """Where the session is in the UI, in its model-training view (the default view is GenAI's)."""
    from mlflow.tracking import MlflowClient

    try:
        links = session_links(MlflowClient(), parent_run_id)
    except Exception as exc:  # noqa: BLE001 - the summary above is what matters
        print(f"(no UI links: {exc})")
        return
    print("then, in the UI's model-training view:")
    print(format_links(links))
