"""The JSONL file sink: lines, fsync policy (off the reactor thread), rotation, write errors,
following its path (moved, deleted, reopened on SIGHUP, directory removed)."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import orjson
import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from llmproxy.config.model import ExporterSettings
from llmproxy.events.envelope import StoredEvent
from llmproxy.export.deadletter import DeadLetter
from llmproxy.export.exporter import BatchingExporter
from llmproxy.export.registry import build_exporter
from llmproxy.export.sink import Sink
from llmproxy.export.sinks import file as file_module
from llmproxy.export.sinks.file import FileSink
from llmproxy.export.verdict import Delivered, Retry

T = TypeVar("T")


def run_now(work: Callable[[], T]) -> Deferred[T]:
    """A synchronous ``run_blocking``: the tests stay deterministic."""
    return maybeDeferred(work)


def file_sink(path: Path, **kwargs: Any) -> FileSink:
    return FileSink("f", path, run_blocking=run_now, **kwargs)


class ManualRunner:
    """A ``run_blocking`` that runs each piece of work only when told to."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, work: Callable[[], T]) -> Deferred[T]:
        done: Deferred[T] = Deferred()
        self.pending.append((work, done))
        return done

    def run_one(self) -> None:
        work, done = self.pending.pop(0)
        maybeDeferred(work).chainDeferred(done)


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
    assert isinstance(file_sink(tmp_path / "e.jsonl"), Sink)


def test_events_are_appended_one_json_line_each(tmp_path: Path) -> None:
    sink = file_sink(tmp_path / "sub" / "events.jsonl")
    assert deliver(sink, 1, 2) == Delivered()
    assert deliver(sink, 3) == Delivered()
    assert lines_of(sink.path) == [event(1), event(2), event(3)]


def test_events_are_appended_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(orjson.dumps(event(0)) + b"\n")
    deliver(file_sink(path), 1)
    assert lines_of(path) == [event(0), event(1)]


def test_a_batch_is_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[int] = []
    real = os.writev

    def counting(fd: int, pieces: Sequence[bytes]) -> int:
        writes.append(sum(map(len, pieces)))
        return real(fd, pieces)

    monkeypatch.setattr(file_module.os, "writev", counting)
    deliver(file_sink(tmp_path / "e.jsonl"), 1, 2, 3)
    assert writes == [3 * LINE]
    monkeypatch.setattr(file_module, "_JOIN_BELOW", 0)  # a large batch: not joined
    deliver(file_sink(tmp_path / "f.jsonl"), 1, 2, 3)
    assert writes == [3 * LINE, 3 * LINE]


