"""``llmproxy token``: create, list and revoke proxy tokens (tests:
tests/unit/access/test_tokens.py, tests/integration/test_access.py).

The tokens live in the token file of ``[server] state_dir`` (llmproxy/access/tokens.py);
a running proxy re-reads it within a second, so no restart is needed.  With
``[state] store = redis`` they live in Redis instead (llmproxy/access/shared.py),
where every proxy process of every host sees a change within a second; the
commands then talk to ``[redis] url`` (and fail with a clear line when it does not
answer).  ``create``
prints the secret once, on stdout, and everything else on stderr, so
``TOKEN=$(llmproxy token create ...)`` captures only the token.  Creating and
revoking write an audit line with the OS user as the actor.  The commands read the
config without resolving secrets: they need the state directory, not the provider
keys.
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

import orjson

from llmproxy.cli.args import Subcommands, config_option, on_local_settings, positive_int
from llmproxy.cli.shared_state import failed, run_on_shared_state
from llmproxy.config.model import Settings

if TYPE_CHECKING:
    from llmproxy.access.shared import SharedTokenStore
    from llmproxy.access.tokens import Token, TokenTerms

__all__ = ["add_token_command", "parse_expiry", "project_name", "usd_amount"]

_T = TypeVar("_T")

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


def project_name(text: str) -> str:
    """argparse type for ``--project``: 1-128 letters, digits and ``. _ : @ / -``."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}", text):
        raise argparse.ArgumentTypeError(
            "project names are 1-128 letters, digits and . _ : @ / - (starting with a letter "
            "or digit)"
        )
    return text


def usd_amount(text: str) -> float:
    """argparse type for ``--max-usd``: a positive number of US dollars."""
    try:
        value = float(text.strip().lstrip("$"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of USD") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("--max-usd must be greater than 0")
    return value


def _shared(settings: Settings, work: Callable[[SharedTokenStore], Awaitable[_T]]) -> _T:
    """Run ``work`` against the shared token set (see llmproxy/cli/shared_state.py)."""
    from llmproxy.access.shared import SharedTokenStore
    from llmproxy.access.tokens import TokenFile

    token_file = TokenFile.in_state_dir(settings.server.state_dir)
    return run_on_shared_state(settings, lambda state: work(SharedTokenStore(state, token_file)))


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%MZ")


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "-"


@on_local_settings
def _token_create(args: argparse.Namespace, settings: Settings) -> int:
    from llmproxy.access.audit import AuditLog
    from llmproxy.access.tokens import TokenFile

    now = time.time()
    try:
        expires = parse_expiry(args.expires, now) if args.expires else None
    except argparse.ArgumentTypeError as e:
        print(e, file=sys.stderr)
        return 2
    paths = tuple(args.allow_path or ())
    bad = [p for p in paths if not p.startswith("/")]
    if bad:
        print(f"--allow-path: {bad[0]!r} is not an absolute path (/v1/...)", file=sys.stderr)
        return 2
    methods = tuple(m.upper() for m in args.allow_method or ())
    kw: TokenTerms = {
        "expires": expires,
        "max_requests": args.max_requests,
        "rpm": args.rpm,
        "max_usd": args.max_usd,
        "max_tokens": args.max_tokens,
        "period": args.period,
        "allowed_paths": paths,
        "allowed_methods": methods,
    }
    if settings.state.store == "redis":
        try:
            secret, token = _shared(settings, lambda s: s.create(args.project, now, **kw))
        except Exception as e:
            print(failed(e), file=sys.stderr)
            return 1
    else:
        secret, token = TokenFile.in_state_dir(settings.server.state_dir).create(
            args.project, now, **kw
        )
    audit = AuditLog(settings.audit_path)
    audit.write(
        "token_created",
        token_id=token.id,
        project=token.project,
        **token.terms(),
        actor=_actor(),
        outcome="ok",
    )
    audit.close()
    print(secret)
    print(
        f"created {token.id} for project {token.project} (expires {_when(token.expires)}, "
        f"quota {token.max_requests or '-'}, rpm {token.rpm or '-'}, budget "
        f"{_budget(token.max_usd, token.max_tokens)} per {token.period}). The token above is "
        "shown only this once: store it now.",
        file=sys.stderr,
    )
    return 0


def _budget(max_usd: float | None, max_tokens: int | None) -> str:
    parts = []
    if max_usd is not None:
        parts.append(f"${max_usd:g}")
    if max_tokens is not None:
        parts.append(f"{max_tokens} tokens")
    return " + ".join(parts) or "-"


async def _shared_list(
    store: SharedTokenStore, now: float
) -> tuple[Sequence[Token], Mapping[str, int], dict[tuple[str, str], tuple[int, int]]]:
    """The shared token set, its request counts, and each token's spend in the
    current period of its budget (the shared budget counters)."""
    from llmproxy.access.budgets import budget_key, window

    tokens, used = await store.list(now)
    keys = []
    for t in tokens:
        w = window(t.period, now).key
        keys += [budget_key(t.id, "usd", w), budget_key(t.id, "tokens", w)]
    counts = await store.state.counters.read(keys, now)
    spend = {(t.id, t.period): (counts[2 * i], counts[2 * i + 1]) for i, t in enumerate(tokens)}
    return tokens, used, spend


@on_local_settings
def _token_list(args: argparse.Namespace, settings: Settings) -> int:
    from llmproxy.access.budgets import NANO, read_spend, spent_by_token
    from llmproxy.access.tokens import TokenFile, UsageFile

    state_dir = settings.server.state_dir
    now = time.time()
    try:
        if settings.state.store == "redis":
            tokens, used, spend = _shared(settings, lambda s: _shared_list(s, now))
        else:
            tokens = TokenFile.in_state_dir(state_dir).read()
            used = UsageFile.in_state_dir(state_dir).read()
            spend = spent_by_token(read_spend(state_dir), now)
    except Exception as e:
        print(failed(e), file=sys.stderr)
        return 1
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
            "period": t.period,
            "spent_usd": spend.get((t.id, t.period), (0, 0))[0] / NANO,
            "spent_tokens": spend.get((t.id, t.period), (0, 0))[1],
            "max_usd": t.max_usd,
            "max_tokens": t.max_tokens,
            "allowed_paths": list(t.allowed_paths),
            "allowed_methods": list(t.allowed_methods),
        }
        for t in tokens
    ]
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0
    header = (
        "ID",
        "PROJECT",
        "STATE",
        "CREATED",
        "EXPIRES",
        "USED",
        "QUOTA",
        "RPM",
        "PERIOD",
        "SPENT_USD",
        "MAX_USD",
        "SPENT_TOKENS",
        "MAX_TOKENS",
    )
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
            str(r["period"]),
            f"{r['spent_usd']:.6f}",
            "-" if r["max_usd"] is None else f"{r['max_usd']:g}",
            str(r["spent_tokens"]),
            str(r["max_tokens"] or "-"),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


