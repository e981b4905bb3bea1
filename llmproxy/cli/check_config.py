"""``llmproxy check-config``: validate a config file and name every problem
(tests: tests/integration/test_daemon.py, tests/integration/test_workers.py).

It loads the file exactly as the daemon does (secrets resolved too, so a missing
``env:`` variable or ``file:`` path is reported) and prints one
``section.key: reason`` line per problem on stderr, exit code 64 (``EX_CONFIG``,
the daemon's own for a bad file); a good file gets one line naming its routes
and exporters, exit code 0.  The systemd units run it as the first
``ExecReload=`` command, so ``systemctl reload`` fails on a bad file instead of
sending SIGHUP.
"""

from __future__ import annotations

import argparse
import sys

from llmproxy.cli.args import Subcommands
from llmproxy.config.loader import ConfigError
from llmproxy.runtime.checks import load_checked
from llmproxy.runtime.exits import EX_CONFIG

__all__ = ["add_check_config_command"]


def _check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_checked(args.path)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return EX_CONFIG
    names = ", ".join(r.name for r in settings.routes) or "none"
    sinks = ", ".join(f"{e.name} ({e.type})" for e in settings.exporters) or "none"
    print(f"{settings.source}: ok (routes: {names}; exporters: {sinks})")
    return 0


def add_check_config_command(sub: Subcommands) -> None:
    """Register ``llmproxy check-config``."""
    p = sub.add_parser(
        "check-config",
        help="validate a config file and name every problem",
        description="Load an ini file as the daemon would and print one "
        "'section.key: reason' line per problem (exit code 64), or a one-line summary of "
        "the routes and exporters (exit code 0). See docs/configuration.md.",
    )
    p.add_argument("path", nargs="?", default=None, help="ini file (default: the embedded one)")
    p.set_defaults(func=_check_config)
