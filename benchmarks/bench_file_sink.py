"""Microbenchmark: what following its path costs the file sink (no tests: benchmark tool).

Writes batches of ``--batch`` events (~670 bytes each, pre-encoded, as the
exporter hands them over) with ``fsync = never`` into a temporary file, once as
the sink is (one ``os.stat`` of the path per batch, to notice a file moved aside
or deleted) and once with that check skipped, rounds interleaved so the noise of
a shared machine falls on both.  Prints the median and best wall-clock
microseconds per batch of each, and the cost of the check alone.

    .venv/bin/python benchmarks/bench_file_sink.py [--batches 1000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import orjson
from twisted.internet.defer import maybeDeferred

from llmproxy.export.appendfile import displaced
from llmproxy.export.sinks.file import FileSink

EVENT: dict[str, Any] = {
    "schema": 1,
    "type": "response",
    "request_id": "d2c1a8e0f3b54a6c",
    "body": "x" * 600,
}


@attrs.define
class UncheckedFileSink(FileSink):
    """The sink without the per-batch look at its path: the baseline."""

    def _follow_path(self) -> None:
        pass


def per_batch(sink_class: type[FileSink], path: Path, batch: int, batches: int) -> float:
    events = [EVENT] * batch
    lines = [orjson.dumps(e) for e in events]
    sink = sink_class("bench", path, fsync="never", rotate_bytes=0, run_blocking=maybeDeferred)
    sink.deliver_lines(events, lines)  # opens the file
    started = time.perf_counter()
    for _ in range(batches):
        sink.deliver_lines(events, lines)
    elapsed = time.perf_counter() - started
    sink.close()
    path.unlink()
    return elapsed / batches * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100, help="events per batch")
    parser.add_argument("--batches", type=int, default=1000, help="batches per round")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of each")
    args = parser.parse_args()
    results: dict[str, list[float]] = {"checked": [], "unchecked": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.jsonl"
        for n in range(args.rounds):
            order = [FileSink, UncheckedFileSink] if n % 2 else [UncheckedFileSink, FileSink]
            for sink_class in order:
                key = "checked" if sink_class is FileSink else "unchecked"
                results[key].append(per_batch(sink_class, path, args.batch, args.batches))
        sink = FileSink("bench", path, fsync="never", run_blocking=maybeDeferred)
        sink.deliver([EVENT])
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
