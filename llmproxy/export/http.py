"""The HTTP sinks' client: treq over the pooled Agent, tuned, with answers read
within a bound (tests: tests/unit/export/test_http.py,
tests/integration/test_sink_http_client.py).

treq's ``HTTPClient`` sends the sinks' batches (``sink_http_client``), tuned
through its own parameters where its per-request work shows in a profile
(``benchmarks/bench_sink_post.py``):

- ``NoCookies``: a sink has no session, so its jar keeps and sends nothing, and
  ``HTTPSink`` passes it as each request's ``cookies=`` too, so treq does not
  build a jar per request;
- ``BytesBody`` as ``data_to_body_producer``: the batch is written in one go
  (treq's default, ``FileBodyProducer``, takes a reactor turn per 64 KiB);
- ``unbuffered=True`` per request: an answer is read once, so treq's buffering
  wrapper would only copy it;
- the URL parsed once per sink (``HTTPSink``): treq parses a ``str`` URL with
  hyperlink on every request.

A receiver's answer must not grow the daemon's memory (issue 14: a 500 with
1 MB of gzip that inflates to 1 GiB, read whole on every retry, took the daemon
from 0.29 to 3.3 GB RSS).  Two parts bound it:

- ``GunzipAgent``, the agent treq is given, inflates a gzip answer in steps of
  at most ``INFLATE_STEP`` bytes and stops inflating as soon as the reader stops
  reading.  treq's own decoder (Twisted's ``GzipDecoder``, which treq always
  puts in front) would inflate each chunk whole — one 64 KiB read of a zip
  bomb is 64 MiB — and never sees a gzip answer: this agent takes the
  ``Content-Encoding`` off what it decodes.
- ``read_answer`` reads at most ``limit`` decoded bytes of a body.  Past it, it
  stops: the connection is closed (it never goes back to the pool with unread
  data) and the answer is what was read, marked ``cut``.  Cancelling it (a
  sink's timeout on a body that never ends) closes the connection too.

``treq.testing.StubTreq`` stands in for the client in unit tests: it takes the
same ``request`` arguments, and its answers read the same way.
"""

from __future__ import annotations

import zlib
from typing import Any, cast

import attrs
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

__all__ = [
    "INFLATE_STEP",
    "Answer",
    "BytesBody",
    "GunzipAgent",
    "NoCookies",
    "read_answer",
    "sink_http_client",
]

# The most a gzip answer is inflated by at a time, between checks that its
# reader still wants more: what one answer can hold beyond the reader's bound.
INFLATE_STEP = 16 * 1024


def quiet_pool(reactor: Any, *, persistent: bool) -> HTTPConnectionPool:
    """An ``HTTPConnectionPool`` whose connections do not log "Starting factory"
    each time one opens (the pool offers no switch: its factory's ``noisy``)."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory.noisy = False  # type: ignore[attr-defined]
    return pool


def sink_http_client(agent: IAgent) -> HTTPClient:
    """treq's client for the HTTP sinks over ``agent`` (the exporters' pooled
    ``Agent``), with gzip answers inflated in bounded steps (by a ``GunzipAgent``
    around it; one given is used as it is, so a test can read its count)."""
    gunzip = agent if isinstance(agent, GunzipAgent) else GunzipAgent(agent)
    return HTTPClient(gunzip, cookiejar=NoCookies(), data_to_body_producer=BytesBody)


class NoCookies(IndexableCookieJar):
    """A cookie jar that never keeps or sends a cookie.

    treq's client asks its jar for a ``Cookie`` header before each request and
    hands it the answer's ``Set-Cookie`` after; a sink has no session, so both
    are skipped (the standard jar parses headers and takes a lock for each).
    """

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def set_cookie(self, cookie: Any) -> None:
        pass


@implementer(IBodyProducer)
class BytesBody:
    """A request body already in memory, written in one go (``FileBodyProducer``
    goes through a cooperator, a reactor turn per 64 KiB: slower)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


# -- gzip answers, inflated in bounded steps --------------------------------------------


@implementer(IAgent)
class GunzipAgent:
    """Wraps an agent so that a gzip answer is inflated in bounded steps.

    The answer's trailing ``gzip`` content codings (``Content-Encoding: gzip``,
    or ``gzip, gzip``) are decoded here and taken off its headers, so the
    decoder treq puts in front sees nothing to decode.  ``inflated`` counts the
    bytes this agent's answers were inflated to (what the tests check).
    """

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent
        self.inflated = 0

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        answer: Deferred[IResponse] = self._agent.request(method, uri, headers, bodyProducer)
        return answer.addCallback(self._decoded)

    def _decoded(self, response: IResponse) -> IResponse:
        codings = b",".join(response.headers.getRawHeaders(b"content-encoding", [])).split(b",")
        layers = 0
        while codings and codings[-1].strip() == b"gzip":
            codings.pop()
            layers += 1
        if not layers:
            return response
        headers = response.headers.copy()
        left = [coding for coding in codings if coding.strip()]
        if left:
            headers.setRawHeaders(b"content-encoding", [b",".join(left)])
        else:
            headers.removeHeader(b"content-encoding")
        for _ in range(layers):
            response = _GunzippedResponse(response, headers, self)
        return response


