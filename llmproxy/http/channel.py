"""HTTP/1.1 channels no single client can hold: a deadline for the request head,
a minimum request-body rate, connection caps per listener and per client
address, and a JSON 431 for a header line over the limit
(tests: tests/unit/http/test_channel.py, tests/integration/test_hostile_clients.py).

Twisted's ``HTTPChannel`` has one timer, the idle timeout, and every byte resets
it: a client sending one header line every few seconds, or a body at one byte
per few seconds, keeps its connection (and a ``max_connections`` slot) for as
long as it likes.  Here a request head must be complete ``header_timeout``
after the connection opened (or after the first byte of a later request on it),
and a body must then average ``min_body_rate`` bytes a second once
``header_timeout`` has passed since its headers.  Trickling does not extend
either.

Cost: a request that arrives whole in one read (as good as all of them) costs
a few attribute checks.  Only a connection left mid-request after a read is
put on its site's :class:`ChannelWatch`, whose sweep checks the watched ones
every ``header_timeout / 4`` (at most every second): one timer per listener,
none per request.

A refused connection gets its answer (408, 429, 431 or 503, the usual JSON
error, ``Connection: close``) where one is still possible, and the site's
:meth:`LimitedSite.limit_hit` hook hears which limit fired (metrics, events).
"""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import HTTPChannel

from llmproxy.http.errors import error_body

__all__ = ["CappedRequest", "ChannelLimits", "ChannelWatch", "LimitedChannel", "LimitedSite"]

_HEAD, _BODY = 1, 2
_REASONS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    408: b"Request Timeout",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


@attrs.frozen
class ChannelLimits:
    """What one listener allows a client.  ``keys`` names a limit in messages:
    ``"server.{}"`` makes ``server.header_timeout``."""

    header_timeout: float
    min_body_rate: int  # bytes per second once header_timeout has passed; 0: none
    max_connections: int
    max_connections_per_client: int  # 0: no cap
    max_header_bytes: int  # request line plus headers, and so any one line
    max_header_count: int
    keys: str = "server.{}"

    def name(self, limit: str) -> str:
        return self.keys.format(limit)


def raw_response(status: int, body: bytes, extra: bytes = b"") -> bytes:
    """A whole ``Connection: close`` response with a JSON body, for a channel
    answering before (or instead of) any request object."""
    reason = _REASONS.get(status, b"Error")
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"%sConnection: close\r\n\r\n%s" % (status, reason, len(body), extra, body)
    )


class ChannelWatch:
    """A listener's connections left mid-request, checked against their deadlines
    every ``interval`` seconds on ``clock``; and its open connections, in total
    and per client address."""

    def __init__(self, clock: IReactorTime, limits: ChannelLimits) -> None:
        self.clock = clock
        self.limits = limits
        self.connections = 0
        self.per_client: dict[str, int] = {}
        self._watched: dict[LimitedChannel, None] = {}
        self._loop: LoopingCall | None = None

    @property
    def interval(self) -> float:
        return max(0.05, min(1.0, self.limits.header_timeout / 4))

    def set_limits(self, limits: ChannelLimits) -> None:
        """A config reload: new connections and the next sweep use ``limits``."""
        restart = self._loop is not None and limits.header_timeout != self.limits.header_timeout
        self.limits = limits
        if restart:
            self.stop()
            self.start()

    def start(self) -> None:
        if self._loop is None:
            loop = self._loop = LoopingCall(self.sweep)
            loop.clock = self.clock
            loop.start(self.interval, now=False)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def watch(self, channel: LimitedChannel) -> None:
        self._watched[channel] = None

    def unwatch(self, channel: LimitedChannel) -> None:
        self._watched.pop(channel, None)

    def watching(self) -> int:
        return len(self._watched)

    def sweep(self) -> None:
        now = self.clock.seconds()
        for channel in list(self._watched):
            channel.check_deadline(now)


