"""The cache stores: the memory store's TTL on a controlled clock and its LRU
bound in bytes; the Redis store's commands, checked against a fake executor
(tests/integration/test_cache.py runs it against a real redis-server)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock

from llmproxy.cache import build_cache, cache_problems, cache_wanted
from llmproxy.cache.entry import ENTRY_OVERHEAD, CachedResponse
from llmproxy.cache.redis_store import RedisStore
from llmproxy.cache.store import MemoryStore
from llmproxy.config.loader import load_settings


def _entry(clock: Clock, body: bytes = b"x", ttl: float = 60.0) -> CachedResponse:
    now = clock.seconds()
    return CachedResponse(200, ((b"content-type", b"text/plain"),), (body,), now, now + ttl)


def _now(d: defer.Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the store answered later than at once"
    return out[0]


# -- memory store: time ---------------------------------------------------------------------


def test_an_entry_is_served_until_its_ttl_on_the_clock() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock, max_bytes=10_000)
    entry = _entry(clock, ttl=30)
    assert _now(store.put("k", entry)) is True
    clock.advance(29.999)
    assert _now(store.get("k")) == entry
    clock.advance(0.001)
    assert _now(store.get("k")) is None
    assert store.stats()["entries"] == 0 and store.stats()["expired"] == 1


# -- memory store: the byte bound -----------------------------------------------------------


def test_entries_are_charged_body_headers_and_overhead() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock, max_bytes=10_000)
    store.put_now("k", _entry(clock, b"x" * 100))
    assert store.stats()["bytes"] == 100 + len(b"content-type") + len(b"text/plain") + 4 + (
        ENTRY_OVERHEAD
    )


def test_the_least_recently_used_entry_goes_first() -> None:
    clock = Clock()
    size = _entry(clock, b"x" * 100).size
    store = MemoryStore(clock=clock, max_bytes=3 * size)
    for key in "abc":
        store.put_now(key, _entry(clock, b"x" * 100))
    assert store.get_now("a") is not None  # b is now the coldest
    store.put_now("d", _entry(clock, b"x" * 100))
    assert store.get_now("b") is None
    assert all(store.get_now(k) is not None for k in "acd")
    assert store.stats() | {} == {
        "entries": 3,
        "bytes": 3 * size,
        "max_bytes": 3 * size,
        "evictions": 1,
        "expired": 0,
    }


def test_a_big_entry_evicts_as_many_as_it_needs() -> None:
    clock = Clock()
    small = _entry(clock, b"x" * 10).size
    store = MemoryStore(clock=clock, max_bytes=10 * small)
    for i in range(10):
        store.put_now(str(i), _entry(clock, b"x" * 10))
    big = _entry(clock, b"y" * (small * 3))
    assert store.put_now("big", big)
    assert store.stats()["evictions"] == 4
    assert [store.get_now(str(i)) is None for i in range(5)] == [True] * 4 + [False]


def test_an_entry_larger_than_max_bytes_is_not_kept_and_evicts_nothing() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock, max_bytes=1000)
    store.put_now("a", _entry(clock))
    assert _now(store.put("huge", _entry(clock, b"z" * 1000))) is False
    assert store.get_now("a") is not None and store.stats()["evictions"] == 0


def test_stale_entries_pushed_out_count_as_expired_not_evicted() -> None:
    clock = Clock()
    size = _entry(clock, b"x" * 50).size
    store = MemoryStore(clock=clock, max_bytes=size)
    store.put_now("a", _entry(clock, b"x" * 50, ttl=1))
    clock.advance(2)
    store.put_now("b", _entry(clock, b"x" * 50))
    assert (store.stats()["evictions"], store.stats()["expired"]) == (0, 1)


def test_replacing_a_key_charges_only_the_new_entry() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock, max_bytes=10_000)
    store.put_now("k", _entry(clock, b"x" * 500))
    store.put_now("k", _entry(clock, b"x" * 10))
    assert store.stats()["bytes"] == _entry(clock, b"x" * 10).size
    assert store.stats()["entries"] == 1


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "get", "advance", "purge"]),
            st.integers(0, 7),
            st.integers(0, 600),
        ),
        max_size=60,
    )
)
def test_the_store_never_holds_more_than_max_bytes(ops: list[tuple[str, int, int]]) -> None:
    clock = Clock()
    store = MemoryStore(clock=clock, max_bytes=1500)
    for op, key, n in ops:
        if op == "put":
            store.put_now(str(key), _entry(clock, b"x" * n, ttl=1 + key))
        elif op == "get":
            store.get_now(str(key))
        elif op == "advance":
            clock.advance(n / 100)
        else:
            _now(store.purge(key=str(key)))
        stats = store.stats()
        assert stats["bytes"] <= 1500
        held = [e for e, _ in store._entries.values()]
        assert stats["bytes"] == sum(e.size for e in held)


def test_purge_by_key_prefix_and_everything() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock, max_bytes=100_000)
    for key in ("r1/anon/GET/a", "r1/anon/GET/b", "r1/p-x/GET/c", "r2/anon/GET/d"):
        store.put_now(key, _entry(clock))
    assert _now(store.purge(key="r1/anon/GET/a")) == 1
    assert _now(store.purge(key="r1/anon/GET/a")) == 0
    assert _now(store.purge(prefix="r1/")) == 2
    assert _now(store.purge(prefix="")) == 1
    assert store.stats()["entries"] == 0 and store.stats()["bytes"] == 0


# -- Redis store, against a fake executor ----------------------------------------------------------


class FakeRedis:
    """GET, SET .. PX, DEL and SCAN over a dict, SCAN in pages of two keys."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.ttl_ms: dict[bytes, int] = {}
        self.commands: list[tuple[Any, ...]] = []
        self.scan_snapshot: list[bytes] = []
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> defer.Deferred[None]:
        self.stopped = True
        return defer.succeed(None)

    def execute(self, *args: Any) -> defer.Deferred[Any]:
        self.commands.append(args)
        name = args[0]
        if name == b"GET":
            return defer.succeed(self.data.get(args[1]))
        if name == b"SET":
            assert args[3] == b"PX"
            self.data[args[1]] = args[2]
            self.ttl_ms[args[1]] = args[4]
            return defer.succeed(b"OK")
        if name == b"DEL":
            return defer.succeed(sum(self.data.pop(k, None) is not None for k in args[1:]))
        if name == b"SCAN":
            cursor, pattern = int(args[1]), args[3].decode("latin-1")
            if cursor == 0:  # like Redis: deleting returned keys never skips others
                self.scan_snapshot = sorted(self.data)
            keys = self.scan_snapshot
            page = keys[cursor : cursor + 2]
            following = cursor + 2 if cursor + 2 < len(keys) else 0
            glob = _redis_glob(pattern)
            matched = [k for k in page if glob.match(k.decode("latin-1"))]
            return defer.succeed([str(following).encode(), matched])
        raise AssertionError(f"unexpected command {args!r}")


