"""Argument parsing only: each command maps its flags onto the preset and its options, then makes
one call into ``pipeline/commands/`` (``command_table.COMMANDS``). Flags are derived from the
declared settings (``flags``)."""

from __future__ import annotations

import argparse
import os
import sys

from ..config import ConfigError
from ..interrupt import install_sigterm
from ..progress import configure as configure_progress
from .command_table import COMMANDS, Command, build_options, build_preset
from .errors import one_line, user_error
from .flags import add_flags, given


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline",
                                     description="Tune, track and register a deepfake-classification CNN ensemble.")
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, command in COMMANDS.items():
        head, _, action = name.partition(" ")
        if action:  # "data synth": a subcommand of "data"
            if head not in groups:
                groups[head] = sub.add_parser(head, help="synthesise or inspect a dataset").add_subparsers(
                    dest="action", required=True)
            target = groups[head].add_parser(action, help=command.help, description=command.help)
        else:
            target = sub.add_parser(name, help=command.help, description=command.help)
        add_flags(target, command.flags())
    return parser


def command_of(args: argparse.Namespace) -> Command:
    return COMMANDS[f"{args.command} {args.action}" if getattr(args, "action", None) else args.command]


def check_not_searched(command: Command, values: dict, preset) -> None:
    """A flag for a setting the search space samples would be silently overridden: refuse it."""
    if command.name != "tune":
        return
    searched = set(preset.study.space.keys()) & set(values)
    if searched:
        key = sorted(searched)[0]
        raise ConfigError(f"{key} is searched by study.space, so a fixed value for it would be ignored; "
                          f"remove it from the flags or from the preset's study.space")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file is noise
    # MLflow's INFO lines (creating a store's tables, validating an input example) are its own
    # bookkeeping, not the command's progress: shown only when MLFLOW_LOGGING_LEVEL asks for them.
    # Read when mlflow is first imported, which the command does after this.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    install_sigterm()
    values: dict = {}
    try:
        command = command_of(args)
        values = given(args, command.flags())
        preset = build_preset(values)
        check_not_searched(command, values, preset)
        quiet, no_progress = bool(values.get("common.quiet")), bool(values.get("common.no_progress"))
        configure_progress(no_progress=no_progress, quiet=quiet)
        return command.run(preset, build_options(command.options, values), not (quiet or no_progress))
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc or 'Ctrl-C'}", file=sys.stderr)
        return 130
    except Exception as exc:
        # Bad input, an unreachable store, an MLflow or Optuna error: one line and exit 2 (a bug keeps
        # its traceback).
        if not user_error(exc):
            raise
        print(f"error: {one_line(exc, values.get('study.storage'))}", file=sys.stderr)
        return 2


__all__ = ["main", "build_parser"]
