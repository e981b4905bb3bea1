"""The sinks' HTTP client and the bound on answers (llmproxy/export/http.py, and
``HTTPSink`` reading its answers): without sockets, through treq's
``RequestTraversalAgent`` (a real Twisted client and server in memory) and
``StubTreq``.  On real sockets: tests/integration/test_sink_http_client.py.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import pytest
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from llmproxy.export.http import (
    INFLATE_STEP,
    Answer,
    GunzipAgent,
    NoCookies,
    read_answer,
    sink_http_client,
)
from llmproxy.export.sink import ANSWER_LIMIT, EncodedBatch, HTTPSink
from llmproxy.export.verdict import Rejected, Retry

URL = "http://sink.test/push"


class Answering(Resource):
    """Answers every request with one status, headers and body."""

    isLeaf = True

    def __init__(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._status = status
        self._body = body
        self._headers = dict(headers or {})
        self.cookies: list[str | None] = []

    def render(self, request: Request) -> bytes:
        cookie = request.getHeader(b"cookie")
        self.cookies.append(None if cookie is None else cookie.decode())
        request.setResponseCode(self._status)
        for name, value in self._headers.items():
            request.setHeader(name, value)
        return self._body


class Endless(Resource):
    """Starts an answer and never ends it; remembers whether the client went away."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.gone: list[Failure] = []

    def render(self, request: Request) -> int:
        request.setResponseCode(500)
        request.write(b"still ")
        request.notifyFinish().addErrback(self.gone.append)
        return NOT_DONE_YET


@attrs.define
class Wire:
    traversal: RequestTraversalAgent
    gunzip: GunzipAgent

    def read(self, limit: int = ANSWER_LIMIT) -> Answer | Failure:
        client = sink_http_client(self.gunzip)
        d = client.request("POST", URL, data=b"{}", unbuffered=True)
        d.addCallback(read_answer, limit)
        self.traversal.flush()
        return result_of(d)


def wire(resource: Resource) -> Wire:
    traversal = RequestTraversalAgent(resource)
    return Wire(traversal, GunzipAgent(traversal))


