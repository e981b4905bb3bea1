"""The upstream HTTP/1.1 client (llmproxy/proxy/client.py), driven without a reactor:
a ``Clock`` as the pool's reactor, a fake endpoint whose connections are
``StringTransport``s, raw HTTP bytes fed to ``dataReceived`` and the transport's
end delivered by hand with ``connectionLost``."""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, error, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IConsumer, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from llmproxy.proxy.client import (
    Origin,
    ResponseBodyCut,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    split_url,
)

URL = b"http://upstream.test:8080/v1/chat/completions"
HEAD_GET = b"GET /v1/chat/completions HTTP/1.1\r\nHost: upstream.test:8080\r\n\r\n"
BODY = b'{"id":"chatcmpl-1","choices":[{"message":{"content":"hi"}}]}'
DONE = Failure(ResponseDone())
JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Set-Cookie: a=1\r\n"
    b"content-length: %d\r\n"
    b"set-cookie: b=2\r\n"
    b"\r\n" % len(BODY)
) + BODY
JSON_HEADERS = [
    (b"Content-Type", [b"application/json"]),
    (b"Set-Cookie", [b"a=1", b"b=2"]),
    (b"content-length", [b"%d" % len(BODY)]),
]
CHUNKED_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
    b"7\r\ndata: 1\r\n"
    b"7\r\ndata: 2\r\n"
    b"0\r\n\r\n"
)
EMPTY_200 = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


# -- fakes --------------------------------------------------------------------


class Transport(StringTransport):
    """A StringTransport recording each write and each way it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closes: list[str] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def loseConnection(self) -> None:
        self.closes.append("lose")
        super().loseConnection()

    def abortConnection(self) -> None:
        self.closes.append("abort")
        self.disconnecting = True
        self.disconnected = True


@implementer(IStreamClientEndpoint)
class Endpoint:
    """Connects at once (``mode="ok"``), fails, or never answers (``"hang"``)."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.conns: list[UpstreamConnection] = []
        self.pending: list[tuple[IProtocolFactory, defer.Deferred[Any]]] = []
        self.cancelled = 0

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        if self.mode == "refuse":
            return defer.fail(error.ConnectionRefusedError("nobody listens"))
        if self.mode == "hang":
            d: defer.Deferred[Any] = defer.Deferred(self._cancel)
            self.pending.append((factory, d))
            return d
        return defer.succeed(self._build(factory))

    def _build(self, factory: IProtocolFactory) -> UpstreamConnection:
        conn = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        assert isinstance(conn, UpstreamConnection)
        conn.makeConnection(Transport())
        self.conns.append(conn)
        return conn

    def finish_connect(self) -> UpstreamConnection:
        """The oldest pending connect succeeds."""
        factory, d = self.pending.pop(0)
        conn = self._build(factory)
        d.callback(conn)
        return conn

    def _cancel(self, d: defer.Deferred[Any]) -> None:
        self.cancelled += 1


class Body(Protocol):
    """Records what ``deliverBody`` hands it; optional hooks act from inside."""

    def __init__(
        self,
        on_made: Callable[[Any], None] | None = None,
        on_data: Callable[[Any, bytes], None] | None = None,
    ) -> None:
        self.made: list[Any] = []
        self.chunks: list[bytes] = []
        self.reasons: list[Failure] = []
        self.on_made = on_made
        self.on_data = on_data

    def makeConnection(self, transport: Any) -> None:
        self.made.append(transport)
        self.transport = transport
        if self.on_made is not None:
            self.on_made(transport)

    def dataReceived(self, data: bytes) -> None:
        assert not self.reasons, "data after connectionLost"
        self.chunks.append(data)
        if self.on_data is not None:
            self.on_data(self.transport, data)

    def connectionLost(self, reason: Failure = DONE) -> None:
        self.reasons.append(reason)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def reason(self) -> Failure:
        assert len(self.reasons) == 1, self.reasons
        return self.reasons[0]


class Call:
    """One request's Deferred; with ``body``, the body is taken inside the
    callback, at once, as the proxy's Exchange does."""

    def __init__(self, d: defer.Deferred[UpstreamResponse], body: Body | None) -> None:
        self.d = d
        self.results: list[UpstreamResponse | Failure] = []

        def got(response: UpstreamResponse) -> UpstreamResponse:
            self.results.append(response)
            if body is not None:
                response.deliverBody(body)
            return response

        def failed(failure: Failure) -> None:
            self.results.append(failure)

        d.addCallbacks(got, failed)

    @property
    def response(self) -> UpstreamResponse:
        assert len(self.results) == 1, self.results
        result = self.results[0]
        assert isinstance(result, UpstreamResponse), result
        return result

    @property
    def failure(self) -> Failure:
        assert len(self.results) == 1, self.results
        result = self.results[0]
        assert isinstance(result, Failure), result
        return result


