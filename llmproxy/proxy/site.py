"""The client-facing HTTP site: body, header and connection limits, no access
log by default (tests: tests/integration/test_proxy.py, tests/integration/test_access.py)."""

from __future__ import annotations

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import HTTPChannel, Request
from twisted.web.http_headers import InvalidHeaderName, _nameEncoder

from llmproxy.http.errors import error_body
from llmproxy.http.headers import HttpDate
from llmproxy.proxy.forward import ProxyResource

__all__ = ["ProxyRequest", "ProxySite"]

log = Logger()
_SERVER = [server.version]
_date = HttpDate()


class ProxyRequest(server.Request):
    """Enforces ``max_body_bytes`` while the body arrives, not after."""

    _too_large = False
    _body_seen = 0

    def gotLength(self, length: int | None) -> None:
        site: ProxySite = self.channel.site  # type: ignore[union-attr,attr-defined]
        if length is not None and length > site.max_body_bytes:
            self._too_large = True
            site.proxy.reject_early(
                self,
                413,
                f"request body of {length} bytes is over the limit of "
                f"{site.max_body_bytes} bytes (server.max_body_bytes)",
            )
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._body_seen += len(data)
        site: ProxySite = self.channel.site  # type: ignore[union-attr,attr-defined]
        if self._body_seen > site.max_body_bytes:
            self._too_large = True
            site.proxy.reject_early(
                self,
                413,
                f"request body is over the limit of {site.max_body_bytes} bytes "
                "(server.max_body_bytes)",
            )
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._too_large:
            return
        super().requestReceived(command, path, version)

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


class _LimitedChannel(HTTPChannel):
    _peer: IAddress | None = None
    _host: IAddress | None = None

    def connectionMade(self) -> None:
        site: ProxySite = self.site  # type: ignore[attr-defined]
        limits = site.proxy.limits
        self.maxHeaders = limits.max_header_count
        self.totalHeadersSize = limits.max_header_bytes
        site.proxy.metrics.connections += 1
        super().connectionMade()
        if site.proxy.metrics.connections > site.max_connections:
            body = error_body(503, "too many connections (server.max_connections)")
            self.transport.write(  # type: ignore[union-attr]
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            site.proxy.metrics.finished("-", 503, "rejected", 0.0, None, 0, len(body))
            self.loseConnection()

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

    def _respondToBadRequestAndDisconnect(self) -> None:
        # HTTPChannel answers every bad request head with a bare 400; its
        # counters say whether a header limit was the reason (each is checked
        # right after it is incremented), which deserves 431 and a message.
        if self._receivedHeaderSize > self.totalHeadersSize:
            status, code = 431, "request_header_fields_too_large"
            message = (
                f"request line and headers are over {self.totalHeadersSize} bytes "
                "(server.max_header_bytes)"
            )
        elif self._receivedHeaderCount > self.maxHeaders:
            status, code = 431, "request_header_fields_too_large"
            message = f"more than {self.maxHeaders} request headers (server.max_header_count)"
        else:
            status, code = 400, "bad_request"
            message = "malformed HTTP request"
        body = error_body(status, message, code)
        reason = _REASONS[status]
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, reason, len(body), body)
        )
        self.site.proxy.metrics.finished(  # type: ignore[attr-defined]
            "-", status, "rejected", 0.0, None, 0, len(body)
        )
        self.loseConnection()


_REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}


class ProxySite(server.Site):
    requestFactory = ProxyRequest
    protocol = _LimitedChannel  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        proxy: ProxyResource,
        *,
        max_body_bytes: int,
        max_connections: int,
        idle_timeout: float,
        access_log: bool = False,
    ) -> None:
        # Bodies pass through untouched: Twisted's form parsing of POST bodies
        # (Content-Type parsed with the email package on every POST, 12% of the
        # request path's CPU) is pure cost here.  Request.__init__ copies this
        # from the site, so a class attribute on the request would be overwritten.
        super().__init__(proxy, timeout=idle_timeout, parsePOSTFormSubmission=False)
        assert proxy.isLeaf  # ProxyRequest.process renders it without traversal
        self.proxy = proxy
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self._access_log = access_log

    def log(self, request: Request) -> None:
        # Site writes a formatted access line per request by default, which costs
        # more than the proxying itself; the exchange events carry it all anyway.
        if self._access_log:
            super().log(request)
