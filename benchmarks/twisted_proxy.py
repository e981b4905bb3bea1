"""Plain Twisted reverse proxies as Python references (no tests: benchmark tool).

    python benchmarks/twisted_proxy.py --port 8002 --upstream-port 8000 [--sse-upstream-port 8001]
    python benchmarks/twisted_proxy.py --agent --port 8002 --upstream-port 8000 ...

``/`` is forwarded to ``127.0.0.1:<upstream-port>`` and, when given, ``/sse/...``
to ``127.0.0.1:<sse-upstream-port>/...``.  No capture, no access log.

- default: Twisted's stock ``ReverseProxyResource``, the plainest proxy Twisted
  ships: one new upstream connection per request (HTTP/1.0, no pool);
- ``--agent``: the bare ``Agent``-based proxy: ``Agent`` over a persistent
  ``HTTPConnectionPool`` (100 connections per host), the request body sent in
  one write, the answer relayed as it arrives (a stream's chunks as they come).
  What a Python proxy on the same reactor costs with pooled connections and
  nothing else: the yardstick for llmproxy's own forwarding and capture.
"""

# twisted.web's Request and Resource are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import argparse
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IReactorCore, IReactorTCP
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http import Request as HTTPRequest
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

# Not forwarded either way (RFC 9110 7.6.1), and what the client side sets itself.
_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)


class QuietSite(Site):
    """No access log, like nginx with ``access_log off`` and llmproxy."""

    def log(self, request: HTTPRequest) -> None:
        pass


@implementer(IBodyProducer)
class _Body:
    """A request body written in one go (``FileBodyProducer`` takes cooperator turns)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Relay(Protocol):
    """The upstream's answer, written to the client as it arrives."""

    def __init__(self, request: HTTPRequest, gone: list[bool]) -> None:
        self._request = request
        self._gone = gone

    def dataReceived(self, data: bytes) -> None:
        if not self._gone[0]:
            self._request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._gone[0]:
            self._request.finish()


class AgentProxy(Resource):
    isLeaf = True

    def __init__(self, agent: Agent, upstream_port: int, sse_port: int | None) -> None:
        super().__init__()
        self._agent = agent
        self._base = f"http://127.0.0.1:{upstream_port}".encode()
        self._sse = None if sse_port is None else f"http://127.0.0.1:{sse_port}".encode()

    def render(self, request: HTTPRequest) -> Any:
        uri = request.uri
        if self._sse is not None and uri.startswith(b"/sse/"):
            url = self._sse + uri[4:]
        else:
            url = self._base + uri
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in _HOP:
                headers.setRawHeaders(name, values)
        body = request.content.read() if request.content is not None else b""
        gone = [False]
        request.notifyFinish().addErrback(lambda _: gone.__setitem__(0, True))
        d = self._agent.request(request.method, url, headers, _Body(body) if body else None)
        d.addCallback(self._answer, request, gone)
        d.addErrback(self._failed, request, gone)
        return NOT_DONE_YET

    def _answer(self, response: IResponse, request: HTTPRequest, gone: list[bool]) -> None:
        if gone[0]:
            response.deliverBody(Protocol())
            return
        request.setResponseCode(response.code)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in _HOP:
                request.responseHeaders.setRawHeaders(name, values)
        response.deliverBody(_Relay(request, gone))

    def _failed(self, failure: Failure, request: HTTPRequest, gone: list[bool]) -> None:
        if not gone[0]:
            request.setResponseCode(502)
            request.finish()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--sse-upstream-port", type=int, default=None)
    parser.add_argument("--agent", action="store_true", help="Agent over a connection pool")
    args = parser.parse_args(argv)
    reactor: IReactorCore = _reactor
    tcp: IReactorTCP = _reactor
    root: Resource
    if args.agent:
        pool = HTTPConnectionPool(_reactor, persistent=True)
        pool.maxPersistentPerHost = 100
        pool._factory.noisy = False  # no "Starting factory" line per connection
        root = AgentProxy(Agent(_reactor, pool=pool), args.upstream_port, args.sse_upstream_port)
    else:
        root = ReverseProxyResource("127.0.0.1", args.upstream_port, b"")
        if args.sse_upstream_port is not None:
            sse = ReverseProxyResource("127.0.0.1", args.sse_upstream_port, b"")
            root.putChild(b"sse", sse)
    site = QuietSite(root)
    tcp.listenTCP(args.port, site, backlog=1024, interface="127.0.0.1")  # type: ignore[arg-type]
    print(f"twisted_proxy listening on 127.0.0.1:{args.port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
