"""The ``llmproxy`` command: everything but the daemon itself (tests: tests/unit/test_cli.py)."""

from __future__ import annotations

import argparse
import getpass
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import orjson

from llmproxy.config.loader import ConfigError, load_settings
from llmproxy.config.model import Settings


def _check_config(args: argparse.Namespace) -> int:
    from llmproxy.runtime.checks import load_checked

    try:
        settings = load_checked(args.path)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return 1
    names = ", ".join(r.name for r in settings.routes) or "none"
    sinks = ", ".join(f"{e.name} ({e.type})" for e in settings.exporters) or "none"
    print(f"{settings.source}: ok (routes: {names}; exporters: {sinks})")
    return 0


# -- llmproxy token ----------------------------------------------------------------

_SPAN_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(text: str, now: float) -> float | None:
    """``30d``, ``12h``, ``90m``, ``2w``, seconds, an ISO date/time (UTC), or ``never``."""
    value = text.strip().lower()
    if value in ("never", "none", ""):
        return None
    m = re.fullmatch(r"(\d+)\s*([smhdw]?)", value)
    if m:
        span = int(m.group(1)) * _SPAN_UNITS[m.group(2)]
        if span <= 0:
            raise argparse.ArgumentTypeError("--expires must be in the future")
        return now + span
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--expires: {text!r} is not a span (30d, 12h, 90m, 2w), a date, or never"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if when.timestamp() <= now:
        raise argparse.ArgumentTypeError("--expires must be in the future")
    return when.timestamp()


def positive_int(text: str) -> int:
    """argparse type: a whole number above 0."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return n


def _project(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}", text):
        raise argparse.ArgumentTypeError(
            "project names are 1-128 letters, digits and . _ : @ / - (starting with a letter "
            "or digit)"
        )
    return text


def _token_settings(args: argparse.Namespace) -> Settings | None:
    try:
        # The token commands need the state directory, not the provider keys.
        return load_settings(args.config, resolve_secrets=False)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return None


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%MZ")


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "-"


def _token_create(args: argparse.Namespace) -> int:
    from llmproxy.access.audit import AuditLog
    from llmproxy.access.tokens import TokenFile

    settings = _token_settings(args)
    if settings is None:
        return 1
    now = time.time()
    try:
        expires = parse_expiry(args.expires, now) if args.expires else None
    except argparse.ArgumentTypeError as e:
        print(e, file=sys.stderr)
        return 2
    secret, token = TokenFile.in_state_dir(settings.server.state_dir).create(
        args.project, now, expires=expires, max_requests=args.max_requests, rpm=args.rpm
    )
    audit = AuditLog(settings.audit_path)
    audit.write(
        "token_created",
        token_id=token.id,
        project=token.project,
        expires=token.expires,
        max_requests=token.max_requests,
        rpm=token.rpm,
        actor=_actor(),
        outcome="ok",
    )
    audit.close()
    print(secret)
    print(
        f"created {token.id} for project {token.project} (expires {_when(token.expires)}, "
        f"quota {token.max_requests or '-'}, rpm {token.rpm or '-'}). The token above is "
        "shown only this once: store it now.",
        file=sys.stderr,
    )
    return 0


def _token_list(args: argparse.Namespace) -> int:
    from llmproxy.access.tokens import TokenFile, TokenFileError, UsageFile

    settings = _token_settings(args)
    if settings is None:
        return 1
    state_dir = settings.server.state_dir
    try:
        tokens = TokenFile.in_state_dir(state_dir).read()
        used = UsageFile.in_state_dir(state_dir).read()
    except TokenFileError as e:
        print(e, file=sys.stderr)
        return 1
    now = time.time()
    rows = [
        {
            "id": t.id,
            "project": t.project,
            "state": t.state(now),
            "created": _when(t.created),
            "expires": _when(t.expires),
            "used": used.get(t.id, 0),
            "max_requests": t.max_requests,
            "rpm": t.rpm,
        }
        for t in tokens
    ]
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0
    header = ("ID", "PROJECT", "STATE", "CREATED", "EXPIRES", "USED", "QUOTA", "RPM")
    table = [header] + [
        (
            str(r["id"]),
            str(r["project"]),
            str(r["state"]),
            str(r["created"]),
            str(r["expires"]),
            str(r["used"]),
            str(r["max_requests"] or "-"),
            str(r["rpm"] or "-"),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    from llmproxy.access.audit import AuditLog
    from llmproxy.access.tokens import TokenFile, UnknownToken

    settings = _token_settings(args)
    if settings is None:
        return 1
    try:
        token, changed = TokenFile.in_state_dir(settings.server.state_dir).revoke(
            args.id, time.time()
        )
    except UnknownToken:
        print(f"no token with id {args.id} (see: llmproxy token list)", file=sys.stderr)
        return 1
    if not changed:
        print(f"{token.id} was already revoked")
        return 0
    audit = AuditLog(settings.audit_path)
    audit.write(
        "token_revoked", token_id=token.id, project=token.project, actor=_actor(), outcome="ok"
    )
    audit.close()
    print(f"revoked {token.id} (project {token.project}); a running proxy refuses it within 1s")
    return 0


def _add_token_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = sub.add_parser("token", help="create, list and revoke proxy tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config", "-c", default=None, help="ini file (for state_dir; default: the embedded one)"
    )
    p = token_sub.add_parser(
        "create", parents=[config], help="create a token and print it (only this once)"
    )
    p.add_argument("--project", required=True, type=_project, help="who the token is for")
    p.add_argument("--expires", default=None, help="30d, 12h, 2w, an ISO date, or never")
    p.add_argument("--max-requests", type=positive_int, default=None, help="request quota")
    p.add_argument("--rpm", type=positive_int, default=None, help="requests per minute")
    p.set_defaults(func=_token_create)
    p = token_sub.add_parser("list", parents=[config], help="ids, projects, expiry and usage")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=_token_list)
    p = token_sub.add_parser("revoke", parents=[config], help="revoke a token by id")
    p.add_argument("id", help="the token id (tok_...), as token list shows it")
    p.set_defaults(func=_token_revoke)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmproxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate a config file and name every problem")
    p.add_argument("path", nargs="?", default=None, help="ini file (default: the embedded one)")
    p.set_defaults(func=_check_config)
    _add_token_commands(sub)
    from llmproxy.redis.dispatcher import add_dispatcher_command

    add_dispatcher_command(sub)
    from llmproxy.cli.cache import add_cache_command

    add_cache_command(sub)
    from llmproxy.cli.benchmark import add_benchmark_command

    add_benchmark_command(sub)
    from llmproxy.cli.plugin_cache import add_plugin_cache_command

    add_plugin_cache_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