@on_local_settings
def _token_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from llmproxy.access.audit import AuditLog
    from llmproxy.access.tokens import TokenFile, UnknownToken

    now = time.time()
    try:
        if settings.state.store == "redis":
            token, changed = _shared(settings, lambda s: s.revoke(args.id, now))
        else:
            token, changed = TokenFile.in_state_dir(settings.server.state_dir).revoke(args.id, now)
    except UnknownToken:
        print(f"no token with id {args.id} (see: llmproxy token list)", file=sys.stderr)
        return 1
    except Exception as e:
        print(failed(e), file=sys.stderr)
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


def add_token_command(sub: Subcommands) -> None:
    """Register ``llmproxy token`` (create, list, revoke)."""
    token = sub.add_parser("token", help="create, list and revoke proxy tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    config = argparse.ArgumentParser(add_help=False)
    config_option(config, "state_dir")
    p = token_sub.add_parser(
        "create", parents=[config], help="create a token and print it (only this once)"
    )
    p.add_argument("--project", required=True, type=project_name, help="who the token is for")
    p.add_argument("--expires", default=None, help="30d, 12h, 2w, an ISO date, or never")
    p.add_argument("--max-requests", type=positive_int, default=None, help="request quota")
    p.add_argument("--rpm", type=positive_int, default=None, help="requests per minute")
    p.add_argument(
        "--max-usd", type=usd_amount, default=None, help="USD budget per period (see --period)"
    )
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        help="token budget (input + output) per period",
    )
    p.add_argument(
        "--period",
        choices=("day", "month", "total"),
        default="total",
        help="the budgets' period: a UTC day, a UTC month, or the token's life (default)",
    )
    p.add_argument(
        "--allow-path",
        action="append",
        metavar="PATH",
        help="an upstream path the token may use (a prefix, or a glob with *): repeat for "
        "more; default: every path the route serves",
    )
    p.add_argument(
        "--allow-method",
        action="append",
        metavar="METHOD",
        help="an HTTP method the token may use (repeat for more); default: all",
    )
    p.set_defaults(func=_token_create)
    p = token_sub.add_parser(
        "list", parents=[config], help="ids, projects, expiry, usage and spend this period"
    )
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=_token_list)
    p = token_sub.add_parser("revoke", parents=[config], help="revoke a token by id")
    p.add_argument("id", help="the token id (tok_...), as token list shows it")
    p.set_defaults(func=_token_revoke)
