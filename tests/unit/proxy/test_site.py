"""The client-facing channel's request header parsing and response head
(llmproxy/proxy/site.py): the same answers as Twisted's HTTPChannel."""

from __future__ import annotations

import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.http import HTTPChannel, _IdentityTransferDecoder, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.server import version

from llmproxy.config.loader import load_settings
from llmproxy.proxy.site import _LimitedChannel
from llmproxy.runtime.service import ProxyService


class _Request:
    def __init__(self) -> None:
        self.requestHeaders = Headers()
        self.chunks: list[bytes] = []

    def handleContentChunk(self, data: bytes) -> None:
        self.chunks.append(data)


def _feed(channel: HTTPChannel, lines: list[bytes]) -> tuple[list[Any], Any, Any]:
    request = _Request()
    channel.requests = [request]
    channel.maxHeaders = 5
    channel.length = 0
    refused: list[int] = []
    channel._respondToBadRequestAndDisconnect = lambda: refused.append(1)  # type: ignore[method-assign]
    results = []
    for line in lines:
        results.append(channel.headerReceived(line))
        if refused:
            break
    decoder = channel._transferDecoder
    return (
        [results, refused, sorted(request.requestHeaders.getAllRawHeaders())],
        type(decoder),
        channel.length,
    )


_NAME = st.sampled_from(
    [
        b"Content-Length",
        b"content-length",
        b"Transfer-Encoding",
        b"X-Thing",
        b"x-thing",
        b"Bad Name",
        b"",
        b"X\x00",
        b"\xe9t\xe9",
        b" X-Lead",
    ]
)
_SEP = st.sampled_from([b":", b": ", b":\t ", b"", b"::"])
_VALUE = st.lists(
    st.sampled_from(
        [
            b"12",
            b"-1",
            b" ",
            b"\t",
            b"chunked",
            b"identity",
            b"gzip",
            b"a, b",
            b"\xe9",
            b"\x00",
            b"\r",
            b"\n",
            b"value",
            b":",
        ]
    ),
    max_size=4,
).map(b"".join)
_LINES = st.lists(st.tuples(_NAME, _SEP, _VALUE).map(b"".join), max_size=7)


@settings(max_examples=400)
@given(_LINES)
def test_header_lines_are_parsed_and_refused_as_twisted_does(lines: list[bytes]) -> None:
    assert _feed(_LimitedChannel(), lines) == _feed(HTTPChannel(), lines)


def test_a_content_length_header_sets_the_body_decoder() -> None:
    (results, refused, headers), decoder, length = _feed(
        _LimitedChannel(), [b"content-length:  67 ", b"X-Two: a", b"x-two: b"]
    )
    assert results == [True, True, True] and not refused
    assert decoder is _IdentityTransferDecoder and length == 67
    assert headers == [(b"Content-Length", [b"67"]), (b"X-Two", [b"a", b"b"])]


# -- the whole channel, in memory ---------------------------------------------

_ANSWER = b'{"ok":true}'


class _Endpoint:
    def __init__(self) -> None:
        self.made: list[Any] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        self.made.append(proto)
        return defer.succeed(proto)


def _channel(tmp_path: Any) -> tuple[Any, StringTransport, _Endpoint]:
    settings = load_settings(
        text=f"[server]\nstate_dir = {tmp_path}\n\n[route:mock]\nprefix = /\n"
        "upstream = http://127.0.0.1:9\nprovider = openai\n",
        env={},
    )
    clock = MemoryReactorClock()
    service = ProxyService(settings, clock)
    endpoint = _Endpoint()
    service.upstream._make_endpoint = lambda origin: endpoint  # type: ignore[method-assign]
    service.site.reactor = clock
    channel = service.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    client = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel.makeConnection(client)
    return channel, client, endpoint


def _exchange(channel: Any, endpoint: _Endpoint) -> None:
    channel.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    endpoint.made[-1].dataReceived(
        b"HTTP/1.1 200 OK\r\nServer: upstream\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(_ANSWER), _ANSWER)
    )


def test_answers_carry_twisteds_server_and_a_current_date(tmp_path: Any) -> None:
    channel, client, endpoint = _channel(tmp_path)
    for _ in range(2):  # (the second one from the cache)
        before = datetimeToString(int(time.time()))
        _exchange(channel, endpoint)
        after = datetimeToString(int(time.time()))
        head, _, body = client.value().partition(b"\r\n\r\n")
        client.clear()
        lines = head.split(b"\r\n")
        assert lines[0] == b"HTTP/1.1 200 OK" and body == _ANSWER
        assert lines[1] == b"Server: " + version
        assert lines[2] in (b"Date: " + before, b"Date: " + after)
        assert b"Server: upstream" not in head and b"1970" not in head
    assert len(endpoint.made) == 1  # both ends kept alive


def test_options_star_is_answered_by_the_site(tmp_path: Any) -> None:
    channel, client, endpoint = _channel(tmp_path)
    channel.dataReceived(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 0\r\n" in client.value()
    client.clear()
    channel.dataReceived(b"GET * HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 405 ")
    assert not endpoint.made  # nothing went upstream


def test_the_client_address_is_asked_of_the_transport_once(tmp_path: Any) -> None:
    channel, client, endpoint = _channel(tmp_path)
    asked: list[str] = []
    get_peer, get_host = client.getPeer, client.getHost
    client.getPeer = lambda: asked.append("peer") or get_peer()  # type: ignore[method-assign]
    client.getHost = lambda: asked.append("host") or get_host()  # type: ignore[method-assign]
    for _ in range(3):
        _exchange(channel, endpoint)
    # (The peer was asked once already, when the connection was made: its address
    # is counted against max_connections_per_client.)
    assert sorted(asked) == ["host"]
    assert channel.getPeer() == IPv4Address("TCP", "127.0.0.1", 40000)
