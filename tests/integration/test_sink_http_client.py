"""The sinks' HTTP client (``AgentClient``) against a real server on 127.0.0.1.

What a sink relies on from treq, checked on the wire: the body and headers as
given, a redirect of a POST not followed, a gzip answer decoded, the request cancellable (the
sink's timeout), and the answer judged by ``HTTPSink``.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool

from llmproxy.export.sink import AgentClient, Delivered, EncodedBatch, HTTPSink, Rejected, Retry

pytestmark = pytest.mark.integration


class _Receiver(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []
        self.held: list[server.Request] = []

    def render_POST(self, request: server.Request) -> bytes | int:
        assert request.content is not None
        self.seen.append(
            {
                "path": request.path,
                "body": request.content.read(),
                "headers": {
                    name.decode().lower(): b", ".join(values).decode()
                    for name, values in request.requestHeaders.getAllRawHeaders()
                },
            }
        )
        if request.path == b"/moved":
            request.setResponseCode(307)
            request.setHeader(b"location", b"/push")
            return b""
        if request.path == b"/refuse":
            request.setResponseCode(400)
            text = b"entry for stream '{app=\"llmproxy\"}' has timestamp too old"
            accepts = request.getHeader(b"accept-encoding") or b""
            if b"gzip" in accepts:
                request.setHeader(b"content-encoding", b"gzip")
                return gzip.compress(text)
            return text
        if request.path == b"/hold":
            self.held.append(request)
            return server.NOT_DONE_YET
        request.setResponseCode(204)
        return b""


@attrs.define
class _Site:
    receiver: _Receiver
    base: str
    client: AgentClient
    pool: HTTPConnectionPool


@pytest.fixture
def site() -> Iterator[_Site]:
    receiver = _Receiver()
    # No idle timer on the server's side: it would outlive the test's connections.
    site = server.Site(receiver, timeout=None)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    pool = HTTPConnectionPool(reactor, persistent=True)
    base = f"http://127.0.0.1:{port.getHost().port}"
    yield _Site(receiver, base, AgentClient(Agent(reactor, pool=pool)), pool)
    for request in receiver.held:
        request.finish()
    pytest_twisted.blockon(pool.closeCachedConnections())
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@attrs.define(kw_only=True)
class _Sink(HTTPSink):
    def encode(self, events: Sequence[dict[str, Any]]) -> EncodedBatch:
        return EncodedBatch(
            body=b"".join(e["line"] for e in events),
            headers={"Content-Type": "application/x-ndjson", "X-Scope-OrgID": "tenant-1"},
        )


def _sink(site: _Site, path: str, timeout: float = 10.0) -> _Sink:
    return _Sink(name="t", url=site.base + path, client=site.client, clock=reactor, timeout=timeout)


@pytest_twisted.ensureDeferred
async def test_a_batch_arrives_with_its_body_and_headers(site: _Site) -> None:
    verdict = await _sink(site, "/push").deliver([{"line": b'{"a":1}\n'}, {"line": b'{"b":2}\n'}])
    assert verdict == Delivered()
    [seen] = site.receiver.seen
    assert seen["path"] == b"/push"
    assert seen["body"] == b'{"a":1}\n{"b":2}\n'
    assert seen["headers"]["content-type"] == "application/x-ndjson"
    assert seen["headers"]["x-scope-orgid"] == "tenant-1"
    assert seen["headers"]["content-length"] == str(len(seen["body"]))


@pytest_twisted.ensureDeferred
async def test_header_values_go_out_as_utf8_as_with_treq(site: _Site) -> None:
    # A configured extra header may hold any text; treq sent str values as UTF-8.
    response = await site.client.request(
        "POST", site.base + "/push", data=b"x", headers={"X-Team": "données"}
    )
    assert response.code == 204
    assert await treq.content(response) == b""
    assert site.receiver.seen[0]["headers"]["x-team"] == "données"


@pytest_twisted.ensureDeferred
async def test_connections_are_kept_alive_between_batches(site: _Site) -> None:
    sink = _sink(site, "/push")
    for n in range(3):
        assert await sink.deliver([{"line": b"%d\n" % n}]) == Delivered()
    assert [s["body"] for s in site.receiver.seen] == [b"0\n", b"1\n", b"2\n"]
    assert len(site.pool._connections) == 1  # type: ignore[attr-defined]
    [(_, idle)] = site.pool._connections.items()  # type: ignore[attr-defined]
    assert len(idle) == 1


@pytest_twisted.ensureDeferred
async def test_a_redirected_post_is_retried_not_followed(site: _Site) -> None:
    # As with treq (its RedirectAgent): a POST is never re-sent elsewhere on a 30x.
    verdict = await _sink(site, "/moved").deliver([{"line": b"x\n"}])
    assert isinstance(verdict, Retry)
    assert [s["path"] for s in site.receiver.seen] == [b"/moved"]


@pytest_twisted.ensureDeferred
async def test_a_gzip_refusal_is_read_as_text(site: _Site) -> None:
    verdict = await _sink(site, "/refuse").deliver([{"line": b"x\n"}])
    assert site.receiver.seen[0]["headers"]["accept-encoding"] == "gzip"
    assert isinstance(verdict, Rejected)
    assert verdict.reason == "HTTP 400: entry for stream '{app=\"llmproxy\"}' has timestamp too old"


@pytest_twisted.ensureDeferred
async def test_the_sink_timeout_cancels_a_request_left_unanswered(site: _Site) -> None:
    verdict = await _sink(site, "/hold", timeout=0.2).deliver([{"line": b"x\n"}])
    assert verdict == Retry("timed out after 0.2s")
    assert [s["path"] for s in site.receiver.seen] == [b"/hold"]


@pytest_twisted.ensureDeferred
async def test_a_refused_connection_is_a_retry() -> None:
    probe = reactor.listenTCP(0, server.Site(resource.Resource()), interface="127.0.0.1")  # type: ignore[attr-defined]
    port = probe.getHost().port
    await defer.maybeDeferred(probe.stopListening)
    client = AgentClient(Agent(reactor))
    sink = _Sink(name="t", url=f"http://127.0.0.1:{port}/push", client=client, clock=reactor)
    assert await sink.deliver([{"line": b"x\n"}]) == Retry("connection refused")
