"""The chosen ensemble scored on the audit split, after every choice was made: honest figures with
95 % intervals, calibration before and after, each member alone, a reliability diagram.

Member outputs come from their checkpoints through the served model's own ``Member`` (same
preprocessing, precision, test-time variant and temperature), so these are the served figures.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from .. import metrics as M
from .. import tracking
from ..config import EVAL_BATCH
from ..metrics import accuracy, bootstrap, ece, macro_f1, nll, wilson
from .calibration import calibrated, variant_logprobs
from .figures import reliability_figure
from .pyfunc import Member
from .rules import combine
from .stage import EnsembleResult


def audit_probs(result: EnsembleResult, images: torch.Tensor, device: torch.device,
                batch_size: int = EVAL_BATCH) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(ensemble probabilities with temperature 1, calibrated, [each member alone, plain]) for uint8 images.

    Each checkpoint's plain and mirrored passes run once, whatever reads them (a member's variant, the
    member alone, the other member when both are the same run): on the CPU an audit pass of 2,000
    images is ~15 s of the budget, and a one-run ensemble with its mirror vote read it four times."""
    passes: dict[tuple[str, bool], np.ndarray] = {}
    before, after, alone = [], [], []
    for cand, tta, t in ((result.member_a, result.variant_a, result.temperature_a),
                         (result.member_b, result.variant_b, result.temperature_b)):
        member = Member(str(cand.checkpoint), device, cand.precision, tta, t)
        batch = member.prepare(images)  # the split's own tensor when no resize is needed (no copy)

        def logits(flip: bool, member: Member = member, batch: torch.Tensor = batch, key: str = str(cand.checkpoint)):
            if (key, flip) not in passes:
                passes[(key, flip)] = member.logits(batch, batch_size, flip)
            return passes[(key, flip)]

        logp = variant_logprobs(logits(False), logits(True) if tta == "hflip" else None, tta)
        before.append(calibrated(logp, 1.0))
        after.append(calibrated(logp, t))
        alone.append(calibrated(variant_logprobs(logits(False), None, "none"), 1.0))
    mix = lambda p: combine(p[0], p[1], result.weight, result.method)  # noqa: E731
    return mix(before), mix(after), alone


def audit_figures(probs: np.ndarray, uncalibrated: np.ndarray, alone: list[np.ndarray],
                  labels: np.ndarray) -> dict[str, float]:
    """Every audit figure, named once (metrics), with 95 % intervals and the count."""
    correct = int((probs.argmax(1) == labels).sum())
    low, high = wilson(correct, len(labels))
    out = {M.AUDIT_IMAGES: float(len(labels)), M.AUDIT_ACCURACY: correct / len(labels),
           f"{M.AUDIT_ACCURACY}_low": low, f"{M.AUDIT_ACCURACY}_high": high}
    for name, figure in ((M.AUDIT_MACRO_F1, macro_f1), (M.AUDIT_NLL, nll), (M.AUDIT_ECE, ece)):
        out[name] = figure(probs, labels)
        out[f"{name}_low"], out[f"{name}_high"] = bootstrap(figure, probs, labels)
    out[M.AUDIT_NLL_UNCALIBRATED] = nll(uncalibrated, labels)
    out[M.AUDIT_ECE_UNCALIBRATED] = ece(uncalibrated, labels)
    out[M.MEMBER_A_AUDIT_ACCURACY] = accuracy(alone[0], labels)
    out[M.MEMBER_B_AUDIT_ACCURACY] = accuracy(alone[1], labels)
    return out


def audit_ensemble(result: EnsembleResult, images: torch.Tensor, labels: np.ndarray, ids: list[str],
                   classes: tuple[str, ...], source: str, client, device: torch.device) -> dict[str, float]:
    """Score ``result`` on the audit images and log it into the ensemble run; returns the figures."""
    before, after, alone = audit_probs(result, images, device)
    figures = audit_figures(after, before, alone, labels)
    tracking.log_metrics(client, result.run_id, figures)
    tracking.set_tags(client, result.run_id, {"audit_source": source})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        reliability_figure(out / "reliability_audit.png", before, after, labels, f"audit ({source})")
        (out / "audit").mkdir()
        tracking.write_evaluation(out / "audit", labels, after.astype(np.float32), ids, classes,
                                  f"ensemble on the audit split ({len(labels)} images, no choice read them)",
                                  split="audit")
        client.log_artifacts(result.run_id, str(out))
    return figures
