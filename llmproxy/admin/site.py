"""The admin listener's site: small limits of its own, and the admin token
checked before any request body is read
(tests: tests/unit/admin/test_site.py, tests/integration/test_hostile_clients.py).

A plain ``twisted.web.server.Site`` reads a whole body (to a temp file above
100 kB) before the resource can refuse it, keeps a half-sent request head for
its 12-hour default timeout, and takes every connection offered: an
unauthenticated client could fill the disk or take the descriptors the proxy
needs.  Here, whatever the proxy's own limits:

- the request head must arrive within ``server.header_timeout`` and be at most
  :data:`ADMIN_MAX_HEADER_BYTES` in :data:`ADMIN_MAX_HEADER_COUNT` headers (431);
- with ``admin_token`` set, a request without it is answered 401 (and audited)
  as soon as its headers are in: no byte of its body is read (the probes too
  with ``probes_public = false``);
- bodies over :data:`ADMIN_MAX_BODY_BYTES` get 413 (``POST /cache/purge`` takes
  its arguments in the query; no admin endpoint needs a body), and a body must
  average :data:`ADMIN_MIN_BODY_RATE` bytes a second after ``header_timeout`` (408);
- at most :data:`ADMIN_MAX_CONNECTIONS` connections are open (503), and an idle
  one is closed after :data:`ADMIN_IDLE_TIMEOUT`.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.web import http

from llmproxy.admin.resource import AdminResource
from llmproxy.http.channel import CappedRequest, ChannelLimits, LimitedChannel, LimitedSite

__all__ = [
    "ADMIN_IDLE_TIMEOUT",
    "ADMIN_MAX_BODY_BYTES",
    "ADMIN_MAX_CONNECTIONS",
    "ADMIN_MAX_HEADER_BYTES",
    "ADMIN_MAX_HEADER_COUNT",
    "ADMIN_MIN_BODY_RATE",
    "AdminSite",
]

ADMIN_MAX_BODY_BYTES = 4096
ADMIN_MAX_CONNECTIONS = 64
ADMIN_MAX_HEADER_BYTES = 8192
ADMIN_MAX_HEADER_COUNT = 50
ADMIN_IDLE_TIMEOUT = 60.0
ADMIN_MIN_BODY_RATE = 256  # bytes/s once header_timeout has passed
_WWW_AUTHENTICATE = b'WWW-Authenticate: Bearer realm="llmproxy-admin"\r\n'


class _AdminRequest(CappedRequest):
    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        assert isinstance(channel, LimitedChannel)
        site: AdminSite = channel.site  # type: ignore[attr-defined]
        resource = site.admin
        if resource.needs_token:
            command: bytes = getattr(channel, "_command", b"-")
            path: bytes = getattr(channel, "_path", b"-").partition(b"?")[0]
            sent = self.requestHeaders.getRawHeaders(b"authorization")
            if not (
                resource.is_public(command, path.rstrip(b"/") or b"/")
                or resource.token_matches(sent[0] if sent else None)
            ):
                peer = channel.getPeer()
                host = getattr(peer, "host", None)
                resource.audit_denied(
                    f"{host}:{getattr(peer, 'port', '')}" if host else "-",
                    command,
                    path,
                    bool(sent),
                )
                self.refused = True
                channel.refuse(
                    "admin_token", 401, "admin token required", _WWW_AUTHENTICATE, named=False
                )
                return
        super().gotLength(length)

    def refuse_body(self, site: LimitedSite, what: str) -> None:
        channel = self.channel
        assert isinstance(channel, LimitedChannel)
        message = f"request body over {ADMIN_MAX_BODY_BYTES} bytes"
        channel.refuse("max_body_bytes", 413, message, b"", named=True)


class _AdminChannel(LimitedChannel):
    pass


class AdminSite(LimitedSite):
    """The admin listener (``server.admin_listen``, and a worker's unix socket)."""

    requestFactory = _AdminRequest
    protocol = _AdminChannel  # type: ignore[assignment]
    max_body_bytes = ADMIN_MAX_BODY_BYTES

    def __init__(
        self,
        resource: AdminResource,
        *,
        clock: IReactorTime,
        header_timeout: float,
        on_limit: Callable[[str], None] | None = None,
    ) -> None:
        limits = ChannelLimits(
            header_timeout=header_timeout,
            min_body_rate=ADMIN_MIN_BODY_RATE,
            max_connections=ADMIN_MAX_CONNECTIONS,
            max_connections_per_client=0,
            max_header_bytes=ADMIN_MAX_HEADER_BYTES,
            max_header_count=ADMIN_MAX_HEADER_COUNT,
            keys="admin listener's {}",
        )
        super().__init__(resource, clock=clock, limits=limits, timeout=ADMIN_IDLE_TIMEOUT)
        self.admin = resource
        self._on_limit = on_limit
        self.refused: dict[str, int] = {}

    def limit_hit(self, channel: LimitedChannel, limit: str, status: int, message: str) -> None:
        self.refused[limit] = self.refused.get(limit, 0) + 1
        if self._on_limit is not None:
            self._on_limit(limit)

    def log(self, request: http.Request) -> None:
        pass  # no access log: the audit log has the refusals
