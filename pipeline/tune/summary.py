"""The end-of-session summary printed by ``tune``: every figure named for the images it was measured on."""

from __future__ import annotations

import mlflow

from .. import metrics as M
from ..tracking import redact
from ..tracking.links import format_links, session_links


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _interval(audit: dict, name: str, scale: float = 100.0, unit: str = "%") -> str:
    low, high = audit[f"{name}_low"], audit[f"{name}_high"]
    return f"{scale * audit[name]:.2f}{unit} [{scale * low:.2f}, {scale * high:.2f}]"


def print_summary(summary) -> None:
    rows = [("member", "study", "complete/pruned/failed", "best trial", "best selection acc")]
    for arch, m in summary.members.items():
        rows.append((arch, m["study"], f"{m['complete']}/{m['pruned']}/{m['failed']}",
                     str(m["best_trial"]), _pct(m["best_val_accuracy"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    print(f"\n{summary.audit_note}")
    outcome = summary.ensemble
    if outcome is not None:
        e, audit = outcome.result, outcome.audit
        a, b = e.member_a, e.member_b
        print(f"\nensemble  {a.label} ({e.variant_a}, T={e.temperature_a:.2f}) x {e.weight:.2f} + {b.label} "
              f"({e.variant_b}, T={e.temperature_b:.2f}) x {1 - e.weight:.2f} ({e.method} vote)")
        print(f"          selection (in-sample: every choice read these {e.selection_images} images): "
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
    from mlflow.tracking import MlflowClient

    try:
        links = session_links(MlflowClient(), parent_run_id)
    except Exception as exc:  # noqa: BLE001 - the summary above is what matters
        print(f"(no UI links: {exc})")
        return
    print("then, in the UI's model-training view:")
    print(format_links(links))
