"""One frozen dataclass per concern, loaded from ``experiments/*.yaml``.

Every run and every checkpoint stores these as plain dicts (``asdict``), so a result can always be
traced back to the exact settings that produced it. This module imports nothing of the package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
DEFAULT_DATA = "data/synthetic"
NUM_CLASSES = 5


class ConfigError(ValueError):
    """A preset or flag value that cannot be used; the message names the key and the file."""


@dataclass(frozen=True)
class DataConfig:
    root: str = DEFAULT_DATA
    image_size: int | None = None  # square resize; None keeps the native size
    normalize: str = "imagenet"  # imagenet | half
    augment: str = "geometric"  # none | geometric | color
    cutmix_alpha: float = 0.0  # > 0 enables CutMix with this Beta(alpha, alpha)
    mixup_alpha: float = 0.0  # > 0 enables MixUp
    cache_dir: str | None = None  # None: $DEEPFAKE_TUNE_CACHE or ~/.cache/deepfake-tune
    synth_preset: str = "demo"  # what to generate when the default root is missing

    def __post_init__(self) -> None:
        _choice("data.normalize", self.normalize, ("imagenet", "half"))
        _choice("data.augment", self.augment, ("none", "geometric", "color"))
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"data.image_size must be >= 8, got {self.image_size}")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "cnn_v1"
    dropout_features: float | None = None  # None: the architecture's reference default
    dropout_fc: float | None = None
    convs_per_block: int = 2
    batch_norm: bool = True  # vgg16 only: the BatchNorm variant
    weights: str | None = None  # vgg16 only: local torchvision state_dict, never downloaded
    num_classes: int = NUM_CLASSES

    def __post_init__(self) -> None:
        for name in ("dropout_features", "dropout_fc"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {value}")
        if self.convs_per_block < 1:
            raise ConfigError(f"model.convs_per_block must be >= 1, got {self.convs_per_block}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adam"  # adam | adamw
    label_smoothing: float = 0.0
    class_weights: str = "none"  # none | balanced | comma list such as "1.9,1,1,1,1.7"
    lr_patience: int = 5
    lr_factor: float = 0.5
    early_stop_patience: int = 15
    precision: str = "auto"  # auto | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        _choice("train.optimizer", self.optimizer, ("adam", "adamw"))
        _choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        parse_class_weights(self.class_weights)


@dataclass(frozen=True)
class SearchSpace:
    """Ranges a member study samples. ``None`` leaves the value at the preset's fixed setting."""

    lr: tuple[float, float] = (1e-4, 3e-3)  # log-uniform
    batch_size: tuple[int, ...] = (16, 32, 64, 128)
    dropout_features: tuple[float, float] | None = (0.1, 0.5)
    dropout_fc: tuple[float, float] | None = (0.25, 0.6)
    weight_decay: tuple[float, float] | None = (1e-6, 1e-3)  # log-uniform
    label_smoothing: tuple[float, float] | None = None
    augment: tuple[str, ...] | None = None


@dataclass(frozen=True)
class StudyConfig:
    members: tuple[str, ...] = ("cnn_v1", "cnn_v2")
    trials: int = 10  # finished (complete + pruned) trials per member study
    pruner: str = "median"  # median | hyperband | none | always (tests: prunes at the first report)
    pruner_warmup_epochs: int = 2
    sampler_seed: int = 0
    top_k: int = 3  # trials per member entering the ensemble search
    ensemble_method: str = "soft"  # soft | confidence | best (tries both, keeps the honest winner)
    ensemble_trials: int = 60
    heartbeat_seconds: int = 30  # Optuna RDB heartbeat: a killed worker's trial is retried
    space: SearchSpace = field(default_factory=SearchSpace)

    def __post_init__(self) -> None:
        _choice("study.pruner", self.pruner, ("median", "hyperband", "none", "always"))
        _choice("study.ensemble_method", self.ensemble_method, ("soft", "confidence", "best"))
        if self.trials < 1:
            raise ConfigError(f"study.trials must be >= 1, got {self.trials}")
        if not self.members:
            raise ConfigError("study.members must name at least one architecture")


@dataclass(frozen=True)
class Preset:
    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    study: StudyConfig = field(default_factory=StudyConfig)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def parse_class_weights(spec: str) -> tuple[float, ...] | str:
    """``none`` / ``balanced`` stay words; anything else must be NUM_CLASSES positive numbers."""
    if spec in ("none", "balanced"):
        return spec
    try:
        weights = tuple(float(part) for part in spec.split(","))
    except ValueError:
        raise ConfigError(
            f"train.class_weights must be none, balanced or {NUM_CLASSES} comma-separated numbers; "
            f"got {spec!r}"
        ) from None
    if len(weights) != NUM_CLASSES or any(w <= 0 for w in weights):
        raise ConfigError(
            f"train.class_weights needs {NUM_CLASSES} positive numbers, got {spec!r}"
        )
    return weights


def _coerce(cls: type, section: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    values: dict[str, Any] = {}
    for name, value in section.items():
        if isinstance(value, list):
            value = tuple(value)
        if cls is StudyConfig and name == "space":
            value = _coerce(SearchSpace, value or {}, f"{where}.space")
        values[name] = value
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def preset_path(name: str) -> Path:
    """A preset is a path to a YAML file or a bare name found in ``experiments/``."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    found = EXPERIMENTS_DIR / f"{name}.yaml"
    if found.exists():
        return found
    available = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
    raise ConfigError(f"preset {name!r} not found (looked for {candidate} and {found}); "
                      f"available: {', '.join(available)}")


def load_preset(name: str | None) -> Preset:
    """Load ``experiments/<name>.yaml`` (or a YAML path); ``None`` gives the built-in defaults."""
    if name is None:
        return Preset()
    path = preset_path(name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    sections = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "study": StudyConfig}
    unknown = sorted(set(raw) - set(sections) - {"name"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(sections)}")
    built = {key: _coerce(cls, raw.get(key) or {}, f"{path}: {key}") for key, cls in sections.items()}
    return Preset(name=str(raw.get("name", path.stem)), **built)


def override(obj: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that ignores ``None`` (a flag the user did not give)."""
    given = {k: v for k, v in changes.items() if v is not None}
    try:
        return replace(obj, **given) if given else obj
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def flat_params(preset: Preset, sections: tuple[str, ...] = ("data", "model", "train")) -> dict[str, Any]:
    """``{"train.lr": 0.001, ...}``: every config value, named once, for MLflow params."""
    out: dict[str, Any] = {}
    for section in sections:
        for key, value in to_dict(getattr(preset, section)).items():
            if isinstance(value, dict):
                for sub, subval in value.items():
                    out[f"{section}.{key}.{sub}"] = subval
            else:
                out[f"{section}.{key}"] = value
    return out


def model_from_dict(d: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def data_from_dict(d: dict[str, Any]) -> DataConfig:
    return DataConfig(**d)


def train_from_dict(d: dict[str, Any]) -> TrainConfig:
    return TrainConfig(**d)
