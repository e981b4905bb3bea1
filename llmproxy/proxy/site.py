"""The client-facing HTTP site: body, header, deadline and connection limits
(the channel's in llmproxy/http/channel.py), no access log by default
(tests: tests/integration/test_proxy.py, tests/integration/test_access.py,
tests/integration/test_hostile_clients.py, tests/unit/proxy/test_site.py).

A refusal by a limit is counted in ``llmproxy_limit_rejections_total{limit}``
and in the requests counter (route ``-``, outcome ``rejected``); one that cut a
request short (408, 431) also becomes a ``response`` event with the request
line and headers received so far."""

from __future__ import annotations

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import Request
from twisted.web.http_headers import Headers, InvalidHeaderName, _nameEncoder

from llmproxy.capture.record import ExchangeRecord
from llmproxy.config.model import ServerSettings
from llmproxy.http.channel import CappedRequest, ChannelLimits, LimitedChannel, LimitedSite
from llmproxy.http.headers import HttpDate, request_id_from
from llmproxy.proxy.forward import ProxyResource

__all__ = ["ProxyRequest", "ProxySite"]

log = Logger()
_SERVER = [server.version]
_date = HttpDate()


class ProxyRequest(CappedRequest):
    """Enforces ``max_body_bytes`` while the body arrives, not after."""

    def refuse_body(self, site: LimitedSite, what: str) -> None:
        proxy: ProxyResource = site.proxy  # type: ignore[attr-defined]
        proxy.metrics.limit_hit("max_body_bytes")
        proxy.reject_early(
            self,
            413,
            f"{what} is over the limit of {site.max_body_bytes} bytes (server.max_body_bytes)",
        )

    def process(self) -> None:
        # server.Request.process, less what a site whose root is one leaf
        # resource does not need: no traversal (getResourceFor, prepath and
        # postpath, unquoting every path segment: nothing here reads them), no
        # encoder lookup (the proxy never compresses), and the Date header
        # from a per-second cache.  The same headers, in the same order.
        site: ProxySite = self.channel.site  # type: ignore[union-attr,attr-defined]
        self.site = site
        headers = self.responseHeaders
        headers.setRawHeaders(b"Server", _SERVER)
        headers.setRawHeaders(b"Date", [_date()])
        if self.path == b"*":
            self._handleStar()  # type: ignore[no-untyped-call]
            return
        try:
            self.render(site.resource)  # type: ignore[no-untyped-call]
        except BaseException:
            self.processingFailed(Failure())  # type: ignore[no-untyped-call]


class _LimitedChannel(LimitedChannel):
    _peer: IAddress | None = None
    _host: IAddress | None = None

    def connectionMade(self) -> None:
        self.site.proxy.metrics.connections += 1  # type: ignore[attr-defined]
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.proxy.metrics.connections -= 1  # type: ignore[attr-defined]
        super().connectionLost(reason)

    # Every Request asks for both addresses when it is made; a TCP transport
    # builds a new address object each time, and getHost() is a getsockname()
    # system call.  Neither changes while the connection lasts.
    def getPeer(self) -> IAddress:
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    def getHost(self) -> IAddress:
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def headerReceived(self, line: bytes) -> bool:
        # HTTPChannel.headerReceived, with the same checks and answers, less
        # its repeated work: addRawHeader canonicalised the name a second
        # time and rewrote CR/LF in a value already refused for containing
        # them, and every header went through _maybeChooseTransferDecoder.
        name, colon, data = line.partition(b":")
        if not colon:
            self._respondToBadRequestAndDisconnect()
            return False
        try:
            header = _nameEncoder.encode(name)
        except InvalidHeaderName:
            self._respondToBadRequestAndDisconnect()
            return False
        data = data.strip(b" \t")
        # A header value must not contain NUL, CR, or LF (RFC 9110 section 5.5).
        if b"\r" in data or b"\n" in data or b"\x00" in data:
            self._respondToBadRequestAndDisconnect()
            return False
        if (
            header == b"Content-Length" or header == b"Transfer-Encoding"
        ) and not self._maybeChooseTransferDecoder(header, data):
            return False
        # (Headers keeps canonical name -> values; the name is canonical and
        # the value clean, which is all addRawHeader would have ensured.)
        self.requests[-1].requestHeaders._rawHeaders.setdefault(header, []).append(data)
        self._receivedHeaderCount += 1
        if self._receivedHeaderCount > self.maxHeaders:
            self._respondToBadRequestAndDisconnect()
            return False
        return True

    def bad_request(self) -> None:
        self.site.proxy.metrics.finished("-", 400, "rejected", 0.0, None, 0, 0)  # type: ignore[attr-defined]

    def request_so_far(self) -> tuple[bytes, bytes, Headers] | None:
        """Method, target and headers of the request being received, when its
        request line was read."""
        command = getattr(self, "_command", None)
        if command is None or not self.requests or self._handlingRequest:
            return None
        return command, self._path, self.requests[-1].requestHeaders


