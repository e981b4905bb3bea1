"""Microbenchmark: what pricing adds per exchange (no tests: benchmark tool).

Three figures, CPU microseconds (process time) per exchange, median of
``rounds``:

- ``calc_price``: one ``genai_prices.calc_price`` call for a chat answer's usage
  (what pricing would cost done the plain way, lookup cached by genai-prices);
- ``Pricer.cost``: our pricer for the same usage (the model's rates looked up
  once, then a dict lookup and a few float operations);
- the pump's pricing step per exchange (bench_pump.py's ``json`` and ``sse``
  answers, their events already built, as the pump builds them anyway): the
  pricer and the metrics by project and model, and for a token's exchange the
  spend book too -- everything pricing and budgets add to an exchange, off the
  request path.  The minimum over interleaved rounds (a shared machine).

    .venv/bin/python benchmarks/bench_pricing.py [--n 5000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_events import json_record, sse_record  # the script's folder is on sys.path
from bench_pump import NullBus, fresh
from genai_prices import Usage, calc_price
from twisted.internet.task import Clock

from llmproxy.access.budgets import SpendBook, SpendFile
from llmproxy.capture.events import RecordEnvelope
from llmproxy.capture.pump import CapturePump
from llmproxy.capture.record import ExchangeRecord
from llmproxy.config.model import CaptureSettings
from llmproxy.pricing import Pricer
from llmproxy.proxy.metrics import ProxyMetrics

USAGE = {
    "input_tokens": 1200,
    "output_tokens": 80,
    "total_tokens": 1280,
    "cache_read_tokens": 1024,
    "cache_creation_tokens": None,
}


def median_us(work: Callable[[], None], n: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.process_time()
        work()
        times.append(time.process_time() - started)
    return statistics.median(times) / n * 1e6


def plain_calc_price(n: int) -> None:
    usage = Usage(input_tokens=1200, output_tokens=80, cache_read_tokens=1024)
    for _ in range(n):
        calc_price(usage, "gpt-4o-mini", provider_id="openai")


def our_pricer(n: int) -> None:
    pricer = Pricer()
    cost = pricer.cost
    for _ in range(n):
        cost(
            route="openai",
            provider="openai",
            upstream_host="api.openai.com",
            model="gpt-4o-mini",
            usage=USAGE,
            when=1.8e9,
        )


def built_events(make: Callable[[], ExchangeRecord], n: int) -> list[tuple[ExchangeRecord, Any]]:
    """``n`` finished exchanges with their response events already built (the pump
    builds them whether or not it prices them)."""
    out = []
    for record, _ in fresh(make, n):
        envelope = RecordEnvelope("response", record, CaptureSettings())
        envelope.payload()
        out.append((record, envelope))
    return out


def pricing_step_us(
    make: Callable[[], ExchangeRecord], with_token: bool, n: int, rounds: int
) -> float:
    """CPU per exchange of what the pump does beyond building the event: the
    pricer, the metrics by project and model and (a token's exchange) the spend
    book.  Interleaved rounds, minimum: the machine is shared."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            pump = CapturePump(NullBus(), CaptureSettings(), Clock(), enabled=True)
            pump.pricer = Pricer()
            metrics = ProxyMetrics()
            book = SpendBook(SpendFile(Path(tmp) / "spend.json"))
            if with_token:
                access = _Charging(book)
                pump.spent = (metrics.spent, access.charge)
            else:
                pump.spent = (metrics.spent,)
            exchanges = built_events(make, n)
            for record, _ in exchanges:
                record.token_id = "tok_x" if with_token else None
                record.project = "proj" if with_token else None
            price = pump._price  # the step itself is what is measured
            started = time.process_time()
            for record, envelope in exchanges:
                price(record, envelope)
            times.append(time.process_time() - started)
            assert pump.pricing_errors == 0
            assert envelope.payload()["cost"] is not None
    return min(times) / n * 1e6


class _Charging:
    """TokenAccess.charge's work: the spend book's charge for the record's token."""

    def __init__(self, book: SpendBook) -> None:
        self.book = book

    def charge(self, record: ExchangeRecord, event: Any) -> None:
        self.book.charge(
            record.token_id or "-",
            record.project or "-",
            event.get("model"),
            event.get("usage"),
            event.get("cost"),
            record.started_at,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="exchanges per round")
    parser.add_argument("--rounds", type=int, default=9, help="rounds (the median is shown)")
    args = parser.parse_args()
    small = max(200, args.n // 10)
    calc = median_us(lambda: plain_calc_price(small), small, args.rounds)
    print(f"calc_price                               {calc:6.2f} us")
    ours = median_us(lambda: our_pricer(args.n), args.n, args.rounds)
    print(f"Pricer.cost                              {ours:6.2f} us")
    for name, make in (("json", json_record), ("sse", sse_record)):
        for with_token in (False, True):
            us = pricing_step_us(make, with_token, args.n, args.rounds)
            label = "token, budgets counted" if with_token else "no token"
            print(f"pricing step {name:4s} {label:23s} {us:6.2f} us per exchange")


if __name__ == "__main__":
    main()
