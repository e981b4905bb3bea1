"""The response cache end to end: the real proxy service on 127.0.0.1, a real
upstream, and each store (in memory, and a real redis-server), with the cache's
clock under the test's control.

The service is wired by hand here (``proxy.cache``, the admin's ``cache``), as
llmproxy/runtime/service.py will do from ``[cache]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import pytest_twisted
import treq
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task, threads
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived

from llmproxy.access.tokens import TokenFile
from llmproxy.cache import build_cache
from llmproxy.cache.cache import ResponseCache
from llmproxy.cache.redis_store import RedisStore
from llmproxy.cache.store import MemoryStore
from llmproxy.cli.cache import add_cache_command
from llmproxy.config.loader import load_settings
from llmproxy.interfaces import CacheStore
from llmproxy.proxy.metrics import MetricsCollector, make_registry
from llmproxy.redis.connection import RedisConnection, parse_redis_url
from llmproxy.runtime.service import ProxyService
from llmproxy.testing import RecordingEventSink
from tests.fakes.upstream import FakeUpstream
from tests.integration.harness import (
    Collect,
    Running,
    config_text,
    raw_request,
    running_fixture,
    stop,
)
from tests.integration.redis_server import RedisServer, free_port

pytestmark = pytest.mark.integration

NOW = 1_800_000_000.0
KEY_A = "sk-proj-AAAAaaaa1111tenantA"
KEY_B = "sk-proj-BBBBbbbb2222tenantB"
UPSTREAM_KEY = "sk-upstream-Zz9Yy8Xx7Ww6"
CACHE_INI = """
[cache]
enabled = true
store = memory
max_bytes = {max_bytes}
max_object_bytes = {max_object_bytes}
default_ttl = 300
lock_timeout = 30

[route:nocache]
prefix = /nocache
upstream = http://127.0.0.1:{port}
cache = off

[route:always]
prefix = /always
upstream = http://127.0.0.1:{port}
cache = on
cache_ttl = 20