class Upstream:
    """A pool on a Clock with one fake endpoint for every origin."""

    def __init__(self, mode: str = "ok", max_idle: int = 100, idle_timeout: float = 50.0) -> None:
        self.clock = task.Clock()
        self.endpoint = Endpoint(mode)
        self.origins: list[Origin] = []
        self.pool = UpstreamPool(
            self.clock,
            5.0,
            max_idle=max_idle,
            idle_timeout=idle_timeout,
            endpoint_factory=self._endpoint,
        )

    def _endpoint(self, origin: Origin) -> IStreamClientEndpoint:
        self.origins.append(origin)
        return self.endpoint

    def request(
        self,
        method: bytes = b"GET",
        url: bytes = URL,
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: bytes | IBodyProducer | None = None,
        take: Body | None = None,
    ) -> Call:
        return Call(self.pool.request(method, url, list(headers), body), take)

    @property
    def conn(self) -> UpstreamConnection:
        return self.endpoint.conns[-1]

    def transport(self, conn: UpstreamConnection | None = None) -> Transport:
        t = (conn or self.conn).transport
        assert isinstance(t, Transport)
        return t

    def fetch(
        self, raw: bytes, method: bytes = b"GET", segments: Sequence[int] = ()
    ) -> tuple[Call, Body]:
        """Send a request and answer it with ``raw``, cut at ``segments``."""
        body = Body()
        call = self.request(method, take=body)
        conn = self.conn
        cuts = [0, *sorted(segments), len(raw)]
        for start, end in itertools.pairwise(cuts):
            if end > start:
                conn.dataReceived(raw[start:end])
        return call, body


def lose(conn: UpstreamConnection, exc: Exception | None = None) -> None:
    """What the reactor does once a transport is gone."""
    conn.connectionLost(Failure(exc or error.ConnectionDone("closed")))


@implementer(IBodyProducer)
class Producer:
    """A request body sent by hand: ``send`` writes, ``finish`` fires the Deferred."""

    def __init__(self, data: bytes, length: object, fail: Exception | None = None) -> None:
        self.data = data
        self.length = length
        self.fail = fail
        self.consumer: IConsumer | None = None
        self.done: defer.Deferred[None] = defer.Deferred()
        self.stopped = 0

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        self.consumer = consumer
        if self.fail is not None:
            return defer.fail(self.fail)
        return self.done

    def send(self) -> None:
        assert self.consumer is not None
        self.consumer.write(self.data)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped += 1


# -- split_url ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (b"http://api.test/v1/x?a=1", ((b"http", b"api.test", 80), b"api.test", b"/v1/x?a=1")),
        (b"https://api.test/v1", ((b"https", b"api.test", 443), b"api.test", b"/v1")),
        (b"http://api.test:8080/", ((b"http", b"api.test", 8080), b"api.test:8080", b"/")),
        (b"https://10.0.0.1:8443/p", ((b"https", b"10.0.0.1", 8443), b"10.0.0.1:8443", b"/p")),
        (b"http://api.test", ((b"http", b"api.test", 80), b"api.test", b"/")),
        (b"http://[::1]/v1", ((b"http", b"::1", 80), b"[::1]", b"/v1")),
        (b"https://[::1]", ((b"https", b"::1", 443), b"[::1]", b"/")),
        (
            b"http://[2001:db8::7]:8000/a",
            ((b"http", b"2001:db8::7", 8000), b"[2001:db8::7]:8000", b"/a"),
        ),
        (b"http://api.test?q=1", ((b"http", b"api.test", 80), b"api.test", b"/?q=1")),
        (b"http://api.test:81?q=1", ((b"http", b"api.test", 81), b"api.test:81", b"/?q=1")),
        # A query with a slash in it, still without a path.
        (b"http://api.test?next=/a/b", ((b"http", b"api.test", 80), b"api.test", b"/?next=/a/b")),
    ],
)
def test_split_url(url: bytes, expected: tuple[Origin, bytes, bytes]) -> None:
    assert split_url(url) == expected


