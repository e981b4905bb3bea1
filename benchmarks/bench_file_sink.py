"""Microbenchmark: what the file sink's write costs (no tests: benchmark tool).

Writes batches of ``--batch`` events (``--event-bytes`` each, ~670 by default;
a 100-chunk stream's response event is ~23,000; pre-encoded, as the exporter
hands them over) with ``fsync = never`` into a temporary file, rounds
interleaved so the noise of a shared machine falls on all three:

- ``checked``: the sink as it is: one ``os.stat`` of the path per batch (to
  notice a file moved aside or deleted), then the lines and their newlines in
  one ``writev``;
- ``unchecked``: the same with the path check skipped;
- ``joined``: the lines joined into one buffer and that written, as the sink
  did before: a batch near ``batch_bytes`` (1 MiB) is a buffer ``malloc``
  takes from ``mmap``, every page of it faulted in and handed back per batch.

Prints the median and best wall-clock microseconds per batch of each, and the
cost of the check alone.

    .venv/bin/python benchmarks/bench_file_sink.py [--batches 1000] [--rounds 20]
    .venv/bin/python benchmarks/bench_file_sink.py --batch 45 --event-bytes 23000 --batches 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import orjson
from twisted.internet.defer import maybeDeferred

from llmproxy.export.appendfile import displaced
from llmproxy.export.sinks import file as file_module
from llmproxy.export.sinks.file import FileSink


def make_event(size: int) -> dict[str, Any]:
    event: dict[str, Any] = {"schema": 1, "type": "response", "request_id": "d2c1a8e0f3b54a6c"}
    event["body"] = "x" * max(0, size - len(orjson.dumps({**event, "body": ""})))
    return event


def _write_joined(fd: int, lines: Any) -> None:
    view = memoryview(b"\n".join(lines) + b"\n")
    while view:
        view = view[os.write(fd, view) :]


@attrs.define
class UncheckedFileSink(FileSink):
    """The sink without the per-batch look at its path: the baseline."""

    def _follow_path(self) -> None:
        pass


def per_batch(variant: str, path: Path, event: dict[str, Any], batch: int, batches: int) -> float:
    events = [event] * batch
    lines = [orjson.dumps(e) for e in events]
    sink_class = UncheckedFileSink if variant == "unchecked" else FileSink
    sink = sink_class("bench", path, fsync="never", rotate_bytes=0, run_blocking=maybeDeferred)
    sink.deliver_lines(events, lines)  # opens the file
    write_lines = file_module._write_lines
    if variant == "joined":
        file_module._write_lines = _write_joined
    try:
        started = time.perf_counter()
        for _ in range(batches):
            sink.deliver_lines(events, lines)
        elapsed = time.perf_counter() - started
    finally:
        file_module._write_lines = write_lines
    sink.close()
    path.unlink()
    return elapsed / batches * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100, help="events per batch")
    parser.add_argument("--batches", type=int, default=1000, help="batches per round")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of each")
    parser.add_argument("--event-bytes", type=int, default=670, help="one event's JSON")
    args = parser.parse_args()
    event = make_event(args.event_bytes)
    results: dict[str, list[float]] = {"checked": [], "unchecked": [], "joined": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.jsonl"
        for n in range(args.rounds):
            order = list(results)[n % 3 :] + list(results)[: n % 3]
            for key in order:
                results[key].append(per_batch(key, path, event, args.batch, args.batches))
        sink = FileSink("bench", path, fsync="never", run_blocking=maybeDeferred)
        sink.deliver([event])
        fd, identity = sink._fd, sink._identity
        assert fd is not None
        calls = 100_000
        started = time.perf_counter()
        for _ in range(calls):
            displaced(path, fd, identity)
        check = (time.perf_counter() - started) / calls * 1e6
        sink.close()
    for key, values in results.items():
        print(
            f"{key:>9}: median {statistics.median(values):6.1f} us,"
            f" best {min(values):6.1f} us per batch of {args.batch}"
        )
    print(f"the check alone (os.stat + compare): {check:.2f} us per batch")


if __name__ == "__main__":
    main()
