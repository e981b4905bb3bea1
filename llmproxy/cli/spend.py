"""``llmproxy spend``: what proxy tokens spent, per project and model, in the
current day, month or in total (tests: tests/unit/access/test_budgets.py,
tests/unit/access/test_shared_spend.py).

With ``[state] store = local`` it reads the spend the proxy keeps under
``[server] state_dir`` (``token-spend.json``, and each worker's with
``workers > 1``; see llmproxy/access/budgets.py): this host's processes.  The
running proxy writes it every few seconds, so the last seconds may be missing.

With ``[state] store = redis`` it reads the spend table every process of every
host adds each answer to (``spend:<window>`` under ``[state] prefix``), up to
the last answer.  A Redis that does not answer is an error naming its URL
(without credentials) and exit code 1; ``--local`` reads this host's files
instead.  The output says where it read from; ``--json`` gives the same rows as
JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

import orjson

from llmproxy.cli.args import Subcommands, local_settings
from llmproxy.cli.shared_state import failed, run_on_shared_state, shared_state_url

if TYPE_CHECKING:
    from llmproxy.state import SharedState

__all__ = ["add_spend_command"]


def _spend(args: argparse.Namespace) -> int:
    from llmproxy.access.budgets import NANO, read_spend, summarize, window
    from llmproxy.access.tokens import TokenFileError

    settings = local_settings(args.config)
    if settings is None:
        return 1
    now = time.time()
    if settings.state.store == "redis" and not args.local:
        url = shared_state_url(settings)
        try:
            period = args.period
            sums = run_on_shared_state(settings, lambda state: _shared_sums(state, period, now))
        except Exception as e:
            print(f"{failed(e)} (--local reads this host's spend files)", file=sys.stderr)
            return 1
        source = {"store": "redis", "url": url}
        where = f"the shared state at {url} (every host and worker)"
    else:
        state_dir = settings.server.state_dir
        try:
            rows = read_spend(state_dir)
        except TokenFileError as e:
            print(e, file=sys.stderr)
            return 1
        sums = summarize(rows, args.period, now)
        source = {"store": "local", "state_dir": str(state_dir)}
        where = f"the spend files under {state_dir} (this host)"
    if args.project is not None:
        sums = {k: v for k, v in sums.items() if k[0] == args.project}
    table = [
        {
            "project": project,
            "model": model,
            "usd": round(v["usd_nanos"] / NANO, 9),
            "tokens": v["tokens"],
            "requests": v["requests"],
            "unpriced": v["unpriced"],
        }
        for (project, model), v in sorted(sums.items(), key=lambda kv: (-kv[1]["usd_nanos"], kv[0]))
    ]
    if args.json:
        doc = {
            "period": args.period,
            "window": window(args.period, now).key,
            "source": source,
            "rows": table,
        }
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return 0
    header = ("PROJECT", "MODEL", "USD", "TOKENS", "REQUESTS", "UNPRICED")
    lines = [header] + [
        (
            str(r["project"]),
            str(r["model"]),
            f"{r['usd']:.6f}",
            str(r["tokens"]),
            str(r["requests"]),
            str(r["unpriced"]),
        )
        for r in table
    ]
    total_usd = sum(v["usd_nanos"] for v in sums.values()) / NANO
    total_tokens = sum(v["tokens"] for v in sums.values())
    lines.append(("TOTAL", "", f"{total_usd:.6f}", str(total_tokens), "", ""))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    print(f"spend for {args.period} {window(args.period, now).key} (UTC), from {where}")
    for row in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


async def _shared_sums(
    state: SharedState, period: str, now: float
) -> dict[tuple[str, str], dict[str, int]]:
    """The shared spend table of ``period``'s current window, per (project, model)."""
    from llmproxy.access.budgets import spend_table_key, summarize_table, window

    table = await state.counters.read_table(spend_table_key(window(period, now).key))
    return summarize_table(table)


def add_spend_command(sub: Subcommands) -> None:
    """Register ``llmproxy spend``."""
    p = sub.add_parser(
        "spend", help="what proxy tokens spent, per project and model, this day/month/in total"
    )
    p.add_argument(
        "--config", "-c", default=None, help="ini file (for state_dir; default: the embedded one)"
    )
    p.add_argument(
        "--period",
        choices=("day", "month", "total"),
        default="month",
        help="the current UTC day, the current UTC month (default), or everything",
    )
    p.add_argument("--project", default=None, help="only this project")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.add_argument(
        "--local",
        action="store_true",
        help="with [state] store = redis: read this host's spend files, not Redis",
    )
    p.set_defaults(func=_spend)
