"""What the bus hands to an exporter (tests: tests/unit/export/test_exporter.py).

An *envelope* carries one canonical event.  Its ``size_hint`` is known at publish
time without encoding, so the exporter can bound its buffer in bytes cheaply; the
JSON encoding (``json()``) is memoised and happens off the request path, when a
batch is built.  ``StoredEvent`` wraps an event dict that was already encoded
once (read back from the spool or from Redis).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import attrs
import orjson

__all__ = ["Envelope", "StoredEvent"]


@runtime_checkable
class Envelope(Protocol):
    """One event on its way to the sinks."""

    @property
    def kind(self) -> str:
        """``"request"`` | ``"response"`` | ``"session_start"`` | ``"fork"``."""

    @property
    def size_hint(self) -> int:
        """A cheap byte estimate known at publish time (no JSON encoding)."""

    def payload(self) -> dict[str, Any]:
        """The canonical event dict (JSON-ready), memoised."""

    def json(self) -> bytes:
        """``orjson.dumps(payload())``, memoised."""


@attrs.define(eq=False)
class StoredEvent:
    """An event dict read back from the spool or Redis, wrapped as an ``Envelope``.

    ``size_hint`` is the exact encoded length: the dict was decoded from JSON, so
    encoding it again is cheap and exact beats an estimate here.
    """

    _payload: dict[str, Any]
    _encoded: bytes | None = attrs.field(default=None, init=False, repr=False)

    @property
    def kind(self) -> str:
        return str(self._payload.get("type", ""))

    @property
    def size_hint(self) -> int:
        return len(self.json())

    def payload(self) -> dict[str, Any]:
        return self._payload

    def json(self) -> bytes:
        if self._encoded is None:
            self._encoded = orjson.dumps(self._payload)
        return self._encoded
