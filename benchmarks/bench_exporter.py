"""Microbenchmark: the exporter core's own cost per event (no tests: benchmark tool).

A ``BatchingExporter`` with default settings, on a ``Clock``, in front of a sink
that answers every batch ``Delivered()`` at once; the envelopes carry their JSON
already encoded, so what is measured is ``publish``, batching, the delivery
bookkeeping and the accounting, nothing of event building or I/O.

    .venv/bin/python benchmarks/bench_exporter.py [--n 100000] [--turn 50] [--profile]

Events are published ``--turn`` at a time (the requests one reactor turn finishes
at a concurrency of about that many), then the clock advances, as the reactor
would, to run the batching the publishes scheduled; ``stats()`` is read every
1000 events (a metrics scrape is rarer).  Prints CPU microseconds per event.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from llmproxy.config.model import ExporterSettings
from llmproxy.export.deadletter import DeadLetter
from llmproxy.export.exporter import BatchingExporter
from llmproxy.export.verdict import Delivered, Verdict

EVENT: dict[str, Any] = {
    "schema": 1,
    "type": "response",
    "ts": "2026-11-23T07:40:12.873456000Z",
    "request_id": "d2c1a8e0f3b54a6c",
    "route": "openai",
    "status": 200,
    "response_body": {"text": "x" * 600},
}
ENCODED = orjson.dumps(EVENT)


@attrs.frozen
class PrecomputedEnvelope:
    """An envelope whose payload and JSON are ready: no encoding in the measurement."""

    kind: str
    size_hint: int
    _payload: dict[str, Any]
    _json: bytes

    def payload(self) -> dict[str, Any]:
        return self._payload

    def json(self) -> bytes:
        return self._json


@attrs.define
class InstantSink:
    """Every batch delivered, answered before ``deliver`` returns."""

    name: str = "instant"
    events: int = 0

    def deliver(self, events: Sequence[dict[str, Any]]) -> Deferred[Verdict]:
        self.events += len(events)
        return succeed(Delivered())

    def close(self) -> Deferred[None]:
        return succeed(None)


def run(n: int, turn: int, state_dir: Path) -> tuple[float, dict[str, Any]]:
    """CPU seconds to publish and deliver ``n`` events, and the final stats."""
    clock = Clock()
    sink = InstantSink()
    exporter = BatchingExporter(
        ExporterSettings(name="bench", type="bench"),
        sink,
        clock,
        None,
        DeadLetter(state_dir / "dead.jsonl", "bench"),
    )
    envelopes = [
        PrecomputedEnvelope("response", len(ENCODED) + 64, EVENT, ENCODED) for _ in range(n)
    ]
    exporter.start()
    started = time.process_time()
    publish = exporter.publish
    for first in range(0, n, turn):
        for envelope in envelopes[first : first + turn]:
            publish(envelope)
        clock.advance(0)
        if first % 1000 < turn:
            exporter.stats()
    clock.advance(1.0)  # the flush timer sends the last partial batch
    elapsed = time.process_time() - started
    exporter.stop(1.0)
    clock.advance(1.0)
    stats = exporter.stats()
    assert sink.events == n == stats["sent"], stats
    return elapsed, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="events to publish")
    parser.add_argument("--turn", type=int, default=50, help="publishes per reactor turn")
    parser.add_argument("--rounds", type=int, default=5, help="runs; the best is reported")
    parser.add_argument("--profile", action="store_true", help="print a cProfile listing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        best = min(run(args.n, args.turn, Path(tmp))[0] for _ in range(args.rounds))
        _, stats = run(args.n, args.turn, Path(tmp))
        print(
            f"exporter core: {best / args.n * 1e6:.3f} us per event"
            f"  ({args.n} events, {stats['batches_sent']} batches)"
        )
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            run(args.n, args.turn, Path(tmp))
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
