"""The sinks' HTTP client (llmproxy/export/http.py) without sockets, through
treq's ``RequestTraversalAgent`` (a real Twisted client and server in memory).
On real sockets: tests/integration/test_sink_http_client.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Request

from llmproxy.export.http import NoCookies, sink_http_client

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


def result_of(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "no result yet"
    return out[0]


def test_no_cookie_is_kept_or_sent() -> None:
    answering = Answering(204, b"", {"set-cookie": "session=abc; Path=/"})
    traversal = RequestTraversalAgent(answering)
    jar = NoCookies()
    client = sink_http_client(traversal)
    for _ in range(2):
        result_of(client.request("POST", URL, cookies=jar))
    assert answering.cookies == [None, None]
    assert list(jar) == []