def channel_limits(server_settings: ServerSettings) -> ChannelLimits:
    """The proxy listener's limits from ``[server]``."""
    return ChannelLimits(
        header_timeout=server_settings.header_timeout,
        min_body_rate=server_settings.min_body_rate,
        max_connections=server_settings.max_connections,
        max_connections_per_client=server_settings.max_connections_per_client,
        max_header_bytes=server_settings.max_header_bytes,
        max_header_count=server_settings.max_header_count,
    )


class ProxySite(LimitedSite):
    requestFactory = ProxyRequest
    protocol = _LimitedChannel  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        proxy: ProxyResource,
        *,
        clock: IReactorTime,
        server_settings: ServerSettings,
        access_log: bool = False,
    ) -> None:
        # Bodies pass through untouched: Twisted's form parsing of POST bodies
        # (Content-Type parsed with the email package on every POST, 12% of the
        # request path's CPU) is pure cost here.  Request.__init__ copies this
        # from the site, so a class attribute on the request would be overwritten.
        super().__init__(
            proxy,
            clock=clock,
            limits=channel_limits(server_settings),
            timeout=server_settings.idle_timeout,
            parsePOSTFormSubmission=False,
        )
        assert proxy.isLeaf  # ProxyRequest.process renders it without traversal
        self.proxy = proxy
        self.max_body_bytes = server_settings.max_body_bytes
        self._access_log = access_log

    def apply(self, server_settings: ServerSettings) -> None:
        """A config reload: the limits of new connections and of the next sweep."""
        self.max_body_bytes = server_settings.max_body_bytes
        self.timeOut = server_settings.idle_timeout
        self.channel_watch.set_limits(channel_limits(server_settings))

    def limit_hit(self, channel: LimitedChannel, limit: str, status: int, message: str) -> None:
        proxy = self.proxy
        metrics = proxy.metrics
        metrics.limit_hit(limit)
        metrics.finished("-", status, "rejected", 0.0, None, 0, 0)
        so_far = channel.request_so_far() if isinstance(channel, _LimitedChannel) else None
        if so_far is None or not proxy.events.enabled:
            return  # no request yet (a connection refused, or a silent one)
        method, target, headers = so_far
        path, _, query = target.partition(b"?")
        rid = request_id_from(headers.getRawHeaders(b"x-request-id", (None,))[0])
        record = ExchangeRecord(
            request_id=rid,
            started_at=proxy.clock.seconds(),
            method=method.decode("latin-1"),
            path=path.decode("latin-1")[:2048],
            query=query.decode("latin-1")[:2048],
            route="-",
            provider="",
            upstream_url="",
            upstream_host="",
            client_addr=_address(channel.getPeer()),
            request_headers=[(n, v) for n, vs in headers.getAllRawHeaders() for v in vs],
            environment=proxy.limits.environment,
            machine=proxy.machine,
        )
        record.status = status
        record.outcome = "rejected"
        record.error = message
        record.ended_at = 0.0
        proxy.events.request_finished(record)

    def log(self, request: Request) -> None:
        # Site writes a formatted access line per request by default, which costs
        # more than the proxying itself; the exchange events carry it all anyway.
        if self._access_log:
            super().log(request)


def _address(peer: IAddress) -> str:
    host = getattr(peer, "host", None)
    return f"{host}:{getattr(peer, 'port', '')}" if host else "-"
