"""The sinks' HTTP client (``llmproxy/export/http.py``: treq over the pooled
Agent) on the wire: the real Loki and Lunary sinks through it to the fake
receivers (tests/fakes/) on 127.0.0.1.

What a sink relies on from it: the batch and its headers arrive, connections
are kept alive, a redirect of a POST is not followed, a gzip answer is read as
text, header values go out as UTF-8, the request is cancellable (the sink's
timeout), and transport failures are retries.  And what it must withstand: an
answer is read up to a bound (a zip bomb, a huge body, a body that never ends),
its connection then closed, and a full batch's Lunary results are still read whole.
"""

from __future__ import annotations

import gzip
import resource
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import attrs
import orjson
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web import resource as web_resource
from twisted.web import server
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from llmproxy.config.model import ExporterSettings
from llmproxy.export.http import INFLATE_STEP, GunzipAgent, read_answer, sink_http_client
from llmproxy.export.sink import ANSWER_LIMIT
from llmproxy.export.sinks.loki import PARTLY_REFUSED, LokiSink
from llmproxy.export.sinks.lunary import LunarySink
from llmproxy.export.verdict import Delivered, Rejected, Retry
from llmproxy.interfaces import HTTPClient
from tests.fakes.loki import (
    Endless,
    FakeLoki,
    Hang,
    Respond,
    RunningFakeLoki,
    listen_fake_loki,
)
from tests.fakes.lunary import DEFAULT_KEY, DUPLICATE, FakeLunary, listen_fake_lunary
from tests.integration.harness import wait_until

pytestmark = pytest.mark.integration

GiB = 1 << 30


@attrs.define
class _Wire:
    loki: RunningFakeLoki
    gunzip: GunzipAgent
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
    gunzip = GunzipAgent(Agent(reactor, pool=pool))
    yield _Wire(running, gunzip, sink_http_client(gunzip), pool)
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