@pytest.mark.parametrize(
    ("url", "words"),
    [
        (b"ftp://api.test/x", "not an http(s) URL"),
        (b"api.test/x", "not an http(s) URL"),
        (b"HTTPS://api.test/x", "not an http(s) URL"),
        (b"http:///x", "no host"),
        (b"http://:80/x", "no host"),
        (b"http://?q=1", "no host"),
        (b"http://[::1/x", "bad IPv6 host"),
        (b"http://[::1]x/", "bad IPv6 host"),
        (b"http://api.test:http/x", "bad port"),
        (b"http://api.test:70000/x", "bad port"),
        (b"http://api.test:-1/x", "bad port"),
        (b"http://api.test: 80/x", "bad port"),
    ],
)
def test_split_url_rejects(url: bytes, words: str) -> None:
    with pytest.raises(ValueError) as caught:
        split_url(url)
    # The message says what is wrong and names the URL.
    assert words in str(caught.value)
    assert repr(url) in str(caught.value)


def test_a_bad_url_raises_from_request_and_dials_nothing() -> None:
    up = Upstream()
    with pytest.raises(ValueError, match="ftp://"):
        up.pool.request(b"GET", b"ftp://api.test/x", [], None)
    assert up.origins == [] and up.endpoint.conns == []


def test_origins_are_remembered_and_targets_kept() -> None:
    up = Upstream()
    first = up.request(url=b"http://a.test/one?x=1")
    up.conn.dataReceived(EMPTY_200)
    first.response.deliverBody(Body())
    up.request(url=b"http://a.test/two")
    assert up.transport().writes[-1].startswith(b"GET /two HTTP/1.1\r\nHost: a.test\r\n")
    assert up.origins == [(b"http", b"a.test", 80)]  # the endpoint was made once
    up.request(url=b"https://b.test:444/three")
    assert up.origins[-1] == (b"https", b"b.test", 444)
    assert up.transport().writes[-1].startswith(b"GET /three HTTP/1.1\r\nHost: b.test:444\r\n")


def test_a_query_without_path_keeps_its_target_every_time() -> None:
    up = Upstream()
    for _ in range(2):
        up.request(url=b"http://a.test?next=/b")
        assert up.transport().writes[-1].startswith(b"GET /?next=/b HTTP/1.1\r\nHost: a.test\r\n")


# -- the request head -------------------------------------------------------------


def test_request_head_and_bytes_body_go_out_in_one_write() -> None:
    up = Upstream()
    up.request(
        b"POST",
        b"http://api.test:8080/v1/x?y=1",
        [
            (b"Content-Type", b"application/json"),
            (b"X-A", b"1"),
            (b"x-a", b"2"),
            (b"X-Evil", b"a\r\nInjected: yes\nZ: \r"),
        ],
        b'{"a":1}',
    )
    assert up.transport().writes == [
        b"POST /v1/x?y=1 HTTP/1.1\r\n"
        b"Host: api.test:8080\r\n"
        b"Content-Type: application/json\r\n"
        b"X-A: 1\r\n"
        b"x-a: 2\r\n"
        b"X-Evil: a  Injected: yes Z:  \r\n"
        b"Content-Length: 7\r\n"
        b"\r\n"
        b'{"a":1}'
    ]


@pytest.mark.parametrize(
    ("method", "body", "head"),
    [
        (b"GET", None, b"GET /p HTTP/1.1\r\nHost: api.test\r\n\r\n"),
        (b"HEAD", None, b"HEAD /p HTTP/1.1\r\nHost: api.test\r\n\r\n"),
        (b"DELETE", None, b"DELETE /p HTTP/1.1\r\nHost: api.test\r\n\r\n"),
        (b"POST", None, b"POST /p HTTP/1.1\r\nHost: api.test\r\nContent-Length: 0\r\n\r\n"),
        (b"PUT", b"", b"PUT /p HTTP/1.1\r\nHost: api.test\r\nContent-Length: 0\r\n\r\n"),
        (b"GET", b"", b"GET /p HTTP/1.1\r\nHost: api.test\r\nContent-Length: 0\r\n\r\n"),
    ],
)
def test_content_length_only_where_a_body_is_expected(
    method: bytes, body: bytes | None, head: bytes
) -> None:
    up = Upstream()
    up.request(method, b"http://api.test/p", [], body)
    assert up.transport().writes == [head]


# -- responses ---------------------------------------------------------------------


def check_json_exchange(up: Upstream, call: Call, body: Body) -> None:
    response = call.response
    assert response.code == 200
    assert response.phrase == b"OK"
    assert response.headers == JSON_HEADERS
    assert response.length == len(BODY)
    assert body.made == [up.conn]
    assert body.data == BODY
    assert body.reason.check(ResponseDone)
    assert up.pool.idle_count() == 1
    assert up.transport().closes == []


