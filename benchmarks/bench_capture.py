"""Microbenchmark: the CPU one exchange's capture costs, from record to written line
(no tests: benchmark tool).

Feeds finished exchange records through the real capture pipeline as the daemon
runs it with the file sink and default settings: the capture pump
(``request_started`` + ``request_finished``, then one ``flush()`` per reactor
turn of ``--turn`` exchanges: the session tracker, both events built and encoded
once), then each event's JSON line written by the file sink (``deliver_lines``,
one batch per ``--batch`` events, ``fsync = never``, into a temporary file).
The relay itself (HTTP both ways) is not included: this is what capture adds.

Shapes:

- ``json``: a small chat completion (JSON request and reply);
- ``sse100``: the recorded 100-chunk OpenAI stream (the role chunk, 97 content
  deltas, the finish chunk, a usage chunk and ``data: [DONE]``; 17.8 KB:
  ``sse_mock.recorded_stream()``, what benchmarks/run.py streams), each event
  arriving as its own read, as a model paces it;
- ``sse100-burst``: the same bytes arriving in 16 KiB reads, as a local mock
  sends them in one write.

    .venv/bin/python benchmarks/bench_capture.py [--n 2000] [--rounds 7] [--shape sse100]
    .venv/bin/python benchmarks/bench_capture.py --profile [--shape sse100]
    .venv/bin/python benchmarks/bench_capture.py --split   # where the CPU goes, by stage

Prints the median (and best) over ``rounds`` of CPU microseconds
(``time.process_time``) per exchange.  ``--profile`` prints a cProfile listing;
``--split`` times each stage alone (SSE splitting, JSON parsing of the chunks,
the merge, event building, encoding, the write), for docs/performance.md.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from bench_events import _record, _request_body  # the script's folder is on sys.path
from bench_pump import fresh
from recorded import recorded_stream
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from llmproxy.capture.events import RecordEnvelope
from llmproxy.capture.pump import CapturePump
from llmproxy.capture.record import ExchangeRecord
from llmproxy.capture.sessions import SessionTracker
from llmproxy.config.model import CaptureSettings
from llmproxy.export.sinks.file import FileSink

CAPTURE = CaptureSettings()
SSE_FRAMES = recorded_stream()
SSE_BODY = b"".join(SSE_FRAMES)
READ_SIZE = 16384


def json_record() -> ExchangeRecord:
    from bench_events import json_record as make

    return make()


def sse100_record() -> ExchangeRecord:
    chunks = [(0.001 + i * 0.0001, frame) for i, frame in enumerate(SSE_FRAMES)]
    return _record(_request_body(True), b"text/event-stream; charset=utf-8", chunks)


def sse100_burst_record() -> ExchangeRecord:
    reads = [SSE_BODY[at : at + READ_SIZE] for at in range(0, len(SSE_BODY), READ_SIZE)]
    chunks = [(0.001 + i * 0.0001, read) for i, read in enumerate(reads)]
    return _record(_request_body(True), b"text/event-stream; charset=utf-8", chunks)


SHAPES: dict[str, Callable[[], ExchangeRecord]] = {
    "json": json_record,
    "sse100": sse100_record,
    "sse100-burst": sse100_burst_record,
}


class CollectingBus:
    """Keeps what the pump publishes, for the sink to write."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    def publish(self, envelope: Any) -> None:
        self.envelopes.append(envelope)


class Pipeline:
    def __init__(self, path: Path, batch: int) -> None:
        clock = Clock()
        self.bus = CollectingBus()
        sessions = SessionTracker(
            publish=self.bus.publish, store_path=None, max_states=100000, clock=clock
        )
        self.pump = CapturePump(self.bus, CAPTURE, clock, enabled=True, sessions=sessions)
        self.sink = FileSink(
            "bench", path, fsync="never", rotate_bytes=0, run_blocking=maybeDeferred
        )
        self.batch = batch

    def run(self, records: list[tuple[ExchangeRecord, bytes]], turn: int) -> None:
        started = self.pump.request_started
        finished = self.pump.request_finished
        flush = self.pump.flush
        bus = self.bus
        deliver = self.sink.deliver_lines
        batch = self.batch
        for at in range(0, len(records), turn):
            for record, body in records[at : at + turn]:
                started(record, body)
                finished(record)
            flush()
            if len(bus.envelopes) >= batch:
                taken, bus.envelopes = bus.envelopes, []
                # The exporter hands the sink each event's memoised JSON.
                deliver([], [envelope.json() for envelope in taken])
        if bus.envelopes:
            deliver([], [envelope.json() for envelope in bus.envelopes])
            bus.envelopes = []


