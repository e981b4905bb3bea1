"""One stored response and its byte form for shared stores (tests: tests/unit/cache/test_store.py).

A :class:`CachedResponse` is what a hit replays: status, the headers the client
got (hop-by-hop fields, ``Set-Cookie`` and ``Age`` already dropped), the body
as the chunks it arrived in (so a replayed SSE stream keeps its event
boundaries), when it was stored and until when it is fresh on the cache's
clock, and the request header values its ``Vary`` names.

The byte form is a magic, a length-prefixed JSON header and the raw body: the
body is never base64'd or JSON-escaped, so a 1 MiB entry costs 1 MiB in Redis.
"""

from __future__ import annotations

import struct

import attrs
import orjson

__all__ = ["ENTRY_OVERHEAD", "CachedResponse", "Pairs"]

_MAGIC = b"LPC1"
_HEAD = struct.Struct(">4sI")
# Per-entry bookkeeping counted against max_bytes beside headers and body.
ENTRY_OVERHEAD = 128

Pairs = tuple[tuple[bytes, bytes], ...]


@attrs.frozen
class CachedResponse:
    status: int
    headers: Pairs  # names lower-case
    chunks: tuple[bytes, ...]
    stored_at: float  # cache clock, seconds
    expires_at: float  # cache clock, seconds: fresh while now < expires_at
    age: float = 0.0  # the Age the upstream reported when it was stored
    vary: Pairs = ()  # (lower-case request header name, its value then)

    @property
    def body_size(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def size(self) -> int:
        """Bytes this entry is charged for in a bounded store."""
        return (
            self.body_size
            + sum(len(n) + len(v) + 4 for n, v in self.headers)
            + sum(len(n) + len(v) + 4 for n, v in self.vary)
            + ENTRY_OVERHEAD
        )

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def age_at(self, now: float) -> float:
        return self.age + max(0.0, now - self.stored_at)

    def encode(self) -> bytes:
        meta = orjson.dumps(
            {
                "s": self.status,
                "h": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
                "c": [len(c) for c in self.chunks],
                "t": self.stored_at,
                "e": self.expires_at,
                "a": self.age,
                "v": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.vary],
            }
        )
        return b"".join((_HEAD.pack(_MAGIC, len(meta)), meta, *self.chunks))

    @classmethod
    def decode(cls, data: bytes) -> CachedResponse:
        """Raises ValueError for anything that is not an entry this version wrote."""
        if len(data) < _HEAD.size:
            raise ValueError("cache entry too short")
        magic, meta_len = _HEAD.unpack_from(data)
        if magic != _MAGIC:
            raise ValueError("not a cache entry (bad magic)")
        start = _HEAD.size + meta_len
        try:
            meta = orjson.loads(data[_HEAD.size : start])
            lengths = [int(n) for n in meta["c"]]
            body = memoryview(data)[start:]
            if sum(lengths) != len(body) or any(n < 0 for n in lengths):
                raise ValueError("cache entry body length does not match")
            chunks = []
            offset = 0
            for n in lengths:
                chunks.append(bytes(body[offset : offset + n]))
                offset += n
            return cls(
                status=int(meta["s"]),
                headers=tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in meta["h"]),
                chunks=tuple(chunks),
                stored_at=float(meta["t"]),
                expires_at=float(meta["e"]),
                age=float(meta["a"]),
                vary=tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in meta["v"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed cache entry ({type(e).__name__})") from None
