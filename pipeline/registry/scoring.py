"""What ``promote`` scores versions on, and how: the audit images their session set aside (or a
labelled test split, or a split the user names), through the same ``predict`` the server runs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..data import load_dataset
from ..data.layout import DataError, index_dataset
from ..data.roles import ids_digest, partition
from ..metrics import macro_f1, wilson
from .inference import load_model, predict_images


class PromotionError(RuntimeError):
    """The registry is not in a state promotion can work with (no model, no challenger, other data)."""


# What a promotion's figures are, in its text and its run's ``scoring`` tag.
AUDIT_FIGURES = "audit: no choice of these versions' sessions read these images"
IN_SAMPLE = "in-sample for these versions: treat the scores as optimistic"
OTHER_DATA = "scored on other data: not the version's audit split"


@dataclass(frozen=True)
class ScoringSet:
    name: str  # "audit (validation:0.3:20)", "test", "validation (selection: choices read it)", or
    # "test images of other data (digest ...; v3 was built on ...)" (``on_data_of``)
    honest: bool  # no choice of the versions' sessions read these images
    ids: list[str]
    paths: list[Path]
    labels: np.ndarray
    num_classes: int
    data_digest: str
    audit_digest: str
    source: str  # the split the images come from: test or validation
    other_data: bool = False  # not the data the challenger was built on (another content digest)

    @property
    def label(self) -> str:
        return OTHER_DATA if self.other_data else AUDIT_FIGURES if self.honest else IN_SAMPLE


def on_data_of(scoring: ScoringSet, version: str, built_on: str | None) -> ScoringSet:
    """``scoring`` as what it is for ``version`` (built on data of content digest ``built_on``): drawn from
    other data, no split of it is the version's audit split, whatever it is called there."""
    if built_on is None or built_on == scoring.data_digest:
        return scoring
    return replace(scoring, name=f"{scoring.source} images of other data (digest {scoring.data_digest}; v{version} "
                                 f"was built on {built_on})", honest=False, other_data=True)


@dataclass(frozen=True)
class Score:
    version: str
    correct: np.ndarray  # per image: did this version get it right (bool)

    @property
    def images(self) -> int:
        return len(self.correct)

    @property
    def right(self) -> int:
        return int(self.correct.sum())

    @property
    def accuracy(self) -> float:
        return self.right / self.images if self.images else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.right, self.images)


@dataclass(frozen=True)
class Scored:
    score: Score
    macro_f1: float


def audit_spec_of(tags: dict[str, str]) -> str | None:
    return tags.get("audit_split")


def check_comparable(name: str, challenger: tuple[str, dict], champion: tuple[str, dict] | None) -> None:
    """Versions audited on different data or different audit sets are never compared."""
    if champion is None:
        return
    for key, what in (("dataset_digest", "data"), ("audit_split", "audit split")):
        mine, theirs = challenger[1].get(key), champion[1].get(key)
        if mine is None or theirs is None or mine != theirs:
            raise PromotionError(
                f"{name} v{challenger[0]} and v{champion[0]} were built and audited on different {what} "
                f"({key} {mine or 'unknown'} vs {theirs or 'unknown'}): their scores are not comparable, so "
                "neither can be preferred on evidence; --force promotes anyway")


def scoring_set(data_cfg: DataConfig, split: str | None, audit_spec: str | None) -> ScoringSet:
    """The images both versions are scored on: ``split`` if named, else the audit split the versions'
    session drew (a labelled test split, or the same part of validation, by content)."""
    data = load_dataset(data_cfg)
    index = index_dataset(data_cfg.root)
    if split is None:
        roles = partition(data, _audit_config(data_cfg, audit_spec))
        if roles.audit is None:
            chosen, name, honest = data.validation, "validation (selection: audit split off, choices read it)", False
        else:
            chosen, name, honest = roles.audit, f"audit ({roles.info.spec})", True
        source = "test" if roles.info.source == "test" else "validation"
    else:
        if split not in data.splits:
            raise DataError(f"{data.root}: no {split} split (this dataset has {', '.join(data.splits)})")
        chosen, source = data.splits[split], split
        honest = split == "test"
        name = split if honest else f"{split} (selection: choices read it)"
    if chosen.labels is None:
        raise DataError(f"{index.splits[source].source}: the {source} split has no labels, so it cannot score a model; "
                        "name a labelled split (--split validation) or dataset (--data)")
    by_id = dict(zip(index.splits[source].ids, index.splits[source].paths, strict=True))
    return ScoringSet(name, honest, list(chosen.ids), [by_id[i] for i in chosen.ids], chosen.labels.numpy(),
                      data.num_classes, data.digest, ids_digest(chosen), source)


def _audit_config(cfg: DataConfig, spec: str | None) -> DataConfig:
    """The data settings that redraw the audit split a version's session drew (``validation:0.3:20``)."""
    if not spec or spec == "test":
        return cfg
    if spec == "none":
        return replace(cfg, audit_fraction=0.0)
    _, fraction, minimum = spec.split(":")
    return replace(cfg, audit_fraction=float(fraction), audit_min_per_class=int(minimum))


def score_version(model_name: str, version: str, blobs: list[bytes], labels: np.ndarray, num_classes: int,
                  batch_size: int = 256, device: str | None = None, progress: bool = False) -> Scored:
    model = load_model(f"models:/{model_name}/{version}", device)
    predicted = predict_images(model, blobs, batch_size, progress, desc=f"score v{version}")["label"].to_numpy()
    onehot = np.eye(num_classes)[predicted]
    return Scored(Score(version, predicted == labels), macro_f1(onehot, labels, num_classes))
