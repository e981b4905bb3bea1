"""The JSONL file sink: lines, fsync policy, rotation, write errors."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from twisted.internet.task import Clock

from llmproxy.export.envelope import StoredEvent
from llmproxy.export.registry import build_exporter
from llmproxy.export.sink import Delivered, Retry, Sink
from llmproxy.export.sinks import file as file_module
from llmproxy.export.sinks.file import FileSink
from llmproxy.settings import ExporterSettings


def event(i: int) -> dict[str, Any]:
    return {"type": "request", "i": i}


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def deliver(sink: FileSink, *numbers: int) -> Any:
    return sink.deliver([event(i) for i in numbers]).result


LINE = len(orjson.dumps(event(1))) + 1


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(file_module.os, "fsync", fsync)
    return calls


def test_file_sink_is_a_sink(tmp_path: Path) -> None:
    assert isinstance(FileSink("f", tmp_path / "e.jsonl"), Sink)


def test_events_are_appended_one_json_line_each(tmp_path: Path) -> None:
    sink = FileSink("f", tmp_path / "sub" / "events.jsonl")
    assert deliver(sink, 1, 2) == Delivered()
    assert deliver(sink, 3) == Delivered()
    assert lines_of(sink.path) == [event(1), event(2), event(3)]


def test_events_are_appended_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(orjson.dumps(event(0)) + b"\n")
    deliver(FileSink("f", path), 1)
    assert lines_of(path) == [event(0), event(1)]


def test_a_batch_is_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[int] = []
    real = os.write
    monkeypatch.setattr(
        file_module.os, "write", lambda fd, data: (writes.append(len(data)), real(fd, data))[1]
    )
    deliver(FileSink("f", tmp_path / "e.jsonl"), 1, 2, 3)
    assert writes == [3 * LINE]


def test_fsync_batch_syncs_once_per_delivery(tmp_path: Path, fsyncs: list[int]) -> None:
    deliver(FileSink("f", tmp_path / "e.jsonl", fsync="batch"), 1, 2, 3)
    assert len(fsyncs) == 1


def test_fsync_always_syncs_after_each_line(tmp_path: Path, fsyncs: list[int]) -> None:
    sink = FileSink("f", tmp_path / "e.jsonl", fsync="always")
    deliver(sink, 1, 2, 3)
    assert len(fsyncs) == 3
    assert lines_of(sink.path) == [event(1), event(2), event(3)]


def test_fsync_never_leaves_syncing_to_the_os(tmp_path: Path, fsyncs: list[int]) -> None:
    deliver(FileSink("f", tmp_path / "e.jsonl", fsync="never"), 1, 2, 3)
    assert fsyncs == []


def test_an_unknown_fsync_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        FileSink("f", tmp_path / "e.jsonl", fsync="sometimes")


def test_the_file_is_rotated_before_it_would_pass_rotate_bytes(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = FileSink("f", path, rotate_bytes=2 * LINE, rotate_keep=3)
    deliver(sink, 1, 2)
    deliver(sink, 3)
    assert lines_of(path) == [event(3)]
    assert lines_of(tmp_path / "events.jsonl.1") == [event(1), event(2)]


def test_rotation_keeps_rotate_keep_old_files(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = FileSink("f", path, rotate_bytes=LINE, rotate_keep=2)
    for i in range(5):
        deliver(sink, i)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "events.jsonl",
        "events.jsonl.1",
        "events.jsonl.2",
    ]
    assert [
        lines_of(tmp_path / n) for n in ("events.jsonl.2", "events.jsonl.1", "events.jsonl")
    ] == [
        [event(2)],
        [event(3)],
        [event(4)],
    ]


def test_rotate_keep_zero_starts_the_file_afresh(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = FileSink("f", path, rotate_bytes=LINE, rotate_keep=0)
    deliver(sink, 1)
    deliver(sink, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["events.jsonl"]
    assert lines_of(path) == [event(2)]


def test_a_batch_bigger_than_rotate_bytes_goes_alone_into_a_fresh_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = FileSink("f", path, rotate_bytes=LINE)
    deliver(sink, 1, 2, 3)
    assert lines_of(path) == [event(1), event(2), event(3)]
    deliver(sink, 4)
    assert lines_of(path) == [event(4)]


def test_a_write_error_is_retried_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_module.os, "write", disk_full)
    verdict = deliver(FileSink("f", tmp_path / "e.jsonl"), 1)
    assert verdict == Retry("file write failed: No space left on device")


def test_a_failed_write_leaves_no_partial_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = FileSink("f", tmp_path / "e.jsonl")
    deliver(sink, 1)
    real = os.write

    def half_then_full(fd: int, data: Any) -> int:
        if len(data) > 10:
            return real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_module.os, "write", half_then_full)
    assert isinstance(deliver(sink, 2, 3), Retry)
    monkeypatch.setattr(file_module.os, "write", real)
    assert deliver(sink, 2, 3) == Delivered()
    assert lines_of(sink.path) == [event(1), event(2), event(3)]


def test_an_event_that_is_not_json_is_rejected_alone(tmp_path: Path) -> None:
    sink = FileSink("f", tmp_path / "e.jsonl")
    verdict = sink.deliver([event(1), {"bad": {1, 2}}, event(3)]).result
    assert isinstance(verdict, Delivered) and list(verdict.rejected) == [1]
    assert lines_of(sink.path) == [event(1), event(3)]


def test_close_closes_the_file_and_a_later_batch_reopens_it(tmp_path: Path) -> None:
    sink = FileSink("f", tmp_path / "e.jsonl")
    deliver(sink, 1)
    assert sink.close().result is None
    deliver(sink, 2)
    assert lines_of(sink.path) == [event(1), event(2)]


def test_exporter_with_a_file_sink_writes_published_events(tmp_path: Path) -> None:
    clock = Clock()
    settings = ExporterSettings(name="local", type="file", batch_size=2)
    exporter = build_exporter(settings, clock=clock, http_client=None, state_dir=tmp_path)  # type: ignore[arg-type]
    exporter.start()
    for i in range(5):
        exporter.publish(StoredEvent(event(i)))
    clock.advance(1.0)
    closed = exporter.close(timeout=5.0)
    assert closed.called
    assert lines_of(tmp_path / "events.jsonl") == [event(i) for i in range(5)]
    assert exporter.stats()["sent"] == 5
    assert clock.getDelayedCalls() == []
