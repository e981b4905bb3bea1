"""The public test doubles (llmproxy/testing.py) do what their docs say: a
ScriptedSink drives the real delivery engine through a retry, and a
RecordingEventSink is what the proxy's request path takes."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock

from llmproxy.capture.events import response_event
from llmproxy.config.model import ExporterSettings
from llmproxy.events.envelope import StoredEvent
from llmproxy.export.deadletter import DeadLetter
from llmproxy.export.exporter import BatchingExporter
from llmproxy.export.verdict import Delivered, Retry
from llmproxy.interfaces import EventSink, Sink
from llmproxy.testing import RecordingEventSink, ScriptedSink, older_chunk_shape
from tests.unit.capture.test_events import (
    CAPTURE,
    SSE_CHUNKS,
    finish_json,
    finish_stream,
    make_record,
)


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


def test_older_chunk_shape_gives_a_stream_as_an_earlier_version_wrote_it() -> None:
    event = response_event(finish_stream(make_record()), CAPTURE)
    before = dict(event)
    older = older_chunk_shape(event)
    assert event == before  # not changed
    assert older["response_chunks"] == [
        {"offset_ms": offset, "data": chunk.decode()}
        for offset, chunk in zip([100.0, 200.0, 300.0], SSE_CHUNKS, strict=True)
    ]
    # The keys and their order of that version: the chunks last, no offsets list.
    assert list(older) == [k for k in event if k != "response_chunk_offsets_ms"]
    assert list(older)[-1] == "response_chunks"
    plain = response_event(finish_json(make_record()), CAPTURE)
    assert older_chunk_shape(plain) == {
        k: v for k, v in plain.items() if k != "response_chunk_offsets_ms"
    }