@pytest.mark.parametrize("cut", range(len(JSON_RESPONSE) + 1))
def test_json_response_split_at_any_byte(cut: int) -> None:
    up = Upstream()
    call, body = up.fetch(JSON_RESPONSE, segments=[cut])
    check_json_exchange(up, call, body)


def test_json_response_in_one_segment_and_the_connection_reused() -> None:
    up = Upstream()
    call, body = up.fetch(JSON_RESPONSE)
    check_json_exchange(up, call, body)
    transport = up.transport()
    assert transport.writes == [HEAD_GET]
    call2, body2 = up.fetch(JSON_RESPONSE)
    assert len(up.endpoint.conns) == 1 and up.pool.connections_made == 1
    assert up.transport() is transport
    assert transport.writes == [HEAD_GET, HEAD_GET]
    check_json_exchange(up, call2, body2)


def test_body_taken_after_the_response_is_complete() -> None:
    up = Upstream()
    call = up.request()
    up.conn.dataReceived(JSON_RESPONSE)
    assert up.pool.idle_count() == 0  # the body is still the exchange's
    body = Body()
    call.response.deliverBody(body)
    assert body.data == BODY and body.reason.check(ResponseDone)
    assert up.pool.idle_count() == 1


def test_chunked_response_is_dechunked_and_the_connection_reused() -> None:
    up = Upstream()
    call, body = up.fetch(CHUNKED_RESPONSE)
    assert call.response.length is None
    assert call.response.headers == [
        (b"Content-Type", [b"text/event-stream"]),
        (b"Transfer-Encoding", [b"chunked"]),
    ]
    assert body.chunks == [b"data: 1", b"data: 2"]
    assert body.reason.check(ResponseDone)
    assert up.pool.idle_count() == 1
    up.fetch(EMPTY_200)
    assert len(up.endpoint.conns) == 1


@given(st.lists(st.integers(0, len(CHUNKED_RESPONSE)), max_size=10))
def test_chunked_response_in_any_segments(cuts: list[int]) -> None:
    up = Upstream()
    call, body = up.fetch(CHUNKED_RESPONSE, segments=cuts)
    assert call.response.code == 200 and call.response.phrase == b"OK"
    assert body.data == b"data: 1data: 2"
    assert body.reason.check(ResponseDone)
    assert up.pool.idle_count() == 1


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n",
    ],
)
def test_close_delimited_body_ends_with_potential_data_loss(head: bytes) -> None:
    up = Upstream()
    call, body = up.fetch(head + b"part one, ")
    assert call.response.length is None
    up.conn.dataReceived(b"part two")
    assert body.reasons == []
    conn = up.conn
    lose(conn)
    assert body.data == b"part one, part two"
    assert body.reason.check(PotentialDataLoss)
    assert up.pool.idle_count() == 0
    up.request()
    assert len(up.endpoint.conns) == 2 and up.endpoint.conns[0] is conn


