"""The upstream HTTP/1.1 client of the request path (tests:
tests/unit/proxy/test_client.py, tests/integration/test_proxy.py).

Twisted's ``Agent`` is general and correct, and it cost about half of the
proxy's CPU per request: URI objects, a pool keyed through endpoint factories,
a line-by-line response parser in Python and several Deferreds per request.
This client does only what the proxy needs, with the response parsed by
``httptools`` (llhttp, the parser Node.js uses):

- one request at a time per connection, persistent connections kept per origin
  (at most ``max_idle`` idle ones each, closed after ``idle_timeout``), no
  pipelining, no retries (a POST on a stale connection is not replayed, as with
  Agent: ``idle_timeout`` stays below the upstreams' keep-alive);
- the request head and an in-memory body go out in one write; a body in a temp
  file streams through a producer;
- the response is handed out at the end of the head as an
  :class:`UpstreamResponse`; ``deliverBody(protocol)`` then streams the body
  the way Agent does: ``protocol.makeConnection(connection)`` (the connection
  is the push producer the client request registers, so a slow client pauses
  the upstream), ``dataReceived`` per piece, ``connectionLost`` with
  ``ResponseDone`` (complete), ``PotentialDataLoss`` (a body delimited by the
  connection closing) or the failure that cut it short;
- cancelling the request's Deferred before the head arrives aborts the
  connection (a client that went away, ``first_byte_timeout``); so does
  ``stopProducing`` during the body.

Parser callbacks only record what they saw; the work (firing the Deferred,
relaying the body, reusing the connection) happens after ``feed_data`` returns,
so nothing re-enters the parser.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import attrs
import httptools
from twisted.internet import defer, endpoints, error
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

__all__ = [
    "EndpointFactory",
    "Origin",
    "ResponseBodyCut",
    "UpstreamConnection",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
    "split_url",
]

_DONE = Failure(ResponseDone())
_DATA_LOSS = Failure(PotentialDataLoss())
_BODYLESS_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT"})
_MAX_ORIGINS = 4096  # endpoints remembered (routes plus allowlisted passthrough hosts)


class UpstreamError(Exception):
    """The upstream broke the exchange: closed early, sent something unparseable."""


class ResponseBodyCut(UpstreamError):
    """The connection ended before the response body was complete."""


Origin = tuple[bytes, bytes, int]  # scheme, host (no brackets), port


def split_url(url: bytes) -> tuple[Origin, bytes, bytes]:
    """``http://host:port/path?q`` → ((scheme, host, port), Host header value, target)."""
    scheme, sep, rest = url.partition(b"://")
    if not sep or scheme not in (b"http", b"https"):
        raise ValueError(f"not an http(s) URL: {url[:200]!r}")
    # The authority ends at the first "/" or "?" (http://host?next=/a has no path).
    cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    netloc, target = rest[:cut], rest[cut:]
    if not target.startswith(b"/"):
        target = b"/" + target
    default = 443 if scheme == b"https" else 80
    host, port, p = netloc, default, b""
    if netloc.startswith(b"["):
        end = netloc.find(b"]")
        host, p = netloc[1:end], netloc[end + 1 :]
        if end < 0 or p[:1] not in (b"", b":"):
            raise ValueError(f"bad IPv6 host in URL: {url[:200]!r}")
        p = p[1:]
    elif b":" in netloc:
        host, _, p = netloc.rpartition(b":")
    if p:
        if not p.isdigit() or not 0 < int(p) < 65536:
            raise ValueError(f"bad port in URL: {url[:200]!r}")
        port = int(p)
    if not host:
        raise ValueError(f"no host in URL: {url[:200]!r}")
    return (scheme, host, port), netloc, target


class EndpointFactory:
    """How an origin is dialled.  IP literals go to TCP endpoints directly
    (HostnameEndpoint resolves even those in the thread pool and reports a refused
    connection only after its 0.3 s happy-eyeballs delay); names through
    HostnameEndpoint; https wrapped in TLS with the system's trust roots."""

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self.connect_timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()

    def endpoint(self, origin: Origin) -> IStreamClientEndpoint:
        scheme, host, port = origin
        text = host.decode("ascii")
        endpoint: IStreamClientEndpoint
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            endpoint = endpoints.HostnameEndpoint(
                self._reactor, text, port, timeout=self.connect_timeout
            )
        else:
            cls = endpoints.TCP6ClientEndpoint if ip.version == 6 else endpoints.TCP4ClientEndpoint
            endpoint = cls(self._reactor, text, port, timeout=self.connect_timeout)
        if scheme == b"https":
            creator = self._tls.creatorForNetloc(host, port)
            endpoint = endpoints.wrapClientTLS(creator, endpoint)
        return endpoint