[route:secure]
prefix = /secure
upstream = http://127.0.0.1:{port}
auth = token
api_key = env:CACHE_TEST_UPSTREAM_KEY
"""


class _NoCookies(CookieJar):
    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


@attrs.define
class Answer:
    code: int
    headers: dict[str, list[str]]
    body: bytes

    def h(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


@attrs.define
class Cached:
    env: Running
    cache: ResponseCache
    clock: task.Clock
    events: RecordingEventSink
    redis: RedisServer | None
    tokens: TokenFile

    @property
    def calls(self) -> int:
        return self.env.upstream.cacheable_served

    async def send(
        self,
        path: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Answer:
        resp = await self.env.client.request(
            method, self.env.url(path), headers=headers or {}, data=body
        )
        content = await resp.content()
        return Answer(
            resp.code,
            {
                k.decode().lower(): [v.decode() for v in vs]
                for k, vs in resp.headers.getAllRawHeaders()
            },
            content,
        )

    async def admin(self, path: str) -> tuple[int, Any]:
        resp = await self.env.client.post(self.env.admin + path)
        return resp.code, orjson.loads(await resp.content())


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await task.deferLater(reactor, 0.002, lambda: None)


def _start(
    tmp_path: Path,
    store: str,
    max_bytes: str = "64MiB",
    max_object_bytes: str = "16KiB",
    *,
    redis: RedisServer | None = None,
    upstream: FakeUpstream | None = None,
) -> Cached:
    """A proxy with a cache; ``redis`` and ``upstream`` shared with another one
    when given (the caller stops them)."""
    state = tmp_path / "state"
    state.mkdir(parents=True, exist_ok=True)
    if upstream is None:
        upstream = FakeUpstream(reactor)
        port = upstream.listen()
    else:
        assert upstream.port is not None
        port = upstream.port.getHost().port  # type: ignore[attr-defined]
    extra = CACHE_INI.format(port=port, max_bytes=max_bytes, max_object_bytes=max_object_bytes)
    settings = load_settings(
        text=config_text(port, str(state), extra), env={"CACHE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}
    )
    service = ProxyService(settings, reactor)
    events = RecordingEventSink()
    service.proxy.events = events
    service.startService()
    assert service.port is not None and service.admin_port is not None
    base = f"http://127.0.0.1:{service.port.getHost().port}"  # type: ignore[attr-defined]
    admin = f"http://127.0.0.1:{service.admin_port.getHost().port}"  # type: ignore[attr-defined]
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64
    pool._factory.noisy = False  # type: ignore[attr-defined]
    # No cookie jar: the upstream sets a cookie, and a cookie is a credential.
    client = treq.client.HTTPClient(  # type: ignore[attr-defined]
        Agent(reactor, pool=pool), cookiejar=_NoCookies()
    )
    env = Running(service, upstream, base, admin, client, pool)
    clock = task.Clock()
    clock.advance(NOW)
    cache_store: CacheStore
    if store == "redis":
        if redis is None:
            redis = RedisServer(tmp_path / "redis")
            redis.start()
        connection = RedisConnection(reactor, parse_redis_url(redis.url), 5.0, "cache-test")
        ready: defer.Deferred[None] = defer.Deferred()
        connection.when_ready(lambda: None if ready.called else ready.callback(None))
        cache_store = RedisStore(redis=connection, clock=clock, prefix="test:cache:")
        cache_store.start()
        pytest_twisted.blockon(ready.addTimeout(10, reactor))
    else:
        cache_store = MemoryStore(clock=clock, max_bytes=settings.cache.max_bytes)
    cache = ResponseCache(
        settings=settings.cache, store=cache_store, clock=clock, timer=reactor, health=None
    )
    # Wired by hand, as llmproxy/runtime/service.py does from [cache] (replacing its own, if any).
    service.proxy.cache = cache
    service.admin_site.resource.cache = cache  # type: ignore[attr-defined]
    service.cache = cache  # type: ignore[attr-defined]
    return Cached(env, cache, clock, events, redis, TokenFile.in_state_dir(state))


def _stop(c: Cached) -> None:
    stop(c.env)
    pytest_twisted.blockon(c.cache.stop(0))
    if c.redis is not None:
        c.redis.stop()


@pytest.fixture(params=["memory", "redis"])
def cached(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cached]:
    c = _start(tmp_path, request.param)
    try:
        yield c
    finally:
        _stop(c)


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Cached]:
    c = _start(tmp_path, "memory", max_bytes="4KiB", max_object_bytes="2KiB")
    try:
        yield c
    finally:
        _stop(c)


# -- hits, misses and the headers ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_get_is_stored_then_answered_from_the_cache(cached: Cached) -> None:
    first = await cached.send("/mock/cacheable?cc=max-age%3D60&x=1")
    assert first.code == 200
    assert first.h("x-proxy-cache") == "stored"
    key = first.h("x-proxy-cache-key")
    assert key is not None and key.startswith("mock/anon/GET/")
    assert first.h("cache-status") == "llmproxy; fwd=miss; stored; ttl=60"
    assert first.json["call"] == 1
    cached.clock.advance(7)
    second = await cached.send("/mock/cacheable?cc=max-age%3D60&x=1")
    assert second.code == 200
    assert second.body == first.body
    assert second.h("x-proxy-cache") == "hit"
    assert second.h("x-proxy-cache-key") == key
    assert second.h("cache-status") == "llmproxy; hit; ttl=53"
    assert second.h("age") == "7"
    assert second.h("content-type") == "application/json"
    assert second.h("x-llmproxy-request-id") not in (None, first.h("x-llmproxy-request-id"))
    # The upstream's cookie went to the client that caused it, never to others.
    assert first.h("set-cookie") is not None and second.h("set-cookie") is None
    assert cached.calls == 1


@pytest_twisted.ensureDeferred
async def test_sorted_query_and_route_make_the_key(cached: Cached) -> None:
    a = await cached.send("/mock/cacheable?cc=max-age%3D60&a=1&b=2")
    b = await cached.send("/mock/cacheable?b=2&cc=max-age%3D60&a=1")
    assert b.h("x-proxy-cache") == "hit" and a.h("x-proxy-cache-key") == b.h("x-proxy-cache-key")
    other_route = await cached.send("/cacheable?cc=max-age%3D60&a=1&b=2")
    assert other_route.h("x-proxy-cache") == "stored"
    assert other_route.h(
        "x-proxy-cache-key",
    ).startswith("root/")  # type: ignore[union-attr]
    accept = await cached.send(
        "/mock/cacheable?cc=max-age%3D60&a=1&b=2", headers={"Accept": "text/plain"}
    )
    assert accept.h("x-proxy-cache") == "stored"
    assert cached.calls == 3


@pytest_twisted.ensureDeferred
async def test_hits_skip_the_upstream_but_are_recorded_as_exchanges(cached: Cached) -> None:
    first = await cached.send("/mock/cacheable?cc=max-age%3D60")
    assert len(cached.events.started) == 1 and len(cached.events.finished) == 1
    stored = cached.events.finished[0]
    assert (stored.cache_status, stored.cache_key) == ("stored", first.h("x-proxy-cache-key"))
    assert stored.cache_age is None
    for age in (2, 5, 9):
        cached.clock.advance(age - (cached.clock.seconds() - NOW))
        hit = await cached.send("/mock/cacheable?cc=max-age%3D60")
        assert hit.h("x-proxy-cache") == "hit"
        record = cached.events.finished[-1]
        assert record in cached.events.started  # its request was handed over first
        assert (record.cache_status, record.cache_key) == ("hit", first.h("x-proxy-cache-key"))
        assert record.cache_age == age and hit.h("age") == str(age)
        assert (record.outcome, record.status, record.error) == ("ok", 200, None)
        # The body goes over by reference; the capture pump tees it a turn later.
        assert record.replayed is not None and b"".join(record.replayed) == hit.body
        assert record.response_chunks == [] and record.response_body_size == 0
        assert dict(record.response_headers)[b"content-type"] == b"application/json"
    assert len(cached.events.started) == 4 and len(cached.events.finished) == 4
    assert cached.calls == 1
    stats = cached.cache.stats()
    assert (stats["hits"], stats["misses"], stats["stores"]) == (3, 1, 1)
    # Each exchange counted once; hits under their own outcome.
    proxy = cached.env.service.metrics.snapshot()
    assert proxy["requests_total"] == 4
    assert proxy["routes"]["mock"]["by_outcome"] == {"cache_hit": 3, "ok": 1}
    assert proxy["routes"]["mock"]["by_status"] == {"200": 4}


@pytest_twisted.ensureDeferred
async def test_routes_without_the_cache_carry_no_cache_headers(cached: Cached) -> None:
    for _ in range(2):
        answer = await cached.send("/nocache/cacheable?cc=max-age%3D60")
        assert answer.h("x-proxy-cache") is None and answer.h("cache-status") is None
    assert cached.calls == 2


# -- tenants ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_provider_keys_never_share_an_entry(cached: Cached) -> None:
    path = "/mock/cacheable?cc=max-age%3D60"
    a = await cached.send(path, headers={"Authorization": f"Bearer {KEY_A}"})
    b = await cached.send(path, headers={"Authorization": f"Bearer {KEY_B}"})
    anon = await cached.send(path)
    assert [x.h("x-proxy-cache") for x in (a, b, anon)] == ["stored"] * 3
    assert [x.json["call"] for x in (a, b, anon)] == [1, 2, 3]
    keys = {x.h("x-proxy-cache-key") for x in (a, b, anon)}
    assert len(keys) == 3
    for key in keys:
        assert key is not None
        assert KEY_A not in key and KEY_B not in key and "AAAA" not in key
    again_a = await cached.send(path, headers={"Authorization": f"Bearer {KEY_A}"})
    again_b = await cached.send(path, headers={"x-api-key": KEY_B})
    assert again_a.h("x-proxy-cache") == "hit" and again_a.json["call"] == 1
    # The same secret in another header is another credential: no sharing either.
    assert again_b.h("x-proxy-cache") == "stored" and again_b.json["call"] == 4


@pytest_twisted.ensureDeferred
async def test_token_projects_are_the_namespaces(cached: Cached) -> None:
    now = time.time()
    a1, _ = cached.tokens.create("team-a", now)
    a2, _ = cached.tokens.create("team-a", now)
    b1, _ = cached.tokens.create("team-b", now)
    cached.env.service.access.reload()
    path = "/secure/cacheable?cc=max-age%3D60"
    first = await cached.send(path, headers={"Authorization": f"Bearer {a1}"})
    same_project = await cached.send(path, headers={"Authorization": f"Bearer {a2}"})
    other_project = await cached.send(path, headers={"Authorization": f"Bearer {b1}"})
    refused = await cached.send(path, headers={"Authorization": "Bearer llmp_not-a-token"})
    assert first.h("x-proxy-cache-key").startswith("secure/p-team-a/GET/")  # type: ignore[union-attr]
    assert same_project.h("x-proxy-cache") == "hit"
    assert other_project.h("x-proxy-cache") == "stored"
    assert other_project.h("x-proxy-cache-key").startswith("secure/p-team-b/")  # type: ignore[union-attr]
    assert refused.code == 401 and refused.h("x-proxy-cache") is None
    assert cached.calls == 2


# -- what is stored, and for how long ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_entries_expire_on_the_cache_clock(cached: Cached) -> None:
    path = "/mock/cacheable?cc=s-maxage%3D30%2C%20max-age%3D5"
    first = await cached.send(path)
    assert first.h("cache-status") == "llmproxy; fwd=miss; stored; ttl=30"
    if cached.redis is not None:
        pttl = cached.redis.command("PTTL", "test:cache:" + first.h("x-proxy-cache-key"))
        assert 25_000 < pttl <= 30_000
    cached.clock.advance(29)
    assert (await cached.send(path)).h("x-proxy-cache") == "hit"
    cached.clock.advance(1)
    again = await cached.send(path)
    assert again.h("x-proxy-cache") == "stored" and again.json["call"] == 2


@pytest_twisted.ensureDeferred
async def test_ttl_falls_back_to_the_route_then_the_default_less_the_age(cached: Cached) -> None:
    default = await cached.send("/mock/cacheable?age=100")
    assert default.h("cache-status") == "llmproxy; fwd=miss; stored; ttl=200"
    route = await cached.send("/always/cacheable")
    assert route.h("cache-status") == "llmproxy; fwd=miss; stored; ttl=20"
    cached.clock.advance(10)
    hit = await cached.send("/mock/cacheable?age=100")
    assert hit.h("age") == "110"


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("cc=no-store", "no-store"),
        ("cc=private%2C%20max-age%3D60", "private"),
        ("cc=max-age%3D60&vary=%2A", "vary"),
        ("cc=max-age%3D60&status=500", "status"),
        ("cc=max-age%3D60&status=404", "status"),
        ("cc=max-age%3D0", "stale"),
        ("cc=max-age%3D60&size=20000", "too-large"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_responses_that_must_not_be_stored_are_not(
    cached: Cached, query: str, detail: str
) -> None:
    for n in (1, 2):
        answer = await cached.send(f"/mock/cacheable?{query}")
        assert answer.h("x-proxy-cache") == "miss"
        assert answer.h("cache-status") == f"llmproxy; fwd=miss; detail={detail}"
        assert answer.json["call"] == n
    assert cached.cache.stats()["stores"] == 0


@pytest_twisted.ensureDeferred
async def test_post_is_cached_on_client_opt_in_or_route_config_only(cached: Cached) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    for _ in range(2):
        plain = await cached.send("/mock/cacheable", "POST", body=body)
        assert plain.h("x-proxy-cache") == "bypass"
        assert plain.h("cache-status") == "llmproxy; fwd=method; detail=method"
    opt_in = {"Cache-Control": "public, max-age=45"}
    first = await cached.send("/mock/cacheable", "POST", opt_in, body)
    assert first.h("cache-status") == "llmproxy; fwd=miss; stored; ttl=45"
    assert first.h("x-proxy-cache-key").startswith("mock/anon/POST/")  # type: ignore[union-attr]
    hit = await cached.send("/mock/cacheable", "POST", opt_in, body)
    assert hit.h("x-proxy-cache") == "hit" and hit.body == first.body
    other_body = await cached.send("/mock/cacheable", "POST", opt_in, body + b" ")
    assert other_body.h("x-proxy-cache") == "stored"
    on_route = [await cached.send("/always/cacheable", "POST", body=body) for _ in range(2)]
    assert [a.h("x-proxy-cache") for a in on_route] == ["stored", "hit"]
    assert cached.calls == 5


@pytest_twisted.ensureDeferred
async def test_client_no_cache_revalidates_and_no_store_bypasses(cached: Cached) -> None:
    path = "/mock/cacheable?cc=max-age%3D60"
    await cached.send(path)
    fresh = await cached.send(path, headers={"Cache-Control": "no-cache"})
    assert fresh.h("x-proxy-cache") == "stored" and fresh.json["call"] == 2
    assert fresh.h("cache-status") == "llmproxy; fwd=request; stored; ttl=60"
    after = await cached.send(path)
    assert after.h("x-proxy-cache") == "hit" and after.json["call"] == 2
    bypass = await cached.send(path, headers={"Cache-Control": "no-store"})
    assert bypass.h("x-proxy-cache") == "bypass" and bypass.json["call"] == 3
    assert bypass.h("cache-status") == "llmproxy; fwd=bypass; detail=no-store"
    assert (await cached.send(path)).json["call"] == 2
    cached.clock.advance(30)
    too_old = await cached.send(path, headers={"Cache-Control": "max-age=10"})
    assert too_old.h("cache-status") == "llmproxy; fwd=stale; stored; ttl=60"


@pytest_twisted.ensureDeferred
async def test_vary_keeps_variants_apart(cached: Cached) -> None:
    path = "/mock/cacheable?cc=max-age%3D60&vary=X-Variant"
    a = await cached.send(path, headers={"X-Variant": "a"})
    b = await cached.send(path, headers={"X-Variant": "b"})
    assert b.h("cache-status") == "llmproxy; fwd=vary-miss; stored; ttl=60"
    b_again = await cached.send(path, headers={"X-Variant": "b"})
    assert a.json["call"] == 1 and b_again.h("x-proxy-cache") == "hit"
    assert b_again.json["call"] == 2


# -- conditional requests -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_conditional_requests_against_an_entry_get_304(cached: Cached) -> None:
    lm = "Tue, 15 Nov 1994 08:12:31 GMT"
    path = f"/mock/cacheable?cc=max-age%3D60&etag=%22v1%22&lm={lm.replace(' ', '%20')}"
    await cached.send(path)
    match = await cached.send(path, headers={"If-None-Match": 'W/"v0", "v1"'})
    assert match.code == 304 and match.body == b""
    assert match.h("x-proxy-cache") == "conditional-hit"
    assert match.h("etag") == '"v1"' and match.h("cache-control") == "max-age=60"
    assert match.h("cache-status") == 'llmproxy; hit; ttl=60; detail="conditional"'
    other = await cached.send(path, headers={"If-None-Match": '"v2"'})
    assert other.code == 200 and other.h("x-proxy-cache") == "hit"
    since = await cached.send(path, headers={"If-Modified-Since": "Wed, 16 Nov 1994 00:00:00 GMT"})
    assert since.code == 304
    before = await cached.send(path, headers={"If-Modified-Since": "Mon, 14 Nov 1994 00:00:00 GMT"})
    assert before.code == 200
    assert cached.calls == 1
    assert cached.cache.stats()["conditional_hits"] == 2
    # Recorded as served: 304, no body, the headers a 304 carries.
    served = [(r.status, r.cache_status) for r in cached.events.finished]
    assert served == [
        (200, "stored"),
        (304, "conditional-hit"),
        (200, "hit"),
        (304, "conditional-hit"),
        (200, "hit"),
    ]
    not_modified = cached.events.finished[1]
    assert not_modified.outcome == "ok" and not_modified.replayed is None
    assert sorted(n for n, _ in not_modified.response_headers) == [b"cache-control", b"etag"]
    assert cached.env.service.metrics.snapshot()["routes"]["mock"]["by_status"] == {
        "200": 3,
        "304": 2,
    }


# -- streams -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_complete_stream_is_stored_and_replayed(cached: Cached) -> None:
    first = await cached.send("/mock/cacheable?sse=3")
    assert first.h("x-proxy-cache") == "stored"
    assert first.h("cache-status") == "llmproxy; fwd=miss; stored; ttl=300"
    hit = await cached.send("/mock/cacheable?sse=3")
    assert hit.h("x-proxy-cache") == "hit"
    assert hit.h("content-type") == "text/event-stream"
    assert hit.body == first.body
    assert hit.body.count(b"data: ") == 4 and hit.body.endswith(b"data: [DONE]\n\n")
    assert cached.calls == 1


@pytest_twisted.ensureDeferred
async def test_a_truncated_stream_is_never_stored(cached: Cached) -> None:
    agent = Agent(reactor, pool=cached.env.pool)
    for n in (1, 2):
        resp = await raw_request(agent, b"GET", cached.env.url("/mock/cacheable?sse=2&cut=1"))
        assert resp.headers.getRawHeaders(b"x-proxy-cache") == [b"stored"]
        collect = Collect()
        resp.deliverBody(collect)
        await collect.done.addTimeout(10, reactor)
        assert not collect.complete
        assert cached.calls == n
        await until(lambda: not cached.env.service.proxy.open)
        assert cached.events.finished[-1].cache_status == "miss"
    assert cached.cache.stats()["stores"] == 0


# -- coalescing -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fifty_concurrent_identical_misses_make_one_upstream_call(cached: Cached) -> None:
    path = "/mock/cacheable?cc=max-age%3D60&hold=1"
    answers = [defer.ensureDeferred(cached.send(path)) for _ in range(50)]
    await until(lambda: len(cached.env.upstream.held) == 1 and cached.cache.inflight.waiting == 49)
    assert cached.env.upstream.release_held() == 1
    done = await defer.gatherResults(answers)
    assert cached.calls == 1
    assert {a.code for a in done} == {200}
    assert {a.body for a in done} == {done[0].body}
    marks = sorted(a.h("x-proxy-cache") or "" for a in done)
    assert marks == ["hit"] * 49 + ["stored"]
    collapsed = [a for a in done if a.h("x-proxy-cache") == "hit"]
    assert all(a.h("cache-status") == "llmproxy; fwd=miss; collapsed; ttl=60" for a in collapsed)
    # One exchange went upstream; the others were answered by it, each an exchange too.
    assert len(cached.events.started) == len(cached.events.finished) == 50
    statuses = sorted(str(r.cache_status) for r in cached.events.finished)
    assert statuses == ["hit"] * 49 + ["stored"]
    assert {r.cache_key for r in cached.events.finished} == {done[0].h("x-proxy-cache-key")}
    await until(lambda: cached.cache.stats()["in_flight"] == 0)  # the store has it
    stats = cached.cache.stats()
    assert (stats["coalesced"], stats["misses"], stats["in_flight"]) == (49, 1, 0)


@pytest_twisted.ensureDeferred
async def test_followers_go_upstream_themselves_when_the_leader_cannot_be_stored(
    cached: Cached,
) -> None:
    path = "/mock/cacheable?cc=no-store&hold=1"
    answers = [defer.ensureDeferred(cached.send(path)) for _ in range(5)]
    await until(lambda: len(cached.env.upstream.held) == 1 and cached.cache.inflight.waiting == 4)
    cached.env.upstream.release_held()
    await until(lambda: len(cached.env.upstream.held) == 4)
    cached.env.upstream.release_held()
    done = await defer.gatherResults(answers)
    assert sorted(a.json["call"] for a in done) == [1, 2, 3, 4, 5]
    assert {a.h("x-proxy-cache") for a in done} == {"miss"}


@pytest_twisted.ensureDeferred
async def test_followers_stop_waiting_after_lock_timeout(cached: Cached) -> None:
    path = "/mock/cacheable?cc=max-age%3D60&hold=1"
    leader = defer.ensureDeferred(cached.send(path))
    await until(lambda: len(cached.env.upstream.held) == 1)
    follower = defer.ensureDeferred(cached.send(path))
    await until(lambda: cached.cache.inflight.waiting == 1)
    cached.clock.advance(30)
    await until(lambda: len(cached.env.upstream.held) == 2)
    cached.env.upstream.release_held()
    first, second = await defer.gatherResults([leader, follower])
    assert {first.json["call"], second.json["call"]} == {1, 2}
    assert cached.cache.stats()["released"] == 1


@pytest_twisted.ensureDeferred
async def test_a_follower_that_disconnects_does_not_disturb_the_leader(cached: Cached) -> None:
    path = "/mock/cacheable?cc=max-age%3D60&hold=1"
    leader = defer.ensureDeferred(cached.send(path))
    await until(lambda: len(cached.env.upstream.held) == 1)
    gone = cached.env.client.get(cached.env.url(path))
    await until(lambda: cached.cache.inflight.waiting == 1)
    gone.cancel()
    gone.addErrback(lambda f: f.trap(defer.CancelledError, ResponseNeverReceived))
    await until(
        lambda: cached.cache.inflight.waiting == 0 and len(cached.env.service.proxy.open) == 1
    )
    cached.env.upstream.release_held()
    assert (await leader).h("x-proxy-cache") == "stored"
    await until(lambda: not cached.env.service.proxy.open)


@pytest.fixture
def two_processes(tmp_path: Path) -> Iterator[tuple[Cached, Cached]]:
    """Two proxies with their own cache and in-flight table (as two processes),
    one Redis store and one upstream."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    first = _start(tmp_path / "a", "redis", redis=redis)
    second = _start(tmp_path / "b", "redis", redis=redis, upstream=first.env.upstream)
    try:
        yield first, second
    finally:
        pytest_twisted.blockon(second.env.pool.closeCachedConnections())
        pytest_twisted.blockon(second.env.service.stopService())
        pytest_twisted.blockon(second.cache.stop(0))
        _stop(first)


