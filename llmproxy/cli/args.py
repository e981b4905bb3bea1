"""Argument types the ``llmproxy`` subcommands share (tests: tests/unit/cli/test_main.py).

Each is an argparse ``type=``: it turns one command-line word into a value or
raises ``argparse.ArgumentTypeError``, which argparse prints as
``llmproxy SUBCOMMAND: error: argument --flag: <reason>`` with exit code 2.
``Subcommands`` is what a subcommand module's ``add_*_command`` registers on.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import TypeAlias

from llmproxy.config.converter import parse_duration
from llmproxy.config.loader import ConfigError, load_settings
from llmproxy.config.model import Settings

__all__ = [
    "Subcommands",
    "local_settings",
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
