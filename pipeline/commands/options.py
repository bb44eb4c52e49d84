"""Options that belong to one command rather than to a preset (where to write, what to skip…),
declared like config settings: one field each, with its help text; flags and MLproject parameters
derive from them."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DEFAULT_DATA
from ..config.fields import setting


@dataclass(frozen=True)
class CommonOptions:
    config: str | None = setting(None, "a preset in experiments/ (name or YAML path); flags override it")


@dataclass(frozen=True)
class ProgressOptions:
    no_progress: bool = setting(False, "no progress bars: plain progress lines on stderr instead (as when stderr "
                                       "is not a terminal)")
    quiet: bool = setting(False, "no progress at all: only errors and the final summary")


@dataclass(frozen=True)
class SynthOptions:
    out: str = setting(DEFAULT_DATA, "where to write the dataset (also --data)")
    preset: str = setting("demo", "synthetic preset", choices=("tiny", "demo", "full"))
    seed: int = setting(0, "generation seed")


@dataclass(frozen=True)
class TrainOptions:
    run_name: str | None = setting(None, "MLflow run name (default train-<arch>)")


@dataclass(frozen=True)
class BaselineOptions:
    svm_c: float = setting(10.0, "SVM C")
    pixels: int = setting(32, "downscale to this square size before flattening")
    max_train: int | None = setting(None, "use at most this many training images (default all)")


@dataclass(frozen=True)
class TuneOptions:
    setup_only: bool = setting(False, "create the storages, studies and parent run, then exit (before starting "
                                      "workers)")
    trials_only: bool = setting(False, "run trials (search, then final runs or refits) until none is left to "
                                       "admit, then exit: no waiting for other workers, no ensemble (how --jobs-as "
                                       "processes starts its workers)")


@dataclass(frozen=True)
class PromoteOptions:
    split: str | None = setting(None, "labelled split to score on (default: the versions' audit split: the "
                                      "labelled test split, or the part of validation no choice read)")
    min_gain: float = setting(0.0, "the challenger must win by at least this accuracy gain")
    alpha: float = setting(0.05, "significance level of the exact McNemar test on the images the two disagree on")
    dry_run: bool = setting(False, "only report what would happen")
    force: bool = setting(False, "promote regardless of scores")


@dataclass(frozen=True)
class PredictOptions:
    model_uri: str | None = setting(None, "model to predict with (default models:/<model-name>@champion)")
    out: str = setting("submission.csv", "submission CSV")
    split: str = setting("test", "split to predict")
    probabilities: bool = setting(False, "also write prob_0..prob_4 columns")
    batch_size: int = setting(256, "images per predict call")


@dataclass(frozen=True)
class BenchOptions:
    epochs: int | None = setting(None, "epochs for the throughput and accuracy-parity sections (default 3)")
    archs: str | None = setting(None, "comma-separated architectures (default cnn_v1,cnn_v2)")
    search_trials: int | None = setting(None, "trials per study in the search section (default 8)")
    skip: str | None = setting(None, "comma list of sections to skip (reference, ours, ceiling, inference, "
                                     "search)")
    also: str | None = setting(None, "comma list of opt-in sections, minutes each: memory (peak RSS of a tune "
                                     "worker on the full synthetic preset), compile (torch.compile modes)")
    json: str | None = setting(None, "also write the JSON line to this file")