def _gzip_bomb(inflated: int) -> bytes:
    """A gzip stream of ``inflated`` zero bytes, ~1000 times smaller: one MiB of
    zeros compressed after a full flush is the same bytes every time, so the
    stream is that block repeated (built in well under a second)."""
    mib = b"\0" * (1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = deflate.compress(mib) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(inflated >> 20):
        crc = zlib.crc32(mib, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, inflated & 0xFFFFFFFF)
    return header + block * (inflated >> 20) + deflate.flush() + trailer


def test_the_gzip_bomb_is_what_it_claims() -> None:
    small = _gzip_bomb(3 << 20)
    assert gzip.decompress(small) == b"\0" * (3 << 20)
    assert len(_gzip_bomb(GiB)) < 1_100_000


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


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
    assert verdict == Rejected(f"{PARTLY_REFUSED}: {text.decode()}")
    assert wire.gunzip.inflated == len(text)


@pytest_twisted.ensureDeferred
async def test_header_values_go_out_as_utf8(wire: _Wire) -> None:
    # A configured header may hold any text; it goes out as UTF-8.
    response = await wire.client.request(
        "POST", wire.loki.push_url, data=b"{}", headers=Headers({"X-Team": ["données"]})
    )
    await read_answer(response, ANSWER_LIMIT)
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


# -- what it withstands: an answer is read up to a bound -------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_gzip_bomb_answer_is_inflated_no_further_than_the_bound(wire: _Wire) -> None:
    # Issue 14: 1 MB of gzip that inflates to 1 GiB, answered with a 500, took the
    # daemon from 0.29 to 3.3 GB RSS when it was read whole on every retry.
    bomb = _gzip_bomb(GiB)
    wire.fake.fail_next(
        *[Respond(500, body=bomb, headers={"content-encoding": "gzip"}) for _ in range(3)]
    )
    peak_before = _peak_rss_bytes()
    sink = wire.sink()
    for _ in range(3):
        verdict = await _deliver(sink, _events(1))
        assert isinstance(verdict, Retry) and verdict.reason.startswith("HTTP 500: ")
    # Each answer inflated up to the bound, then no further: the decoder stopped
    # with the reader (at most one step past it).
    assert 3 * ANSWER_LIMIT <= wire.gunzip.inflated <= 3 * (ANSWER_LIMIT + INFLATE_STEP)
    assert _peak_rss_bytes() - peak_before < 200 << 20
    # The rest of each answer was left unread: no connection went back to the pool,
    # and the next batch goes out on a new one.
    assert wire.idle_connections() == 0
    assert await _deliver(sink, _events(1)) == Delivered()


@pytest_twisted.ensureDeferred
async def test_a_huge_refusal_is_judged_on_its_start(wire: _Wire) -> None:
    text = b"line too long " * 100_000  # 1.4 MB
    wire.fake.fail_next(Respond(400, body=text))
    verdict = await _deliver(wire.sink(), _events(1))
    assert verdict == Rejected(f"{PARTLY_REFUSED}: {text[:500].decode().strip()}")
    assert wire.idle_connections() == 0


@pytest_twisted.ensureDeferred
async def test_an_answer_past_the_bound_is_cut_there(wire: _Wire) -> None:
    wire.fake.fail_next(Respond(500, body=b"x" * (ANSWER_LIMIT + 1)), Respond(500, body=b"y" * 10))
    first = await wire.client.request("POST", wire.loki.push_url, data=b"{}", unbuffered=True)
    answer = await read_answer(first, ANSWER_LIMIT)
    assert answer.cut and answer.body == b"x" * ANSWER_LIMIT
    second = await wire.client.request("POST", wire.loki.push_url, data=b"{}", unbuffered=True)
    assert (await read_answer(second, ANSWER_LIMIT)).body == b"y" * 10


@pytest_twisted.ensureDeferred
async def test_an_answer_of_exactly_the_bound_is_read_whole(wire: _Wire) -> None:
    wire.fake.fail_next(Respond(500, body=b"x" * ANSWER_LIMIT))
    response = await wire.client.request("POST", wire.loki.push_url, data=b"{}", unbuffered=True)
    answer = await read_answer(response, ANSWER_LIMIT)
    assert not answer.cut and len(answer.body) == ANSWER_LIMIT
    assert wire.idle_connections() == 1


@pytest_twisted.ensureDeferred
async def test_an_answer_that_never_ends_times_out_and_its_connection_is_closed(
    wire: _Wire,
) -> None:
    wire.fake.fail_next(Endless(500, chunk=b"upstream overloaded, please "))
    verdict = await _deliver(wire.sink(timeout=0.2), _events(1))
    assert verdict == Retry("timed out after 0.2s")
    # The receiver sees its connection closed (it counts the answer as hung until then).
    await wait_until(lambda: wire.fake.hung == 0, what="the endless answer's connection closed")
    assert wire.idle_connections() == 0


@pytest_twisted.ensureDeferred
async def test_a_full_lunary_batch_answer_is_read_whole() -> None:
    # 1000 exchanges are 2000 Lunary events; sent a second time, every start is a
    # duplicate: ~180 KB of results, past ANSWER_LIMIT, and all of them needed.
    running = listen_fake_lunary(FakeLunary(rate_limit=None))
    pool = HTTPConnectionPool(reactor, persistent=True)
    try:
        settings = ExporterSettings(
            name="lunary", type="lunary", endpoint=running.url, api_key=DEFAULT_KEY
        )
        client = sink_http_client(Agent(reactor, pool=pool))
        sink = LunarySink.from_settings(settings, client=client, clock=reactor)
        now = time.time_ns()
        events = [
            {
                "type": "response",
                "request_id": f"req-{i}",
                "ts_ns": now + i,
                "status": 200,
                "outcome": "ok",
                "model": "gpt-4o-mini",
            }
            for i in range(1000)
        ]
        assert await sink.deliver(events) == Delivered()
        assert await sink.deliver(events) == Delivered()
        results = orjson.loads(running.fake.requests[-1].reply)["results"]
        assert len(results) == 2000
        assert sum(DUPLICATE in r.get("error", "") for r in results) == 1000
        assert len(running.fake.requests[-1].reply) > ANSWER_LIMIT
        assert len(running.fake.runs) == 1000
    finally:
        await pool.closeCachedConnections()
        await running.stop()
