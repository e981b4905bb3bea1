"""Cache hits are exchanges too, end to end: the real daemon (``twistd -n
llmproxy``) with the response cache on, the fake upstream, the file sink's
``events.jsonl`` and ``/metrics`` as a user reads them.

A hit (and a conditional hit answered 304) must leave the same pair of events
as an answer from the upstream, marked with the cache status, key and age, in
the conversation's session, and be counted once in the request metrics.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool

from tests.fakes.upstream import CHAT_COMPLETION, FakeUpstream, sse_chunks
from tests.integration.daemon import DaemonProtocol, kill, spawn, terminate, write_config
from tests.integration.harness import wait_until

pytestmark = pytest.mark.integration

# Appended to the daemon's [route:root] (cache = on: POST bodies are cached
# without the client's opt-in), then its own sections.
EXTRA = """cache = on

[cache]
enabled = true
store = memory
default_ttl = 300

[exporter:events]
type = file
path = events.jsonl
flush_interval = 0.05
"""


class NoCookies(CookieJar):
    """The upstream sets a cookie, and a cookie is a credential: sent back, it
    would put the next request in another cache namespace."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


@attrs.define
class Daemon:
    proc: DaemonProtocol
    transport: Any
    upstream: FakeUpstream
    client: Any
    pool: HTTPConnectionPool
    base: str
    admin: str
    events_path: Path

    async def send(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        resp = await self.client.request(
            method,
            self.base + path,
            data=None if body is None else orjson.dumps(body),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        content = await resp.content()
        got = {k.decode().lower(): v[0].decode() for k, v in resp.headers.getAllRawHeaders()}
        return resp.code, got, content

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        lines = self.events_path.read_bytes().splitlines()
        return [orjson.loads(line) for line in lines if line.strip()]

    async def exchanges(self, *request_ids: str) -> list[dict[str, Any]]:
        """The request and response events of these exchanges, once all are written."""

        def mine() -> list[dict[str, Any]]:
            return [
                e
                for e in self.events()
                if e["type"] in ("request", "response") and e["request_id"] in request_ids
            ]

        await wait_until(
            lambda: len(mine()) == 2 * len(request_ids), what="the exchanges' events in the file"
        )
        return mine()

    async def request_counts(self) -> dict[tuple[str, str], float]:
        """``llmproxy_requests_total`` of route root, by (status, outcome)."""
        resp = await self.client.get(self.admin + "/metrics")
        text = (await resp.content()).decode()
        counts: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            if family.name == "llmproxy_requests":
                for sample in family.samples:
                    if sample.labels["route"] == "root":
                        key = (sample.labels["status"], sample.labels["outcome"])
                        counts[key] = sample.value
            if family.name == "llmproxy_cache_requests":
                for sample in family.samples:
                    counts[("cache", sample.labels["result"])] = sample.value
        return counts


@pytest_twisted.async_yield_fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    upstream = FakeUpstream(reactor)
    port = upstream.listen()
    proc, transport = spawn(write_config(tmp_path, port, extra=EXTRA))
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(  # type: ignore[attr-defined]
        Agent(reactor, pool=pool), cookiejar=NoCookies()
    )
    try:
        proxy_port, admin_port = await proc.ready.addTimeout(30, reactor)
        yield Daemon(
            proc,
            transport,
            upstream,
            client,
            pool,
            f"http://127.0.0.1:{proxy_port}",
            f"http://127.0.0.1:{admin_port}",
            tmp_path / "state" / "events.jsonl",
        )
    finally:
        terminate(transport)
        try:
            await proc.ended.addTimeout(30, reactor)
        except Exception:
            kill(transport)
            await proc.ended
        await pool.closeCachedConnections()
        await upstream.stop()


def _age_agrees(age_s: Any, age_header: str) -> bool:
    """The event's age, to the ms, is the one the ``Age`` header gave in whole seconds."""
    return isinstance(age_s, float | int) and int(age_header) <= age_s < int(age_header) + 1.001


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest_twisted.ensureDeferred
async def test_a_miss_then_a_hit_are_two_exchanges_of_one_session(
    daemon: Daemon, stream: bool
) -> None:
    chat = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hi"}],
        "stream": stream,
    }
    session = {"X-Session-ID": "conv-from-the-cache"}
    code1, miss, body1 = await daemon.send(
        "POST", "/v1/chat/completions", body=chat, headers=session
    )
    code2, hit, body2 = await daemon.send(
        "POST", "/v1/chat/completions", body=chat, headers=session
    )
    assert (code1, code2) == (200, 200)
    assert (miss["x-proxy-cache"], hit["x-proxy-cache"]) == ("stored", "hit")
    assert body2 == body1 and len(daemon.upstream.requests) == 1
    key = hit["x-proxy-cache-key"]

    events = await daemon.exchanges(miss["x-llmproxy-request-id"], hit["x-llmproxy-request-id"])
    kinds = [(e["type"], e["request_id"]) for e in events]
    assert kinds == [
        ("request", miss["x-llmproxy-request-id"]),
        ("response", miss["x-llmproxy-request-id"]),
        ("request", hit["x-llmproxy-request-id"]),
        ("response", hit["x-llmproxy-request-id"]),
    ]
    first, second = events[1], events[3]
    assert (first["cache_status"], first["cache_key"], first["cache_age_s"]) == (
        "stored",
        key,
        None,
    )
    assert (second["cache_status"], second["cache_key"]) == ("hit", key)
    assert _age_agrees(second["cache_age_s"], hit["age"])
    # The hit's event is the answer the client got, read as an upstream answer is.
    for response in (first, second):
        assert (response["status"], response["outcome"], response["error"]) == (200, "ok", None)
        assert response["is_stream"] is stream
    if stream:
        text = "".join(second["response_chunks"])
        assert len(second["response_chunk_offsets_ms"]) == len(second["response_chunks"])
        assert text.encode() == body2 == b"".join(sse_chunks())
        assert second["usage"]["total_tokens"] == 8 and second["model"] == "gpt-4o-mini"
    else:
        assert second["response_body"]["text"].encode() == body2
        assert second["usage"]["total_tokens"] == CHAT_COMPLETION["usage"]["total_tokens"]  # type: ignore[index]
        assert second["model"] == CHAT_COMPLETION["model"]
    assert second["finish_reasons"] == ["stop"]
    # One conversation: both turns, request and response, in the same session.
    assert {e["session_id"] for e in events} == {"conv-from-the-cache"}
    assert [e["seq"] for e in events] == [1, 1, 2, 2]

    # Counted once each: the hit under its own outcome, and once by the cache.
    counts = await daemon.request_counts()
    assert counts[("200", "ok")] == 1 and counts[("200", "cache_hit")] == 1
    assert sum(v for k, v in counts.items() if k[0] != "cache") == 2
    assert (counts[("cache", "hit")], counts[("cache", "miss")]) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_a_conditional_hit_is_recorded_as_the_304_it_was(daemon: Daemon) -> None:
    path = "/cacheable?cc=max-age%3D60&etag=%22v1%22"
    code1, stored, _ = await daemon.send("GET", path)
    code2, revalidated, body = await daemon.send("GET", path, headers={"If-None-Match": '"v1"'})
    assert (code1, code2, body) == (200, 304, b"")
    assert revalidated["x-proxy-cache"] == "conditional-hit"
    assert daemon.upstream.cacheable_served == 1

    events = await daemon.exchanges(
        stored["x-llmproxy-request-id"], revalidated["x-llmproxy-request-id"]
    )
    response = events[-1]
    assert (response["type"], response["request_id"]) == (
        "response",
        revalidated["x-llmproxy-request-id"],
    )
    assert (response["status"], response["outcome"]) == (304, "ok")
    assert response["cache_status"] == "conditional-hit"
    assert response["cache_key"] == revalidated["x-proxy-cache-key"] == stored["x-proxy-cache-key"]
    assert _age_agrees(response["cache_age_s"], revalidated["age"])
    assert response["response_body"]["size"] == 0 and response["usage"] is None
    assert response["response_headers"]["etag"] == '"v1"'

    counts = await daemon.request_counts()
    assert counts[("200", "ok")] == 1 and counts[("304", "cache_hit")] == 1
    assert sum(v for k, v in counts.items() if k[0] != "cache") == 2
    assert counts[("cache", "conditional_hit")] == 1
