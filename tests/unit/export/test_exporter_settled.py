"""The exporter's ``on_settled`` hook: every published event is reported once, with
where it ended (the dispatcher acknowledges Redis entries on it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from llmproxy.config.model import ExporterSettings
from llmproxy.events.envelope import Envelope, StoredEvent
from llmproxy.export.deadletter import DeadLetter
from llmproxy.export.exporter import BatchingExporter
from llmproxy.export.spool import Spool
from llmproxy.export.verdict import Delivered, Rejected, Retry
from tests.unit.export.test_exporter import FakeSink


def ev(i: int) -> StoredEvent:
    return StoredEvent({"type": "request", "i": i})


def make(
    tmp_path: Path, *, spool: bool = False, **kw: Any
) -> tuple[BatchingExporter, FakeSink, Clock, list[tuple[int, str]]]:
    reports: list[tuple[int, str]] = []

    def on_settled(envelope: Envelope, outcome: str) -> None:
        reports.append((envelope.payload()["i"], outcome))

    base: dict[str, Any] = {"batch_size": 2, "max_retries": 1, "backoff_min": 1.0}
    base.update(kw)
    settings = ExporterSettings(name="t", type="file", **base)
    sink = FakeSink()
    clock = Clock()
    exporter = BatchingExporter(
        settings,
        sink,
        clock,
        Spool(tmp_path / "spool", 1 << 20) if spool else None,
        DeadLetter(tmp_path / "dead.jsonl", "t"),
        lambda: 0.0,
        on_settled=on_settled,
    )
    exporter.start()
    return exporter, sink, clock, reports


def test_delivered_events_are_reported_sent_and_refused_ones_dead_lettered(
    tmp_path: Path,
) -> None:
    exporter, sink, clock, reports = make(tmp_path)
    exporter.publish(ev(0))
    exporter.publish(ev(1))
    clock.advance(0)
    assert reports == []  # nothing before the sink answered
    sink.answer(Delivered(rejected={1: "bad"}))
    assert sorted(reports) == [(0, "sent"), (1, "dead_lettered")]


def test_a_rejected_batch_is_reported_dead_lettered(tmp_path: Path) -> None:
    exporter, sink, clock, reports = make(tmp_path)
    exporter.publish(ev(0))
    exporter.publish(ev(1))
    clock.advance(0)
    sink.answer(Rejected("HTTP 400"))
    assert reports == [(0, "dead_lettered"), (1, "dead_lettered")]


def test_retries_report_nothing_until_the_batch_ends(tmp_path: Path) -> None:
    exporter, sink, clock, reports = make(tmp_path, spool=True)
    exporter.publish(ev(0))
    exporter.publish(ev(1))
    clock.advance(0)
    sink.answer(Retry("503"))
    assert reports == []
    clock.advance(2.0)
    sink.answer(Retry("503"))  # max_retries = 1: to the spool
    assert reports == [(0, "spooled"), (1, "spooled")]


def test_without_a_spool_exhausted_and_overflowing_events_are_reported_dropped(
    tmp_path: Path,
) -> None:
    exporter, sink, clock, reports = make(tmp_path, buffer=2, batch_size=10, max_retries=0)
    for i in range(3):
        exporter.publish(ev(i))
    assert reports == [(2, "dropped")]  # buffer full
    clock.advance(1.0)
    sink.answer(Retry("503"))
    assert sorted(reports) == [(0, "dropped"), (1, "dropped"), (2, "dropped")]


def test_what_is_left_at_the_drain_deadline_is_reported(tmp_path: Path) -> None:
    exporter, _sink, clock, reports = make(tmp_path)
    for i in range(3):
        exporter.publish(ev(i))
    clock.advance(0)
    exporter.stop(5.0)
    clock.advance(5.0)
    assert sorted(reports) == [(0, "dropped"), (1, "dropped"), (2, "dropped")]
    exporter.publish(ev(3))
    assert reports[-1] == (3, "dropped")


@pytest.mark.allow_logged_errors
def test_a_raising_hook_is_logged_and_does_not_stop_delivery(tmp_path: Path) -> None:
    errors: list[dict[str, Any]] = []
    from twisted.logger import globalLogPublisher

    def boom(envelope: Envelope, outcome: str) -> None:
        raise RuntimeError("hook bug")

    exporter = BatchingExporter(
        ExporterSettings(name="t", type="file", batch_size=1),
        (sink := FakeSink()),
        (clock := Clock()),
        None,
        DeadLetter(tmp_path / "dead.jsonl", "t"),
        on_settled=boom,
    )
    globalLogPublisher.addObserver(errors.append)
    try:
        exporter.start()
        exporter.publish(ev(0))
        clock.advance(0)
        sink.answer(Delivered())
    finally:
        globalLogPublisher.removeObserver(errors.append)
    assert exporter.stats()["sent"] == 1
    assert any(e.get("log_failure") is not None for e in errors)


@given(st.lists(st.sampled_from(["publish", "ok", "retry", "reject", "tick"]), max_size=40))
def test_every_event_is_reported_exactly_once_when_all_settle(actions: list[str]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        exporter, sink, clock, reports = make(Path(tmp), spool=True, buffer=4)
        published = 0
        for action in actions:
            if action == "publish":
                exporter.publish(ev(published))
                published += 1
            elif action == "tick":
                clock.advance(1.0)
            elif sink.pending:
                verdict = {"ok": Delivered(), "retry": Retry("503"), "reject": Rejected("400")}
                sink.answer(verdict[action])
        exporter.stop(10.0)
        clock.pump([1.0] * 12)
        # Once each: an event replayed from the spool was reported "spooled" already.
        assert sorted(i for i, _ in reports) == list(range(published))
        stats = exporter.stats()
        outcomes = [o for _, o in reports]
        assert outcomes.count("sent") <= stats["sent"]
        assert outcomes.count("dead_lettered") <= stats["dead_lettered"]
        if not outcomes.count("spooled"):
            assert outcomes.count("sent") == stats["sent"]
            assert outcomes.count("dead_lettered") == stats["dead_lettered"]
