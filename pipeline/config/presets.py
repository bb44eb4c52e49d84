"""Presets: ``experiments/<name>.yaml`` (or a YAML path) into a ``Preset``; overrides; flat params."""

from __future__ import annotations

import dataclasses
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import yaml

from .fields import ConfigError
from .sections import SECTIONS, DataConfig, ModelConfig, Preset, StudyConfig, TrainConfig
from .space import Choice, SearchSpace, parse_space

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent.parent / "experiments"


def _coerce(cls: type, section: dict[str, Any], where: str) -> Any:
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(section).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for name, value in section.items():
        if cls is StudyConfig and name == "space":
            value = parse_space(value, SECTIONS, f"{where}.space")
        elif isinstance(value, list):
            value = tuple(value)
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
    unknown = sorted(set(raw) - set(SECTIONS) - {"name"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    built = {key: _coerce(cls, raw.get(key) or {}, f"{path}: {key}") for key, cls in SECTIONS.items()}
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


def _plain(value: Any) -> Any:
    """A setting's value as YAML ``load_preset`` reads back: a space as its preset form, tuples as lists."""
    if isinstance(value, SearchSpace):
        return {key: list(d.values) if isinstance(d, Choice) else dataclasses.asdict(d) for key, d in value.items()}
    return list(value) if isinstance(value, tuple) else value


def preset_yaml(preset: Preset) -> str:
    """``preset`` as a YAML preset that ``load_preset`` reads back equal (how ``tune`` hands its
    resolved settings to the worker processes it starts)."""
    raw: dict[str, Any] = {"name": preset.name}
    for section in SECTIONS:
        obj = getattr(preset, section)
        raw[section] = {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    return yaml.safe_dump(raw, sort_keys=False)


def flat_params(preset: Preset, sections: tuple[str, ...] = ("data", "model", "train")) -> dict[str, Any]:
    """``{"train.lr": 0.001, ...}``: every config value, named once, for MLflow params."""
    out: dict[str, Any] = {}
    for section in sections:
        obj = getattr(preset, section)
        for f in fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, SearchSpace):
                out.update({f"{section}.{f.name}.{key}": text for key, text in value.describe().items()})
            else:
                out[f"{section}.{f.name}"] = value
    return out


def model_from_dict(d: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def data_from_dict(d: dict[str, Any]) -> DataConfig:
    known = {f.name for f in fields(DataConfig)}
    return DataConfig(**{k: v for k, v in d.items() if k in known})  # checkpoints of older versions


def train_from_dict(d: dict[str, Any]) -> TrainConfig:
    return TrainConfig(**d)
