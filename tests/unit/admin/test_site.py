"""The admin listener's site (llmproxy/admin/site.py): the token before any body,
a body cap of a few KB, a head deadline and a connection cap."""

from __future__ import annotations

from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from llmproxy.admin.resource import AdminResource
from llmproxy.admin.site import (
    ADMIN_MAX_BODY_BYTES,
    ADMIN_MAX_CONNECTIONS,
    AdminSite,
)
from llmproxy.http.channel import LimitedChannel
from tests.unit.admin.test_resource import ADMIN_TOKEN, FakeAudit


class Purger:
    def __init__(self) -> None:
        self.calls = 0

    def purge(self, *, key: str | None = None, prefix: str | None = None) -> Any:
        from twisted.internet import defer

        self.calls += 1
        return defer.succeed(0)


def make(
    token: str = ADMIN_TOKEN, probes_public: bool = True
) -> tuple[Clock, AdminSite, FakeAudit, Purger, list[str]]:
    clock, audit, purger = Clock(), FakeAudit(), Purger()
    hits: list[str] = []
    resource = AdminResource(
        is_ready=lambda: True,
        stats=lambda: {},
        registry=CollectorRegistry(),
        token=token,
        probes_public=probes_public,
        audit=audit,
        cache=purger,
    )
    site = AdminSite(resource, clock=clock, header_timeout=5.0, on_limit=hits.append)
    site.startFactory()
    return clock, site, audit, purger, hits


def connect(site: AdminSite, port: int = 50000) -> tuple[LimitedChannel, StringTransport]:
    address = IPv4Address("TCP", "127.0.0.1", port)
    channel = site.buildProtocol(address)
    assert isinstance(channel, LimitedChannel)
    transport = StringTransport(peerAddress=address)
    channel.makeConnection(transport)
    return channel, transport


def status(transport: StringTransport) -> int:
    return int(transport.value().split(b" ", 2)[1])


def test_a_request_without_the_token_is_refused_before_its_body_is_read() -> None:
    _clock, site, audit, purger, hits = make()
    channel, transport = connect(site)
    channel.dataReceived(
        b"POST /cache/purge?all=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 314572800\r\n\r\n"
    )
    # Answered with the headers alone: not one byte of the 300 MiB was asked for.
    assert status(transport) == 401 and transport.disconnecting
    assert b'WWW-Authenticate: Bearer realm="llmproxy-admin"' in transport.value()
    body = orjson.loads(transport.value().partition(b"\r\n\r\n")[2])
    assert body["error"]["message"] == "admin token required"
    channel.dataReceived(b"x" * 65536)  # what the client sends anyway is dropped
    assert purger.calls == 0
    assert [(a["action"], a["path"], a["reason"]) for a in audit.lines] == [
        ("admin_denied", "/cache/purge", "missing")
    ]
    assert hits == ["admin_token"]


def test_a_wrong_token_is_refused_and_audited_without_the_token() -> None:
    _clock, site, audit, _purger, _hits = make()
    channel, transport = connect(site)
    channel.dataReceived(
        b"GET /stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-" + b"x" * 30 + b"\r\n\r\n"
    )
    assert status(transport) == 401
    assert audit.lines[0]["reason"] == "wrong_token"
    assert "wrong-" not in orjson.dumps(audit.lines).decode()


def test_with_the_token_a_body_over_the_cap_gets_413_and_a_small_one_is_served() -> None:
    _clock, site, audit, purger, hits = make()
    auth = b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\n"
    channel, transport = connect(site)
    channel.dataReceived(
        b"POST /cache/purge?all=1 HTTP/1.1\r\nHost: x\r\n"
        + auth
        + b"Content-Length: %d\r\n\r\n" % (ADMIN_MAX_BODY_BYTES + 1)
    )
    assert status(transport) == 413 and transport.disconnecting
    channel, transport = connect(site, 50001)
    channel.dataReceived(
        b"POST /cache/purge?all=1 HTTP/1.1\r\nHost: x\r\n"
        + auth
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % (ADMIN_MAX_BODY_BYTES + 1)
        + b"x" * (ADMIN_MAX_BODY_BYTES + 1)
        + b"\r\n0\r\n\r\n"
    )
    assert status(transport) == 413
    channel, transport = connect(site, 50002)
    channel.dataReceived(
        b"POST /cache/purge?all=1 HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 2\r\n\r\n{}"
    )
    assert status(transport) == 200 and purger.calls == 1
    assert hits == ["max_body_bytes", "max_body_bytes"]
    assert [a["action"] for a in audit.lines] == ["cache_purged"]


def test_without_an_admin_token_requests_are_served_as_before() -> None:
    _clock, site, _audit, _purger, _hits = make(token="")
    channel, transport = connect(site)
    channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(transport) == 200 and transport.value().endswith(b'{"status":"ok"}')


def test_the_public_probes_pass_the_early_check_without_the_token_and_nothing_else() -> None:
    _clock, site, audit, purger, hits = make()
    for port, request in enumerate((b"GET /health", b"HEAD /ready/", b"GET /ready?x=1")):
        channel, transport = connect(site, 50000 + port)
        channel.dataReceived(request + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status(transport) == 200, request
    # Not a probe: another method, or another path, still needs the token first.
    for port, request in enumerate((b"POST /health", b"GET /stats", b"GET /health/x")):
        channel, transport = connect(site, 50010 + port)
        channel.dataReceived(request + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 9999999\r\n\r\n")
        assert status(transport) == 401 and transport.disconnecting, request
    assert purger.calls == 0
    assert [a["path"] for a in audit.lines] == ["/health", "/stats", "/health/x"]
    assert hits == ["admin_token"] * 3


def test_with_probes_public_off_the_probes_need_the_token_too() -> None:
    _clock, site, audit, _purger, _hits = make(probes_public=False)
    channel, transport = connect(site)
    channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(transport) == 401
    assert [a["reason"] for a in audit.lines] == ["missing"]


def test_a_partial_head_is_cut_at_the_header_deadline() -> None:
    clock, site, _audit, _purger, hits = make()
    channel, transport = connect(site)
    channel.dataReceived(b"GET /stats HTTP/1.1\r\nHost: x\r\n")
    clock.pump([0.5] * 12)
    assert status(transport) == 408 and transport.disconnecting
    assert hits == ["header_timeout"]


def test_connections_past_the_admin_cap_get_503() -> None:
    _clock, site, _audit, _purger, hits = make()
    conns = [connect(site, 40000 + i) for i in range(ADMIN_MAX_CONNECTIONS + 1)]
    assert not conns[-2][1].value()
    assert status(conns[-1][1]) == 503
    assert hits == ["max_connections"]
