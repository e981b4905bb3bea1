"""Microbenchmark: CPU per batch POST of the HTTP sinks' client (no tests: benchmark tool).

    .venv/bin/python benchmarks/bench_sink_post.py [--n 400] [--rounds 5] [--kib 30] [--steps]

A receiver answering 204 runs in a child process (its CPU is not counted); this
process POSTs a ``--kib`` KiB body to it over one kept-alive connection, one
request at a time, with each client in turns, and prints this process's CPU
time per POST, request and answer included (best of ``--rounds``): what one
batch sent to Loki, Lunary, Helicone or an OTLP collector costs the proxy's core.
Before that, the same clients over an agent that answers at once, without I/O:
the CPU of each client's own layers alone, a steadier figure on a busy machine.

- ``Agent``: Twisted's pooled ``Agent`` alone (the floor: no redirect policy,
  no gzip answers, no cookie jar);
- ``treq tuned``: what the sinks use (``llmproxy/export/http.py``), called as
  ``HTTPSink.post`` calls it (the URL parsed once);
- ``treq default``: treq's ``HTTPClient`` as it comes.

``Agent`` and ``treq tuned`` read the answer as the sinks do (``read_answer``,
within ``ANSWER_LIMIT``), the others with ``treq.content``.

``--steps`` adds treq with one tuning more at a time, to show what each is worth.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import treq
from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from llmproxy.export.http import BytesBody, NoCookies, read_answer, sink_http_client
from llmproxy.export.sink import ANSWER_LIMIT

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


HEADERS = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
Post = Callable[[str, bytes], "defer.Deferred[Any]"]


def clients(agent: Agent, steps: bool) -> dict[str, Post]:
    """Each client as one POST, answer read: name -> post(url, body)."""
    no_cookies = NoCookies()
    parsed: dict[str, EncodedURL] = {}

    def parse(url: str) -> EncodedURL:
        if url not in parsed:
            parsed[url] = EncodedURL.from_text(url)
        return parsed[url]

    def raw(url: str, body: bytes) -> defer.Deferred[Any]:
        headers = Headers({k: [v] for k, v in HEADERS.items()})
        d = agent.request(b"POST", url.encode("ascii"), headers, BytesBody(body))
        return d.addCallback(read_answer, ANSWER_LIMIT)

    def tuned(client: HTTPClient) -> Post:
        def post(url: str, body: bytes) -> defer.Deferred[Any]:
            headers = Headers({k: [v] for k, v in HEADERS.items()})
            d = client.request(
                "POST", parse(url), data=body, headers=headers, cookies=no_cookies, unbuffered=True
            )
            return d.addCallback(read_answer, ANSWER_LIMIT)

        return post

    def default(client: HTTPClient, url_once: bool = False, **options: Any) -> Post:
        def post(url: str, body: bytes) -> defer.Deferred[Any]:
            target = parse(url) if url_once else url
            d = client.request("POST", target, data=body, headers=HEADERS, **options)
            return d.addCallback(treq.content)

        return post

    chosen: dict[str, Post] = {
        "Agent": raw,
        "treq tuned": tuned(sink_http_client(agent)),
        "treq default": default(HTTPClient(agent)),
    }
    if steps:

        def client() -> HTTPClient:
            return HTTPClient(agent, cookiejar=NoCookies(), data_to_body_producer=BytesBody)

        chosen["+ BytesBody"] = default(HTTPClient(agent, data_to_body_producer=BytesBody))
        chosen["+ no cookies"] = default(client(), cookies=no_cookies)
        chosen["+ unbuffered"] = default(client(), cookies=no_cookies, unbuffered=True)
        chosen["+ URL once"] = default(client(), True, cookies=no_cookies, unbuffered=True)
    return chosen


class _Answered:
    """An empty 204, as Twisted's ``Response`` has it for the layers above the agent."""

    version = (b"HTTP", 1, 1)
    code = 204
    phrase = b"No Content"
    length = 0
    request = None
    previousResponse = None

    def __init__(self) -> None:
        self.headers = Headers()


@implementer(IAgent)
class InstantAgent:
    """Answers every request at once, with no I/O: what is left is the client's own work."""

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> defer.Deferred[Any]:
        return defer.succeed(_Answered())


def layers(args: argparse.Namespace, url: str) -> None:
    """CPU per request of each client's own layers, above an agent that answers at once."""
    posts = clients(InstantAgent(), args.steps)  # type: ignore[arg-type]
    body = os.urandom(args.kib * 1024)
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, post in posts.items():
            started = time.process_time()
            for _ in range(args.n * 5):
                post(url, body)
            us = (time.process_time() - started) / (args.n * 5) * 1e6
            best[name] = min(best.get(name, us), us)
    print("The clients' own work, above an agent that answers at once (no I/O):")
    for name, us in best.items():
        print(f"  {name:14s} {us:7.1f} us of CPU per POST (best of {args.rounds} rounds)")


async def measure(args: argparse.Namespace, url: str) -> None:
    pool = HTTPConnectionPool(reactor, persistent=True)
    agent = Agent(reactor, pool=pool)
    posts = clients(agent, args.steps)
    body = os.urandom(args.kib * 1024)
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, post in posts.items():
            for _ in range(20):  # warm: the connection, caches
                await post(url, body)
            started = time.process_time()
            for _ in range(args.n):
                await post(url, body)
            us = (time.process_time() - started) / args.n * 1e6
            best[name] = min(best.get(name, us), us)
    print("Over a kept-alive connection to a receiver answering 204:")
    for name, us in best.items():
        print(f"  {name:14s} {us:7.1f} us of CPU per POST (best of {args.rounds} rounds)")
    await pool.closeCachedConnections()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="POSTs per round and client")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--kib", type=int, default=30, help="body size")
    p.add_argument("--steps", action="store_true", help="also treq with one tuning at a time")
    args = p.parse_args()
    port = run.free_port()
    with (
        tempfile.TemporaryDirectory(prefix="bench-sink-post-") as tmp,
        run.spawn("receiver", [sys.executable, "-c", RECEIVER, str(port)], Path(tmp)) as receiver,
    ):
        run.started(receiver, run.port_open(port))
        layers(args, f"http://127.0.0.1:{port}/loki/api/v1/push")
        d = defer.ensureDeferred(measure(args, f"http://127.0.0.1:{port}/loki/api/v1/push"))
        d.addErrback(lambda f: f.printTraceback())
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
        reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
