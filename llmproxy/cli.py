"""The ``llmproxy`` command: everything but the daemon itself (tests: tests/unit/test_cli.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from llmproxy.config import ConfigError, load_settings


def _check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.path)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return 1
    names = ", ".join(r.name for r in settings.routes) or "none"
    sinks = ", ".join(f"{e.name} ({e.type})" for e in settings.exporters) or "none"
    print(f"{settings.source}: ok (routes: {names}; exporters: {sinks})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmproxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate a config file and name every problem")
    p.add_argument("path", nargs="?", default=None, help="ini file (default: the embedded one)")
    p.set_defaults(func=_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
