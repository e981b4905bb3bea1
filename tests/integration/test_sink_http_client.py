"""The sinks' HTTP client (``llmproxy/export/http.py``: treq over the pooled
Agent) on the wire: the real Loki and Lunary sinks through it to the fake
receivers (tests/fakes/) on 127.0.0.1.

What a sink relies on from it: the batch and its headers arrive, connections
are kept alive, a redirect of a POST is not followed, a gzip answer is read as
text, header values go out as UTF-8, the request is cancellable (the sink's
timeout), no cookie is kept, and transport failures are retries.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterator
from typing import Any

import attrs
import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.web import resource as web_resource
from twisted.web import server
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from llmproxy.export.http import sink_http_client
from llmproxy.export.sink import Delivered, HTTPClient, Rejected, Retry
from llmproxy.export.sinks.loki import LokiSink
from llmproxy.settings import ExporterSettings
from tests.fakes.loki import FakeLoki, Hang, Respond, RunningFakeLoki, listen_fake_loki

pytestmark = pytest.mark.integration


@attrs.define
class _Wire:
    loki: RunningFakeLoki
    client: HTTPClient
    pool: HTTPConnectionPool

    @property
    def fake(self) -> FakeLoki:
        return self.loki.fake

    def sink(self, **kw: Any) -> LokiSink:
        settings = ExporterSettings(name="loki", type="loki", url=self.loki.url, **kw)
        return LokiSink.from_settings(settings, client=self.client, clock=reactor)

    def idle_connections(self) -> int:
        return sum(len(c) for c in self.pool._connections.values())  # type: ignore[attr-defined]


@pytest.fixture
def wire() -> Iterator[_Wire]:
    pool = HTTPConnectionPool(reactor, persistent=True)
    running = listen_fake_loki(FakeLoki())
    yield _Wire(running, sink_http_client(Agent(reactor, pool=pool)), pool)
    pytest_twisted.blockon(pool.closeCachedConnections())
    pytest_twisted.blockon(running.stop())


def _events(n: int) -> list[dict[str, Any]]:
    now = time.time_ns()
    return [
        {"type": "request", "ts_ns": now + i, "request_id": f"req-{i}", "provider": "openai"}
        for i in range(n)
    ]


async def _deliver(sink: LokiSink, events: list[dict[str, Any]]) -> Any:
    return await sink.deliver_lines(events, [orjson.dumps(e) for e in events])


# -- what a sink relies on --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_batch_arrives_gzipped_with_its_tenant(wire: _Wire) -> None:
    verdict = await _deliver(wire.sink(tenant="team-a"), _events(3))
    assert verdict == Delivered()
    [seen] = wire.fake.requests
    assert (seen.status, seen.tenant, seen.content_encoding) == (204, "team-a", "gzip")
    stored = wire.fake.entries(tenant="team-a")
    assert [e.json()["request_id"] for e in stored] == ["req-0", "req-1", "req-2"]


@pytest_twisted.ensureDeferred
async def test_connections_are_kept_alive_between_batches(wire: _Wire) -> None:
    sink = wire.sink()
    for n in range(3):
        assert await _deliver(sink, _events(n + 1)) == Delivered()
    assert wire.fake.request_count == 3
    assert wire.idle_connections() == 1


@pytest_twisted.ensureDeferred
async def test_no_cookie_is_kept_or_sent(wire: _Wire) -> None:
    wire.fake.fail_next(Respond(204, headers={"set-cookie": "session=abc; Path=/"}))
    sink = wire.sink()
    assert await _deliver(sink, _events(1)) == Delivered()
    assert await _deliver(sink, _events(1)) == Delivered()
    assert "cookie" not in wire.fake.requests[1].headers


@pytest_twisted.ensureDeferred
async def test_a_redirected_post_is_retried_not_followed(wire: _Wire) -> None:
    # treq's RedirectAgent: a POST is never re-sent elsewhere on a 30x.
    wire.fake.fail_next(Respond(307, headers={"location": "/elsewhere"}))
    verdict = await _deliver(wire.sink(), _events(1))
    assert isinstance(verdict, Retry)
    assert wire.fake.request_count == 1 and wire.fake.entries() == []


@pytest_twisted.ensureDeferred
async def test_a_gzip_refusal_is_read_as_text(wire: _Wire) -> None:
    text = b"entry for stream '{app=\"llmproxy\"}' has timestamp too old"
    wire.fake.fail_next(
        Respond(400, body=gzip.compress(text), headers={"content-encoding": "gzip"})
    )
    verdict = await _deliver(wire.sink(), _events(1))
    assert wire.fake.requests[0].headers["accept-encoding"] == "gzip"
    assert verdict == Rejected(f"Loki refused entries (HTTP 400): {text.decode()}")


@pytest_twisted.ensureDeferred
async def test_header_values_go_out_as_utf8(wire: _Wire) -> None:
    # A configured header may hold any text; it goes out as UTF-8.
    response = await wire.client.request(
        "POST", wire.loki.push_url, data=b"{}", headers=Headers({"X-Team": ["données"]})
    )
    await treq.content(response)
    sent = wire.fake.requests[0].headers["x-team"]  # read back as latin-1 bytes
    assert sent.encode("latin-1").decode("utf-8") == "données"


@pytest_twisted.ensureDeferred
async def test_the_sink_timeout_cancels_a_request_left_unanswered(wire: _Wire) -> None:
    wire.fake.fail_next(Hang())
    verdict = await _deliver(wire.sink(timeout=0.2), _events(1))
    assert verdict == Retry("timed out after 0.2s")
    assert wire.fake.request_count == 1


@pytest_twisted.ensureDeferred
async def test_a_refused_connection_is_a_retry() -> None:
    probe = reactor.listenTCP(0, server.Site(web_resource.Resource()), interface="127.0.0.1")  # type: ignore[attr-defined]
    port = probe.getHost().port
    await defer.maybeDeferred(probe.stopListening)
    settings = ExporterSettings(name="loki", type="loki", url=f"http://127.0.0.1:{port}")
    client = sink_http_client(Agent(reactor))
    sink = LokiSink.from_settings(settings, client=client, clock=reactor)
    assert await _deliver(sink, _events(1)) == Retry("connection refused")
