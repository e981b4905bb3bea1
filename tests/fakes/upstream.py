"""A real HTTP upstream on 127.0.0.1 for integration tests, shaped like an LLM API.

It counts TCP connections, records the requests it saw, and serves:
  POST /v1/chat/completions          a JSON chat completion (with usage)
  POST /v1/chat/completions + stream an SSE stream (``"stream": true`` in the body)
  GET  /sse?n=N&gap=S                N SSE events S seconds apart (real reactor time)
  GET  /big?bytes=N                  N bytes from a push producer (tracks pauses)
  GET  /hang                         never answers
  GET  /stall                        sends headers and one chunk, then nothing
  GET  /echo-headers                 the request headers it received, as JSON
  GET  /status/NNN                   an empty NNN answer
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

CHAT_COMPLETION = {
    "id": "chatcmpl-abc123",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
}


def sse_chunks(text: str = "Hello there, friend") -> list[bytes]:
    out = []
    for word in text.split(" "):
        chunk = {
            "id": "chatcmpl-s1",
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}],
        }
        out.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    final = {
        "id": "chatcmpl-s1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }
    out.append(b"data: " + json.dumps(final).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


@implementer(IPushProducer)
class _BigBody:
    def __init__(self, upstream: FakeUpstream, request: server.Request, total: int) -> None:
        self.upstream = upstream
        self.request = request
        self.left = total
        self.paused = False
        self.stopped = False
        self.chunk = b"x" * 65536

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True
        self.upstream.pauses += 1
        waiters, self.upstream.pause_waiters = self.upstream.pause_waiters, []
        for d in waiters:
            d.callback(self.upstream.big_sent)

    def resumeProducing(self) -> None:
        self.paused = False
        # Write until the transport says stop (pauseProducing) or we are done.
        while not self.paused and not self.stopped and self.left > 0:
            n = min(self.left, len(self.chunk))
            self.left -= n
            self.upstream.big_sent += n
            self.request.write(self.chunk[:n])
        if self.left == 0 and not self.stopped:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        self.stopped = True


class _CountingChannel(http.HTTPChannel):
    def connectionMade(self) -> None:
        self.site.upstream.connections += 1  # type: ignore[attr-defined]
        self.site.upstream.open_connections += 1  # type: ignore[attr-defined]
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        up = self.site.upstream  # type: ignore[attr-defined]
        up.open_connections -= 1
        waiters, up.close_waiters = up.close_waiters, []
        for d in waiters:
            d.callback(None)
        super().connectionLost(reason)


class FakeUpstream(Resource):
    isLeaf = True

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.connections = 0
        self.open_connections = 0
        self.requests: list[dict[str, Any]] = []
        self.big_sent = 0
        self.pauses = 0
        self.pause_waiters: list[defer.Deferred[int]] = []
        self.close_waiters: list[defer.Deferred[None]] = []
        self.port: IListeningPort | None = None
        self._pending: list[Any] = []

    # -- helpers for tests ----------------------------------------------------

    def listen(self) -> int:
        site = server.Site(self)
        site.protocol = _CountingChannel  # type: ignore[assignment]
        site.upstream = self  # type: ignore[attr-defined]
        site.noisy = False
        site.log = lambda r: None  # type: ignore[method-assign]
        self.port = self.reactor.listenTCP(0, site, interface="127.0.0.1")
        return int(self.port.getHost().port)  # type: ignore[union-attr]

    def next_pause(self) -> defer.Deferred[int]:
        d: defer.Deferred[int] = defer.Deferred()
        self.pause_waiters.append(d)
        return d

    def next_close(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.close_waiters.append(d)
        return d

    def stop(self) -> defer.Deferred[None]:
        for call in self._pending:
            if call.active():
                call.cancel()
        for r in list(self._open_requests):
            if not r.finished and not r._disconnected:
                r.channel.transport.abortConnection()
        return defer.maybeDeferred(self.port.stopListening)  # type: ignore[union-attr]

    @property
    def _open_requests(self) -> list[server.Request]:
        return [r["_request"] for r in self.requests if not r["_request"].finished]

    # -- serving --------------------------------------------------------------

    def render(self, request: server.Request) -> Any:
        body = request.content.read() if request.content is not None else b""
        self.requests.append(
            {
                "method": request.method,
                "uri": request.uri,
                "headers": {
                    k.decode().lower(): [x.decode() for x in v]
                    for k, v in request.requestHeaders.getAllRawHeaders()
                },
                "body": body,
                "_request": request,
            }
        )
        path = request.path
        if path == b"/v1/chat/completions" or path.endswith(b"/chat/completions"):
            try:
                wants_stream = bool(json.loads(body or b"{}").get("stream"))
            except ValueError:
                wants_stream = False
            if wants_stream:
                request.setHeader(b"content-type", b"text/event-stream")
                request.setHeader(b"cache-control", b"no-cache")
                for chunk in sse_chunks():
                    request.write(chunk)
                request.finish()
                return server.NOT_DONE_YET
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(CHAT_COMPLETION).encode()
        if path == b"/sse":
            n = int(request.args.get(b"n", [b"3"])[0])
            gap = float(request.args.get(b"gap", [b"0.2"])[0])
            request.setHeader(b"content-type", b"text/event-stream")
            self._send_events(request, n, gap, 0)
            return server.NOT_DONE_YET
        if path == b"/big":
            total = int(request.args.get(b"bytes", [b"1000000"])[0])
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-length", b"%d" % total)
            _BigBody(self, request, total).start()
            return server.NOT_DONE_YET
        if path == b"/hang":
            return server.NOT_DONE_YET
        if path == b"/stall":
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b"data: first\n\n")
            return server.NOT_DONE_YET
        if path == b"/echo-headers":
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"connection", b"keep-alive, x-hop")
            request.setHeader(b"x-hop", b"should-not-reach-client")
            request.setHeader(b"keep-alive", b"timeout=5")
            return json.dumps(self.requests[-1]["headers"]).encode()
        if path.startswith(b"/status/"):
            request.setResponseCode(int(path.rsplit(b"/", 1)[1]))
            request.setHeader(b"content-type", b"application/json")
            return b"{}"
        request.setResponseCode(404)
        return b"not found"

    def _send_events(self, request: server.Request, n: int, gap: float, i: int) -> None:
        if request.finished or request._disconnected:
            return
        request.write(b'data: {"i": %d}\n\n' % i)
        if i + 1 >= n:
            request.finish()
            return
        self._pending.append(self.reactor.callLater(gap, self._send_events, request, n, gap, i + 1))
