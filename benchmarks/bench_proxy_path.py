"""CPU per exchange on the bare request path, in-process (no sockets, no event loop).

    .venv/bin/python benchmarks/bench_proxy_path.py            # 20,000 exchanges, best of 5
    .venv/bin/python benchmarks/bench_proxy_path.py --profile  # cProfile of one run

The real ``ProxyService`` (no sinks) gets a wrk-like POST through its ``Site``
channel (a ``StringTransport`` for the client) and the upstream answer an nginx
mock gives, fed to the pooled ``UpstreamConnection`` (a ``StringTransport`` too).
Both connections stay alive, as under wrk.  What is measured is the Python work
of one exchange: request parsing, routing, header filtering, the upstream
request head, the response head and body relay, the timed calls; not the syscalls
or the reactor's polling.  Compare with the tree before a change:
``PYTHONPATH=/path/to/old/tree .venv/bin/python benchmarks/bench_proxy_path.py``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from llmproxy.config.loader import load_settings
from llmproxy.runtime.service import ProxyService

BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8080\r\n"
    b"Content-Type: application/json\r\n"
    b"Authorization: Bearer sk-bench-not-a-real-key\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)
ANSWER = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"hello"},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":1,'
    b'"total_tokens":10}}'
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.24.0\r\n"
    b"Date: Mon, 23 Nov 2026 13:08:48 GMT\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: keep-alive\r\n\r\n%s" % (len(ANSWER), ANSWER)
)


class _Endpoint:
    """Connects the pool's protocol to a StringTransport at once."""

    def __init__(self, made: list[Any]) -> None:
        self.made = made

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        self.made.append(proto)
        return defer.succeed(proto)


def build() -> tuple[Any, StringTransport, list[Any]]:
    state = tempfile.mkdtemp(prefix="bench-proxy-path-")
    settings = load_settings(
        text=f"""
[server]
listen = tcp:0:interface=127.0.0.1
admin_listen = tcp:0:interface=127.0.0.1
state_dir = {state}

[route:mock]
prefix = /
upstream = http://127.0.0.1:9
provider = openai
""",
        env={},
    )
    # The real reactor, not running: its timed calls (first-byte and idle timers,
    # the channel's idle timeout) cost what they cost in production, and
    # runUntilCurrent() after each exchange drops the cancelled ones.
    service = ProxyService(settings, reactor)
    made: list[Any] = []
    endpoint = _Endpoint(made)
    service.upstream._make_endpoint = lambda origin: endpoint  # type: ignore[method-assign]
    channel = service.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    client = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel.makeConnection(client)
    return channel, client, made


def exchange(channel: Any, client: StringTransport, made: list[Any]) -> None:
    channel.dataReceived(REQUEST)
    conn = made[-1]
    conn.transport.clear()
    conn.dataReceived(RESPONSE)
    reactor.runUntilCurrent()


def run(n: int) -> float:
    channel, client, made = build()
    exchange(channel, client, made)  # warm: connect, caches
    answer = client.value()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(ANSWER), answer
    assert len(made) == 1
    client.clear()
    t0 = time.process_time()
    for _ in range(n):
        exchange(channel, client, made)
        client.clear()
    elapsed = time.process_time() - t0
    assert len(made) == 1, "the upstream connection was not reused"
    return elapsed / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--sort", default="tottime")
    p.add_argument("--show", action="store_true", help="print one exchange's bytes")
    args = p.parse_args()
    if args.show:
        channel, client, made = build()
        exchange(channel, client, made)
        print(made[-1].transport.value() or "(upstream head cleared)")
        channel.dataReceived(REQUEST)
        print(made[-1].transport.value().decode())
        client.clear()
        made[-1].dataReceived(RESPONSE)
        print(client.value().decode())
        return
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run(args.n)
        prof.disable()
        pstats.Stats(prof).sort_stats(args.sort).print_stats(35)
        return
    times = [run(args.n) for _ in range(args.repeat)]
    print(f"us per exchange: best {min(times):.1f}, all " + " ".join(f"{t:.1f}" for t in times))


if __name__ == "__main__":
    main()