def test_transfer_coding_not_ending_in_chunked_is_close_delimited() -> None:
    up = Upstream()
    call, body = up.fetch(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n2\r\nok")
    assert call.response.length is None
    lose(up.conn)
    assert body.data == b"2\r\nok"
    assert body.reason.check(PotentialDataLoss)


def test_gzip_then_chunked_is_framed() -> None:
    up = Upstream()
    _, body = up.fetch(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n")
    lose(up.conn)
    assert body.data == b"ok"
    assert body.reason.check(ResponseBodyCut)


def test_content_length_with_transfer_encoding_is_refused() -> None:
    # Both framings at once is how responses are smuggled: llhttp refuses it.
    up = Upstream()
    call = up.request()
    up.conn.dataReceived(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    )
    assert up.transport().closes == ["abort"]
    lose(up.conn, error.ConnectionAborted())
    assert call.failure.check(UpstreamError)
    assert "unparseable" in str(call.failure.value)


def test_body_cut_short() -> None:
    up = Upstream()
    call, body = up.fetch(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd")
    assert call.response.length == 10
    lose(up.conn)
    assert body.data == b"abcd"
    assert body.reason.check(ResponseBodyCut)
    assert "closed" in str(body.reason.value)
    assert up.pool.idle_count() == 0


def test_chunked_body_cut_short() -> None:
    up = Upstream()
    _, body = up.fetch(CHUNKED_RESPONSE[:-5])
    lose(up.conn, error.ConnectionLost("reset by peer"))
    assert body.chunks == [b"data: 1", b"data: 2"]
    assert body.reason.check(ResponseBodyCut)
    assert "reset by peer" in str(body.reason.value)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
)
def test_response_without_keep_alive_closes_the_connection(raw: bytes) -> None:
    up = Upstream()
    _, body = up.fetch(raw)
    assert body.data == b"ok" and body.reason.check(ResponseDone)
    assert up.transport().closes == ["lose"]
    assert up.pool.idle_count() == 0
    lose(up.conn)
    assert len(body.reasons) == 1  # told once
    up.request()
    assert len(up.endpoint.conns) == 2


def test_http10_keep_alive_is_reused() -> None:
    up = Upstream()
    _, body = up.fetch(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok")
    assert body.reason.check(ResponseDone)
    assert up.pool.idle_count() == 1


@pytest.mark.parametrize("split", [False, True])
def test_interim_103_is_ignored(split: bool) -> None:
    up = Upstream()
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    final = b"HTTP/1.1 201 Created\r\nX-Final: 1\r\nContent-Length: 2\r\n\r\nok"
    call, body = up.fetch(hints + final, segments=[len(hints)] if split else [])
    assert call.response.code == 201
    assert call.response.phrase == b"Created"
    assert call.response.headers == [(b"X-Final", [b"1"]), (b"Content-Length", [b"2"])]
    assert body.data == b"ok" and body.reason.check(ResponseDone)
    assert up.pool.idle_count() == 1


def test_head_response_ends_at_the_head_and_closes() -> None:
    up = Upstream()
    call, body = up.fetch(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain\r\n\r\n",
        method=b"HEAD",
    )
    assert up.transport().writes == [HEAD_GET.replace(b"GET", b"HEAD")]
    assert call.response.length == 1234
    assert body.data == b"" and body.reason.check(ResponseDone)
    assert up.transport().closes == ["lose"]
    assert up.pool.idle_count() == 0
    lose(up.conn)
    assert len(body.reasons) == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nContent-Length: 50\r\n\r\n',
    ],
)
def test_204_and_304_have_no_body_and_stay_reusable(raw: bytes) -> None:
    up = Upstream()
    call, body = up.fetch(raw)
    assert call.response.code in (204, 304)
    assert body.data == b"" and body.reason.check(ResponseDone)
    assert up.pool.idle_count() == 1
    _, body2 = up.fetch(JSON_RESPONSE)
    assert len(up.endpoint.conns) == 1
    assert body2.data == BODY


# -- failures before the head -----------------------------------------------------


def test_unparseable_response_fails_the_request_and_aborts() -> None:
    up = Upstream()
    call = up.request()
    up.conn.dataReceived(b"SMTP ready\r\n\r\n")
    assert up.transport().closes == ["abort"]
    assert call.results == []
    lose(up.conn, error.ConnectionAborted())
    assert call.failure.check(UpstreamError)
    assert "unparseable response" in str(call.failure.value)
    assert up.pool.idle_count() == 0


def test_unparseable_body_cuts_it() -> None:
    up = Upstream()
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    call, body = up.fetch(head + b"2\r\nok\r\nZZ\r\n", segments=[len(head)])
    assert call.response.code == 200
    assert up.transport().closes == ["abort"]
    lose(up.conn, error.ConnectionAborted())
    assert body.data == b"ok"
    assert body.reason.check(ResponseBodyCut)
    assert "unparseable" in str(body.reason.value)


@pytest.mark.parametrize("received", [b"", b"HTTP/1.1 200 OK\r\nContent-Le"])
def test_connection_lost_before_the_head(received: bytes) -> None:
    up = Upstream()
    call = up.request()
    if received:
        up.conn.dataReceived(received)
    lose(up.conn)
    assert call.failure.check(UpstreamError)
    assert str(call.failure.value) == "the upstream closed the connection"
    assert up.pool.idle_count() == 0
    up.request()
    assert len(up.endpoint.conns) == 2


def test_connection_reset_before_the_head_names_the_reason() -> None:
    up = Upstream()
    call = up.request()
    lose(up.conn, error.ConnectionLost("Connection reset by peer"))
    assert call.failure.check(UpstreamError)
    assert "reset by peer" in str(call.failure.value)


def test_cancel_before_the_head_aborts() -> None:
    up = Upstream()
    call = up.request()
    up.conn.dataReceived(b"HTTP/1.1 200 OK\r\n")
    call.d.cancel()
    assert call.failure.check(defer.CancelledError)
    assert up.transport().closes == ["abort"]
    up.conn.dataReceived(b"Content-Length: 0\r\n\r\n")  # late bytes change nothing
    lose(up.conn, error.ConnectionAborted())
    assert len(call.results) == 1
    assert up.pool.idle_count() == 0


def test_cancel_on_a_reused_connection_aborts_it() -> None:
    up = Upstream()
    up.fetch(EMPTY_200)
    call = up.request()
    assert len(up.endpoint.conns) == 1
    call.d.cancel()
    assert call.failure.check(defer.CancelledError)
    assert up.transport().closes == ["abort"]


def test_cancel_after_the_head_changes_nothing() -> None:
    up = Upstream()
    call, body = up.fetch(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    call.d.cancel()
    assert up.transport().closes == []
    up.conn.dataReceived(b"cd")
    assert body.data == b"abcd" and body.reason.check(ResponseDone)


def test_cancel_while_connecting_cancels_the_connect() -> None:
    up = Upstream(mode="hang")
    call = up.request()
    assert len(up.endpoint.pending) == 1 and call.results == []
    call.d.cancel()
    assert up.endpoint.cancelled == 1
    assert call.failure.check(defer.CancelledError)
    assert up.pool.connections_made == 0


def test_connect_failure_fails_the_request() -> None:
    up = Upstream(mode="refuse")
    call = up.request()
    assert call.failure.check(error.ConnectionRefusedError)


def test_connection_arriving_later_sends_the_request() -> None:
    up = Upstream(mode="hang")
    call = up.request()
    conn = up.endpoint.finish_connect()
    assert up.transport(conn).writes == [HEAD_GET]
    conn.dataReceived(EMPTY_200)
    assert call.response.code == 200
    assert up.pool.connections_made == 1


# -- idle connections ------------------------------------------------------------


def test_data_on_an_idle_connection_drops_it() -> None:
    up = Upstream()
    up.fetch(EMPTY_200)
    conn = up.conn
    assert up.pool.idle_count() == 1
    conn.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    assert up.transport(conn).closes == ["lose"]
    # Out of the pool at once, not only once the close is done.
    assert up.pool.idle_count() == 0
    up.request()
    assert len(up.endpoint.conns) == 2
    lose(conn)
    assert up.pool.idle_count() == 0


def test_idle_connection_closed_by_the_upstream_is_dropped() -> None:
    up = Upstream()
    up.fetch(EMPTY_200)
    lose(up.conn)
    assert up.pool.idle_count() == 0
    up.request()
    assert len(up.endpoint.conns) == 2


def test_unparseable_body_with_its_head_fails_the_request() -> None:
    up = Upstream()
    call = up.request()
    up.conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n")
    assert up.transport().closes == ["abort"]
    lose(up.conn, error.ConnectionAborted())
    assert call.failure.check(UpstreamError)
    assert "unparseable" in str(call.failure.value)


def test_idle_sweep_closes_stale_connections() -> None:
    up = Upstream(idle_timeout=10.0)
    a, b = up.request(), up.request()
    first, second = up.endpoint.conns
    first.dataReceived(EMPTY_200)
    a.response.deliverBody(Body())  # idle from t=0
    up.clock.advance(4)
    second.dataReceived(EMPTY_200)
    b.response.deliverBody(Body())  # idle from t=4
    assert up.pool.idle_count() == 2
    for _ in range(5):  # to t=9
        up.clock.advance(1)
    assert up.transport(first).closes == [] and up.pool.idle_count() == 2
    up.clock.advance(1)  # t=10: the first has been idle idle_timeout
    assert up.transport(first).closes == ["lose"]
    assert up.transport(second).closes == []
    assert up.pool.idle_count() == 1
    for _ in range(5):  # to t=15
        up.clock.advance(1)
    assert up.transport(second).closes == ["lose"]
    assert up.pool.idle_count() == 0
    assert up.clock.getDelayedCalls() == []  # nothing left: no sweep rescheduled
    up.fetch(EMPTY_200)  # a new idle connection schedules a sweep again
    assert len(up.clock.getDelayedCalls()) == 1


def test_max_idle_closes_extra_connections_on_release() -> None:
    up = Upstream(max_idle=1)
    calls = [up.request(), up.request()]
    assert len(up.endpoint.conns) == 2
    for conn in up.endpoint.conns:
        conn.dataReceived(EMPTY_200)
    for call in calls:
        call.response.deliverBody(Body())
    assert up.pool.idle_count() == 1
    assert [up.transport(c).closes for c in up.endpoint.conns] == [[], ["lose"]]


def test_max_idle_zero_keeps_nothing() -> None:
    up = Upstream(max_idle=0)
    up.fetch(EMPTY_200)
    assert up.pool.idle_count() == 0 and up.transport().closes == ["lose"]


# -- the body's producer -----------------------------------------------------------


def test_stop_producing_during_the_body_aborts() -> None:
    up = Upstream()
    call, body = up.fetch(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd")
    conn = body.made[0]
    assert call.response.length == 10
    conn.stopProducing()
    assert up.transport().closes == ["abort"]
    up.conn.dataReceived(b"efghij")  # what was still on its way
    assert body.reasons == []
    lose(up.conn, error.ConnectionAborted())
    assert body.data == b"abcd"
    assert body.reason.check(ResponseBodyCut)
    assert "stopped" in str(body.reason.value)
    assert up.pool.idle_count() == 0


def test_stop_producing_from_the_body_with_the_rest_already_read() -> None:
    up = Upstream()
    body = Body(on_data=lambda transport, data: transport.stopProducing())
    up.request(take=body)
    up.conn.dataReceived(CHUNKED_RESPONSE)
    assert body.chunks == [b"data: 1"]  # nothing more once stopped
    assert up.transport().closes == ["abort"]
    assert up.pool.idle_count() == 0
    assert body.reasons == []
    lose(up.conn, error.ConnectionAborted())
    assert body.reason.check(ResponseBodyCut)
    up.request()
    assert len(up.endpoint.conns) == 2


def test_stop_producing_when_the_body_is_taken() -> None:
    # The proxy's relay stops at once when its client has gone.
    up = Upstream()
    body = Body(on_made=lambda transport: transport.stopProducing())
    up.request(take=body)
    up.conn.dataReceived(JSON_RESPONSE)
    assert up.transport().closes == ["abort"]
    assert up.pool.idle_count() == 0
    assert body.data == b""
    lose(up.conn, error.ConnectionAborted())
    assert body.reason.check(ResponseBodyCut)


def test_stop_producing_after_the_end_is_ignored() -> None:
    up = Upstream()
    _, body = up.fetch(JSON_RESPONSE)
    body.made[0].stopProducing()
    assert up.transport().closes == [] and up.pool.idle_count() == 1


def test_pause_after_the_end_is_ignored() -> None:
    up = Upstream()
    _, body = up.fetch(JSON_RESPONSE)
    body.made[0].pauseProducing()
    assert up.transport().producerState == "producing"
    _, body2 = up.fetch(JSON_RESPONSE)
    assert body2.data == BODY and up.pool.idle_count() == 1


def test_pause_and_resume_reach_the_transport() -> None:
    up = Upstream()
    _, body = up.fetch(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    conn = body.made[0]
    transport = up.transport()
    conn.pauseProducing()
    assert transport.producerState == "paused"
    conn.pauseProducing()
    conn.resumeProducing()
    assert transport.producerState == "producing"
    conn.pauseProducing()
    assert transport.producerState == "paused"
    up.conn.dataReceived(b"cd")  # (bytes already read still arrive)
    assert body.data == b"abcd" and body.reason.check(ResponseDone)
    # Resumed before it went back to the pool.
    assert transport.producerState == "producing"
    assert up.pool.idle_count() == 1


def test_a_paused_connection_closing_is_not_resumed_after_loss() -> None:
    up = Upstream()
    _, body = up.fetch(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    conn = body.made[0]
    conn.pauseProducing()
    lose(up.conn)
    conn.resumeProducing()  # no longer reaches a gone transport
    assert up.transport().producerState == "paused"
    assert body.reason.check(ResponseBodyCut)


def test_body_taken_after_the_connection_closed() -> None:
    up = Upstream()
    call = up.request()
    up.conn.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    lose(up.conn)
    body = Body()
    call.response.deliverBody(body)
    assert body.data == b"ok" and body.reason.check(ResponseDone)


def test_body_taken_after_the_connection_broke() -> None:
    up = Upstream()
    call = up.request()
    up.conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nok")
    lose(up.conn)
    body = Body()
    call.response.deliverBody(body)
    assert body.data == b"ok" and body.reason.check(ResponseBodyCut)


# -- close() ------------------------------------------------------------------------


def test_close_with_nothing_open_fires_at_once() -> None:
    up = Upstream()
    d = up.pool.stop(5.0)
    assert d.called


def test_close_closes_idle_connections_and_cancels_the_sweep() -> None:
    up = Upstream()
    up.fetch(EMPTY_200)
    assert len(up.clock.getDelayedCalls()) == 1
    d = up.pool.stop(5.0)
    assert up.clock.getDelayedCalls() == []
    assert up.transport().closes == ["lose"]
    assert not d.called
    lose(up.conn)
    assert d.called
    assert up.pool.idle_count() == 0


def test_close_waits_for_busy_exchanges() -> None:
    up = Upstream()
    up.fetch(EMPTY_200)
    first_call = up.request()  # takes the pooled connection
    second_call = up.request()  # dials a second one
    first, second = up.endpoint.conns
    d = up.pool.stop(5.0)
    assert up.transport(first).closes == [] and up.transport(second).closes == []
    first.dataReceived(EMPTY_200)
    first_call.response.deliverBody(Body())
    assert up.transport(first).closes == ["lose"]  # closed, not pooled again
    assert up.pool.idle_count() == 0
    lose(first)
    assert not d.called
    body = Body()
    second.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no")
    second_call.response.deliverBody(body)
    assert not d.called
    second.dataReceived(b"k")
    assert body.data == b"ok" and body.reason.check(ResponseDone)
    assert up.transport(second).closes == ["lose"]
    assert not d.called
    lose(second)
    assert d.called
    assert up.clock.getDelayedCalls() == []


def test_close_fires_when_a_busy_connection_breaks() -> None:
    up = Upstream()
    call = up.request()
    d = up.pool.stop(5.0)
    assert not d.called
    lose(up.conn)
    assert call.failure.check(UpstreamError)
    assert d.called


# -- request bodies that stream ----------------------------------------------------


def test_streamed_body_is_written_after_the_head() -> None:
    up = Upstream()
    producer = Producer(b"abcdef", 6)
    call = up.request(b"POST", body=producer)
    transport = up.transport()
    assert transport.writes == [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: upstream.test:8080\r\n"
        b"Content-Length: 6\r\n\r\n"
    ]
    assert transport.producer is producer and transport.streaming is True
    producer.send()
    assert transport.writes[1:] == [b"abcdef"]
    producer.done.callback(None)
    assert transport.producer is None
    up.conn.dataReceived(EMPTY_200)
    call.response.deliverBody(Body())
    assert up.pool.idle_count() == 1


def test_file_body_producer_streams_through_the_transport() -> None:
    up = Upstream()
    clock = up.clock
    cooperator = task.Cooperator(scheduler=lambda work: clock.callLater(0, work))
    data = b"0123456789" * 5
    producer = FileBodyProducer(io.BytesIO(data), cooperator=cooperator, readSize=8)
    up.request(b"PUT", body=producer)
    transport = up.transport()
    assert transport.producer is producer
    for _ in range(20):
        clock.advance(0)
    assert transport.value().endswith(b"Content-Length: 50\r\n\r\n" + data)
    assert transport.producer is None
    cooperator.stop()


def test_response_before_the_body_is_sent_is_not_reused() -> None:
    up = Upstream()
    producer = Producer(b"abc", 3)
    call = up.request(b"POST", body=producer)
    up.conn.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    body = Body()
    call.response.deliverBody(body)
    assert call.response.code == 413 and body.reason.check(ResponseDone)
    assert up.pool.idle_count() == 0 and up.transport().closes == ["lose"]


def test_connection_lost_while_sending_stops_the_producer() -> None:
    up = Upstream()
    producer = Producer(b"abc", 3)
    call = up.request(b"POST", body=producer)
    lose(up.conn)
    assert producer.stopped == 1
    assert call.failure.check(UpstreamError)


def test_a_failing_request_body_aborts_and_says_so() -> None:
    up = Upstream()
    call = up.request(b"POST", body=Producer(b"", 10, fail=OSError("disk gone")))
    transport = up.transport()
    assert transport.closes == ["abort"] and transport.producer is None
    lose(up.conn, error.ConnectionAborted())
    assert call.failure.check(UpstreamError)
    assert "request body could not be read" in str(call.failure.value)
    assert "disk gone" in str(call.failure.value)


def test_a_body_of_unknown_length_is_refused() -> None:
    up = Upstream()
    with pytest.raises(ValueError, match="unknown length"):
        up.pool.request(b"POST", URL, [], Producer(b"", UNKNOWN_LENGTH))
    assert up.endpoint.conns == []
