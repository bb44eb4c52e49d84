"""A search space as data: dotted setting -> distribution, written in the preset.

```yaml
study:
  space:
    train.lr: {low: 0.0001, high: 0.003, log: true}   # a range: float or int by the setting's type
    train.batch_size: [16, 32, 64, 128]               # a list: one of these
    data.augment: [geometric, color]
```

Any field of ``data``, ``model`` or ``train`` may be searched; ``tune`` turns each entry into one
``trial.suggest_*`` call, named by the field (``lr``, ``batch_size``…). A ``model.*`` key that an
architecture does not take (vgg16 has no ``dropout_features``) is left out of that member's trials.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .fields import ConfigError

SEARCHABLE = ("data", "model", "train")


@dataclass(frozen=True)
class Range:
    """Uniform between ``low`` and ``high`` (log-uniform with ``log``); ints when the setting is an int."""

    low: float
    high: float
    log: bool = False
    step: float | None = None

    def describe(self) -> str:
        return f"{'log-' if self.log else ''}uniform[{self.low:g}, {self.high:g}]" + (
            f" step {self.step:g}" if self.step else "")


@dataclass(frozen=True)
class Choice:
    values: tuple

    def describe(self) -> str:
        return "one of " + ", ".join(map(str, self.values))


Distribution = Range | Choice


@dataclass(frozen=True)
class SearchSpace:
    """An ordered, immutable mapping ``"section.field" -> Range | Choice``."""

    entries: tuple[tuple[str, Distribution], ...] = ()

    def items(self) -> Iterator[tuple[str, Distribution]]:
        return iter(self.entries)

    def keys(self) -> list[str]:
        return [key for key, _ in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: str) -> Distribution:
        for name, dist in self.entries:
            if name == key:
                return dist
        raise KeyError(key)

    def describe(self) -> dict[str, str]:
        return {key: dist.describe() for key, dist in self.entries}

    @staticmethod
    def of(mapping: dict[str, Distribution]) -> SearchSpace:
        return SearchSpace(tuple(mapping.items()))


def param_name(key: str) -> str:
    """The Optuna parameter (and MLflow ``optuna.<name>`` param) of a dotted key: its field name."""
    return key.split(".", 1)[1]


def default_space() -> SearchSpace:
    return SearchSpace.of({
        "train.lr": Range(1e-4, 3e-3, log=True),
        "train.batch_size": Choice((16, 32, 64, 128)),
        "model.dropout_features": Range(0.1, 0.5),
        "model.dropout_fc": Range(0.25, 0.6),
        "train.weight_decay": Range(1e-6, 1e-3, log=True),
    })


def field_type(cls: type, name: str) -> type:
    """The declared type of a setting (``int | None`` -> ``int``)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def parse_space(raw: Any, sections: dict[str, type], where: str) -> SearchSpace:
    """Validate a preset's ``study.space`` against the config sections: every key names a setting,
    every bound and choice is a value that setting accepts."""
    if raw is None:
        return SearchSpace()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of dotted settings to ranges or lists")
    entries: dict[str, Distribution] = {}
    names: dict[str, str] = {}
    for key, spec in raw.items():
        section, _, name = str(key).partition(".")
        if section not in SEARCHABLE or not name:
            raise ConfigError(f"{where}: key {key!r} is not a dotted setting such as train.lr or data.augment "
                              f"(sections {', '.join(SEARCHABLE)}); write e.g. train.lr: "
                              "{low: 0.0001, high: 0.003, log: true}")
        cls = sections[section]
        known = {f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
        if name not in known:
            raise ConfigError(f"{where}.{key}: {section} has no setting {name!r}; known: {', '.join(sorted(known))}")
        if name in names:
            raise ConfigError(f"{where}.{key}: {names[name]} is searched under the same name {name!r}")
        names[name] = key
        dist = _distribution(spec, field_type(cls, name), f"{where}.{key}")
        for value in _probe_values(dist):
            try:
                cls(**{name: value})  # the section's own validation, on every bound and choice
            except (ConfigError, TypeError, ValueError) as exc:
                raise ConfigError(f"{where}.{key}: {exc}") from None
        entries[key] = dist
    return SearchSpace.of(entries)


def _distribution(spec: Any, kind: type, where: str) -> Distribution:
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError(f"{where}: an empty list of choices")
        return Choice(tuple(spec))
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a list of choices or {{low, high[, log, step]}}, got {spec!r}")
    unknown = sorted(set(spec) - {"low", "high", "log", "step"})
    if unknown or "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: a range needs low and high (and optionally log, step); got keys {sorted(spec)}")
    if kind not in (int, float):
        raise ConfigError(f"{where}: a range needs a numeric setting; give a list of choices instead")
    try:
        low, high = kind(spec["low"]), kind(spec["high"])
        step = None if spec.get("step") is None else kind(spec["step"])
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: low, high and step must be numbers") from None
    log = bool(spec.get("log", False))
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ConfigError(f"{where}: needs finite low <= high, got {low} and {high}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
    if log and step:
        raise ConfigError(f"{where}: a range is either log or stepped, not both")
    return Range(low, high, log, step)


def _probe_values(dist: Distribution) -> tuple:
    return dist.values if isinstance(dist, Choice) else (dist.low, dist.high)
