"""Argument types the ``llmproxy`` subcommands share (tests: tests/unit/cli/test_main.py).

Each is an argparse ``type=``: it turns one command-line word into a value or
raises ``argparse.ArgumentTypeError``, which argparse prints as
``llmproxy SUBCOMMAND: error: argument --flag: <reason>`` with exit code 2.
``Subcommands`` is what a subcommand module's ``add_*_command`` registers on;
``config_option`` and ``on_local_settings`` are the ``--config`` of the
commands that work on the local state.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Callable
from typing import TypeAlias

from llmproxy.config.converter import parse_duration
from llmproxy.config.loader import ConfigError, load_settings
from llmproxy.config.model import Settings

__all__ = [
    "Subcommands",
    "config_option",
    "local_settings",
    "on_local_settings",
    "positive_duration",
    "positive_int",
    "positive_seconds",
]

# argparse names its subparsers action privately, and it is generic only to type
# checkers (hence a string): this is the one place we spell it.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def positive_int(text: str) -> int:
    """A whole number above 0."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return n


def positive_seconds(text: str) -> float:
    """A plain, finite number of seconds above 0 (``2.5``)."""
    try:
        n = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(n) or n <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return n


def positive_duration(text: str) -> float:
    """A duration above 0 written as in the ini file (``30``, ``500ms``, ``5s``, ``2m``),
    in seconds."""
    try:
        value = parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def local_settings(path: str) -> Settings | None:
    """The config at ``path`` for a command that works on the local state (tokens,
    spend, the cache), not on the providers: secrets are left unresolved.  None
    after printing every problem to stderr."""
    try:
        return load_settings(path, resolve_secrets=False)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return None


def config_option(parser: argparse.ArgumentParser, wanted_for: str) -> None:
    """``--config/-c``: the ini file, read for ``wanted_for`` only."""
    parser.add_argument(
        "--config",
        "-c",
        default=None,
        help=f"ini file (for {wanted_for}; default: the embedded one)",
    )


def on_local_settings(
    command: Callable[[argparse.Namespace, Settings], int],
) -> Callable[[argparse.Namespace], int]:
    """``command`` as a subcommand's ``func``: it is given the ``--config`` file
    loaded by :func:`local_settings`, and is not run (exit code 1, the problems
    printed) when that file does not load."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        settings = local_settings(args.config)
        if settings is None:
            return 1
        return command(args, settings)

    return run
