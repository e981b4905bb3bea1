"""Channels no client can hold (llmproxy/http/channel.py): the request-head
deadline, the minimum body rate, the connection caps and the 431 for a long
header line, driven by a Clock over a StringTransport."""

from __future__ import annotations

from typing import Any

import attrs
import orjson
import pytest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Request

from llmproxy.http.channel import CappedRequest, ChannelLimits, LimitedChannel, LimitedSite

LIMITS = ChannelLimits(
    header_timeout=10.0,
    min_body_rate=1000,
    max_connections=4,
    max_connections_per_client=2,
    max_header_bytes=2048,
    max_header_count=10,
)


class _Hello(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        body = request.content.read() if request.content is not None else b""
        return b"hello %d" % len(body)


class _Site(LimitedSite):
    protocol = LimitedChannel  # type: ignore[assignment]

    def __init__(self, clock: Clock, limits: ChannelLimits) -> None:
        super().__init__(_Hello(), clock=clock, limits=limits)
        self.hits: list[tuple[str, int]] = []

    def limit_hit(self, channel: LimitedChannel, limit: str, status: int, message: str) -> None:
        self.hits.append((limit, status))


@attrs.define
class Conn:
    channel: LimitedChannel
    transport: StringTransport

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    @property
    def written(self) -> bytes:
        return self.transport.value()

    @property
    def status(self) -> int | None:
        head = self.written.split(b"\r\n", 1)[0]
        return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None

    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = orjson.loads(self.written.partition(b"\r\n\r\n")[2])["error"]
        return error

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)


def make(limits: ChannelLimits = LIMITS) -> tuple[Clock, _Site]:
    clock = Clock()
    site = _Site(clock, limits)
    site.startFactory()
    return clock, site


def connect(site: _Site, host: str = "10.0.0.1", port: int = 40000) -> Conn:
    address = IPv4Address("TCP", host, port)
    channel = site.buildProtocol(address)
    assert isinstance(channel, LimitedChannel)
    transport = StringTransport(peerAddress=address)
    channel.makeConnection(transport)
    return Conn(channel, transport)


def tick(clock: Clock, seconds: float, step: float = 0.25) -> None:
    clock.pump([step] * int(seconds / step))


def test_a_request_head_sent_a_line_at_a_time_is_cut_at_the_header_deadline() -> None:
    clock, site = make()
    conn = connect(site)
    conn.send(b"GET / HTTP/1.1\r\n")
    for i in range(9):  # a header line a second: each resets the idle timeout, not this
        tick(clock, 1.0)
        conn.send(b"X-Slow-%d: x\r\n" % i)
    assert conn.status is None
    tick(clock, 1.5)
    assert conn.status == 408 and conn.closing
    assert "header_timeout" in conn.error()["message"]
    assert site.hits == [("header_timeout", 408)]


def test_a_silent_new_connection_has_header_timeout_to_start() -> None:
    clock, site = make()
    conn = connect(site)
    tick(clock, 9.0)
    assert not conn.closing
    tick(clock, 1.5)
    assert conn.status == 408 and conn.closing


def test_a_request_sent_whole_is_served_and_not_watched() -> None:
    _clock, site = make()
    conn = connect(site)
    conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    assert conn.status == 200 and conn.written.endswith(b"hello 3")
    assert site.channel_watch.watching() == 0


def test_an_idle_keep_alive_connection_is_left_to_the_idle_timeout() -> None:
    clock, site = make()
    conn = connect(site)
    conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.transport.clear()
    tick(clock, 30.0)  # three header deadlines, no byte sent: not a slow request
    assert not conn.closing and site.hits == []
    conn.send(b"GET / HTTP")  # the next request starts its own deadline
    tick(clock, 10.5)
    assert conn.status == 408


def test_a_trickling_body_is_cut_by_the_minimum_rate() -> None:
    clock, site = make()
    conn = connect(site)
    conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
    conn.send(b"x" * 5000)  # 10 s of grace, then 1000 bytes a second on average
    tick(clock, 14.0)
    conn.send(b"x" * 200)
    assert conn.status is None  # 5200 bytes after 14 s: 4 s past the grace, 4000 needed
    tick(clock, 2.5)
    assert conn.status == 408 and conn.closing
    assert "min_body_rate" in conn.error()["message"]
    assert site.hits == [("min_body_rate", 408)]


def test_a_body_at_the_minimum_rate_completes() -> None:
    clock, site = make()
    conn = connect(site)
    conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 30000\r\n\r\n")
    for _ in range(20):
        tick(clock, 1.0)
        conn.send(b"x" * 1500)
    assert conn.status == 200 and conn.written.endswith(b"hello 30000")
    assert site.hits == [] and site.channel_watch.watching() == 0


