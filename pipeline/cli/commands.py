"""The command table: which settings and options each command takes, and the library call it makes.

Each command is also an ``MLproject`` entry point of the same name (``mlproject.py`` renders the
file from this table), so a flag, its help and its parameter are declared once.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

from ..config import SECTIONS, Preset, load_preset, override
from .flags import Flag, flags_of
from .options import (BaselineOptions, BenchOptions, CommonOptions, PredictOptions, ProgressOptions,
                      PromoteOptions, SynthOptions, TrainOptions, TuneOptions)


@dataclass(frozen=True)
class Command:
    name: str  # "train", or "data inspect" for a subcommand
    help: str
    settings: tuple[str, ...]  # preset settings it takes: "train.*", "data.root", "-model.arch" (excluded)
    options: type | None  # its own options dataclass
    run: Callable[[Preset, Any, bool], int]
    common: bool = True  # --config
    progress: bool = True  # --no-progress: the command shows progress
    names: dict[str, str] = field(default_factory=dict)  # per-command public names, e.g. data.synth_seed -> seed
    extras: dict[str, tuple[str, ...]] = field(default_factory=dict)  # more spellings, e.g. synth's --data

    def flags(self) -> list[Flag]:
        out: list[Flag] = []
        for section, cls in SECTIONS.items():
            out += [f for f in flags_of(cls, section, self.names, dynamic_choices()) if self.takes(f.key)]
        if self.options is not None:
            out += flags_of(self.options, "options", self.names, extras=self.extras)
        if self.common:
            out += flags_of(CommonOptions, "common")
        if self.progress:
            out += flags_of(ProgressOptions, "common")
        return out

    def takes(self, key: str) -> bool:
        chosen = any(fnmatch.fnmatchcase(key, s) for s in self.settings if not s.startswith("-"))
        return chosen and not any(fnmatch.fnmatchcase(key, s[1:]) for s in self.settings if s.startswith("-"))


def dynamic_choices() -> dict[str, tuple]:
    """Choices that live in a table of a later stage: the architectures."""
    from ..models import MODELS

    return {"model.arch": tuple(MODELS), "study.members": tuple(MODELS)}


def build_preset(values: dict[str, Any]) -> Preset:
    """The preset named by ``common.config`` with every given setting applied over it."""
    preset = load_preset(values.get("common.config"))
    changes: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, name = key.split(".", 1)
        if section in SECTIONS:
            changes.setdefault(section, {})[name] = value
    return replace(preset, **{s: override(getattr(preset, s), **c) for s, c in changes.items()})


def build_options(cls: type | None, values: dict[str, Any]) -> Any:
    if cls is None:
        return None
    names = {f.name for f in fields(cls)}
    return cls(**{k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("options.")
                  and k.split(".", 1)[1] in names})


# ----------------------------------------------------------------------------- what each command calls

def _synth(preset: Preset, opts: SynthOptions, progress: bool) -> int:
    from ..data.synth import synthesize

    summary = synthesize(opts.out, opts.preset, opts.seed)
    print(f"wrote {summary.preset} dataset to {summary.out}: " + ", ".join(f"{k} {v}" for k, v in summary.counts.items())
          + f" ({summary.image_size}x{summary.image_size}) in {summary.seconds:.2f}s")
    return 0


def _inspect(preset: Preset, opts: None, progress: bool) -> int:
    from ..data import DataError, load_dataset, summarize
    from ..data.audit import partition

    data = load_dataset(preset.data)
    print(summarize(data))
    try:
        print(partition(data, preset.data).info.describe())
    except DataError as exc:  # the data is fine; only its audit split cannot be drawn with these settings
        print(f"audit split: cannot be drawn: {exc}")
    return 0


def _train(preset: Preset, opts: TrainOptions, progress: bool) -> int:
    from ..commands.train import run_training

    outcome = run_training(preset, preset.tracking.experiment, opts.run_name, progress=progress)
    print(f"run {outcome.run_id}: " + ", ".join(f"{k}={v:.4g}" for k, v in outcome.summary.items()
                                                if not k.startswith("val_recall")))
    return 0


def _baseline(preset: Preset, opts: BaselineOptions, progress: bool) -> int:
    from ..commands.baseline import run_baseline

    outcome = run_baseline(preset, preset.tracking.experiment, c=opts.svm_c, pixels=opts.pixels,
                           max_train=opts.max_train)
    print(f"run {outcome.run_id}: " + ", ".join(f"{k}={v:.4g}" for k, v in outcome.summary.items()))
    return 0


def _tune(preset: Preset, opts: TuneOptions, progress: bool) -> int:
    from ..tune import run_tuning

    run_tuning(preset, progress=progress, setup_only=opts.setup_only)
    return 0


def _check_tracking() -> None:
    """Fail in seconds, before any work, when the tracking store cannot be reached."""
    from .. import tracking

    tracking.check_tracking(tracking.client())


def _promote(preset: Preset, opts: PromoteOptions, progress: bool) -> int:
    from ..registry.promote import PromotionRule, ScoringOptions, promote

    decision = promote(preset.data, preset.study.model_name, PromotionRule(opts.min_gain, opts.alpha, opts.force),
                       ScoringOptions(opts.split, device=preset.train.device, progress=progress),
                       dry_run=opts.dry_run, experiment=preset.tracking.experiment)
    print(decision.describe())
    return 0


def _predict(preset: Preset, opts: PredictOptions, progress: bool) -> int:
    from ..commands.predict import write_submission

    uri = opts.model_uri or f"models:/{preset.study.model_name}@champion"
    if uri.startswith(("models:/", "runs:/")):  # a model in the tracking store (else a local path)
        _check_tracking()
    result = write_submission(preset.data, uri, opts.out, split=opts.split, probabilities=opts.probabilities,
                              batch_size=opts.batch_size, progress=progress, device=preset.train.device)
    print(result.describe())
    return 0


def _bench(preset: Preset, opts: BenchOptions, progress: bool) -> int:
    from ..bench import bench_settings, run_bench

    # Logged like every command's results (into --experiment, or the `mlflow run` launcher's run);
    # the store is checked before minutes of measuring.
    _check_tracking()
    settings = bench_settings(preset, epochs=opts.epochs, archs=opts.archs, search_trials=opts.search_trials,
                              skip=opts.skip, also=opts.also)
    run_bench(preset, settings, json_path=opts.json, experiment=preset.tracking.experiment)
    return 0


FILES_AT = ("data.root", "data.synth_preset", "data.synth_seed")  # where the image files are, or are made
DATA_AT = (*FILES_AT, "data.cache_dir")  # ... and where they are kept decoded
AUDIT = ("data.audit_fraction", "data.audit_min_per_class")  # how the audit split is drawn
# Each command takes exactly the settings it uses. promote and predict send the image files' bytes to
# the registered model, which decodes and resizes them itself (no data.image_size); promote finds the
# audit images through the decode cache (their pixel hashes) with the versions' own audit settings;
# predict writes a file, not a run (no tracking.experiment).

COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("data synth", "write the embedded synthetic dataset", (), SynthOptions, _synth, common=False, progress=False,
            extras={"options.out": ("data",)}),
    Command("data inspect", "validate a dataset and print a summary", (*DATA_AT, *AUDIT, "data.image_size"), None,
            _inspect, names={"data.synth_preset": "preset", "data.synth_seed": "seed"}),
    Command("train", "train one architecture as one MLflow run",
            ("data.*", "model.*", "train.*", "study.time_budget", "tracking.*"), TrainOptions, _train),
    Command("baseline", "SVM (RBF) on flattened standardised pixels, logged like a training run",
            (*DATA_AT, "data.image_size", "train.seed", "tracking.*"), BaselineOptions, _baseline, progress=False),
    Command("tune", "Optuna member studies, ensemble search, registration",
            ("data.*", "model.*", "-model.arch", "train.*", "study.*", "tracking.*"), TuneOptions, _tune),
    Command("promote", "move @champion to @challenger on evidence",
            (*DATA_AT, "study.model_name", "train.device", "tracking.*"), PromoteOptions, _promote),
    Command("predict", "write a Kaggle submission with a registered model",
            (*FILES_AT, "study.model_name", "train.device"), PredictOptions, _predict),
    Command("bench", "measure our training, inference and search against the reference way",
            ("data.root", "data.image_size", "data.cache_dir", "train.device", "train.seed", "tracking.*"),
            BenchOptions, _bench, progress=False),
)}