@pytest_twisted.ensureDeferred
async def test_identical_misses_on_two_processes_make_one_upstream_call(
    two_processes: tuple[Cached, Cached],
) -> None:
    first, second = two_processes
    upstream = first.env.upstream
    path = "/mock/cacheable?cc=max-age%3D60&hold=1"
    answers = [defer.ensureDeferred(c.send(path)) for c in (first, second) for _ in range(25)]

    def waiting() -> bool:
        # One leader upstream, one process waiting for its entry, every other
        # request waiting in its own process for its own leader.
        local = first.cache.inflight.waiting + second.cache.inflight.waiting
        remote = first.cache.remote_waits + second.cache.remote_waits
        return len(upstream.held) == 1 and local == 48 and remote == 1

    await until(waiting)
    assert upstream.release_held() == 1
    done = await defer.gatherResults(answers)
    assert first.calls == 1  # (one upstream for both)
    assert {a.code for a in done} == {200} and {a.body for a in done} == {done[0].body}
    marks = sorted(a.h("x-proxy-cache") or "" for a in done)
    assert marks == ["hit"] * 49 + ["stored"]
    waited = first if first.cache.remote_waits else second
    assert waited.cache.stats()["remote_hits"] == 1
    assert waited.cache.stats()["coalesced"] == 24
    # The lock is gone once the entry is stored.
    assert first.redis is not None
    await until(
        lambda: first.redis is not None and not first.redis.command("KEYS", "test:cache-lock:*")
    )


