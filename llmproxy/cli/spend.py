"""``llmproxy spend``: what proxy tokens spent, per project and model, in the
current day, month or in total (tests: tests/unit/cli/test_spend.py).

Reads the spend the proxy keeps under ``[server] state_dir``
(``token-spend.json``, and each worker's with ``workers > 1``; see
llmproxy/access/budgets.py).  The running proxy writes it every few seconds,
so the last seconds may be missing.  ``--json`` gives the same rows as JSON.
"""

from __future__ import annotations

import argparse
import sys
import time

import orjson

from llmproxy.cli.args import Subcommands, local_settings

__all__ = ["add_spend_command"]


def _spend(args: argparse.Namespace) -> int:
    from llmproxy.access.budgets import NANO, read_spend, summarize, window
    from llmproxy.access.tokens import TokenFileError

    settings = local_settings(args.config)
    if settings is None:
        return 1
    now = time.time()
    try:
        rows = read_spend(settings.server.state_dir)
    except TokenFileError as e:
        print(e, file=sys.stderr)
        return 1
    sums = summarize(rows, args.period, now)
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
        doc = {"period": args.period, "window": window(args.period, now).key, "rows": table}
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
    print(f"spend for {args.period} {window(args.period, now).key} (UTC)")
    for row in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


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
    p.set_defaults(func=_spend)
