"""The public test doubles (llmproxy/testing.py) do what their docs say: a
ScriptedSink drives the real delivery engine through a retry, and a
RecordingEventSink is what the proxy's request path takes."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock

from llmproxy.config.model import ExporterSettings
from llmproxy.events.envelope import StoredEvent
from llmproxy.export.deadletter import DeadLetter
from llmproxy.export.exporter import BatchingExporter
from llmproxy.export.verdict import Delivered, Retry
from llmproxy.interfaces import EventSink, Sink
from llmproxy.testing import RecordingEventSink, ScriptedSink


def test_a_scripted_sink_drives_the_engine_through_a_retry(tmp_path: Path) -> None:
    clock = Clock()
    sink = ScriptedSink(script=[Retry("HTTP 503")], then=Delivered())
    exporter = BatchingExporter(
        ExporterSettings(name="t", type="test", batch_size=2, backoff_min=1.0, backoff_max=1.0),
        sink,
        clock,
        None,
        DeadLetter(tmp_path / "dead.jsonl", "t"),
        lambda: 0.0,
    )
    exporter.start()
    exporter.publish(StoredEvent({"type": "request", "n": 1}))
    exporter.publish(StoredEvent({"type": "request", "n": 2}))
    clock.advance(0)
    clock.advance(1.0)
    assert sink.delivered("n") == [1, 2, 1, 2]  # refused once, then delivered
    assert exporter.stats()["sent"] == 2


def test_a_scripted_sink_can_hold_its_answers() -> None:
    sink = ScriptedSink(then=None)
    d = sink.deliver([{"n": 1}])
    assert sink.waiting == 1 and not d.called
    sink.answer(Delivered())
    assert d.result == Delivered() and sink.waiting == 0


def test_the_doubles_satisfy_the_protocols_they_stand_for() -> None:
    assert isinstance(ScriptedSink(), Sink)
    assert isinstance(RecordingEventSink(), EventSink)
