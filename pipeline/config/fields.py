"""How a setting is declared once: a dataclass field whose metadata carries its help text and choices.

The CLI flags and the ``MLproject`` parameters are derived from these fields (``pipeline/cli``), and
``validate_choices`` checks the same choices a flag offers, so the allowed values are written once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import MISSING, field, fields
from typing import Any


class ConfigError(ValueError):
    """A preset or flag value that cannot be used; the message names the key and the file."""


def setting(default: Any = MISSING, help: str = "", *, choices: tuple[str, ...] | None = None,
            cli: bool = True, default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A config field with its help text and (optional) allowed values. ``cli=False``: never a flag."""
    metadata = {"help": help, "choices": choices, "cli": cli}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    return f.metadata.get("choices")


def on_cli(f: dataclasses.Field) -> bool:
    return f.metadata.get("cli", True)


def validate_choices(obj: Any, section: str) -> None:
    """Every field declared with ``choices`` holds one of them."""
    for f in fields(obj):
        allowed = choices_of(f)
        value = getattr(obj, f.name)
        if allowed is not None and value is not None and value not in allowed:
            raise ConfigError(f"{section}.{f.name} must be one of {', '.join(allowed)}; got {value!r}")


def check(condition: bool, key: str, requirement: str, value: Any) -> None:
    """One range check with the message every config error uses: ``key must be …, got value``."""
    if not condition:
        raise ConfigError(f"{key} must be {requirement}, got {value!r}")
