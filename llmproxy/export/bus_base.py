"""What publishes events and what receives them (tests: tests/unit/test_memory_bus.py).

The request path publishes envelopes on an ``EventBus``; each subscriber (one
``BatchingExporter`` per sink) has its own bounded buffer, so a stalled sink never
stalls another.  In-memory and Redis buses implement the same interface.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from llmproxy.events.envelope import Envelope


@runtime_checkable
class Subscriber(Protocol):
    """Anything with an O(1), never-raising ``publish`` (an exporter)."""

    def publish(self, envelope: Envelope) -> None: ...


@runtime_checkable
class EventBus(Protocol):
    """Hands every published envelope to every subscriber."""

    def subscribe(self, subscriber: Subscriber) -> None: ...

    def unsubscribe(self, subscriber: Subscriber) -> None: ...

    def publish(self, envelope: Envelope) -> None:
        """Never blocks, never raises: it runs on the request path."""
