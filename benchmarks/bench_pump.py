"""Microbenchmark: the capture pump's work per exchange (no tests: benchmark tool).

Measures what one reactor turn of :class:`~llmproxy.capture.pump.CapturePump`
costs per exchange: ``request_started`` + ``request_finished`` for each exchange
of a turn, then one ``flush()``, which runs the session tracker (when there is
one) and builds and encodes the ``request`` and ``response`` events.  The bus
keeps nothing.  Each exchange is a fresh record (a new request id, no session
yet), so nothing is memoised across exchanges; with a tracker, every exchange is
a one-shot conversation: a new session and its ``session_start`` event.

Shapes (from bench_events.py): ``json``, a small chat completion; ``sse``, the
same call streamed.

    .venv/bin/python benchmarks/bench_pump.py [--n 5000] [--turn 50] [--rounds 9] [--profile]

Prints the median over ``rounds`` of CPU microseconds per exchange;
``--profile`` adds a cProfile listing of each case.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench_events import json_record, sse_record  # the script's folder is on sys.path
from twisted.internet.task import Clock

from llmproxy.capture.pump import CapturePump
from llmproxy.capture.record import ExchangeRecord
from llmproxy.capture.sessions import SessionTracker
from llmproxy.config.model import CaptureSettings

_ids = itertools.count()


class NullBus:
    """A bus that keeps nothing."""

    def publish(self, envelope: Any) -> None:
        pass


def fresh(make: Callable[[], ExchangeRecord], n: int) -> list[tuple[ExchangeRecord, bytes]]:
    """``n`` records with their own request ids and no session yet, with their bodies."""
    records = []
    for _ in range(n):
        record = make()
        record.request_id = f"bench{next(_ids):016x}"
        record.session_id = None
        record.seq = None
        records.append((record, record.request_body))
    return records


def make_pump(with_sessions: bool) -> CapturePump:
    clock = Clock()
    sessions = (
        SessionTracker(publish=NullBus().publish, store_path=None, max_states=100000, clock=clock)
        if with_sessions
        else None
    )
    return CapturePump(NullBus(), CaptureSettings(), clock, enabled=True, sessions=sessions)


def run(pump: CapturePump, records: list[tuple[ExchangeRecord, bytes]], turn: int) -> None:
    started = pump.request_started
    finished = pump.request_finished
    flush = pump.flush
    for at in range(0, len(records), turn):
        for record, body in records[at : at + turn]:
            started(record, body)
            finished(record)
        flush()


def per_exchange_us(
    make: Callable[[], ExchangeRecord], with_sessions: bool, n: int, turn: int, rounds: int
) -> float:
    """Median over ``rounds`` of CPU microseconds per exchange (process time: what
    an exchange costs the proxy's core, whatever else the machine runs)."""
    times = []
    for _ in range(rounds):
        pump = make_pump(with_sessions)
        records = fresh(make, n)
        started = time.process_time()
        run(pump, records, turn)
        times.append(time.process_time() - started)
        assert pump.errors == 0 and not pump.pending()
    return statistics.median(times) / n * 1e6


def profile(make: Callable[[], ExchangeRecord], with_sessions: bool, n: int, turn: int) -> None:
    pump = make_pump(with_sessions)
    records = fresh(make, n)
    profiler = cProfile.Profile()
    profiler.enable()
    run(pump, records, turn)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="exchanges per round")
    parser.add_argument("--turn", type=int, default=50, help="exchanges per flush")
    parser.add_argument("--rounds", type=int, default=9, help="rounds (the median is shown)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile listing")
    args = parser.parse_args()
    cases = {"json": json_record, "sse": sse_record}
    for name, make in cases.items():
        for with_sessions in (False, True):
            us = per_exchange_us(make, with_sessions, args.n, args.turn, args.rounds)
            label = "sessions" if with_sessions else "no sessions"
            print(f"{name:5s} {label:12s} {us:8.2f} us per exchange")
            if args.profile:
                profile(make, with_sessions, min(args.n, 2000), args.turn)


if __name__ == "__main__":
    main()
