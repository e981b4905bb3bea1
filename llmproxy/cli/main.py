"""The top of the ``llmproxy`` command: its parser, ``--version``, and the dispatch to a
subcommand (tests: tests/unit/cli/test_main.py).

Each subcommand lives in its own module of this package and registers itself with
an ``add_*_command`` function; this module only puts them together.  It is the
entry point of the console script (setup.cfg) and of ``python -m llmproxy.cli``
(``__main__.py``); no other module imports it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from llmproxy.cli.benchmark import add_benchmark_command
from llmproxy.cli.cache import add_cache_command
from llmproxy.cli.check_config import add_check_config_command
from llmproxy.cli.dispatcher import add_dispatcher_command
from llmproxy.cli.plugin_cache import add_plugin_cache_command
from llmproxy.cli.spend import add_spend_command
from llmproxy.cli.token import add_token_command

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
llmproxy is a reverse proxy for LLM APIs (OpenAI- and Anthropic-style) that streams
requests and responses through and records every exchange as an event for Loki,
Lunary, Helicone, OTLP, files or a Redis bus. The proxy itself runs under Twisted:
`twistd -n llmproxy --config FILE` (or `twist llmproxy`). This command holds the
tools around it."""

EPILOG = """\
Run `llmproxy COMMAND --help` for the options of one command.

Documentation (docs/ in the source tree): configuration.md (every config key),
operations.md (install, systemd, tokens, the dispatcher, cache purge),
benchmarking.md (llmproxy benchmark), sinks.md (what each sink sends)."""


def package_version() -> str:
    """The installed distribution's version, or a word saying it is not installed."""
    # Imported here: importlib.metadata adds ~0.05 s to every run of the command.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmproxy")
    except PackageNotFoundError:
        return "(not installed)"


class _VersionAction(argparse.Action):
    """``--version``: the version is read only when asked for, not on every run."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(f"{parser.prog} {package_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The ``llmproxy`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="llmproxy",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print the installed version and exit"
    )
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    add_check_config_command(sub)
    add_token_command(sub)
    add_spend_command(sub)
    add_dispatcher_command(sub)
    add_cache_command(sub)
    add_benchmark_command(sub)
    add_plugin_cache_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the subcommand ``argv`` names (default: ``sys.argv[1:]``); its exit code."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover - ``python -m llmproxy.cli.main`` still works
    sys.exit(main())
