"""Flags derived from declared settings: every config field and command option becomes ``--name``
(and an ``MLproject`` parameter ``name``) with its help text, type and choices, written nowhere else.

An empty value (how ``MLproject`` passes "not set") means "keep the preset's value", so ``--config``
and explicit flags compose.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from ..config import SECTIONS
from ..config.fields import choices_of, help_of, on_cli

# Public names that differ from the field name (today's flag and MLproject parameter names).
ALIASES = {"data.root": "data", "data.cutmix_alpha": "cutmix", "data.mixup_alpha": "mixup", "study.name": "study",
           "tracking.experiment": "experiment"}
ALSO_CANONICAL = {"data.cutmix_alpha", "data.mixup_alpha"}  # --cutmix-alpha works beside --cutmix


@dataclass(frozen=True)
class Flag:
    key: str  # "train.lr" for a setting, "options.out" / "common.config" for a command option
    name: str  # --name on the command line, name in MLproject
    kind: type  # int | float | str | bool
    many: bool  # a comma-separated tuple (study.members)
    choices: tuple | None
    help: str
    default: Any
    extra: tuple[str, ...] = ()  # further spellings, e.g. --cutmix-alpha beside --cutmix

    @property
    def dest(self) -> str:
        return self.key.replace(".", "__")

    @property
    def preset_backed(self) -> bool:
        return self.key.split(".", 1)[0] in SECTIONS


def _kind(hint: Any) -> tuple[type, bool]:
    """(scalar type, whether a tuple of it) from a field's type hint."""
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], True
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0] if args else hint), False


def flags_of(cls: type, prefix: str, names: dict[str, str] | None = None,
             choices: dict[str, tuple] | None = None, extras: dict[str, tuple[str, ...]] | None = None) -> list[Flag]:
    """One flag per CLI field of ``cls``; ``names``, ``choices`` and ``extras`` (more spellings) by key."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if not on_cli(f):
            continue
        key = f"{prefix}.{f.name}"
        kind, many = _kind(hints[f.name])
        name = (names or {}).get(key) or ALIASES.get(key) or f.name
        extra = ((f.name,) if key in ALSO_CANONICAL and name != f.name else ()) + (extras or {}).get(key, ())
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(Flag(key, name, kind, many, (choices or {}).get(key) or choices_of(f), help_of(f), default,
                        extra))
    return out


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def converter(flag: Flag) -> Callable[[str], Any]:
    """Text -> value; "" -> None (keep the preset's value); choices checked with the setting's name."""
    scalar = _bool if flag.kind is bool else flag.kind

    def one(text: str) -> Any:
        try:
            value = scalar(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag.key}: expected {flag.kind.__name__}, got {text!r}") from None
        if flag.choices is not None and value not in flag.choices:
            raise argparse.ArgumentTypeError(f"{flag.key} must be one of {', '.join(map(str, flag.choices))}; "
                                             f"got {value!r}")
        return value

    def parse(text: str) -> Any:
        if text.strip() == "":
            return None
        if flag.many:
            return tuple(one(part.strip()) for part in text.split(",") if part.strip())
        return one(text)

    parse.__name__ = flag.kind.__name__  # argparse names the type in its messages
    return parse


def add_flags(parser: argparse.ArgumentParser, flags: list[Flag]) -> None:
    for flag in flags:
        shown = ",".join(map(str, flag.default)) if isinstance(flag.default, tuple) else flag.default
        text = flag.help + (f" (default: {shown})" if shown not in (None, "") else "")
        if flag.choices:
            text += f" [{' | '.join(map(str, flag.choices))}]"
        spellings = [f"--{flag.name.replace('_', '-')}"] + [f"--{e.replace('_', '-')}" for e in flag.extra]
        metavar = "A,B" if flag.many else {int: "INT", float: "NUM", bool: "BOOL"}.get(flag.kind, "TEXT")
        kwargs: dict[str, Any] = {"dest": flag.dest, "type": converter(flag), "default": None, "metavar": metavar,
                                  "help": text.replace("%", "%%")}
        if flag.kind is bool and not flag.many:
            kwargs |= {"nargs": "?", "const": True}
        parser.add_argument(*dict.fromkeys(spellings), **kwargs)


def given(args: argparse.Namespace, flags: list[Flag]) -> dict[str, Any]:
    """``{key: value}`` of the flags the user set (None: not given, or given empty)."""
    return {f.key: getattr(args, f.dest) for f in flags if getattr(args, f.dest, None) is not None}