def result_of(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "no result yet"
    return out[0]


def zeros_gzip(size: int) -> bytes:
    compress = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return compress.compress(b"\0" * size) + compress.flush()


# -- gzip answers ----------------------------------------------------------------------------


def test_a_gzip_answer_is_inflated_whole_when_within_the_bound() -> None:
    text = b"".join(b"line %d of the answer\n" % i for i in range(20_000))  # ~450 KB
    w = wire(Answering(200, gzip.compress(text), {"content-encoding": "gzip"}))
    answer = w.read(limit=len(text))
    assert answer == Answer(text)
    assert w.gunzip.inflated == len(text)


def test_an_answer_many_steps_long_from_a_few_bytes_is_inflated_whole() -> None:
    # Zeros: a few bytes of input give many steps of output, ending on a step.
    body = b"\0" * (4 * INFLATE_STEP)
    w = wire(Answering(200, zeros_gzip(len(body)), {"content-encoding": "gzip"}))
    assert w.read(limit=len(body)) == Answer(body)


def test_a_zip_bomb_is_inflated_to_the_bound_and_no_further() -> None:
    w = wire(Answering(500, zeros_gzip(64 << 20), {"content-encoding": "gzip"}))
    answer = w.read(limit=ANSWER_LIMIT)
    assert isinstance(answer, Answer)
    assert answer.cut and answer.body == b"\0" * ANSWER_LIMIT
    assert ANSWER_LIMIT <= w.gunzip.inflated <= ANSWER_LIMIT + INFLATE_STEP


def test_gzip_layered_twice_is_inflated_twice_within_the_bound() -> None:
    text = b"twice " * 1000
    layered = gzip.compress(gzip.compress(text))
    w = wire(Answering(200, layered, {"content-encoding": "gzip, gzip"}))
    assert w.read() == Answer(text)
    bomb = gzip.compress(zeros_gzip(64 << 20))
    w = wire(Answering(500, bomb, {"content-encoding": "gzip,gzip"}))
    answer = w.read(limit=ANSWER_LIMIT)
    assert isinstance(answer, Answer) and answer.cut
    # The outer layer inflates only what the inner one asks for.
    assert w.gunzip.inflated <= 2 * (ANSWER_LIMIT + INFLATE_STEP)


def test_the_codings_it_does_not_decode_are_left_on_the_answer() -> None:
    inner = b"brotli bytes, not decoded here"
    traversal = RequestTraversalAgent(
        Answering(200, gzip.compress(inner), {"content-encoding": "br, gzip"})
    )
    d = GunzipAgent(traversal).request(b"POST", URL.encode())
    response = result_of(d)
    assert response.headers.getRawHeaders(b"content-encoding") == [b"br"]
    assert result_of(read_answer(response, ANSWER_LIMIT)) == Answer(inner)


def test_an_answer_without_gzip_is_passed_through_as_it_is() -> None:
    traversal = RequestTraversalAgent(Answering(200, b"plain", {"content-encoding": "identity"}))
    d = GunzipAgent(traversal).request(b"POST", URL.encode())
    response = result_of(d)
    assert type(response).__name__ == "Response"  # Twisted's own, not wrapped
    assert result_of(read_answer(response, ANSWER_LIMIT)) == Answer(b"plain")


def test_a_corrupt_gzip_answer_fails_the_read() -> None:
    w = wire(Answering(200, b"\x1f\x8b\x08\x00 this is not deflate", {"content-encoding": "gzip"}))
    failure = w.read()
    assert isinstance(failure, Failure) and failure.check(ResponseFailed)
    inner = failure.value.reasons  # type: ignore[union-attr]
    assert any(reason.check(zlib.error) for reason in inner)


# -- reading within a bound --------------------------------------------------------------------


def test_an_answer_of_exactly_the_bound_is_read_whole() -> None:
    w = wire(Answering(200, b"x" * 100))
    assert w.read(limit=100) == Answer(b"x" * 100)


def test_an_answer_one_byte_past_the_bound_is_cut() -> None:
    w = wire(Answering(200, b"x" * 101))
    assert w.read(limit=100) == Answer(b"x" * 100, cut=True)


def test_an_empty_answer_is_read_as_empty() -> None:
    w = wire(Answering(204, b""))
    assert w.read() == Answer(b"")


def test_cancelling_a_read_closes_the_connection() -> None:
    endless = Endless()
    traversal = RequestTraversalAgent(endless)
    response = result_of(sink_http_client(traversal).request("POST", URL, unbuffered=True))
    reading = read_answer(response, ANSWER_LIMIT)
    traversal.flush()
    assert endless.gone == []
    reading.cancel()
    traversal.flush()
    failure = result_of(reading)
    assert isinstance(failure, Failure) and failure.check(CancelledError)
    assert len(endless.gone) == 1  # the server saw the client go


# -- cookies ------------------------------------------------------------------------------------


def test_no_cookie_is_kept_or_sent() -> None:
    answering = Answering(204, b"", {"set-cookie": "session=abc; Path=/"})
    traversal = RequestTraversalAgent(answering)
    jar = NoCookies()
    client = sink_http_client(traversal)
    for _ in range(2):
        result_of(client.request("POST", URL, cookies=jar))
    assert answering.cookies == [None, None]
    assert list(jar) == []


# -- HTTPSink: its answers within the batch's bound ------------------------------------------


class BoundedSink(HTTPSink):
    limit = ANSWER_LIMIT

    def encode(self, events: Sequence[dict[str, Any]]) -> EncodedBatch:
        return EncodedBatch(b"[]", {"Content-Type": "application/json"}, answer_limit=self.limit)


def deliver(resource: Resource, limit: int = ANSWER_LIMIT, clock: Clock | None = None) -> Any:
    sink = BoundedSink(name="t", url=URL, client=StubTreq(resource), clock=clock or Clock())
    sink.limit = limit
    return result_of(sink.deliver([{"i": 1}]))


def test_a_refusal_past_the_bound_is_rejected_with_its_start() -> None:
    verdict = deliver(Answering(400, b"0123456789abcdef"), limit=10)
    assert verdict == Rejected("HTTP 400: 0123456789")


def test_a_5xx_past_the_bound_is_still_retried() -> None:
    assert deliver(Answering(503, b"x" * (4 << 20))) == Retry("HTTP 503")


def test_the_default_bound_reads_a_refusal_of_its_size_whole() -> None:
    text = b"y" * ANSWER_LIMIT
    sink = BoundedSink(name="t", url=URL, client=StubTreq(Answering(400, text)), clock=Clock())
    verdict = result_of(sink.deliver([{"i": 1}]))
    assert verdict == Rejected("HTTP 400: " + "y" * 500)


def test_an_answer_that_never_ends_times_out_and_its_connection_is_closed() -> None:
    endless = Endless()
    clock = Clock()
    stub = StubTreq(endless)
    sink = BoundedSink(name="t", url=URL, client=stub, clock=clock, timeout=5.0)
    d = sink.deliver([{"i": 1}])
    stub.flush()
    clock.advance(5.0)
    stub.flush()
    assert result_of(d) == Retry("timed out after 5s")
    assert len(endless.gone) == 1


@pytest.mark.parametrize("limit", [0, 1, 17])
def test_a_small_bound_is_honoured_exactly(limit: int) -> None:
    verdict = deliver(Answering(400, b"z" * 100), limit=limit)
    assert verdict == Rejected("HTTP 400: " + "z" * limit)