def test_connections_past_the_per_client_cap_get_429_others_are_not_affected() -> None:
    _clock, site = make()
    first, _second = connect(site, port=1), connect(site, port=2)
    third = connect(site, port=3)
    assert third.status == 429 and third.closing
    assert "max_connections_per_client" in third.error()["message"]
    other = connect(site, host="10.0.0.2")
    assert other.status is None and not other.closing
    first.channel.connectionLost(Exception("gone"))  # type: ignore[arg-type]
    third.channel.connectionLost(Exception("gone"))  # type: ignore[arg-type]
    again = connect(site, port=4)
    assert again.status is None and not again.closing
    assert site.channel_watch.per_client == {"10.0.0.1": 2, "10.0.0.2": 1}
    assert site.hits == [("max_connections_per_client", 429)]


def test_connections_past_max_connections_get_503() -> None:
    _clock, site = make(attrs.evolve(LIMITS, max_connections_per_client=0))
    conns = [connect(site, port=p) for p in range(5)]
    assert [c.status for c in conns] == [None, None, None, None, 503]
    assert site.hits == [("max_connections", 503)]
    conns[-1].channel.connectionLost(Exception("gone"))  # type: ignore[arg-type]
    assert site.channel_watch.connections == 4


def test_a_unix_socket_peer_is_not_counted_per_client() -> None:
    _clock, site = make()
    channel = site.buildProtocol(UNIXAddress(None))
    assert isinstance(channel, LimitedChannel)
    channel.makeConnection(StringTransport(peerAddress=UNIXAddress(None)))
    assert site.channel_watch.per_client == {} and site.channel_watch.connections == 1


@pytest.mark.parametrize(("limit", "served"), [(16 * 1024, False), (64 * 1024, True)])
def test_max_header_bytes_governs_one_long_header_line(limit: int, served: bool) -> None:
    _clock, site = make(attrs.evolve(LIMITS, max_header_bytes=limit))
    conn = connect(site)
    conn.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20 * 1024 + b"\r\n\r\n")
    if served:
        assert conn.status == 200
        return
    assert conn.status == 431 and conn.closing
    assert conn.error()["code"] == "request_header_fields_too_large"
    assert "max_header_bytes" in conn.error()["message"]
    assert site.hits == [("max_header_bytes", 431)]


def test_a_long_line_without_its_end_is_refused_before_it_is_whole() -> None:
    _clock, site = make(attrs.evolve(LIMITS, max_header_bytes=16 * 1024))
    conn = connect(site)
    conn.send(b"GET / HTTP/1.1\r\nX-Long: ")
    for _ in range(17):
        conn.send(b"a" * 1024)
    assert conn.status == 431 and conn.closing


def test_the_sweep_runs_while_listening_only() -> None:
    clock, site = make()
    assert clock.getDelayedCalls()
    site.stopFactory()
    assert not clock.getDelayedCalls()


# -- the body cap (CappedRequest) ----------------------------------------------------------


class _CappedRequest(CappedRequest):
    def refuse_body(self, site: LimitedSite, what: str) -> None:
        assert isinstance(site, _CappedSite)
        site.refusals.append(what)
        channel = self.channel
        assert isinstance(channel, LimitedChannel)
        channel.refuse("max_body_bytes", 413, f"{what} over {site.max_body_bytes}", b"")


class _CappedSite(_Site):
    requestFactory = _CappedRequest
    max_body_bytes = 10

    def __init__(self, clock: Clock, limits: ChannelLimits) -> None:
        super().__init__(clock, limits)
        self.refusals: list[str] = []


def capped() -> _CappedSite:
    site = _CappedSite(Clock(), LIMITS)
    site.startFactory()
    return site


def test_a_body_within_the_cap_is_served() -> None:
    site = capped()
    conn = connect(site)
    conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789")
    assert conn.status == 200 and conn.written.endswith(b"hello 10")
    assert site.refusals == []


def test_an_announced_length_over_the_cap_is_refused_before_the_body() -> None:
    site = capped()
    conn = connect(site)
    conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
    assert conn.status == 413 and conn.closing
    assert site.refusals == ["request body of 11 bytes"]
    assert b"hello" not in conn.written


def test_a_chunked_body_is_refused_once_it_passes_the_cap_and_never_served() -> None:
    site = capped()
    conn = connect(site)
    conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    conn.send(b"6\r\n012345\r\n")
    assert site.refusals == [] and conn.status is None
    conn.send(b"5\r\n67890\r\n")
    assert site.refusals == ["request body"] and conn.status == 413
    conn.send(b"3\r\nabc\r\n0\r\n\r\n")
    assert site.refusals == ["request body"]
    assert b"hello" not in conn.written
