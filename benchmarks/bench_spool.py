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
import tempfile
import time
from pathlib import Path

from llmproxy.export.spool import Spool


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
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
