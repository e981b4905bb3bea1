"""Small requests' latency while other clients flood the proxy with huge
conversation bodies (issue 15: one big conversation must not stall everyone).

    .venv/bin/python benchmarks/big_bodies.py
    .venv/bin/python benchmarks/big_bodies.py --side base=PYTHONPATH=/tmp/i15-base --side new=
    .venv/bin/python benchmarks/big_bodies.py --flood 24 --mib 26 --seconds 20

For each side (a daemon, optionally with its own environment, e.g. the old code
by PYTHONPATH) it starts llmproxy with the file sink (so events and the session
tracker are on, as in ``run.py``'s ``llmproxy-file``) in front of an nginx mock
that takes bodies of any size, then for ``--seconds``: ``--flood`` clients each
POST a ``--mib`` MiB chat body (one long conversation) back to back, while
``--small`` clients send small chat requests back to back and record their
latency.  It prints per side the small requests' count, p50, p99 and max, the
huge bodies sent, and the proxy's peak resident memory (VmHWM).

Sides run one after the other with the same mock.  Timing on a shared machine is
noisy: run it more than once.  Nothing is written anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # the harness next to this file

SMALL = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
).encode()


def big_body(mib: int) -> bytes:
    turn = "lorem ipsum dolor sit amet " * 74  # ~2 KB a message
    messages = []
    size = 0
    while size < mib * 1024 * 1024:
        role = "user" if len(messages) % 2 == 0 else "assistant"
        messages.append({"role": role, "content": turn})
        size += len(turn) + 32
    messages.append({"role": "user", "content": "and now?"})
    return json.dumps({"model": "gpt-4o", "messages": messages}).encode()


def mock_conf(workdir: Path, port: int) -> str:
    body = json.dumps(run.CHAT_COMPLETION, separators=(",", ":"))
    server = f"""\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size 0;
        client_body_buffer_size 1m;
        location = {run.CHAT_PATH} {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}"""
    return run._NGINX_MAIN.format(dir=workdir, body=server)


async def post(port: int, body: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (run.CHAT_PATH.encode(), len(body))
        )
        writer.write(body)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.read()
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()


async def small_client(port: int, until: float, latencies: list[float], codes: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (run.CHAT_PATH.encode(), len(SMALL), SMALL)
    )
    try:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(
                next(
                    line.split(b":", 1)[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
            )
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            codes.append(int(head.split(b" ", 2)[1]))
    finally:
        writer.close()


async def flood_client(port: int, until: float, body: bytes, sent: list[int]) -> None:
    while time.monotonic() < until:
        sent.append(await post(port, body))


def flood(port: int, seconds: float, clients: int, mib: int, out: Any) -> None:
    """The flood, in a process of its own: its copying must not delay the
    measuring client's event loop."""

    async def go() -> list[int]:
        body = big_body(mib)
        until = time.monotonic() + seconds
        sent: list[int] = []
        await asyncio.gather(*(flood_client(port, until, body, sent) for _ in range(clients)))
        return sent

    out.put(asyncio.run(go()))


async def measure(port: int, args: argparse.Namespace) -> dict[str, Any]:
    # Warm up: the proxy's first requests pay for imports and connections.
    await asyncio.gather(*(post(port, SMALL) for _ in range(20)))
    results: Any = multiprocessing.Queue()
    flooding = multiprocessing.Process(
        target=flood, args=(port, args.seconds, args.flood, args.mib, results)
    )
    flooding.start()
    await asyncio.sleep(1.0)  # the first huge bodies under way
    until = time.monotonic() + args.seconds - 1.0
    latencies: list[float] = []
    codes: list[int] = []
    await asyncio.gather(
        *(small_client(port, until, latencies, codes) for _ in range(args.small)),
    )
    sent: list[int] = await asyncio.get_running_loop().run_in_executor(None, results.get)
    flooding.join()
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    return {
        "small": len(ms),
        "small_not_200": sum(1 for c in codes if c != 200),
        "p50_ms": round(statistics.median(ms), 2) if ms else None,
        "p99_ms": round(ms[int(len(ms) * 0.99) - 1], 2) if ms else None,
        "max_ms": round(ms[-1], 2) if ms else None,
        "big_sent": len(sent),
        "big_not_200": sum(1 for c in sent if c != 200),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--side", action="append", default=None, metavar="NAME=K=V,...")
    p.add_argument("--flood", type=int, default=8, help="clients sending huge bodies")
    p.add_argument("--mib", type=int, default=26, help="size of each huge body")
    p.add_argument("--small", type=int, default=4, help="clients sending small requests")
    p.add_argument("--seconds", type=float, default=15.0)
    args = p.parse_args(argv)
    sides: list[tuple[str, dict[str, str]]] = []
    for text in args.side or ["this="]:
        name, _, env_text = text.partition("=")
        env = dict(pair.split("=", 1) for pair in env_text.split(",") if pair)
        sides.append((name, env))
    nginx, _ = run.ensure_tools(allow_install=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="llmproxy-bigbody-") as tmp:
        workdir = Path(tmp)
        mock_port = run.free_port()
        with run.run_nginx("mock", nginx, workdir, mock_conf(workdir, mock_port), mock_port):
            for name, env in sides:
                port, admin = run.free_port(), run.free_port()
                side_dir = workdir / f"side-{name}"
                side_dir.mkdir()
                config = side_dir / "llmproxy.ini"
                config.write_text(
                    f"[server]\nlisten = tcp:{port}:interface=127.0.0.1\n"
                    f"admin_listen = tcp:{admin}:interface=127.0.0.1\n"
                    f"state_dir = {side_dir / 'state'}\nmax_body_bytes = 64MiB\n\n"
                    f"[route:mock]\nprefix = /\nupstream = http://127.0.0.1:{mock_port}\n"
                    "provider = openai\n\n[exporter:events]\ntype = file\npath = events.jsonl\n"
                )
                argv_ = [
                    str(run.VENV_TWISTD), "-n", "--pidfile=", "-l", "/dev/null",
                    "llmproxy", "--config", str(config),
                ]  # fmt: skip
                with run.spawn(name, argv_, workdir, cwd=run.ROOT, extra_env=env) as server:
                    run.started(server, run.answers_200(f"http://127.0.0.1:{admin}/ready"))
                    results[name] = asyncio.run(measure(port, args))
                    peak = run.peak_rss_kib(server.pids())
                    results[name]["peak_rss_mib"] = round((peak or 0) / 1024, 1)
                print(f"{name}: {json.dumps(results[name])}", flush=True)
    print(
        f"\n{args.flood} clients x {args.mib} MiB bodies, {args.small} small-request clients, "
        f"{args.seconds:g} s"
    )
    print(f"{'side':<10} {'small':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'big sent':>8} {'peak RSS MiB':>12}")  # fmt: skip
    for name, r in results.items():
        print(
            f"{name:<10} {r['small']:>6} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['max_ms']:>8} "
            f"{r['big_sent']:>8} {r['peak_rss_mib']:>12}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
