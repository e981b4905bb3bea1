"""The HTTP sinks' client: treq over the pooled Agent, tuned (tests:
tests/unit/test_export_http.py, tests/integration/test_sink_http_client.py).

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

``treq.testing.StubTreq`` stands in for the client in unit tests: it takes the
same ``request`` arguments.
"""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.iweb import IAgent, IBodyProducer
from zope.interface import implementer

__all__ = ["BytesBody", "NoCookies", "sink_http_client"]


def sink_http_client(agent: IAgent) -> HTTPClient:
    """treq's client for the HTTP sinks over ``agent`` (the exporters' pooled ``Agent``)."""
    return HTTPClient(agent, cookiejar=NoCookies(), data_to_body_producer=BytesBody)


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