@attrs.define(slots=True, eq=False)
class UpstreamResponse:
    """What the proxy sees of the upstream's answer once its head has arrived."""

    _conn: UpstreamConnection
    code: int
    phrase: bytes
    # Grouped by name (first spelling kept), in arrival order, Connection included.
    headers: list[tuple[bytes, list[bytes]]]
    length: int | None  # Content-Length, None when chunked or close-delimited

    def deliverBody(self, protocol: Protocol) -> None:
        self._conn.attach(protocol)


def _group(
    pairs: list[tuple[bytes, bytes]],
) -> tuple[list[tuple[bytes, list[bytes]]], int | None, bool]:
    """Headers grouped by name, the Content-Length, and whether the body is framed
    (Content-Length or chunked) rather than delimited by the connection closing."""
    grouped: dict[bytes, tuple[bytes, list[bytes]]] = {}
    length: int | None = None
    chunked = False
    for name, value in pairs:
        low = name.lower()
        entry = grouped.get(low)
        if entry is None:
            grouped[low] = (name, [value])
        else:
            entry[1].append(value)
        if low == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
        elif low == b"transfer-encoding":
            # Framed only when chunked is the last coding; else the close ends it.
            chunked = value.rstrip().lower().endswith(b"chunked")
    framed = chunked or length is not None
    return list(grouped.values()), (None if chunked else length), framed


@implementer(IPushProducer)
class UpstreamConnection(Protocol):
    """One persistent connection to an origin; one exchange at a time."""

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.lost = False
        self.idle_since = 0.0
        self._lost_reason: Failure | None = None
        self._parser: Any = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self._d: defer.Deferred[UpstreamResponse] | None = None
        self._head_request = False
        self._pairs: list[tuple[bytes, bytes]] = []
        self._phrase = b""
        self._head_done = False
        self._responded = False
        self._chunks: list[bytes] = []
        self._complete = False
        self._body: Protocol | None = None
        self._sending: IBodyProducer | None = None
        self._paused = False
        self._ended = False
        self._broken: str | None = None
        self._close_delimited = False
        self._keep_alive = False

    # -- the pool's side ----------------------------------------------------

    def send(
        self,
        d: defer.Deferred[UpstreamResponse],
        head: bytes,
        body: bytes | IBodyProducer | None,
        head_request: bool,
    ) -> None:
        self._d = d
        self._head_request = head_request
        transport = self.transport
        assert transport is not None
        if body is None or body.__class__ is bytes:
            transport.write(head + body if body else head)  # type: ignore[operator]
            return
        assert not isinstance(body, bytes)
        transport.write(head)
        self._sending = body
        transport.registerProducer(body, True)  # type: ignore[attr-defined]
        body.startProducing(transport).addBoth(self._body_sent)

    def _body_sent(self, result: object) -> None:
        if self._sending is not None:
            self._sending = None
            if not self.lost:
                self.transport.unregisterProducer()  # type: ignore[union-attr]
        if isinstance(result, Failure) and not self.lost:
            self._broken = "the request body could not be read: " + str(result.value)[:200]
            self.transport.abortConnection()  # type: ignore[union-attr]

    def cancel(self) -> None:
        """The request's Deferred was cancelled before the response head."""
        self._d = None
        self._ended = True
        if not self.lost:
            self.transport.abortConnection()  # type: ignore[union-attr]

    # -- httptools callbacks (record only) ----------------------------------

    def on_status(self, status: bytes) -> None:
        self._phrase += status  # (called per piece when the phrase is split)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._pairs.append((name, value))

    def on_headers_complete(self) -> None:
        if self._parser.get_status_code() >= 200:
            self._head_done = True

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        if self._head_done:
            self._complete = True
            # (Asked here: once the callback returns, llhttp has reset for the next message.)
            self._keep_alive = self._parser.should_keep_alive()
        else:  # an interim 1xx answer (103 Early Hints...): the real one follows
            self._pairs = []
            self._phrase = b""

    # -- the transport's side -----------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._d is None and not self._responded:
            # Nothing asked: bytes from an idle connection are a protocol error.
            self._broken = "the upstream sent data no request asked for"
            self.pool.forget(self)  # out of the pool now, not once the close is done
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if self._ended or self._broken is not None:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._broken = f"unparseable response from the upstream: {e}"[:300]
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if self._head_done and not self._responded:
            self._respond()
        if self._body is not None:
            self._pump()

    def _respond(self) -> None:
        self._responded = True
        code = self._parser.get_status_code()
        headers, length, framed = _group(self._pairs)
        self._pairs = []
        self._close_delimited = not framed
        if self._head_request:
            # llhttp cannot know a HEAD answer has no body: it ends with the head
            # (and the connection, whose parser would wait for that body).
            self._complete = True
            self._keep_alive = False
            self._chunks = []
        d, self._d = self._d, None
        response = UpstreamResponse(self, code, self._phrase, headers, length)
        if d is not None:
            d.callback(response)

    def attach(self, protocol: Protocol) -> None:
        self._body = protocol
        protocol.makeConnection(self)  # type: ignore[arg-type]
        if self._lost_reason is not None:  # the connection ended before the body was taken
            self.connectionLost(self._lost_reason)
        else:
            self._pump()

    def _pump(self) -> None:
        body = self._body
        assert body is not None
        if self._chunks:
            chunks, self._chunks = self._chunks, []
            for chunk in chunks:
                if self._ended or self._broken is not None:
                    return  # stopped from the body (stopProducing)
                body.dataReceived(chunk)
        if self._complete and not self._ended and self._broken is None:
            self._ended = True
            reusable = (
                not self._head_request
                and self._sending is None
                and not self.lost
                and self._keep_alive
            )
            if self._paused and not self.lost:
                self.transport.resumeProducing()  # type: ignore[union-attr]
            self._reset()
            if reusable:
                self.pool.release(self)
            else:
                self.transport.loseConnection()  # type: ignore[union-attr]
                self._parser = httptools.HttpResponseParser(self)
            body.connectionLost(_DONE)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.pool.forget(self)
        if self._ended:
            return
        if self._sending is not None:
            self._sending.stopProducing()
            self._sending = None
        if self._responded and self._body is None:
            self._lost_reason = reason  # deliverBody ends the body (see attach)
            return
        self._ended = True
        why = self._broken
        if not self._responded:
            d, self._d = self._d, None
            if d is not None:
                d.errback(Failure(UpstreamError(why or _lost_text(reason))))
            return
        body = self._body
        assert body is not None
        chunks, self._chunks = self._chunks, []
        for chunk in chunks:
            body.dataReceived(chunk)
        if self._complete:
            body.connectionLost(_DONE)
        elif why is None and self._close_delimited:
            # Neither Content-Length nor chunked: the body ends with the connection.
            body.connectionLost(_DATA_LOSS)
        else:
            body.connectionLost(Failure(ResponseBodyCut(why or _lost_text(reason))))

    # -- IPushProducer: the client's request pauses us ----------------------

    # (Ignored outside a body: a stale reference must not pause or abort a pooled
    # connection.)

    def pauseProducing(self) -> None:
        if not self.lost and not self._paused and self._body is not None:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        if not self.lost and self._paused:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        if not self.lost and not self._ended and self._body is not None:
            self._broken = "stopped by the proxy"
            self._complete = False  # (nor is the end reported as complete)
            self.transport.abortConnection()  # type: ignore[union-attr]


