"""The HTTP response cache (tests: tests/unit/cache/test_policy.py,
tests/unit/cache/test_store.py, tests/integration/test_cache.py).

``policy`` says what may be cached and under which key, ``entry`` is one stored
response, ``store`` and ``redis_store`` keep entries, ``coalesce`` merges
concurrent identical misses, ``cache`` ties them together for the proxy.
This module builds the cache from the settings and checks ``[cache]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmproxy.config.model import Settings

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from llmproxy.cache.cache import ResponseCache
    from llmproxy.state.health import StateHealth

STORES = ("memory", "redis")


def cache_wanted(settings: Settings) -> bool:
    """``[cache] enabled``, or a route that says ``cache = on``."""
    return settings.cache.enabled or any(r.cache == "on" for r in settings.routes)


def build_cache(
    settings: Settings,
    reactor: Any,
    *,
    clock: IReactorTime | None = None,
    health: StateHealth | None = None,
) -> ResponseCache | None:
    """The process's cache, or None when no route is cached.  Call ``start()``
    when the service starts and ``close()`` when it has drained.  ``clock``
    (default: the reactor) judges freshness; tests pass a ``Clock``.  ``health``
    hears whether the Redis store answers its coalescing locks."""
    if not cache_wanted(settings):
        return None
    from llmproxy.cache.cache import ResponseCache
    from llmproxy.cache.store import MemoryStore
    from llmproxy.interfaces import CacheStore

    c = settings.cache
    clock = clock or reactor
    store: CacheStore
    if c.store == "redis":
        from llmproxy.cache.redis_store import RedisStore
        from llmproxy.redis.connection import RedisConnection, parse_redis_url

        url = parse_redis_url(c.redis_url or settings.redis.url)
        connection = RedisConnection(reactor, url, c.redis_timeout, "llmproxy-cache")
        store = RedisStore(redis=connection, clock=clock, prefix=c.redis_prefix)
    else:
        store = MemoryStore(clock=clock, max_bytes=c.max_bytes)
    return ResponseCache(settings=c, store=store, clock=clock, health=health, timer=reactor)


def cache_problems(settings: Settings) -> list[str]:
    """What is wrong with ``[cache]`` and the routes' cache keys, as ``section.key: reason``."""
    c = settings.cache
    problems = []
    if c.store not in STORES:
        problems.append(f"cache.store: must be one of {', '.join(STORES)}")
    for key in ("max_bytes", "max_object_bytes", "default_ttl", "lock_timeout", "redis_timeout"):
        if getattr(c, key) <= 0:
            problems.append(f"cache.{key}: must be greater than 0")
    if c.store == "memory" and 0 < c.max_bytes < c.max_object_bytes:
        problems.append("cache.max_object_bytes: must not exceed max_bytes")
    if not c.redis_prefix or any(ch.isspace() for ch in c.redis_prefix):
        problems.append("cache.redis_prefix: must be a non-empty name without spaces")
    if c.redis_url:
        from llmproxy.redis.connection import parse_redis_url

        try:
            parse_redis_url(c.redis_url)
        except ValueError as e:
            problems.append(f"cache.redis_url: {e}")
    for r in settings.routes:
        if r.cache_ttl is not None and r.cache_ttl <= 0:
            problems.append(f"route:{r.name}.cache_ttl: must be greater than 0")
    return problems
