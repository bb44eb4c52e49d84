"""The command table: which settings and options each command takes, and which implementation in
``pipeline/commands/`` runs it.

Each command is also an ``MLproject`` entry point of the same name (``mlproject.py`` renders the
file from this table), so a flag, its help and its parameter are declared once.
"""

from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..commands.options import (
    BaselineOptions,
    BenchOptions,
    CommonOptions,
    PredictOptions,
    ProgressOptions,
    PromoteOptions,
    SynthOptions,
    TrainOptions,
    TuneOptions,
)
from ..config import SECTIONS, Preset, load_preset, override
from ..models import MODELS
from .flags import Flag, flags_of


@dataclass(frozen=True)
class Command:
    name: str  # "train", or "data inspect" for a subcommand
    help: str
    settings: tuple[str, ...]  # preset settings it takes: "train.*", "data.root", "-model.arch" (excluded)
    options: type | None  # its own options dataclass
    # "module:function" in pipeline/commands/, imported when the command runs: a command loads only
    # the stages it drives (tune's Optuna, bench's reference loop), and --help none of them.
    target: str
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

    def run(self, preset: Preset, options: Any, progress: bool) -> int:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(f"pipeline.commands.{module}"), function)(preset, options, progress)

    def takes(self, key: str) -> bool:
        chosen = any(fnmatch.fnmatchcase(key, s) for s in self.settings if not s.startswith("-"))
        return chosen and not any(fnmatch.fnmatchcase(key, s[1:]) for s in self.settings if s.startswith("-"))


def dynamic_choices() -> dict[str, tuple]:
    """Choices that live in a table of a later stage: the architectures."""
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


FILES_AT = ("data.root", "data.synth_preset", "data.synth_seed")  # where the image files are, or are made
DATA_AT = (*FILES_AT, "data.cache_dir")  # ... and where they are kept decoded
AUDIT = ("data.audit_fraction", "data.audit_min_per_class")  # how the audit split is drawn
# Each command takes exactly the settings it uses. promote and predict send the image files' bytes to
# the registered model, which decodes and resizes them itself (no data.image_size); promote finds the
# audit images through the decode cache (their pixel hashes) with the versions' own audit settings;
# predict writes a file, not a run (no tracking.experiment).

COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("data synth", "write the embedded synthetic dataset", (), SynthOptions, "data_command:synth",
            common=False, progress=False,
            extras={"options.out": ("data",)}),
    Command("data inspect", "validate a dataset and print a summary", (*DATA_AT, *AUDIT, "data.image_size"), None,
            "data_command:inspect", names={"data.synth_preset": "preset", "data.synth_seed": "seed"}),
    Command("train", "train one architecture as one MLflow run",
            ("data.*", "model.*", "train.*", "study.time_budget", "tracking.*"), TrainOptions, "train_command:main"),
    Command("baseline", "SVM (RBF) on flattened standardised pixels, logged like a training run",
            (*DATA_AT, "data.image_size", "train.seed", "tracking.*"), BaselineOptions, "baseline_command:main",
            progress=False),
    Command("tune", "Optuna member studies, ensemble search, registration",
            ("data.*", "model.*", "-model.arch", "train.*", "study.*", "tracking.*"), TuneOptions, "tune_command:main"),
    Command("promote", "move @champion to @challenger on evidence",
            (*DATA_AT, "study.model_name", "train.device", "tracking.*"), PromoteOptions, "promote_command:main"),
    Command("predict", "write a Kaggle submission with a registered model",
            (*FILES_AT, "study.model_name", "train.device"), PredictOptions, "predict_command:main"),
    Command("bench", "measure our training, inference and search against the reference way",
            ("data.root", "data.image_size", "data.cache_dir", "train.device", "train.seed", "tracking.*"),
            BenchOptions, "bench_command:main", progress=False),
)}