@implementer(IResponse)
class _GunzippedResponse:
    """An answer whose body is delivered inflated (one gzip layer)."""

    def __init__(self, original: IResponse, headers: Headers, agent: GunzipAgent) -> None:
        self._original = original
        self._agent = agent
        self.version = original.version
        self.code = original.code
        self.phrase = original.phrase
        self.headers = headers
        self.length = UNKNOWN_LENGTH
        self.request = original.request
        self.previousResponse = original.previousResponse

    def deliverBody(self, protocol: Any) -> None:
        self._original.deliverBody(_Inflater(protocol, self._agent))

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response


@implementer(IPushProducer)
class _Inflater(Protocol):
    """Inflates a body for its reader, ``INFLATE_STEP`` bytes at a time.

    It is also the reader's transport: when the reader stops (its bound, its
    timeout), inflating stops with it, and the connection is closed.
    """

    def __init__(self, reader: Any, agent: GunzipAgent) -> None:
        self._reader = reader
        self._agent = agent
        self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._stopped = False
        self._error: Failure | None = None

    def connectionMade(self) -> None:
        self._reader.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        self._inflate(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._stopped:
            # What zlib holds back is taken in steps too: flush() would inflate it at once.
            self._inflate(b"")
        if self._error is not None:
            reason = Failure(ResponseFailed([reason, self._error]))
        self._reader.connectionLost(reason)

    def _inflate(self, data: bytes) -> None:
        while not self._stopped:
            try:
                piece = self._zlib.decompress(data, INFLATE_STEP)
            except zlib.error:
                self._error = Failure()
                self.stopProducing()
                return
            data = self._zlib.unconsumed_tail
            if piece:
                self._agent.inflated += len(piece)
                self._reader.dataReceived(piece)
            if not data and len(piece) < INFLATE_STEP:
                return

    # -- the reader's transport -------------------------------------------------------

    def pauseProducing(self) -> None:
        producer = _body_producer(self)
        if producer is not None:
            producer.pauseProducing()

    def resumeProducing(self) -> None:
        producer = _body_producer(self)
        if producer is not None:
            producer.resumeProducing()

    def stopProducing(self) -> None:
        self._stopped = True
        producer = _body_producer(self)
        if producer is not None:
            producer.stopProducing()

    def loseConnection(self) -> None:
        """As ``stopProducing`` (what ``treq.collect`` calls when its collector fails)."""
        self.stopProducing()


# -- reading an answer within a bound --------------------------------------------------


@attrs.frozen
class Answer:
    """An answer's body as read: whole, or its first ``limit`` bytes when ``cut``."""

    body: bytes
    cut: bool = False


def read_answer(response: IResponse, limit: int) -> Deferred[Answer]:
    """Read at most ``limit`` bytes of ``response``'s (decoded) body.

    Past the bound, reading stops and the connection is closed; the Deferred
    fires with the first ``limit`` bytes, ``cut``.  A body that ends with the
    connection lost early is an error (``ResponseFailed``), as with
    ``treq.content``.  Cancelling the Deferred closes the connection.
    """
    if response.length == 0:
        return succeed(Answer(b""))
    reader = _BoundedReader(limit)
    response.deliverBody(reader)
    return reader.done


class _BoundedReader(Protocol):
    """Collects a body up to a bound; ``size`` is what it holds."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self.size = 0
        self.done: Deferred[Answer] = Deferred(self._cancelled)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return  # cut or cancelled: what is still on its way is dropped
        room = self._limit - self.size
        if len(data) <= room:
            self._parts.append(data)
            self.size += len(data)
            return
        self._parts.append(data[:room])
        self.size += room
        self._stop()
        self.done.callback(Answer(b"".join(self._parts), cut=True))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(Answer(b"".join(self._parts)))
        else:
            self.done.errback(reason)

    def _cancelled(self, _: Deferred[Answer]) -> None:
        self._stop()

    def _stop(self) -> None:
        # The response's transport closes the connection on stopProducing: the
        # unread rest of this answer never meets the next request.
        producer = _body_producer(self)
        if producer is not None:
            producer.stopProducing()


def _body_producer(protocol: Protocol) -> IPushProducer | None:
    """The transport of a protocol reading a response body: an ``IPushProducer``
    (``IResponse.deliverBody``), whose ``stopProducing`` closes the connection."""
    return cast("IPushProducer | None", protocol.transport)