@pytest.mark.parametrize("many", [True, False], ids=["lines", "joined"])
@pytest.mark.parametrize("step", [1, 7, LINE - 1, LINE, LINE + 1, 1000])
def test_short_writes_are_carried_on_to_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: int, many: bool
) -> None:
    """The kernel may take part of a ``writev`` (a signal, a nearly full disk): the
    rest follows, from inside a line as from a line's end, with nothing lost or
    written twice; a large batch goes out line by line, a batch longer than one
    ``writev`` takes is split, a small batch is joined."""
    real = os.writev
    calls: list[int] = []

    def short(fd: int, pieces: Sequence[bytes]) -> int:
        calls.append(len(pieces))
        assert len(calls) < 5000, "writev called again and again: the rest never ends"
        assert len(pieces) <= 6  # IOV_MAX below, in buffers
        return real(fd, [bytes(b"".join(pieces)[:step])])

    monkeypatch.setattr(file_module, "_IOV_MAX", 6)
    monkeypatch.setattr(file_module, "_JOIN_BELOW", 0 if many else 1 << 20)
    monkeypatch.setattr(file_module.os, "writev", short)
    sink = file_sink(tmp_path / "e.jsonl")
    assert deliver(sink, *range(1, 11)) == Delivered()
    assert lines_of(sink.path) == [event(n) for n in range(1, 11)]
    assert len(calls) >= -(-10 * LINE // step)


def test_fsync_batch_syncs_once_per_delivery(tmp_path: Path, fsyncs: list[int]) -> None:
    deliver(file_sink(tmp_path / "e.jsonl", fsync="batch"), 1, 2, 3)
    assert len(fsyncs) == 1


def test_fsync_always_syncs_after_each_line(tmp_path: Path, fsyncs: list[int]) -> None:
    sink = file_sink(tmp_path / "e.jsonl", fsync="always")
    deliver(sink, 1, 2, 3)
    assert len(fsyncs) == 3
    assert lines_of(sink.path) == [event(1), event(2), event(3)]


def test_fsync_never_leaves_syncing_to_the_os(tmp_path: Path, fsyncs: list[int]) -> None:
    deliver(file_sink(tmp_path / "e.jsonl", fsync="never"), 1, 2, 3)
    assert fsyncs == []


def test_an_unknown_fsync_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        file_sink(tmp_path / "e.jsonl", fsync="sometimes")


def test_the_file_is_rotated_before_it_would_pass_rotate_bytes(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = file_sink(path, rotate_bytes=2 * LINE, rotate_keep=3)
    deliver(sink, 1, 2)
    deliver(sink, 3)
    assert lines_of(path) == [event(3)]
    assert lines_of(tmp_path / "events.jsonl.1") == [event(1), event(2)]


def test_rotation_keeps_rotate_keep_old_files(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = file_sink(path, rotate_bytes=LINE, rotate_keep=2)
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
    sink = file_sink(path, rotate_bytes=LINE, rotate_keep=0)
    deliver(sink, 1)
    deliver(sink, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["events.jsonl"]
    assert lines_of(path) == [event(2)]


def test_a_batch_bigger_than_rotate_bytes_goes_alone_into_a_fresh_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = file_sink(path, rotate_bytes=LINE)
    deliver(sink, 1, 2, 3)
    assert lines_of(path) == [event(1), event(2), event(3)]
    deliver(sink, 4)
    assert lines_of(path) == [event(4)]


def test_a_write_error_is_retried_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int, pieces: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_module.os, "writev", disk_full)
    verdict = deliver(file_sink(tmp_path / "e.jsonl"), 1)
    assert verdict == Retry("file write failed: No space left on device")


def test_a_failed_write_leaves_no_partial_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = file_sink(tmp_path / "e.jsonl")
    deliver(sink, 1)
    real = os.writev

    def half_then_full(fd: int, pieces: Sequence[bytes]) -> int:
        data = b"".join(pieces)
        if len(data) > 10:
            return real(fd, [data[: len(data) // 2]])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_module.os, "writev", half_then_full)
    assert isinstance(deliver(sink, 2, 3), Retry)
    monkeypatch.setattr(file_module.os, "writev", real)
    assert deliver(sink, 2, 3) == Delivered()
    assert lines_of(sink.path) == [event(1), event(2), event(3)]


def test_an_event_that_is_not_json_is_rejected_alone(tmp_path: Path) -> None:
    sink = file_sink(tmp_path / "e.jsonl")
    verdict = sink.deliver([event(1), {"bad": {1, 2}}, event(3)]).result
    assert isinstance(verdict, Delivered) and list(verdict.rejected) == [1]
    assert lines_of(sink.path) == [event(1), event(3)]


def test_close_closes_the_file_and_a_later_batch_reopens_it(tmp_path: Path) -> None:
    sink = file_sink(tmp_path / "e.jsonl")
    deliver(sink, 1)
    assert sink.close().result is None
    deliver(sink, 2)
    assert lines_of(sink.path) == [event(1), event(2)]


def test_exporter_with_a_file_sink_writes_published_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_module.threads, "deferToThread", run_now)
    clock = Clock()
    settings = ExporterSettings(name="local", type="file", batch_size=2)
    exporter = build_exporter(settings, clock=clock, http_client=None, state_dir=tmp_path)  # type: ignore[arg-type]
    exporter.start()
    for i in range(5):
        exporter.publish(StoredEvent(event(i)))
    clock.advance(1.0)
    closed = exporter.stop(5.0)
    assert closed.called
    assert lines_of(tmp_path / "events.jsonl") == [event(i) for i in range(5)]
    assert exporter.stats()["sent"] == 5
    assert clock.getDelayedCalls() == []


# -- fsync off the reactor thread ---------------------------------------------------


def test_fsync_batch_runs_off_the_calling_thread_and_answers_after_it(
    tmp_path: Path, fsyncs: list[int]
) -> None:
    runner = ManualRunner()
    sink = FileSink("f", tmp_path / "e.jsonl", run_blocking=runner)
    answer = sink.deliver([event(1), event(2)])
    # Written in the caller's thread (one write), synced through the runner.
    assert lines_of(sink.path) == [event(1), event(2)]
    assert fsyncs == [] and len(runner.pending) == 1
    assert not answer.called  # nothing counts as sent before it is durable
    runner.run_one()
    assert len(fsyncs) == 1
    assert answer.result == Delivered()


def test_fsync_always_writes_and_syncs_each_line_off_the_calling_thread(
    tmp_path: Path, fsyncs: list[int]
) -> None:
    runner = ManualRunner()
    sink = FileSink("f", tmp_path / "e.jsonl", fsync="always", run_blocking=runner)
    answer = sink.deliver([event(1), event(2), event(3)])
    assert not sink.path.exists() or sink.path.read_bytes() == b""
    runner.run_one()
    assert len(fsyncs) == 3
    assert lines_of(sink.path) == [event(1), event(2), event(3)]
    assert answer.result == Delivered()


def test_fsync_never_answers_at_once_without_the_runner(tmp_path: Path) -> None:
    runner = ManualRunner()
    sink = FileSink("f", tmp_path / "e.jsonl", fsync="never", run_blocking=runner)
    assert sink.deliver([event(1)]).result == Delivered()
    assert runner.pending == []


def test_a_batch_waits_for_the_fsync_before_it(tmp_path: Path, fsyncs: list[int]) -> None:
    runner = ManualRunner()
    sink = FileSink("f", tmp_path / "e.jsonl", run_blocking=runner)
    first = sink.deliver([event(1)])
    second = sink.deliver([event(2)])
    assert lines_of(sink.path) == [event(1)]  # the second is not even written yet
    runner.run_one()
    assert first.result == Delivered() and not second.called
    assert lines_of(sink.path) == [event(1), event(2)]
    runner.run_one()
    assert second.result == Delivered()
    assert len(fsyncs) == 2


def test_rotation_does_not_close_the_file_under_an_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int]] = []
    real_close = os.close

    def close(fd: int) -> None:
        calls.append(("close", fd))
        real_close(fd)

    monkeypatch.setattr(file_module.os, "fsync", lambda fd: calls.append(("fsync", fd)))
    monkeypatch.setattr(file_module.os, "close", close)
    runner = ManualRunner()
    path = tmp_path / "events.jsonl"
    sink = FileSink("f", path, rotate_bytes=LINE, rotate_keep=2, run_blocking=runner)
    first = sink.deliver([event(1)])
    second = sink.deliver([event(2)])  # rotates the file the first one is syncing
    assert calls == []
    runner.run_one()
    assert first.result == Delivered()
    # The descriptor was synced first, closed by the rotation after.
    assert [kind for kind, _ in calls] == ["fsync", "close"]
    assert calls[0][1] == calls[1][1]
    runner.run_one()
    assert second.result == Delivered()
    assert lines_of(tmp_path / "events.jsonl.1") == [event(1)]
    assert lines_of(path) == [event(2)]


def test_close_waits_for_the_fsync_in_flight(tmp_path: Path) -> None:
    runner = ManualRunner()
    sink = FileSink("f", tmp_path / "e.jsonl", run_blocking=runner)
    answer = sink.deliver([event(1)])
    closing = sink.close()
    assert not closing.called
    runner.run_one()
    assert answer.result == Delivered()
    assert closing.called
    assert sink.deliver([event(2)]).called is False  # reopened, syncing again
    runner.run_one()
    assert lines_of(sink.path) == [event(1), event(2)]


def test_a_failed_fsync_is_retried_and_its_lines_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = file_sink(tmp_path / "e.jsonl")
    deliver(sink, 1)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(file_module.os, "fsync", broken)
    assert deliver(sink, 2, 3) == Retry("file write failed: Input/output error")
    assert lines_of(sink.path) == [event(1)]
    monkeypatch.undo()
    assert deliver(sink, 2, 3) == Delivered()
    assert lines_of(sink.path) == [event(1), event(2), event(3)]


def test_a_failed_always_write_is_cut_off_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = file_sink(tmp_path / "e.jsonl", fsync="always")
    deliver(sink, 1)
    real = os.writev
    calls: list[int] = []

    def second_line_fails(fd: int, pieces: Sequence[bytes]) -> int:
        calls.append(len(pieces))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, pieces)

    monkeypatch.setattr(file_module.os, "writev", second_line_fails)
    assert deliver(sink, 2, 3) == Retry("file write failed: No space left on device")
    monkeypatch.undo()
    assert lines_of(sink.path) == [event(1)]


def test_a_waiting_batch_writes_the_lines_it_was_given(tmp_path: Path) -> None:
    """A batch queued behind an fsync is written as handed over, even when the
    caller's list changes meanwhile (the lines are never copied into a buffer)."""
    runner = ManualRunner()
    sink = FileSink("f", tmp_path / "e.jsonl", run_blocking=runner)
    first = sink.deliver_lines([event(1)], [orjson.dumps(event(1))])
    lines = [orjson.dumps(event(2)), orjson.dumps(event(3))]
    second = sink.deliver_lines([event(2), event(3)], lines)
    lines[:] = [orjson.dumps(event(9))]
    runner.run_one()
    runner.run_one()
    assert first.result == second.result == Delivered()
    assert lines_of(sink.path) == [event(1), event(2), event(3)]


def test_a_cancelled_batch_not_yet_started_is_never_written(tmp_path: Path) -> None:
    runner = ManualRunner()
    sink = FileSink("f", tmp_path / "e.jsonl", run_blocking=runner)
    first = sink.deliver([event(1)])
    second = sink.deliver([event(2)])
    second.cancel()
    assert second.called
    second.addErrback(lambda f: f.trap(CancelledError))
    runner.run_one()
    assert first.result == Delivered()
    assert runner.pending == []
    assert lines_of(sink.path) == [event(1)]


def test_a_batch_cancelled_during_its_fsync_does_not_stop_the_next(tmp_path: Path) -> None:
    runner = ManualRunner()
    sink = FileSink("f", tmp_path / "e.jsonl", run_blocking=runner)
    first = sink.deliver([event(1)])
    first.cancel()
    first.addErrback(lambda f: f.trap(CancelledError))
    second = sink.deliver([event(2)])
    runner.run_one()  # the first's fsync returns after its answer was given up
    runner.run_one()
    assert second.result == Delivered()
    assert lines_of(sink.path) == [event(1), event(2)]


def test_a_runner_that_raises_fails_the_batch_not_the_sink(tmp_path: Path) -> None:
    def broken(work: Callable[[], T]) -> Deferred[T]:
        raise RuntimeError("no threads")

    sink = FileSink("f", tmp_path / "e.jsonl", run_blocking=broken)
    failed = sink.deliver([event(1)])
    assert failed.called
    failed.addErrback(lambda f: f.trap(RuntimeError))
    sink = FileSink("f", tmp_path / "e.jsonl", fsync="never", run_blocking=broken)
    assert sink.deliver([event(2)]).result == Delivered()


@pytest_twisted.inlineCallbacks
def test_by_default_fsync_runs_in_a_thread_of_the_reactor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    threads_seen: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        threads_seen.append(threading.get_ident())
        real(fd)

    monkeypatch.setattr(file_module.os, "fsync", fsync)
    sink = FileSink("f", tmp_path / "e.jsonl")
    verdict = yield sink.deliver([event(1)])
    assert verdict == Delivered()
    assert threads_seen and threads_seen[0] != threading.get_ident()
    yield sink.close()
    assert lines_of(sink.path) == [event(1)]


@pytest.mark.parametrize("fsync", ["never", "batch", "always"])
def test_deliver_lines_writes_what_deliver_writes(tmp_path: Path, fsync: str) -> None:
    events = [{"type": "request", "i": i, "text": "é\u2028\n"} for i in range(5)]
    by_events = file_sink(tmp_path / "a.jsonl", fsync=fsync)
    by_lines = file_sink(tmp_path / "b.jsonl", fsync=fsync)
    answers: list[object] = []
    by_events.deliver(events).addCallback(answers.append)
    by_lines.deliver_lines(events, [orjson.dumps(e) for e in events]).addCallback(answers.append)
    assert [type(a) for a in answers] == [Delivered, Delivered]
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert lines_of(tmp_path / "b.jsonl") == events


# -- following the path: moved, unlinked, reopen (logrotate), directory removed ------


@pytest.fixture
def info_lines() -> Iterator[list[str]]:
    """What was logged at info level, formatted."""
    seen: list[str] = []

    def observer(e: dict[str, Any]) -> None:
        if e.get("log_level") == LogLevel.info:
            seen.append(formatEvent(e))

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def test_a_file_moved_aside_between_batches_is_reopened_at_its_path(
    tmp_path: Path, info_lines: list[str]
) -> None:
    path = tmp_path / "events.jsonl"
    sink = file_sink(path)
    deliver(sink, 1, 2)
    path.rename(tmp_path / "events.jsonl.1")  # logrotate without copytruncate
    assert deliver(sink, 3, 4) == Delivered()
    assert deliver(sink, 5) == Delivered()
    assert lines_of(tmp_path / "events.jsonl.1") == [event(1), event(2)]
    assert lines_of(path) == [event(3), event(4), event(5)]
    assert sink.reopens == {"moved": 1}
    reopened = [x for x in info_lines if "reopening" in x]
    assert len(reopened) == 1 and "moved" in reopened[0] and str(path) in reopened[0]


def test_a_new_file_put_at_the_path_is_written_after_a_move(tmp_path: Path) -> None:
    # logrotate's ``create``: the old file renamed, an empty one created in its place.
    path = tmp_path / "events.jsonl"
    sink = file_sink(path)
    deliver(sink, 1)
    path.rename(tmp_path / "old.jsonl")
    path.write_bytes(b"")
    deliver(sink, 2)
    assert lines_of(tmp_path / "old.jsonl") == [event(1)]
    assert lines_of(path) == [event(2)]
    assert sink.reopens == {"moved": 1}


def test_a_deleted_file_is_created_again_for_the_next_batch(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = file_sink(path)
    deliver(sink, 1)
    path.unlink()
    assert deliver(sink, 2, 3) == Delivered()
    assert lines_of(path) == [event(2), event(3)]
    assert sink.reopens == {"unlinked": 1}


def test_a_removed_directory_is_made_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = state / "sub" / "events.jsonl"
    sink = file_sink(path)
    deliver(sink, 1)
    shutil.rmtree(state)
    assert deliver(sink, 2) == Delivered()
    assert lines_of(path) == [event(2)]
    assert sink.reopens == {"unlinked": 1}


@pytest.mark.parametrize("fsync", ["never", "batch", "always"])
def test_every_fsync_policy_follows_the_path(tmp_path: Path, fsync: str) -> None:
    path = tmp_path / "events.jsonl"
    sink = file_sink(path, fsync=fsync)
    deliver(sink, 1)
    path.rename(tmp_path / "old.jsonl")
    deliver(sink, 2)
    assert lines_of(tmp_path / "old.jsonl") + lines_of(path) == [event(1), event(2)]


def test_rotation_after_a_move_counts_only_the_new_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = file_sink(path, rotate_bytes=2 * LINE, rotate_keep=2)
    deliver(sink, 1, 2)  # full: the next batch would rotate
    path.rename(tmp_path / "aside.jsonl")
    deliver(sink, 3, 4)  # into the new, empty file: no rotation
    assert not (tmp_path / "events.jsonl.1").exists()
    assert lines_of(path) == [event(3), event(4)]


def test_reopen_closes_the_file_and_the_next_batch_opens_the_path(
    tmp_path: Path, info_lines: list[str]
) -> None:
    path = tmp_path / "events.jsonl"
    sink = file_sink(path)
    deliver(sink, 1)
    path.rename(tmp_path / "events.jsonl.1")
    assert sink.reopen().result is None  # postrotate: kill -HUP
    deliver(sink, 2)
    assert lines_of(tmp_path / "events.jsonl.1") == [event(1)]
    assert lines_of(path) == [event(2)]
    assert sink.reopens == {"SIGHUP": 1}
    assert [x for x in info_lines if "reopening" in x and "SIGHUP" in x] != []


def test_reopen_without_an_open_file_does_nothing(tmp_path: Path) -> None:
    sink = file_sink(tmp_path / "events.jsonl")
    assert sink.reopen().result is None
    assert sink.reopens == {}
    assert not sink.path.exists()


def test_reopen_waits_for_the_batch_being_synced(tmp_path: Path) -> None:
    runner = ManualRunner()
    path = tmp_path / "events.jsonl"
    sink = FileSink("f", path, run_blocking=runner)
    first = sink.deliver([event(1)])
    reopening = sink.reopen()
    second = sink.deliver([event(2)])
    assert not reopening.called and not second.called
    path.rename(tmp_path / "events.jsonl.1")
    runner.run_one()  # the first batch's fsync: then the reopen, then the second
    assert first.result == Delivered() and reopening.called
    runner.run_one()
    assert second.result == Delivered()
    assert lines_of(tmp_path / "events.jsonl.1") == [event(1)]
    assert lines_of(path) == [event(2)]
    # The reopen closed the file: the second batch found nothing displaced.
    assert sink.reopens == {"SIGHUP": 1}


def test_exporter_reopen_reaches_the_file_sink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, info_lines: list[str]
) -> None:
    monkeypatch.setattr(file_module.threads, "deferToThread", run_now)
    clock = Clock()
    settings = ExporterSettings(name="local", type="file", batch_size=2)
    exporter = build_exporter(settings, clock=clock, http_client=None, state_dir=tmp_path)  # type: ignore[arg-type]
    exporter.start()
    path = tmp_path / "events.jsonl"
    for i in range(2):
        exporter.publish(StoredEvent(event(i)))
    clock.advance(0)
    path.rename(tmp_path / "events.jsonl.1")
    assert exporter.reopen().called
    for i in range(2, 4):
        exporter.publish(StoredEvent(event(i)))
    clock.advance(0)
    assert exporter.stop(5.0).called
    assert lines_of(tmp_path / "events.jsonl.1") == [event(0), event(1)]
    assert lines_of(path) == [event(2), event(3)]
    assert exporter.stats()["sent"] == 4
    assert [x for x in info_lines if "reopening" in x] == [
        f"file sink local: reopening {path} (SIGHUP)"
    ]


def test_exporter_reopen_is_a_no_op_for_a_sink_without_files(tmp_path: Path) -> None:
    @attrs.define
    class Answering:
        name: str = "http"
        batches: list[int] = attrs.Factory(list)

        def deliver(self, events: Sequence[dict[str, Any]]) -> Deferred[Delivered]:
            self.batches.append(len(events))
            return succeed(Delivered())

        def close(self) -> Deferred[None]:
            return succeed(None)

    clock = Clock()
    sink = Answering()
    exporter = BatchingExporter(
        ExporterSettings(name="http", type="fake", batch_size=1),
        sink,
        clock,
        None,
        DeadLetter(tmp_path / "dead.jsonl", "http"),
    )
    exporter.start()
    assert exporter.reopen().result is None
    exporter.publish(StoredEvent(event(1)))
    clock.advance(0)
    assert sink.batches == [1]
    assert exporter.stop(1.0).called
