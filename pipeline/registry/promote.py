"""``promote``: move ``@champion`` to ``@challenger`` on evidence.

``tune`` registers every new ensemble as ``@challenger`` (``register``). ``promote`` scores
``@challenger`` and ``@champion`` on the audit images their session set aside (no choice read them),
through the same ``predict`` the server runs, and moves ``@champion`` only when the challenger is
better, by at least ``min_gain``, and an exact McNemar test on the images where the two disagree
says the difference is not chance (p < ``alpha``). Nothing is deleted: the previous champion stays
a version (tagged ``superseded_by``), so a rollback is one ``set_registered_model_alias`` call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import mlflow
from mlflow.exceptions import MlflowException

from .. import metrics as M
from .. import tracking
from ..data.dataset import ensure_default_data
from ..metrics import mcnemar
from .inference import read_images
from .register import CHALLENGER, CHAMPION
from .scoring import (
    PromotionError,
    Scored,
    ScoringSet,
    audit_spec_of,
    check_comparable,
    on_data_of,
    score_version,
    scoring_set,
)

PROMOTED = "promoted"  # @champion moved to the challenger
KEPT = "kept"  # the champion stays
ALREADY_CHAMPION = "already_champion"  # @challenger and @champion are the same version
RULE = ("promote when the challenger is better on the scoring images, by at least min_gain, and an exact McNemar "
        "test on the images where the two disagree gives p < alpha")

__all__ = ["PROMOTED", "KEPT", "ALREADY_CHAMPION", "PromotionError", "Decision", "PromotionRule", "ScoringOptions",
           "decide", "promote"]


@dataclass(frozen=True)
class PromotionRule:
    """When the challenger takes @champion: better on the scoring images by at least ``min_gain`` (accuracy,
    0 to 1) and an exact McNemar test gives p < ``alpha``; ``force``: whatever the scores."""

    min_gain: float = 0.0
    alpha: float = 0.05
    force: bool = False

    def __post_init__(self) -> None:
        # Refused before anything is scored: such a rule can only be a mistake.
        if self.min_gain < 0:
            raise ValueError(f"--min-gain must be >= 0, got {self.min_gain}; use --force to promote a challenger "
                             "that does not win")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"--alpha must be in (0, 1], got {self.alpha}")


@dataclass(frozen=True)
class ScoringOptions:
    """How both versions are scored: on ``split`` (default: the versions' audit split), ``batch_size`` images
    per predict call, on ``device`` (default: the served model's, cpu), with progress bars or not."""

    split: str | None = None
    batch_size: int = 256
    device: str | None = None
    progress: bool = False


@dataclass(frozen=True)
class Evidence:
    only_challenger: int  # images only the challenger gets right
    only_champion: int
    p: float  # exact two-sided McNemar p-value


@dataclass(frozen=True)
class Decision:
    """What ``promote`` found and did. ``outcome`` is what happened, or what would have under
    ``dry_run`` (then nothing was written)."""

    model_name: str
    challenger_version: str
    champion_version: str | None  # before the decision
    outcome: str  # promoted | kept | already_champion
    reason: str
    scored_on: ScoringSet | None = None
    challenger: Scored | None = None
    champion: Scored | None = None
    evidence: Evidence | None = None
    min_gain: float = 0.0
    alpha: float = 0.05
    forced: bool = False
    dry_run: bool = False
    run_id: str | None = None  # the MLflow run recording the decision (None for dry runs)

    @property
    def promoted(self) -> bool:
        return self.outcome == PROMOTED

    @property
    def gain(self) -> float | None:
        if self.challenger is None or self.champion is None:
            return None
        return self.challenger.score.accuracy - self.champion.score.accuracy

    def describe(self) -> str:
        name, lines = self.model_name, []
        if self.challenger is not None:
            s = self.scored_on
            lines.append(f"scored on {s.name}: {len(s.ids)} labelled images" + ("" if s.honest else f" ({s.label})"))
            for role, scored in (("challenger", self.challenger), ("champion", self.champion)):
                if scored is not None:
                    low, high = scored.score.interval
                    lines.append(f"  {role:<10} v{scored.score.version:<4} "
                                 f"accuracy {100 * scored.score.accuracy:6.2f}% "
                                 f"[{100 * low:.1f}, {100 * high:.1f}]  macro-F1 {100 * scored.macro_f1:6.2f}%")
        prefix = "dry run: would " if self.dry_run else ""
        if self.outcome == ALREADY_CHAMPION:
            lines.append(f"{name} v{self.challenger_version} is already champion: nothing to do")
        elif self.outcome == PROMOTED:
            verb = "promote" if self.dry_run else "promoted"
            lines.append(f"{prefix}{verb} {name} v{self.challenger_version} to @{CHAMPION} ({self.reason})")
            if self.champion_version and not self.dry_run:
                lines.append(f"previous champion v{self.champion_version} is kept; roll back with "
                             f"MlflowClient().set_registered_model_alias({name!r}, {CHAMPION!r}, "
                             f"{self.champion_version!r})")
        else:
            verb = "keep" if self.dry_run else "kept"
            lines.append(f"{prefix}{verb} champion {name} v{self.champion_version}; challenger "
                         f"v{self.challenger_version} not promoted ({self.reason})")
        if self.run_id:
            lines.append(f"decision recorded in run {self.run_id}")
        elif self.dry_run:
            lines.append("dry run: no alias, tag or decision run was written")
        return "\n".join(lines)


def current_aliases(client, model_name: str) -> tuple[str, str | None]:
    """(challenger version, champion version or None)."""
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise PromotionError(f"no registered model {model_name!r} in {tracking.redact(mlflow.get_tracking_uri())}; "
                                 "run `python -m pipeline tune` first") from None
        raise
    aliases = dict(model.aliases or {})
    if CHALLENGER not in aliases:
        raise PromotionError(f"no version of {model_name} carries @{CHALLENGER}; `python -m pipeline tune` "
                             "registers one (or set it with MlflowClient().set_registered_model_alias)")
    champion = aliases.get(CHAMPION)
    return str(aliases[CHALLENGER]), str(champion) if champion is not None else None


def decide(challenger: Scored, champion: Scored | None, min_gain: float, alpha: float,
           force: bool) -> tuple[str, str, Evidence | None]:
    """(outcome, reason, evidence). Both were scored on the same images, so the comparison is paired."""
    if champion is None:
        return PROMOTED, "no champion yet", None
    mine, theirs = challenger.score, champion.score
    only_mine, only_theirs, p = mcnemar(mine.correct, theirs.correct)
    evidence = Evidence(only_mine, only_theirs, p)
    gain = (only_mine - only_theirs) / mine.images
    facts = (f"challenger {100 * mine.accuracy:.1f} % vs {100 * theirs.accuracy:.1f} %, {only_mine} vs "
             f"{only_theirs} discordant, p = {p:.2g}")
    if force:
        return PROMOTED, f"forced: {facts}", evidence
    if gain <= 0:
        return KEPT, f"{facts}: {'a tie is no evidence' if gain == 0 else 'the challenger is not better'}", evidence
    if gain + 1e-12 < min_gain:
        return KEPT, f"{facts}: a gain of {100 * gain:.2f} points is less than min gain {100 * min_gain:.2f}", evidence
    if p >= alpha:
        return KEPT, f"{facts}: not enough evidence (alpha {alpha:g})", evidence
    return PROMOTED, f"{facts}: better, by >= {100 * min_gain:.2f} points, p < {alpha:g}", evidence


def promote(data_cfg, model_name: str = "deepfake-ensemble", rule: PromotionRule = PromotionRule(),
            scoring: ScoringOptions = ScoringOptions(), dry_run: bool = False,
            experiment: str = "deepfake") -> Decision:
    """Score ``@challenger`` and ``@champion`` on the same labelled images and move ``@champion`` on evidence.

    Writes (unless ``dry_run``): one run in ``experiment`` with both scores, intervals, the discordant
    counts and p; on promotion the alias and the tags ``promoted_at``, ``previous_champion`` and
    ``promotion_score`` on the new champion, ``superseded_by`` on the old one.
    """
    client = tracking.client()
    tracking.check_tracking(client)
    challenger_v, champion_v = current_aliases(client, model_name)
    if challenger_v == champion_v:
        return Decision(model_name, challenger_v, champion_v, ALREADY_CHAMPION, "same version",
                        min_gain=rule.min_gain, alpha=rule.alpha, forced=rule.force, dry_run=dry_run)
    tags = {v: dict(client.get_model_version(model_name, v).tags) for v in (challenger_v, champion_v) if v}
    if not rule.force:
        check_comparable(model_name, (challenger_v, tags[challenger_v]),
                         (champion_v, tags[champion_v]) if champion_v else None)
    ensure_default_data(data_cfg)
    scored_on = on_data_of(scoring_set(data_cfg, scoring.split, audit_spec_of(tags[challenger_v])), challenger_v,
                           tags[challenger_v].get("dataset_digest"))
    blobs = read_images(scored_on.paths, progress=scoring.progress)
    scored = {v: score_version(model_name, v, blobs, scored_on.labels, scored_on.num_classes, scoring.batch_size,
                               scoring.device, scoring.progress)
              for v in (challenger_v, champion_v) if v}
    champion = scored.get(champion_v) if champion_v else None
    outcome, reason, evidence = decide(scored[challenger_v], champion, rule.min_gain, rule.alpha, rule.force)
    decision = Decision(model_name, challenger_v, champion_v, outcome, reason, scored_on, scored[challenger_v],
                        champion, evidence, rule.min_gain, rule.alpha, rule.force, dry_run)
    if dry_run:
        return decision
    run_id = _record(client, decision, experiment, scoring.device or "cpu")
    return replace(decision, run_id=run_id)


def _record(client, decision: Decision, experiment: str, device: str) -> str:
    """The decision run, then (on promotion) the alias and version tags."""
    name, s = decision.model_name, decision.scored_on
    ch, champ, ev = decision.challenger, decision.champion, decision.evidence
    run_id, _ = tracking.open_run(client, experiment, f"promote-{name}-v{decision.challenger_version}", {
        **tracking.standard_tags(device), "kind": "promotion", "outcome": decision.outcome,
        "registered_model": name})
    with tracking.run_guard(client, run_id):
        tracking.log_params(client, run_id, {
            "model_name": name, "challenger_version": decision.challenger_version,
            "champion_version": decision.champion_version or "none", "scored_on": s.name, "honest": s.honest,
            "data_digest": s.data_digest, "scoring_digest": s.audit_digest, "images": len(s.ids),
            "min_gain": decision.min_gain, "alpha": decision.alpha, "force": decision.forced, "rule": RULE})
        low, high = ch.score.interval
        values = {M.CHALLENGER_ACCURACY: ch.score.accuracy, f"{M.CHALLENGER_ACCURACY}_low": low,
                  f"{M.CHALLENGER_ACCURACY}_high": high, M.CHALLENGER_MACRO_F1: ch.macro_f1,
                  M.PROMOTED: float(decision.promoted)}
        if champ is not None:
            low, high = champ.score.interval
            values |= {M.CHAMPION_ACCURACY: champ.score.accuracy, f"{M.CHAMPION_ACCURACY}_low": low,
                       f"{M.CHAMPION_ACCURACY}_high": high, M.CHAMPION_MACRO_F1: champ.macro_f1,
                       M.ACCURACY_GAIN: decision.gain, M.ONLY_CHALLENGER_RIGHT: ev.only_challenger,
                       M.ONLY_CHAMPION_RIGHT: ev.only_champion, M.MCNEMAR_P: ev.p}
        tracking.log_metrics(client, run_id, values)
        tracking.set_tags(client, run_id, {"reason": decision.reason, "scoring": s.label})
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        version_tags = {"promotion_outcome": decision.outcome, "promotion_run_id": run_id}
        if decision.promoted:
            client.set_registered_model_alias(name, CHAMPION, decision.challenger_version)
            version_tags |= {"promoted_at": now, "previous_champion": decision.champion_version or "none",
                             "promotion_score": f"{ch.score.accuracy:.6f}", "promotion_split": s.name}
            if decision.champion_version:
                for key, value in {"superseded_by": decision.challenger_version, "superseded_at": now}.items():
                    client.set_model_version_tag(name, decision.champion_version, key, value)
        for key, value in version_tags.items():
            client.set_model_version_tag(name, decision.challenger_version, key, value)
    return run_id
