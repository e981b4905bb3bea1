"""Where cached responses live: the store protocol and the in-memory LRU store
(tests: tests/unit/cache/test_store.py).

Every store answers with Deferreds so the proxy treats a local dict and Redis
alike; the memory store's Deferreds have already fired, so a hit costs no
reactor turn.  Freshness is judged on the injected clock: an entry is served
while ``clock.seconds() < entry.expires_at``.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from llmproxy.cache.entry import CachedResponse

__all__ = ["MemoryStore"]


class MemoryStore:
    """A dict in least-recently-used order, bounded by the bytes its entries are charged.

    Putting an entry evicts from the cold end until the total fits ``max_bytes``;
    an entry larger than ``max_bytes`` on its own is not kept.  Expired entries
    go when they are next looked up or reach the cold end.
    """

    kind = "memory"

    def __init__(self, *, clock: IReactorTime, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be greater than 0")
        self._clock = clock
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[CachedResponse, int]] = OrderedDict()
        self._bytes = 0
        self.evictions = 0
        self.expired = 0

    def get(self, key: str) -> defer.Deferred[CachedResponse | None]:
        return defer.succeed(self.get_now(key))

    def get_now(self, key: str) -> CachedResponse | None:
        found = self._entries.get(key)
        if found is None:
            return None
        entry = found[0]
        if self._clock.seconds() >= entry.expires_at:
            self._drop(key)
            self.expired += 1
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: CachedResponse) -> defer.Deferred[bool]:
        return defer.succeed(self.put_now(key, entry))

    def put_now(self, key: str, entry: CachedResponse) -> bool:
        size = entry.size
        if key in self._entries:
            self._drop(key)
        if size > self._max_bytes:
            return False
        while self._bytes + size > self._max_bytes and self._entries:
            cold, (old, _) = next(iter(self._entries.items()))
            self._drop(cold)
            if self._clock.seconds() >= old.expires_at:
                self.expired += 1
            else:
                self.evictions += 1
        self._entries[key] = (entry, size)
        self._bytes += size
        return True

    def _drop(self, key: str) -> None:
        _, size = self._entries.pop(key)
        self._bytes -= size

    def purge(self, *, key: str | None = None, prefix: str | None = None) -> defer.Deferred[int]:
        if key is not None:
            if key not in self._entries:
                return defer.succeed(0)
            self._drop(key)
            return defer.succeed(1)
        if prefix is None:
            raise ValueError("purge needs a key or a prefix")
        doomed = [k for k in self._entries if k.startswith(prefix)]
        for k in doomed:
            self._drop(k)
        return defer.succeed(len(doomed))

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "bytes": self._bytes,
            "max_bytes": self._max_bytes,
            "evictions": self.evictions,
            "expired": self.expired,
        }

    def start(self) -> None:
        pass

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)
