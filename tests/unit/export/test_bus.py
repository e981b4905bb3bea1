"""The in-memory bus: fan-out, isolation of subscribers, never raising."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from llmproxy.config.model import ExporterSettings
from llmproxy.events.envelope import Envelope, StoredEvent
from llmproxy.export.bus import MemoryBus
from llmproxy.export.deadletter import DeadLetter
from llmproxy.export.exporter import BatchingExporter
from llmproxy.export.verdict import Delivered
from llmproxy.interfaces import EventBus


@attrs.define
class Recorder:
    got: list[Envelope] = attrs.Factory(list)

    def publish(self, envelope: Envelope) -> None:
        self.got.append(envelope)


class Exploding:
    def publish(self, envelope: Envelope) -> None:
        raise RuntimeError("subscriber bug")


def ev(i: int) -> StoredEvent:
    return StoredEvent({"type": "request", "i": i})


def test_memory_bus_is_an_event_bus() -> None:
    assert isinstance(MemoryBus(), EventBus)


def test_publish_fans_out_to_every_subscriber() -> None:
    bus, a, b = MemoryBus(), Recorder(), Recorder()
    bus.subscribe(a)
    bus.subscribe(b)
    event = ev(1)
    bus.publish(event)
    assert a.got == [event] and b.got == [event]
    assert bus.stats() == {"published": 1, "subscribers": 2, "subscriber_errors": 0}


def test_subscribing_twice_delivers_once() -> None:
    bus, a = MemoryBus(), Recorder()
    bus.subscribe(a)
    bus.subscribe(a)
    bus.publish(ev(1))
    assert len(a.got) == 1


def test_an_unsubscribed_subscriber_gets_nothing_more() -> None:
    bus, a = MemoryBus(), Recorder()
    bus.subscribe(a)
    bus.unsubscribe(a)
    bus.publish(ev(1))
    assert a.got == []


def test_a_raising_subscriber_is_counted_and_the_others_still_get_the_event() -> None:
    warnings: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(warnings.append)
    try:
        bus, a = MemoryBus(), Recorder()
        bus.subscribe(Exploding())
        bus.subscribe(a)
        bus.publish(ev(1))  # does not raise
        bus.publish(ev(2))
    finally:
        globalLogPublisher.removeObserver(warnings.append)
    assert len(a.got) == 2
    assert bus.stats()["subscriber_errors"] == 2
    notes = [w for w in warnings if w.get("log_namespace") == "llmproxy.export.bus"]
    assert len(notes) == 1 and notes[0]["log_level"].name == "warn"


@attrs.define
class StalledSink:
    name: str = "stalled"
    calls: int = 0

    def deliver(self, events: Any) -> Deferred[Any]:
        self.calls += 1
        return Deferred()  # never answers

    def close(self) -> Deferred[None]:
        return succeed(None)


@attrs.define
class CountingSink:
    name: str = "healthy"
    delivered: list[int] = attrs.Factory(list)

    def deliver(self, events: Any) -> Deferred[Any]:
        self.delivered.extend(e["i"] for e in events)
        return succeed(Delivered())

    def close(self) -> Deferred[None]:
        return succeed(None)


def test_a_stalled_sink_does_not_stall_another(tmp_path: Path) -> None:
    clock = Clock()

    def exporter(sink: Any) -> BatchingExporter:
        settings = ExporterSettings(name=sink.name, type="x", batch_size=10, buffer=20)
        dead = DeadLetter(tmp_path / f"{sink.name}.jsonl", sink.name)
        return BatchingExporter(settings, sink, clock, None, dead, lambda: 0.0)

    stalled, healthy = StalledSink(), CountingSink()
    slow, fast = exporter(stalled), exporter(healthy)
    bus = MemoryBus()
    for e in (slow, fast):
        bus.subscribe(e)
        e.start()
    for i in range(100):
        bus.publish(ev(i))
        clock.advance(0.1)
    clock.advance(1.0)
    assert healthy.delivered == list(range(100))
    assert stalled.calls == 1
    assert slow.stats()["dropped_by_reason"]["buffer_full"] > 0
    for e in (slow, fast):
        e.stop(1.0)
    clock.advance(1.0)