@pytest_twisted.ensureDeferred
async def test_a_process_waiting_on_another_goes_upstream_when_it_stores_nothing(
    two_processes: tuple[Cached, Cached],
) -> None:
    first, second = two_processes
    upstream = first.env.upstream
    path = "/mock/cacheable?cc=no-store&hold=1"
    leader = defer.ensureDeferred(first.send(path))
    await until(lambda: len(upstream.held) == 1)
    other = defer.ensureDeferred(second.send(path))
    await until(lambda: second.cache.remote_waits == 1)
    upstream.release_held()  # not storable: the lock goes, no entry comes
    await until(lambda: len(upstream.held) == 1)
    upstream.release_held()
    answers = await defer.gatherResults([leader, other])
    assert sorted(a.json["call"] for a in answers) == [1, 2]
    assert second.cache.stats()["remote_hits"] == 0


@pytest_twisted.ensureDeferred
async def test_without_the_lock_each_process_coalesces_on_its_own(
    two_processes: tuple[Cached, Cached],
) -> None:
    first, second = two_processes
    upstream = first.env.upstream
    assert first.redis is not None
    # Redis answers the entries but refuses the lock keys (an ACL without them):
    # what a lock that fails looks like to the processes.
    first.redis.command("ACL", "SETUSER", "default", "resetkeys", "~test:cache:*")
    path = "/mock/cacheable?cc=max-age%3D60&hold=1"
    answers = [defer.ensureDeferred(c.send(path)) for c in (first, second) for _ in range(10)]
    await until(
        lambda: (
            len(upstream.held) == 2
            and first.cache.inflight.waiting + second.cache.inflight.waiting == 18
        )
    )
    assert upstream.release_held() == 2
    done = await defer.gatherResults(answers)
    assert first.calls == 2  # one per process, never one per request
    assert {a.code for a in done} == {200}
    for c in (first, second):
        stats = c.cache.stats()
        assert (stats["lock_errors"], stats["remote_waits"], stats["coalesced"]) == (1, 0, 9)