def _lost_text(reason: Failure) -> str:
    if reason.check(error.ConnectionDone):
        return "the upstream closed the connection"
    return str(reason.value)[:300] or type(reason.value).__name__


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self.pool, self.origin)


class UpstreamPool:
    """Persistent connections per origin, and the request entry point."""

    def __init__(
        self,
        reactor: Any,
        connect_timeout: float,
        max_idle: int = 100,
        idle_timeout: float = 50.0,
        endpoint_factory: Callable[[Origin], IStreamClientEndpoint] | None = None,
    ) -> None:
        self._reactor = reactor
        self._endpoints_made = EndpointFactory(reactor, connect_timeout)
        self._make_endpoint = endpoint_factory or self._endpoints_made.endpoint
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._origins: dict[bytes, tuple[Origin, bytes, IStreamClientEndpoint]] = {}
        self._idle: dict[Origin, list[UpstreamConnection]] = {}
        self._busy: set[UpstreamConnection] = set()
        self._sweep: IDelayedCall | None = None
        self._closing: defer.Deferred[None] | None = None
        self.connections_made = 0
        self.closed = False  # after close(): connections are not kept any more

    def set_connect_timeout(self, seconds: float) -> None:
        """Reload: new connections use the new timeout."""
        self._endpoints_made.connect_timeout = seconds
        self._origins.clear()

    # -- requests -----------------------------------------------------------

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | IBodyProducer | None,
    ) -> defer.Deferred[UpstreamResponse]:
        """Send one request; fires with the response at the end of its head."""
        slash = url.find(b"/", 8)  # after "https://"
        key = url[:slash] if slash > 0 else url
        known = self._origins.get(key)
        if known is not None and slash > 0:
            origin, hostport, endpoint = known
            target = url[slash:]
        else:
            origin, hostport, target = split_url(url)
            if len(self._origins) >= _MAX_ORIGINS:
                self._origins.clear()
            endpoint = self._make_endpoint(origin)
            if b"?" not in key:  # (a "/" in a query without path is no path)
                self._origins[key] = (origin, hostport, endpoint)
        head = _request_head(method, target, hostport, headers, body)
        head_request = method == b"HEAD"
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.lost:
                return self._send(conn, head, body, head_request)
        return self._connect(endpoint, origin, head, body, head_request)

    def _send(
        self,
        conn: UpstreamConnection,
        head: bytes,
        body: bytes | IBodyProducer | None,
        head_request: bool,
    ) -> defer.Deferred[UpstreamResponse]:
        self._busy.add(conn)
        d: defer.Deferred[UpstreamResponse] = defer.Deferred(lambda _: conn.cancel())
        conn.send(d, head, body, head_request)
        return d

    def _connect(
        self,
        endpoint: IStreamClientEndpoint,
        origin: Origin,
        head: bytes,
        body: bytes | IBodyProducer | None,
        head_request: bool,
    ) -> defer.Deferred[UpstreamResponse]:
        connecting = endpoint.connect(_ConnectionFactory(self, origin))
        state: dict[str, Any] = {}

        def cancel(_: object) -> None:
            inner = state.get("inner")
            if inner is not None:
                inner.cancel()
            else:
                connecting.cancel()

        d: defer.Deferred[UpstreamResponse] = defer.Deferred(cancel)

        def connected(conn: UpstreamConnection) -> None:
            self.connections_made += 1
            if d.called:  # cancelled while connecting
                conn.transport.loseConnection()  # type: ignore[union-attr]
                return
            inner = state["inner"] = self._send(conn, head, body, head_request)
            inner.chainDeferred(d)

        def failed(failure: Failure) -> None:
            if not d.called:
                d.errback(failure)

        connecting.addCallbacks(connected, failed)
        return d

    # -- connections' side --------------------------------------------------

    def release(self, conn: UpstreamConnection) -> None:
        self._busy.discard(conn)
        if self.closed:
            conn.transport.loseConnection()  # type: ignore[union-attr]
            return
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= self.max_idle:
            conn.transport.loseConnection()  # type: ignore[union-attr]
            return
        conn.idle_since = self._reactor.seconds()
        idle.append(conn)
        if self._sweep is None:
            self._sweep = self._reactor.callLater(self.idle_timeout / 2, self._close_stale)

    def forget(self, conn: UpstreamConnection) -> None:
        self._busy.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)
        if self._closing is not None and not self._busy and not any(self._idle.values()):
            closing, self._closing = self._closing, None
            if not closing.called:
                closing.callback(None)

    def _close_stale(self) -> None:
        self._sweep = None
        cutoff = self._reactor.seconds() - self.idle_timeout
        left = 0
        for idle in self._idle.values():
            for conn in [c for c in idle if c.idle_since <= cutoff]:
                idle.remove(conn)
                conn.transport.loseConnection()  # type: ignore[union-attr]
            left += len(idle)
        if left:
            self._sweep = self._reactor.callLater(self.idle_timeout / 2, self._close_stale)

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def start(self) -> None:
        """Connections are opened as requests need them."""

    def stop(self, timeout: float) -> defer.Deferred[None]:
        """Close idle connections now; busy ones close when their exchange ends.
        Fires once every connection is gone (the caller bounds the wait)."""
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        self.closed = True
        if self._closing is not None:
            return _follow(self._closing)
        idle = [c for conns in self._idle.values() for c in conns]
        if not idle and not self._busy:
            return defer.succeed(None)
        self._closing = defer.Deferred()
        closing = _follow(self._closing)
        for conn in idle:
            conn.transport.loseConnection()  # type: ignore[union-attr]
        return closing


def _follow(d: defer.Deferred[None]) -> defer.Deferred[None]:
    """A Deferred that fires when ``d`` does, leaving ``d`` for others to follow too."""
    follower: defer.Deferred[None] = defer.Deferred()

    def fire(result: object) -> object:
        follower.callback(None)
        return result

    d.addBoth(fire)
    return follower


def _request_head(
    method: bytes,
    target: bytes,
    hostport: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes | IBodyProducer | None,
) -> bytes:
    lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target, hostport)]
    for name, value in headers:
        if b"\n" in value or b"\r" in value:
            value = value.replace(b"\r", b" ").replace(b"\n", b" ")
        lines.append(b"%s: %s\r\n" % (name, value))
    if body is None:
        if method not in _BODYLESS_METHODS:
            lines.append(b"Content-Length: 0\r\n")
    elif body.__class__ is bytes:
        lines.append(b"Content-Length: %d\r\n" % len(body))  # type: ignore[arg-type]
    else:
        length = body.length  # type: ignore[union-attr]
        if isinstance(length, int):
            lines.append(b"Content-Length: %d\r\n" % length)
        else:
            raise ValueError("a request body of unknown length cannot be sent")
    lines.append(b"\r\n")
    return b"".join(lines)
