"""Memory of many concurrent idle SSE streams through llmproxy.

    .venv/bin/python benchmarks/idle_streams.py                      # 10,000 streams
    .venv/bin/python benchmarks/idle_streams.py --streams 5000 --workers 1

Starts the SSE mock in ``--hold`` mode (first event, then the stream stays open),
llmproxy in front of it (file sink on, ``workers`` as asked), and an asyncio
client that opens ``--streams`` streaming requests through the proxy, reads each
one's first event and then leaves it idle.  With every stream open it reads the
resident memory (VmRSS) of the proxy's processes, summed, and prints it with the
per-stream cost above the idle baseline; ``--json`` also writes the figures.

Each stream holds two sockets in the proxy (client and upstream): one process
needs ``2 x streams`` descriptors.  When the descriptor limit (``ulimit -n``) is
below that, ``--workers auto`` (the default) spreads the streams over enough
workers; the kernel balances connections between them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # the harness next to this file

OPEN_BATCH = 250  # connections opened at once: keeps the accept queues short


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


async def open_stream(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = run.STREAM_BODY
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stream refused: {head[:200]!r}")
    await reader.readuntil(b"\n\n")  # the first event (inside the first chunk)
    return reader, writer


async def hold_streams(port: int, path: str, count: int) -> list[Any]:
    held: list[Any] = []
    for start in range(0, count, OPEN_BATCH):
        n = min(OPEN_BATCH, count - start)
        held += await asyncio.gather(*(open_stream(port, path) for _ in range(n)))
        if start // OPEN_BATCH % 8 == 0:
            run.say(f"   {len(held):,} streams open")
    return held


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, default=10_000)
    p.add_argument("--workers", default="auto", help="llmproxy workers (auto: by fd limit)")
    p.add_argument("--no-sink", action="store_true", help="no exporter (capture off)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = p.parse_args(argv)

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    per_process = hard - 200
    if args.workers == "auto":
        workers = max(1, math.ceil(2 * args.streams / per_process))
        if workers > 1:  # the kernel's balance is not perfect: leave room
            workers = max(workers, math.ceil(2.4 * args.streams / per_process))
    else:
        workers = int(args.workers)
    if args.streams + 100 > hard:
        raise SystemExit(f"this client needs {args.streams + 100} descriptors; the limit is {hard}")

    with tempfile.TemporaryDirectory(prefix="llmproxy-idle-", ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        sse_port, port, admin = run.free_port(), run.free_port(), run.free_port()
        mock_argv = [
            str(run.VENV_PYTHON), str(run.SSE_MOCK), "--port", str(sse_port), "--hold",
            "--backlog", "4096",
        ]  # fmt: skip
        extra = [] if args.no_sink else run.FILE_SINK
        mocks = run.Mocks("", workdir, sse_port, sse_port, run.Placement.choose(pin=False))
        config = workdir / "llmproxy.ini"
        text = run.llmproxy_config(workdir, mocks, port, admin, extra, workers)
        text = text.replace(
            "drain_timeout = 30",
            f"drain_timeout = 10\nmax_connections = {args.streams + 1000}\nidle_timeout = 600\n"
            # Every stream comes from this one address.
            "max_connections_per_client = 0",
        )
        config.write_text(text)
        twistd = [
            str(run.VENV_TWISTD), "-n", "--pidfile=", "-l", str(workdir / "llmproxy.log"),
            "llmproxy", "--config", str(config),
        ]  # fmt: skip
        with (
            run.spawn("sse-mock", mock_argv, workdir) as mock,
            run.spawn("llmproxy", twistd, workdir, cwd=run.ROOT) as proxy,
        ):
            run.started(mock, run.port_open(sse_port))
            run.started(proxy, run.answers_200(f"http://127.0.0.1:{admin}/ready"))
            time.sleep(1.0)  # let every worker settle before the baseline
            baseline = rss_kib(proxy.pids())
            run.say(
                f"llmproxy up ({workers} worker(s), {len(proxy.pids())} processes), "
                f"RSS {baseline / 1024:.0f} MiB; opening {args.streams:,} streams"
            )
            t0 = time.monotonic()
            loop = asyncio.new_event_loop()
            held = loop.run_until_complete(
                hold_streams(port, run.SSE_PREFIX + run.CHAT_PATH, args.streams)
            )
            opened_s = time.monotonic() - t0
            time.sleep(2.0)
            loaded = rss_kib(proxy.pids())
            per_process = {pid: rss_kib([pid]) for pid in proxy.pids()}
            for _, writer in held:
                writer.close()
            loop.close()
            result = {
                "streams": len(held),
                "workers": workers,
                "sink": not args.no_sink,
                "rss_idle_mib": round(baseline / 1024, 1),
                "rss_loaded_mib": round(loaded / 1024, 1),
                "kib_per_stream": round((loaded - baseline) / max(1, len(held)), 1),
                "rss_by_process_mib": {str(k): round(v / 1024, 1) for k, v in per_process.items()},
                "open_seconds": round(opened_s, 1),
            }
        stopped = time.monotonic()
        result["stop_seconds"] = round(stopped - t0 - opened_s, 1)
        log_copy = Path(tempfile.gettempdir()) / "idle_streams-llmproxy.log"
        log_copy.write_bytes((workdir / "llmproxy.log").read_bytes())
    print(json.dumps(result, indent=2))
    print(
        f"| {result['streams']:,} idle SSE streams, {workers} worker(s) | "
        f"{result['rss_loaded_mib']:.0f} MiB total RSS ({result['rss_idle_mib']:.0f} MiB idle, "
        f"+{result['kib_per_stream']:.1f} KiB per stream) |"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