def _redis_glob(pattern: str) -> re.Pattern[str]:
    """Redis's MATCH: * and ?, a backslash escapes the next character."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out, i = out + re.escape(pattern[i + 1]), i + 2
            continue
        out += ".*" if c == "*" else "." if c == "?" else re.escape(c)
        i += 1
    return re.compile(out + r"\Z", re.S)


def test_redis_entries_are_set_with_their_ttl_under_the_prefix() -> None:
    clock = Clock()
    redis = FakeRedis()
    store = RedisStore(redis=redis, clock=clock, prefix="p:")
    entry = _entry(clock, b"body", ttl=12.5)
    assert _now(store.put("r/anon/GET/abc", entry)) is True
    assert redis.ttl_ms[b"p:r/anon/GET/abc"] == 12_500
    assert _now(store.get("r/anon/GET/abc")) == entry
    assert store.stats()["bytes_written"] == len(entry.encode())


def test_redis_entries_expire_on_the_proxys_clock_too() -> None:
    clock = Clock()
    store = RedisStore(redis=FakeRedis(), clock=clock)
    store.put("k", _entry(clock, ttl=5))
    clock.advance(5)
    assert _now(store.get("k")) is None
    assert _now(store.put("k", _entry(clock, ttl=0))) is False


def test_a_foreign_value_under_a_cache_key_is_a_miss_and_is_deleted() -> None:
    redis = FakeRedis()
    redis.data[b"llmproxy:cache:k"] = b"something else"
    store = RedisStore(redis=redis, clock=Clock())
    assert _now(store.get("k")) is None
    assert b"llmproxy:cache:k" not in redis.data and store.stats()["decode_errors"] == 1


def test_redis_purge_by_prefix_escapes_glob_characters_and_walks_every_page() -> None:
    clock = Clock()
    redis = FakeRedis()
    store = RedisStore(redis=redis, clock=clock, prefix="c:")
    keys = ["r*/a/GET/1", "r*/a/GET/2", "r*/b/GET/3", "rx/a/GET/4", "r*/a/GET/5", "other"]
    for key in keys:
        store.put(key, _entry(clock))
    redis.data[b"unrelated:r*/a/GET/9"] = b"keep"
    assert _now(store.purge(prefix="r*/a/")) == 3
    assert sorted(redis.data) == [
        b"c:other",
        b"c:r*/b/GET/3",
        b"c:rx/a/GET/4",
        b"unrelated:r*/a/GET/9",
    ]
    scans = [c for c in redis.commands if c[0] == b"SCAN"]
    assert scans[0][3] == rb"c:r\*/a/*" and len(scans) > 1
    assert _now(store.purge(key="other")) == 1
    assert _now(store.purge(prefix="")) == 2  # every cache key, nothing else
    assert list(redis.data) == [b"unrelated:r*/a/GET/9"]


def test_the_redis_store_starts_and_stops_its_connection() -> None:
    redis = FakeRedis()
    store = RedisStore(redis=redis, clock=Clock())
    store.start()
    _now(store.close())
    assert redis.started and redis.stopped


# -- building from settings --------------------------------------------------------------------


def _settings(text: str) -> Any:
    base = "[route:a]\nprefix = /a\nupstream = http://127.0.0.1:1\n"
    return load_settings(text=base + text, env={})


def test_no_cache_is_built_unless_enabled_or_a_route_says_on() -> None:
    assert build_cache(_settings(""), Clock()) is None
    assert not cache_wanted(_settings(""))
    on_route = _settings("cache = on\n")
    cache = build_cache(on_route, Clock())
    assert cache is not None and cache.store.kind == "memory"


def test_the_memory_store_gets_max_bytes() -> None:
    cache = build_cache(_settings("[cache]\nenabled = true\nmax_bytes = 2MiB\n"), Clock())
    assert cache is not None and cache.stats()["max_bytes"] == 2 * 1024 * 1024


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[cache]\nstore = disk\n", "cache.store: must be one of memory, redis"),
        ("[cache]\ndefault_ttl = 0\n", "cache.default_ttl: must be greater than 0"),
        ("[cache]\nmax_bytes = 1KiB\n", "cache.max_object_bytes: must not exceed max_bytes"),
        ("[cache]\nredis_url = http://x\n", "cache.redis_url: must start with redis://"),
        ("[cache]\nredis_prefix = a b\n", "cache.redis_prefix: must be a non-empty name"),
        ("cache_ttl = 0\n", "route:a.cache_ttl: must be greater than 0"),
    ],
)
def test_bad_cache_settings_are_named(text: str, problem: str) -> None:
    from llmproxy.config.loader import ConfigError
    from llmproxy.runtime.checks import load_checked

    base = "[route:a]\nprefix = /a\nupstream = http://127.0.0.1:1\n"
    with pytest.raises(ConfigError) as e:
        load_checked(text=base + text, env={})
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_cache_problems_is_empty_for_the_defaults() -> None:
    assert cache_problems(_settings("")) == []