# -- memory bound ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_memory_store_evicts_least_recently_used_under_max_bytes(small: Cached) -> None:
    paths = [f"/mock/cacheable?cc=max-age%3D60&size=1200&n={i}" for i in range(3)]
    for path in paths[:2]:
        assert (await small.send(path)).h("x-proxy-cache") == "stored"
    assert (await small.send(paths[0])).h("x-proxy-cache") == "hit"  # now paths[1] is coldest
    assert (await small.send(paths[2])).h("x-proxy-cache") == "stored"
    stats = small.cache.stats()
    assert stats["evictions"] == 1 and stats["bytes"] <= 4096 and stats["entries"] == 2
    assert (await small.send(paths[0])).h("x-proxy-cache") == "hit"
    assert (await small.send(paths[1])).h("x-proxy-cache") == "stored"


# -- purge ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_purge_by_key_and_by_prefix_through_the_admin(cached: Cached) -> None:
    one = await cached.send("/mock/cacheable?cc=max-age%3D60&n=1")
    await cached.send("/mock/cacheable?cc=max-age%3D60&n=2")
    await cached.send("/always/cacheable?n=3")
    key = one.h("x-proxy-cache-key")
    assert await cached.admin(f"/cache/purge?key={key}") == (200, {"purged": 1})
    assert (await cached.send("/mock/cacheable?cc=max-age%3D60&n=1")).h("x-proxy-cache") == "stored"
    assert await cached.admin("/cache/purge?prefix=mock/") == (200, {"purged": 2})
    assert (await cached.send("/always/cacheable?n=3")).h("x-proxy-cache") == "hit"
    assert await cached.admin("/cache/purge?all=1") == (200, {"purged": 1})
    code, body = await cached.admin("/cache/purge")
    assert code == 400 and "exactly one" in body["error"]["message"]
    audit = [
        orjson.loads(line)
        for line in cached.env.service.settings.audit_path.read_bytes().splitlines()
    ]  # type: ignore[union-attr]
    purges = [a for a in audit if a["action"] == "cache_purged"]
    assert [(a["key"], a["prefix"], a["purged"]) for a in purges] == [
        (key, None, 1),
        (None, "mock/", 2),
        (None, "", 1),
    ]


