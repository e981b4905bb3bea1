"""A real HTTP upstream on 127.0.0.1 for integration tests, shaped like an LLM API.

It counts TCP connections, records the requests it saw, and serves (the
OpenAI-style answers with the provider's ``x-request-id: req_N``, the Anthropic
ones with ``request-id: req_N``, N counting the requests):
  POST /v1/chat/completions          a JSON chat completion (with usage)
  POST /v1/chat/completions + stream an SSE stream (``"stream": true`` in the body);
                                     ?end_after=S sends all of it (``[DONE]`` too) at
                                     once but ends it (the last chunk) S seconds later
  POST /v1/messages                  an Anthropic message answering the last user message
                                     (SSE events with ``"stream": true``)
  GET  /sse?n=N&gap=S                N SSE events S seconds apart (real reactor time)
  GET  /big?bytes=N                  N bytes from a push producer (tracks pauses)
  GET  /hang                         never answers
  GET  /stall                        sends headers and one chunk, then nothing
  GET  /echo-headers                 the request headers it received, as JSON
  GET  /status/NNN                   an empty NNN answer
  ANY  /cacheable?...                for the response cache: a JSON answer numbered per call,
                                     shaped by cc= (Cache-Control), vary=, status=, etag=,
                                     lm= (Last-Modified), age=, size=; sse=N streams N events,
                                     cut=1 drops the connection after them; hold=1 waits for
                                     release_held()
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


def anthropic_reply_text(request_body: dict[str, Any]) -> str:
    """The scripted reply of /v1/messages: it quotes the last user message."""
    text = ""
    for message in request_body.get("messages") or []:
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(
                    b.get("text", "") for b in content if isinstance(b, dict) and "text" in b
                )
            text = content if isinstance(content, str) else ""
    return f"You said: {text}"


def anthropic_message(text: str) -> dict[str, Any]:
    return {
        "id": "msg_fake01",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 6},
    }


def anthropic_sse(text: str) -> list[bytes]:
    half = len(text) // 2
    start = anthropic_message("")
    start["content"] = []
    start["stop_reason"] = None
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
    ]
    for piece in (text[:half], text[half:]):
        delta = {"type": "text_delta", "text": piece}
        events.append(
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
        )
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 6},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return [
        b"event: " + name.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"
        for name, data in events
    ]


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
        self.held: list[tuple[server.Request, bytes]] = []
        self.cacheable_served = 0

    # -- helpers for tests ----------------------------------------------------

    def listen(self) -> int:
        # Like a real API server, bodies are never parsed as HTML forms.
        site = server.Site(self, parsePOSTFormSubmission=False)
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
        provider_id = b"req_%d" % len(self.requests)
        if path.endswith(b"/v1/messages"):
            request.setHeader(b"request-id", provider_id)  # Anthropic's name
        else:
            request.setHeader(b"x-request-id", provider_id)  # OpenAI's
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
                end_after = request.args.get(b"end_after")
                if end_after:
                    call = self.reactor.callLater(float(end_after[0]), request.finish)
                    self._pending.append(call)
                else:
                    request.finish()
                return server.NOT_DONE_YET
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(CHAT_COMPLETION).encode()
        if path.endswith(b"/v1/messages") and request.method == b"POST":
            try:
                asked = json.loads(body or b"{}")
            except ValueError:
                asked = {}
            text = anthropic_reply_text(asked if isinstance(asked, dict) else {})
            if isinstance(asked, dict) and asked.get("stream"):
                request.setHeader(b"content-type", b"text/event-stream")
                for chunk in anthropic_sse(text):
                    request.write(chunk)
                request.finish()
                return server.NOT_DONE_YET
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(anthropic_message(text)).encode()
        if path.startswith(b"/cacheable"):
            return self._cacheable(request)
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

    # -- /cacheable ---------------------------------------------------------------

    def _cacheable(self, request: server.Request) -> Any:
        self.cacheable_served += 1
        args = {k.decode(): v[0].decode() for k, v in (request.args or {}).items()}
        request.setResponseCode(int(args.get("status", "200")))
        for name, arg in (
            (b"cache-control", "cc"),
            (b"vary", "vary"),
            (b"etag", "etag"),
            (b"last-modified", "lm"),
            (b"age", "age"),
        ):
            if arg in args:
                request.setHeader(name, args[arg].encode())
        request.setHeader(b"set-cookie", b"upstream-session=s%d" % self.cacheable_served)
        n = self.cacheable_served
        if "sse" in args:
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", args.get("cc", "no-cache").encode())
            for i in range(int(args["sse"])):
                request.write(b'data: {"call": %d, "i": %d}\n\n' % (n, i))
            if "cut" in args:
                # Flushed, then closed without the last chunk: a truncated stream.
                request.channel.transport.loseConnection()  # type: ignore[union-attr]
            else:
                request.write(b"data: [DONE]\n\n")
                request.finish()
            return server.NOT_DONE_YET
        answer = {
            "call": n,
            "method": request.method.decode(),
            "pad": "x" * int(args.get("size", "0")),
        }
        body = json.dumps(answer).encode()
        request.setHeader(b"content-type", b"application/json")
        if "hold" in args:
            self.held.append((request, body))
            return server.NOT_DONE_YET
        return body

    def release_held(self) -> int:
        held, self.held = self.held, []
        for request, body in held:
            if not request.finished and not request._disconnected:
                request.setHeader(b"content-length", b"%d" % len(body))
                request.write(body)
                request.finish()
        return len(held)
