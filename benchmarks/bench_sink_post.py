"""Microbenchmark: CPU per batch POST of the HTTP sinks' client (no tests: benchmark tool).

    .venv/bin/python benchmarks/bench_sink_post.py [--n 400] [--rounds 3] [--kib 30]

A receiver answering 204 runs in a child process (its CPU is not counted); this
process POSTs a ``--kib`` KiB body to it over one kept-alive connection, one
request at a time, with treq's ``HTTPClient`` and with llmproxy's ``AgentClient``
(``llmproxy/export/sink.py``) in turns, and prints this process's CPU time per
POST, request and answer (``treq.content``) included: what one batch sent to
Loki, Lunary, Helicone or an OTLP collector costs the proxy's core.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool

from llmproxy.export.sink import AgentClient

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # the harness next to this file: free ports, child processes

RECEIVER = """
import sys
from twisted.internet import reactor
from twisted.web import resource, server

class Push(resource.Resource):
    isLeaf = True
    def render_POST(self, request):
        request.content.read()
        request.setResponseCode(204)
        return b""

reactor.listenTCP(int(sys.argv[1]), server.Site(Push()), interface="127.0.0.1")
reactor.run()
"""


async def measure(args: argparse.Namespace, url: str) -> None:
    pool = HTTPConnectionPool(reactor, persistent=True)
    agent = Agent(reactor, pool=pool)
    clients: dict[str, Any] = {"treq": HTTPClient(agent), "AgentClient": AgentClient(agent)}
    body = os.urandom(args.kib * 1024)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, client in clients.items():
            for _ in range(20):  # warm: the connection, caches
                await treq.content(await client.request("POST", url, data=body, headers=headers))
            started = time.process_time()
            for _ in range(args.n):
                await treq.content(await client.request("POST", url, data=body, headers=headers))
            us = (time.process_time() - started) / args.n * 1e6
            best[name] = min(best.get(name, us), us)
    for name, us in best.items():
        print(f"{name:12s} {us:7.1f} us of CPU per POST (best of {args.rounds} rounds)")
    await pool.closeCachedConnections()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="POSTs per round and client")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kib", type=int, default=30, help="body size")
    args = p.parse_args()
    port = run.free_port()
    with (
        tempfile.TemporaryDirectory(prefix="bench-sink-post-") as tmp,
        run.spawn("receiver", [sys.executable, "-c", RECEIVER, str(port)], Path(tmp)) as receiver,
    ):
        run.started(receiver, run.port_open(port))
        d = defer.ensureDeferred(measure(args, f"http://127.0.0.1:{port}/loki/api/v1/push"))
        d.addErrback(lambda f: f.printTraceback())
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
        reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