class LimitedSite(server.Site):
    """A ``Site`` whose channels obey :class:`ChannelLimits`; its sweep runs while
    it listens (``startFactory`` / ``stopFactory``)."""

    protocol = None  # type: ignore[assignment]  # subclasses: a LimitedChannel subclass
    noisy = False
    # The largest request body a CappedRequest takes (subclasses set it).
    max_body_bytes: int

    def __init__(
        self, resource: object, *, clock: IReactorTime, limits: ChannelLimits, **kw: object
    ) -> None:
        # The same clock for Twisted's own timers (idle timeout, abort).
        super().__init__(resource, reactor=clock, **kw)  # type: ignore[arg-type]
        self.channel_watch = ChannelWatch(clock, limits)

    @property
    def limits(self) -> ChannelLimits:
        return self.channel_watch.limits

    def startFactory(self) -> None:
        super().startFactory()
        self.channel_watch.start()

    def stopFactory(self) -> None:
        self.channel_watch.stop()
        super().stopFactory()

    def limit_hit(self, channel: LimitedChannel, limit: str, status: int, message: str) -> None:
        """A limit refused ``channel`` (``limit`` is the setting's name); the
        answer is written already.  Override to count it."""


class LimitedChannel(HTTPChannel):
    """An ``HTTPChannel`` of a :class:`LimitedSite`."""

    _phase = 0  # _HEAD or _BODY while watched, else 0
    _since = 0.0  # when the watched phase started
    _client: str | None = None  # counted in the site's per_client
    _counted = False
    _refused = False
    _body_seen = 0  # of the request being received

    def connectionMade(self) -> None:
        site: LimitedSite = self.site  # type: ignore[attr-defined]
        watch = site.channel_watch
        limits = watch.limits
        self.maxHeaders = limits.max_header_count
        self.totalHeadersSize = limits.max_header_bytes
        # LineReceiver's own cap on one line (16 KiB) would otherwise close the
        # connection without a word before max_header_bytes is reached.
        self.MAX_LENGTH = limits.max_header_bytes
        watch.connections += 1
        self._counted = True
        super().connectionMade()
        if watch.connections > limits.max_connections:
            self.refuse("max_connections", 503, "too many connections")
            return
        cap = limits.max_connections_per_client
        if cap:
            host = getattr(self.getPeer(), "host", None)
            if isinstance(host, str):
                self._client = host
                n = watch.per_client[host] = watch.per_client.get(host, 0) + 1
                if n > cap:
                    self.refuse(
                        "max_connections_per_client",
                        429,
                        f"more than {cap} open connections from this address",
                    )
                    return
        # A new connection has header_timeout to send its first request head.
        self._watch(_HEAD, watch.clock.seconds())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._counted:
            self._counted = False
            watch = self.site.channel_watch  # type: ignore[attr-defined]
            watch.connections -= 1
            host = self._client
            if host is not None:
                self._client = None
                n = watch.per_client.get(host, 0) - 1
                if n > 0:
                    watch.per_client[host] = n
                else:
                    watch.per_client.pop(host, None)
            if self._phase:
                self._phase = 0
                watch.unwatch(self)
        super().connectionLost(reason)

    # -- deadlines ---------------------------------------------------------------

    def _watch(self, phase: int, now: float) -> None:
        if not self._phase:
            self.site.channel_watch.watch(self)  # type: ignore[attr-defined]
        self._phase = phase
        self._since = now

    def _unwatch(self) -> None:
        if self._phase:
            self._phase = 0
            self.site.channel_watch.unwatch(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        super().dataReceived(data)
        # Left mid-request (a partial head or body) by this read: watch it.  A
        # request that came whole is being handled by now and costs nothing more.
        if (
            not self._phase
            and not self._handlingRequest
            and not self._refused
            and (self._receivedHeaderSize or self._buffer or self._transferDecoder is not None)
        ):
            clock = self.site.channel_watch.clock  # type: ignore[attr-defined]
            self._watch(_BODY if self._transferDecoder is not None else _HEAD, clock.seconds())

    def allHeadersReceived(self) -> None:
        self._body_seen = 0
        if self._phase:
            self._since = self.site.channel_watch.clock.seconds()  # type: ignore[attr-defined]
            self._phase = _BODY
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._unwatch()
        super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._handlingRequest:
            self._body_seen += len(data)  # the body as sent (chunk framing included)
        super().rawDataReceived(data)

    def check_deadline(self, now: float) -> None:
        """The sweep: refuse this connection if its current phase is late."""
        if self.transport is None or self.transport.disconnecting:  # type: ignore[attr-defined]
            return  # answered and closing already (a 413, say)
        limits: ChannelLimits = self.site.channel_watch.limits  # type: ignore[attr-defined]
        elapsed = now - self._since
        if self._phase == _HEAD:
            if elapsed >= limits.header_timeout:
                self.refuse(
                    "header_timeout",
                    408,
                    f"request head not complete within {limits.header_timeout:g}s",
                )
        elif self._phase == _BODY:
            rate = limits.min_body_rate
            late = elapsed - limits.header_timeout
            if rate and late > 0 and self._body_seen < rate * late:
                self.refuse(
                    "min_body_rate",
                    408,
                    f"request body slower than {rate} bytes/s "
                    f"({self._body_seen} bytes in {elapsed:.1f}s)",
                )

    # -- refusing ------------------------------------------------------------------

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(
            "max_header_bytes",
            431,
            f"a request header line is over {self.MAX_LENGTH} bytes",
        )

    def refuse(
        self, limit: str, status: int, message: str, extra: bytes = b"", named: bool = True
    ) -> None:
        """Answer ``status`` with a JSON error naming ``limit``'s setting (unless not
        ``named``), close the connection, and tell the site."""
        if self._refused:
            return
        self._refused = True
        self._unwatch()
        site: LimitedSite = self.site  # type: ignore[attr-defined]
        text = f"{message} ({site.limits.name(limit)})" if named else message
        transport = self.transport
        if transport is not None and not transport.disconnecting:  # type: ignore[attr-defined]
            code = "request_header_fields_too_large" if status == 431 else None
            transport.write(raw_response(status, error_body(status, text, code), extra))
        site.limit_hit(self, limit, status, text)
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # HTTPChannel answers every bad request head with a bare 400; its
        # counters say whether a header limit was the reason (each is checked
        # right after it is incremented), which deserves 431 and a message.
        if self._refused:
            return
        if self._receivedHeaderSize > self.totalHeadersSize:
            self.refuse(
                "max_header_bytes",
                431,
                f"request line and headers are over {self.totalHeadersSize} bytes",
            )
        elif self._receivedHeaderCount > self.maxHeaders:
            self.refuse("max_header_count", 431, f"more than {self.maxHeaders} request headers")
        else:
            self._refused = True
            self._unwatch()
            if self.transport is not None:
                body = error_body(400, "malformed HTTP request", "bad_request")
                self.transport.write(raw_response(400, body))
            self.bad_request()
            self.loseConnection()

    def bad_request(self) -> None:
        """A malformed request head was answered 400; override to count it."""

    def timeoutConnection(self) -> None:
        self._unwatch()
        super().timeoutConnection()


class CappedRequest(server.Request):
    """A request whose body is refused as soon as it is known to be over its
    site's ``max_body_bytes``: from ``Content-Length`` before a byte of it is
    read, or while a chunked body arrives; once refused (:attr:`refused`),
    nothing more of it is read or processed.  A subclass answers in
    :meth:`refuse_body`."""

    refused = False
    _body_seen = 0

    def gotLength(self, length: int | None) -> None:
        site: LimitedSite = self.channel.site  # type: ignore[union-attr,attr-defined]
        if length is not None and length > site.max_body_bytes:
            self.refused = True
            self.refuse_body(site, f"request body of {length} bytes")
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        self._body_seen += len(data)
        site: LimitedSite = self.channel.site  # type: ignore[union-attr,attr-defined]
        if self._body_seen > site.max_body_bytes:
            self.refused = True
            self.refuse_body(site, "request body")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self.refused:
            super().requestReceived(command, path, version)

    def refuse_body(self, site: LimitedSite, what: str) -> None:
        """Answer that ``what`` (the body, or its announced size) is over
        ``site.max_body_bytes``."""
        raise NotImplementedError