@pytest_twisted.ensureDeferred
async def test_llmproxy_cache_purge_calls_the_running_proxy(cached: Cached, tmp_path: Path) -> None:
    import argparse

    one = await cached.send("/mock/cacheable?cc=max-age%3D60&n=1")
    await cached.send("/always/cacheable?n=2")
    parser = argparse.ArgumentParser()
    add_cache_command(parser.add_subparsers(dest="command"))
    config = tmp_path / "cli.ini"
    config.write_text("[server]\nadmin_listen = tcp:9\n")

    def run(*argv: str) -> int:
        args = parser.parse_args(
            ["cache", "purge", "--config", str(config), "--admin-url", cached.env.admin, *argv]
        )
        code: int = args.func(args)
        return code

    assert await threads.deferToThread(run, "--key", one.h("x-proxy-cache-key") or "") == 0
    assert await threads.deferToThread(run, "--prefix", "always/") == 0
    assert cached.cache.stats()["purged"] == 2
    assert (await cached.send("/always/cacheable?n=2")).h("x-proxy-cache") == "stored"


# -- counting and failure ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cache_counts_reach_prometheus(cached: Cached) -> None:
    await cached.send("/mock/cacheable?cc=max-age%3D60")
    await cached.send("/mock/cacheable?cc=max-age%3D60")
    await cached.send("/mock/cacheable", "POST", body=b"{}")
    registry = make_registry(MetricsCollector(cached.cache.families))
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    results = {s.labels["result"]: s.value for s in families["llmproxy_cache_requests"].samples}
    assert results == {"hit": 1, "conditional_hit": 0, "miss": 1, "bypass": 1}
    assert families["llmproxy_cache_stores"].samples[0].value == 1
    if cached.redis is None:
        assert families["llmproxy_cache_bytes"].samples[0].value > 0
    else:
        assert families["llmproxy_cache_written_bytes"].samples[0].value > 0


