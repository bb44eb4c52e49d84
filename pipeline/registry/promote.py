"""``promote``: move ``@champion`` to ``@challenger`` on evidence.

``tune`` registers every new ensemble as ``@challenger`` (``register``). ``promote`` scores ``@challenger`` and
``@champion`` on the same labelled images, through the same ``predict`` the server runs, and moves
``@champion`` only when the challenger wins. A promotion never deletes anything: the previous
champion stays a version (tagged ``superseded_by``), so rolling back is one
``set_registered_model_alias(name, "champion", <previous version>)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np

from .. import metric_names as M
from .. import tracking
from .register import CHALLENGER, CHAMPION

PROMOTED = "promoted"  # @champion moved to the challenger
KEPT = "kept"  # the champion stays
ALREADY_CHAMPION = "already_champion"  # @challenger and @champion are the same version
RULE = "promote when challenger - champion accuracy > 0 and >= min_gain (a tie keeps the champion)"


class PromotionError(RuntimeError):
    """The registry is not in a state promotion can work with (no model, no challenger)."""


@dataclass(frozen=True)
class Score:
    version: str
    accuracy: float
    macro_f1: float
    correct: int
    images: int


@dataclass(frozen=True)
class Decision:
    """What ``promote`` found and did. ``outcome`` is what happened, or what would have under
    ``dry_run`` (then nothing was written)."""

    model_name: str
    challenger_version: str
    champion_version: str | None  # before the decision
    outcome: str  # promoted | kept | already_champion
    reason: str
    split: str | None = None
    data_root: str | None = None
    challenger: Score | None = None
    champion: Score | None = None
    min_gain: float = 0.0
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
        return self.challenger.accuracy - self.champion.accuracy

    def describe(self) -> str:
        name = self.model_name
        lines = []
        if self.challenger is not None:
            lines.append(f"scored on {self.challenger.images} labelled images ({self.split} split of {self.data_root})")
            for role, score in (("challenger", self.challenger), ("champion", self.champion)):
                if score is not None:
                    lines.append(f"  {role:<10} v{score.version:<4} accuracy {100 * score.accuracy:6.2f}%  "
                                 f"macro-F1 {100 * score.macro_f1:6.2f}%")
            if self.gain is not None:
                lines.append(f"  gain {100 * self.gain:+.2f} points (min gain {100 * self.min_gain:.2f}); rule: {RULE}")
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
    from mlflow.exceptions import MlflowException

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


def scoring_split(root: str | Path, split: str | None):
    """(split index, class names): the labelled split both versions are scored on, ``split`` if
    named, else the test split when it has labels, else validation."""
    from ..data.layout import DataError, index_dataset
    from .inference import select_split

    index = index_dataset(root)
    if split is None:
        test = index.splits.get("test")
        split = "test" if test is not None and test.labels is not None else "validation"
    entry = select_split(index, split)
    if entry.labels is None:
        raise DataError(f"{entry.source}: the {split} split has no labels, so it cannot score a model; "
                        "name a labelled split (--split validation) or dataset (--data)")
    return entry, index.classes


def score_version(model_name: str, version: str, blobs: list[bytes], labels: np.ndarray, num_classes: int,
                  batch_size: int = 256, device: str | None = None, progress: bool = False) -> Score:
    from sklearn.metrics import f1_score

    from .inference import load_model, predict_images

    model = load_model(f"models:/{model_name}/{version}", device)
    predicted = predict_images(model, blobs, batch_size, progress, desc=f"score v{version}")["label"].to_numpy()
    correct = int((predicted == labels).sum())
    macro_f1 = f1_score(labels, predicted, labels=list(range(num_classes)), average="macro", zero_division=0)
    return Score(version, correct / len(labels), float(macro_f1), correct, len(labels))


def decide(challenger: Score, champion: Score | None, min_gain: float, force: bool) -> tuple[str, str]:
    """(outcome, reason). Same images for both, so the gain is computed from counts, exactly."""
    if champion is None:
        return PROMOTED, "no champion yet"
    gain = (challenger.correct - champion.correct) / challenger.images
    if force:
        return PROMOTED, f"forced (gain {100 * gain:+.2f} points)"
    if gain > 0 and gain >= min_gain - 1e-12:
        return PROMOTED, f"wins by {100 * gain:.2f} points >= {100 * min_gain:.2f}"
    if gain > 0:
        return KEPT, f"wins by {100 * gain:.2f} points, less than min gain {100 * min_gain:.2f}"
    if gain == 0:
        return KEPT, "tie: equal accuracy is no evidence for a change"
    return KEPT, f"loses by {100 * -gain:.2f} points"


def promote(data_cfg, model_name: str = "deepfake-ensemble", split: str | None = None, min_gain: float = 0.0,
            dry_run: bool = False, force: bool = False, experiment: str = "deepfake", batch_size: int = 256,
            device: str | None = None, progress: bool = False) -> Decision:
    """Score ``@challenger`` and ``@champion`` on one labelled split and move ``@champion`` on evidence.

    Writes (unless ``dry_run``): one run in ``experiment`` with both scores, the versions and the
    outcome; on promotion the alias and the tags ``promoted_at``, ``previous_champion`` and
    ``promotion_score`` on the new champion, ``superseded_by`` on the old one.
    """
    from ..data.cache import files_digest
    from ..data.dataset import ensure_default_data
    from .inference import read_images

    if min_gain < 0:
        raise ValueError(f"--min-gain must be >= 0, got {min_gain}; use --force to promote a challenger that "
                         "does not win")
    client = tracking.client()
    tracking.check_tracking(client)
    challenger_v, champion_v = current_aliases(client, model_name)
    if challenger_v == champion_v:
        return Decision(model_name, challenger_v, champion_v, ALREADY_CHAMPION, "same version",
                        min_gain=min_gain, forced=force, dry_run=dry_run)

    ensure_default_data(data_cfg)
    entry, classes = scoring_split(data_cfg.root, split)
    blobs = read_images(entry.paths, progress=progress)
    labels = np.asarray(entry.labels, dtype=np.int64)
    num_classes = len(classes)
    challenger = score_version(model_name, challenger_v, blobs, labels, num_classes, batch_size, device, progress)
    champion = (score_version(model_name, champion_v, blobs, labels, num_classes, batch_size, device, progress)
                if champion_v is not None else None)
    outcome, reason = decide(challenger, champion, min_gain, force)
    decision = Decision(model_name, challenger_v, champion_v, outcome, reason, entry.split, str(data_cfg.root),
                        challenger, champion, min_gain, force, dry_run)
    if dry_run:
        return decision
    run_id = _record(client, decision, experiment, files_digest(entry.paths, None), device or "cpu")
    return replace(decision, run_id=run_id)


def _record(client, decision: Decision, experiment: str, data_digest: str, device: str) -> str:
    """The decision run, then (on promotion) the alias and version tags."""
    name = decision.model_name
    ch, champ = decision.challenger, decision.champion
    run_id, _ = tracking.open_run(client, experiment, f"promote-{name}-v{decision.challenger_version}", {
        **tracking.standard_tags(device), "kind": "promotion", "outcome": decision.outcome,
        "registered_model": name})
    with tracking.run_guard(client, run_id):
        tracking.log_params(client, run_id, {
            "model_name": name, "challenger_version": decision.challenger_version,
            "champion_version": decision.champion_version or "none", "split": decision.split,
            "data_root": decision.data_root, "data_digest": data_digest, "images": ch.images,
            "min_gain": decision.min_gain, "force": decision.forced, "rule": RULE})
        values = {M.CHALLENGER_ACCURACY: ch.accuracy, M.CHALLENGER_MACRO_F1: ch.macro_f1,
                  M.PROMOTED: float(decision.promoted)}
        if champ is not None:
            values |= {M.CHAMPION_ACCURACY: champ.accuracy, M.CHAMPION_MACRO_F1: champ.macro_f1,
                       M.ACCURACY_GAIN: decision.gain}
        tracking.log_metrics(client, run_id, values)
        tracking.set_tags(client, run_id, {"reason": decision.reason})
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        version_tags = {"promotion_outcome": decision.outcome, "promotion_run_id": run_id}
        if decision.promoted:
            client.set_registered_model_alias(name, CHAMPION, decision.challenger_version)
            version_tags |= {"promoted_at": now, "previous_champion": decision.champion_version or "none",
                             "promotion_score": f"{ch.accuracy:.6f}", "promotion_split": decision.split}
            if decision.champion_version:
                for key, value in {"superseded_by": decision.challenger_version, "superseded_at": now}.items():
                    client.set_model_version_tag(name, decision.champion_version, key, value)
        for key, value in version_tags.items():
            client.set_model_version_tag(name, decision.challenger_version, key, value)
    return run_id
