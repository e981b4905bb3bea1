"""The Redis store: cached responses shared by every proxy process and host
(tests: tests/unit/cache/test_store.py, tests/integration/test_cache.py).

Each entry is one Redis string under ``prefix + key`` holding
:meth:`CachedResponse.encode`, written with ``SET ... PX`` so Redis drops it
when it goes stale.  The entry's own ``expires_at`` is checked too, on the
proxy's clock, so processes agree with their own ``Age`` arithmetic and tests
can drive expiry with a controlled clock.  Redis bounds memory (``maxmemory``
with ``volatile-lru`` or ``allkeys-lru``): ``max_bytes`` is the memory store's.

Commands go through :class:`llmproxy.redis.connection.RedisConnection`, which
fails at once while Redis is unreachable and puts a deadline on every reply:
the cache then turns into a bypass, never into a request that waits.  Purging
by prefix walks ``SCAN MATCH`` (never ``KEYS``) and deletes in batches.

Misses are coalesced across processes too (it is a ``LockingStore``): the first
process to miss a key sets a lock key next to it (``SET NX PX``, under
``<prefix without its last ":">-lock:``, so purging never counts it) for as long
as followers would wait; the others look for the entry (one ``MGET`` of entry
and lock) until it is there, the lock is gone, or they stop waiting.  The lock
holds a random token and is deleted only by its holder (a script comparing it).
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from llmproxy.cache.entry import CachedResponse
from llmproxy.interfaces import RedisExecutor
from llmproxy.state.scripts import Script

__all__ = ["RedisStore"]

_GLOB_SPECIAL = re.compile(rb"([*?\[\]\\])")

# KEYS[1]: the lock; ARGV[1]: the holder's token.  Deletes it only if it is still theirs.
_UNLOCK = Script(
    "cache_unlock",
    b"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""",
)


class RedisStore:
    kind = "redis"

    def __init__(
        self, *, redis: RedisExecutor, clock: IReactorTime, prefix: str = "llmproxy:cache:"
    ) -> None:
        self._redis = redis
        self._clock = clock
        self._prefix = prefix.encode()
        self._lock_prefix = (prefix[:-1] if prefix.endswith(":") else prefix).encode() + b"-lock:"
        self.bytes_written = 0
        self.expired = 0
        self.decode_errors = 0

    def get(self, key: str) -> defer.Deferred[CachedResponse | None]:
        full = self._prefix + key.encode()
        return self._redis.execute(b"GET", full).addCallback(self._got, full)

    def _got(self, data: Any, full: bytes) -> CachedResponse | None:
        if data is None:
            return None
        try:
            entry = CachedResponse.decode(bytes(data))
        except (ValueError, TypeError):
            # Another version's format, or a stranger's key: a miss, and it goes.
            self.decode_errors += 1
            self._redis.execute(b"DEL", full).addErrback(lambda _: None)
            return None
        if self._clock.seconds() >= entry.expires_at:
            self.expired += 1
            return None
        return entry

    def put(self, key: str, entry: CachedResponse) -> defer.Deferred[bool]:
        ttl_ms = int((entry.expires_at - self._clock.seconds()) * 1000)
        if ttl_ms <= 0:
            return defer.succeed(False)
        data = entry.encode()
        d = self._redis.execute(b"SET", self._prefix + key.encode(), data, b"PX", ttl_ms)

        def written(_: Any) -> bool:
            self.bytes_written += len(data)
            return True

        return d.addCallback(written)

    def purge(self, *, key: str | None = None, prefix: str | None = None) -> defer.Deferred[int]:
        if key is not None:
            return self._redis.execute(b"DEL", self._prefix + key.encode()).addCallback(int)
        if prefix is None:
            raise ValueError("purge needs a key or a prefix")
        pattern = _GLOB_SPECIAL.sub(rb"\\\1", self._prefix + prefix.encode()) + b"*"
        return defer.ensureDeferred(self._purge_matching(pattern))

    async def _purge_matching(self, pattern: bytes) -> int:
        cursor = b"0"
        deleted = 0
        while True:
            reply = await self._redis.execute(b"SCAN", cursor, b"MATCH", pattern, b"COUNT", 1000)
            cursor = bytes(reply[0])
            keys = [bytes(k) for k in reply[1]]
            if keys:
                deleted += int(await self._redis.execute(b"DEL", *keys))
            if cursor == b"0":
                return deleted

    # -- coalescing across processes (LockingStore) ----------------------------

    def lock(self, key: str, ttl: float) -> defer.Deferred[str | None]:
        token = secrets.token_hex(8)
        d = self._redis.execute(
            b"SET", self._lock_prefix + key.encode(), token, b"NX", b"PX", max(1, int(ttl * 1000))
        )
        return d.addCallback(lambda reply: token if reply is not None else None)

    def unlock(self, key: str, token: str) -> defer.Deferred[None]:
        d = _UNLOCK.run(self._redis, [self._lock_prefix + key.encode()], [token])
        return d.addCallback(lambda _: None)

    def peek(self, key: str) -> defer.Deferred[tuple[CachedResponse | None, bool]]:
        full = self._prefix + key.encode()
        d = self._redis.execute(b"MGET", full, self._lock_prefix + key.encode())

        def read(reply: Any) -> tuple[CachedResponse | None, bool]:
            data, lock = reply
            return self._got(data, full), lock is not None

        return d.addCallback(read)

    def stats(self) -> dict[str, int]:
        # Redis holds the entries of every process: counting them would walk the keyspace.
        return {
            "entries": -1,
            "bytes": -1,
            "evictions": -1,
            "expired": self.expired,
            "bytes_written": self.bytes_written,
            "decode_errors": self.decode_errors,
        }

    def start(self) -> None:
        self._redis.start()

    def close(self) -> defer.Deferred[None]:
        return self._redis.stop()
