"""A versioned set of records in Redis that every process keeps a copy of
(tests: tests/unit/state/test_redis_state.py).

Three keys under ``prefix + name``: a hash of records (id -> bytes, written
once, never changed), a hash of notes (id -> bytes, the first note of a record
wins: a revocation), and a version counter bumped by every change.  A process
holds the records in memory and asks :meth:`RedisRegistry.changed_since` with
the version it has: one short round trip that carries everything only when
something changed.  Polled every half second, a change made anywhere is seen
everywhere within a second.

Writers (``llmproxy token create|revoke``, a proxy importing its token file)
use :meth:`add` and :meth:`note`, each one script: the record or note and the
version bump happen together, so a reader never sees the version without the
change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from llmproxy.interfaces import RedisExecutor
from llmproxy.state.scripts import Script

__all__ = ["RedisRegistry", "Snapshot"]


@attrs.frozen
class Snapshot:
    version: bytes
    records: dict[str, bytes]
    notes: dict[str, bytes]


# KEYS: records, notes, version; ARGV[1]: the version the caller has.
# Reply: {version} when unchanged, else {version, records (flat), notes (flat)}.
_CHANGED_SINCE = Script(
    "registry_changed_since",
    b"""
local v = redis.call('GET', KEYS[3]) or '0'
if v == ARGV[1] then return {v} end
return {v, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
""",
)

# KEYS: records, notes, version; ARGV: n, then n x (id, record, note or '').
# Adds each record not there yet, and its note if it has one and the record has
# none; bumps the version once if anything changed.  Reply: records added.
_ADD = Script(
    "registry_add",
    b"""
local added, changed = 0, false
for i = 0, tonumber(ARGV[1]) - 1 do
  local id, record, note = ARGV[2 + 3 * i], ARGV[3 + 3 * i], ARGV[4 + 3 * i]
  if redis.call('HSETNX', KEYS[1], id, record) == 1 then
    added = added + 1
    changed = true
  end
  if note ~= '' and redis.call('HSETNX', KEYS[2], id, note) == 1 then changed = true end
end
if changed then redis.call('INCR', KEYS[3]) end
return added
""",
)

# KEYS: records, notes, version; ARGV: id, note.
# Reply: 1 noted now, 0 already noted (the first note stays), -1 no such record.
_NOTE = Script(
    "registry_note",
    b"""
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return -1 end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('INCR', KEYS[3])
return 1
""",
)


def _pairs(flat: Sequence[Any]) -> dict[str, bytes]:
    return {
        bytes(flat[i]).decode("utf-8", "replace"): bytes(flat[i + 1])
        for i in range(0, len(flat) - 1, 2)
    }


class RedisRegistry:
    def __init__(self, redis: RedisExecutor, prefix: str, name: str) -> None:
        self._redis = redis
        base = prefix + name
        self._keys = (base, base + ":notes", base + ":version")

    def changed_since(self, version: bytes | None) -> Deferred[Snapshot | None]:
        """Everything, when the version is not ``version``; else None."""
        d = _CHANGED_SINCE.run(self._redis, self._keys, [version or b""])

        def read(reply: Sequence[Any]) -> Snapshot | None:
            now = bytes(reply[0])
            if len(reply) == 1:
                return None
            return Snapshot(now, _pairs(reply[1]), _pairs(reply[2]))

        return d.addCallback(read)

    def add(self, entries: Sequence[tuple[str, bytes, bytes | None]]) -> Deferred[int]:
        """Add ``(id, record, note or None)`` where the id is new (a record is
        never replaced; a note is added only where there is none); the count added."""
        args: list[bytes | str | int | float] = [len(entries)]
        for record_id, record, note in entries:
            args += [record_id, record, note or b""]
        return _ADD.run(self._redis, self._keys, args).addCallback(int)

    def note(self, record_id: str, note: bytes) -> Deferred[int]:
        """1: noted; 0: the record had a note already; -1: no such record."""
        return _NOTE.run(self._redis, self._keys, [record_id, note]).addCallback(int)

    def snapshot(self) -> Deferred[Snapshot]:
        d = self.changed_since(None)

        def whole(snap: Snapshot | None) -> Snapshot:
            assert snap is not None  # asked with no version: always a snapshot
            return snap

        return d.addCallback(whole)
