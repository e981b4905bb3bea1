"""The in-memory event bus, the default (tests: tests/unit/export/test_bus.py).

A plain fan-out: ``publish`` calls every subscriber's ``publish`` in turn.  Each
subscriber buffers on its own (the exporters' bounded buffers), so one slow sink
never holds the others back.  A subscriber that raises is counted and logged once;
the others still get the event and the caller never sees the error.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from llmproxy.events.envelope import Envelope
from llmproxy.interfaces import Subscriber

__all__ = ["MemoryBus"]

log = Logger()


@attrs.define(eq=False)
class MemoryBus:
    """Fan-out of envelopes to subscribers in this process."""

    _subscribers: tuple[Subscriber, ...] = attrs.field(init=False, default=())
    _published: int = attrs.field(init=False, default=0)
    _subscriber_errors: int = attrs.field(init=False, default=0)
    _warned: set[str] = attrs.field(init=False, factory=set)

    def subscribe(self, subscriber: Subscriber) -> None:
        if not any(s is subscriber for s in self._subscribers):  # identity, not equality
            # A new tuple, so a publish in progress keeps iterating over the old one.
            self._subscribers = (*self._subscribers, subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)

    def start(self) -> None:
        """Nothing to start (``Lifecycle``, like the Redis bus)."""

    def stop(self, timeout: float) -> Deferred[None]:
        """Nothing to stop: the subscribers (exporters) stop on their own."""
        return succeed(None)

    def publish(self, envelope: Envelope) -> None:
        self._published += 1
        for subscriber in self._subscribers:
            try:
                subscriber.publish(envelope)
            except Exception as e:
                self._subscriber_errors += 1
                self._warn_once(subscriber, e)

    def stats(self) -> dict[str, Any]:
        return {
            "published": self._published,
            "subscribers": len(self._subscribers),
            "subscriber_errors": self._subscriber_errors,
        }

    def _warn_once(self, subscriber: Subscriber, error: Exception) -> None:
        # The type names only: an exception's text could carry event content.
        key = f"{type(subscriber).__name__}:{type(error).__name__}"
        if key in self._warned:
            return
        self._warned.add(key)
        log.warn(
            "event bus: subscriber {subscriber} raised {error}; others still served",
            subscriber=type(subscriber).__name__,
            error=type(error).__name__,
        )