def per_exchange_us(
    make: Callable[[], ExchangeRecord], n: int, turn: int, batch: int, rounds: int, tmp: Path
) -> list[float]:
    """CPU microseconds per exchange of each round (process time: all threads)."""
    times = []
    for index in range(rounds):
        pipeline = Pipeline(tmp / f"events-{index}.jsonl", batch)
        records = fresh(make, n)
        started = time.process_time()
        pipeline.run(records, turn)
        times.append((time.process_time() - started) / n * 1e6)
        assert pipeline.pump.errors == 0 and not pipeline.pump.pending()
        pipeline.sink.close()
        (tmp / f"events-{index}.jsonl").unlink()
    return times


def profile(make: Callable[[], ExchangeRecord], n: int, turn: int, batch: int, tmp: Path) -> None:
    pipeline = Pipeline(tmp / "profile.jsonl", batch)
    records = fresh(make, n)
    profiler = cProfile.Profile()
    profiler.enable()
    pipeline.run(records, turn)
    profiler.disable()
    pipeline.sink.close()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)


def _time(func: Callable[[], object], n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        func()
    return (time.process_time() - started) / n * 1e6


def split(make: Callable[[], ExchangeRecord], n: int) -> None:
    """Each stage of one exchange's capture timed alone (best of 5), µs per exchange."""
    from llmproxy.capture.events import _fast_stream_capture
    from llmproxy.capture.sessions import reply_facts
    from llmproxy.events.sse import sse_blocks, sse_fields
    from llmproxy.events.usage import _merge, facts_from_sse_bytes

    record = make()
    chunks = record.response_chunks
    body = b"".join(c for _, c in chunks)
    text = body.decode()
    fields = sse_fields(body)
    datas = [d for _, d in fields if d[:1] == "{"]
    stages: dict[str, Callable[[], object]] = {}
    if b"data: " in body:
        stages.update(
            {
                "reading the reply (the tracker: split, templates, facts)": lambda: (
                    facts_from_sse_bytes(body)
                ),
                "  (for scale: splitting at every blank line)": lambda: sse_blocks(text),
                "  (the same, parsing every chunk: no templates)": lambda: _merge(
                    sse_fields(body), templates=False
                ).facts(),
                "  (orjson.loads of every chunk alone)": lambda: [orjson.loads(d) for d in datas],
                "the event's chunk list (offset and text per read)": lambda: _fast_stream_capture(
                    chunks, None, CAPTURE.response_body_bytes, False
                ),
            }
        )
    read = make()  # a record the tracker has read: its summary for the events
    reply_facts(read)
    fresh: list[ExchangeRecord] = []  # records built before each stage's timing

    def reading() -> None:
        reply_facts(fresh.pop())

    def events() -> None:
        record = fresh.pop()
        record.reply_summary = read.reply_summary
        RecordEnvelope("request", record, CAPTURE).payload()
        RecordEnvelope("response", record, CAPTURE).payload()

    if b"data: " not in body:
        stages["reading the reply (the tracker: JSON)"] = reading
    stages["both events built (dicts, given the tracker's summary)"] = events
    request = RecordEnvelope("request", make(), CAPTURE)
    envelope = RecordEnvelope("response", make(), CAPTURE)
    payloads = (request.payload(), envelope.payload())
    stages["both events encoded (orjson.dumps)"] = lambda: [orjson.dumps(p) for p in payloads]
    line = envelope.json()
    with tempfile.TemporaryDirectory() as tmp:
        sink = FileSink(
            "bench", Path(tmp) / "split.jsonl", fsync="never", rotate_bytes=0,
            run_blocking=maybeDeferred,
        )  # fmt: skip
        lines = [line] * 100
        stages["the response line written (in batches of 100)"] = lambda: sink.deliver_lines(
            [], lines
        )
        for name, func in stages.items():
            per = 100 if "batches of 100" in name else 1
            times = []
            for _ in range(5):
                fresh[:] = [make() for _ in range(n // per)]
                times.append(_time(func, n // per) / per)
            best = min(times)
            print(f"  {name:58s} {best:8.1f} us")
        sink.close()
    sizes = f"stream {len(body):,} bytes in {len(chunks)} reads"
    print(f"  (response event line: {len(line):,} bytes; {sizes})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="exchanges per round")
    parser.add_argument("--turn", type=int, default=50, help="exchanges per pump flush")
    parser.add_argument("--batch", type=int, default=100, help="events per file write")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (median and best shown)")
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="default: all")
    parser.add_argument("--profile", action="store_true", help="print a cProfile listing")
    parser.add_argument("--split", action="store_true", help="time each stage alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shape or list(SHAPES):
            make = SHAPES[name]
            if args.split:
                print(f"{name}:")
                split(make, args.n)
                continue
            times = per_exchange_us(make, args.n, args.turn, args.batch, args.rounds, Path(tmp))
            print(
                f"{name:13s} {statistics.median(times):8.1f} us per exchange"
                f" (best {min(times):.1f}, {args.rounds} rounds of {args.n})"
            )
            if args.profile:
                profile(make, min(args.n, 2000), args.turn, args.batch, Path(tmp))


if __name__ == "__main__":
    main()