@pytest.fixture
def unreachable(tmp_path: Path) -> Iterator[Cached]:
    """A cache on Redis at a port where nothing listens."""
    c = _start(tmp_path, "memory")
    settings = c.env.service.settings
    url = f"redis://127.0.0.1:{free_port()}/0"
    settings = attrs.evolve(
        settings, cache=attrs.evolve(settings.cache, store="redis", redis_url=url)
    )
    cache = build_cache(settings, reactor, clock=c.clock)
    assert cache is not None and cache.store.kind == "redis"
    c.cache = c.env.service.proxy.cache = cache
    cache.start()
    try:
        yield c
    finally:
        _stop(c)


@pytest_twisted.ensureDeferred
async def test_an_unreachable_redis_turns_into_a_bypass(unreachable: Cached) -> None:
    for n in (1, 2):
        answer = await unreachable.send("/mock/cacheable?cc=max-age%3D60")
        assert answer.code == 200 and answer.json["call"] == n
        assert answer.h("x-proxy-cache") == "bypass"
        assert answer.h("cache-status") == "llmproxy; fwd=bypass; detail=store-error"
    assert unreachable.cache.stats()["errors"] == 2


@pytest_twisted.ensureDeferred
async def test_head_has_its_own_entries_and_its_hits_carry_no_body(cached: Cached) -> None:
    await cached.send("/mock/cacheable?cc=max-age%3D60")
    head = await cached.send("/mock/cacheable?cc=max-age%3D60", "HEAD")
    assert head.h("x-proxy-cache") == "stored" and head.body == b""
    again = await cached.send("/mock/cacheable?cc=max-age%3D60", "HEAD")
    assert again.h("x-proxy-cache") == "hit" and again.body == b""
    # {"call": 2, "method": "HEAD", "pad": ""}: the upstream's length, not 0.
    assert again.h("content-length") == head.h("content-length") == "40"
    assert cached.calls == 2


@pytest_twisted.ensureDeferred
async def test_purge_wants_post(cached: Cached) -> None:
    resp = await cached.env.client.get(cached.env.admin + "/cache/purge?all=1")
    assert resp.code == 405 and resp.headers.getRawHeaders(b"allow") == [b"POST"]
    await resp.content()


@pytest.fixture
def uncached(tmp_path: Path) -> Iterator[Running]:
    yield from running_fixture(tmp_path)


@pytest_twisted.ensureDeferred
async def test_purge_without_a_cache_is_404_and_requests_carry_no_cache_headers(
    uncached: Running,
) -> None:
    resp = await uncached.client.post(uncached.admin + "/cache/purge?all=1")
    assert resp.code == 404 and "not enabled" in (await resp.json())["error"]["message"]
    answer = await uncached.client.get(uncached.url("/mock/cacheable?cc=max-age%3D60"))
    await answer.content()
    assert answer.headers.getRawHeaders(b"x-proxy-cache") is None
