"""Microbenchmark: the spool's bookkeeping with many segments on disk.

    .venv/bin/python benchmarks/bench_spool.py --segments 10000

A long sink outage leaves one segment per batch (10,000 segments are a million
events).  The exporter asks the spool for its oldest segment on every dispatch
and reserves room for every write; both must not grow with the number of
segments, or the outage itself becomes a stall on the reactor.  Prints the µs
per ``oldest()`` and per ``begin()`` (a write's reservation).  Nothing here is
a test.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from llmproxy.config.model import ExporterSettings
from llmproxy.events.envelope import StoredEvent
from llmproxy.export.deadletter import DeadLetter
from llmproxy.export.exporter import BatchingExporter
from llmproxy.export.spool import Spool
from llmproxy.export.verdict import Retry, Verdict


class FailingSink:
    name = "failing"

    def deliver(self, events: Any) -> Deferred[Verdict]:
        return succeed(Retry("HTTP 503"))

    def close(self) -> Deferred[None]:
        return succeed(None)


def persist_ms(directory: Path, rounds: int = 15) -> tuple[float, float]:
    """Median and best CPU ms to spool 1,000 queued events while failing."""
    clock = Clock()
    settings = ExporterSettings(
        name="bench", type="bench", batch_size=100, flush_interval=1000.0,
        spool_interval=1.0, backoff_min=500.0, backoff_max=500.0, max_retries=1000,
        buffer=100_000,
    )  # fmt: skip
    exporter = BatchingExporter(
        settings, FailingSink(), clock, Spool(directory / "persist", 10**12),
        DeadLetter(directory / "dead.jsonl", "bench"), lambda: 0.0,
        run_blocking=lambda work: Deferred(),  # the thread's part is not measured
    )  # fmt: skip
    exporter.start()
    event = {"type": "response", "text": "x" * 2400}
    exporter.publish(StoredEvent(dict(event)))
    clock.advance(1000.0)  # sent, answered 503: failing
    times = []
    for _ in range(rounds):
        for i in range(1000):
            stored = StoredEvent(dict(event, i=i))
            stored.json()  # encoded when published, as the capture pump does
            exporter.publish(stored)
        started = time.thread_time()
        clock.advance(1.0)  # the spool_interval tick, and every step it schedules
        times.append((time.thread_time() - started) * 1000)
    return statistics.median(times), min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=10_000)
    args = parser.parse_args(argv)
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    directory = Path(tempfile.mkdtemp(prefix="bench-spool-", dir=base))
    try:
        for i in range(args.segments):
            (directory / f"{i * 100}-{i * 100 + 99}-100.jsonl").write_bytes(b"{}\n")
        spool = Spool(directory, 10**12)
        started = time.perf_counter()
        for _ in range(1000):
            spool.oldest()
        oldest = (time.perf_counter() - started) / 1000 * 1e6
        started = time.perf_counter()
        for k in range(200):
            first = args.segments * 100 + k
            pending, _ = spool.begin([b"{}"], first, first)
            assert pending is not None
            spool.abort(pending)
        begin = (time.perf_counter() - started) / 200 * 1e6
        print(f"{args.segments:,} segments: oldest() {oldest:.1f} us, begin() {begin:.1f} us")
        median, best = persist_ms(directory)
        print(
            f"a tick spooling 1,000 events of 2.4 KB: {median:.2f} ms CPU median, {best:.2f} best"
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
