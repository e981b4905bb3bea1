"""The disk spool (segments, recovery, bound, check-out) and the dead-letter file."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from llmproxy.config.model import ExporterSettings
from llmproxy.events.envelope import StoredEvent
from llmproxy.export import deadletter as deadletter_module
from llmproxy.export import spool as spool_module
from llmproxy.export.deadletter import DeadLetter
from llmproxy.export.exporter import BatchingExporter
from llmproxy.export.spool import Spool
from llmproxy.export.verdict import Delivered, Retry, Verdict


def line(i: int) -> bytes:
    return orjson.dumps({"type": "request", "i": i})


def lines(*numbers: int) -> list[bytes]:
    return [line(i) for i in numbers]


def ids(spool: Spool) -> list[list[int]]:
    return [[e["i"] for e in spool.read(s).events] for s in spool.segments()]


SEGMENT = len(line(1)) + 1  # bytes one event takes in a segment


def test_append_writes_one_segment_file_named_by_ordinals_and_count(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6)
    spool.append(lines(1, 2, 3), 10, 12)
    [path] = tmp_path.iterdir()
    assert path.name == "10-12-3.jsonl"
    assert path.read_bytes() == b"\n".join(lines(1, 2, 3)) + b"\n"
    assert (spool.event_count, spool.size_bytes, spool.next_ordinal) == (3, 3 * SEGMENT, 13)


def test_segments_come_oldest_first_by_ordinal_not_by_write_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6)
    spool.append(lines(20), 20, 20)
    spool.append(lines(3), 3, 3)
    spool.append(lines(100), 100, 100)
    assert [s.first for s in spool.segments()] == [3, 20, 100]
    oldest = spool.oldest()
    assert oldest is not None and oldest.first == 3


def test_segments_are_recovered_from_disk_at_start(tmp_path: Path) -> None:
    first = Spool(tmp_path, 10**6)
    first.append(lines(1, 2), 0, 1)
    first.append(lines(5), 4, 4)
    again = Spool(tmp_path, 10**6)
    assert ids(again) == [[1, 2], [5]]
    assert (again.event_count, again.next_ordinal) == (3, 5)


def test_a_write_interrupted_before_its_rename_is_never_read_back(tmp_path: Path) -> None:
    # What a kill -9 in the middle of a write leaves: a half temporary file.
    (tmp_path / ".tmp-0-1-2.jsonl").write_bytes(line(1) + b"\n" + line(2)[:5])
    spool = Spool(tmp_path, 10**6)
    assert spool.segments() == []
    assert list(tmp_path.iterdir()) == []


def test_files_that_are_not_segments_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    spool = Spool(tmp_path, 10**6)
    assert spool.segments() == []
    assert (tmp_path / "notes.txt").exists()


def test_failed_write_adds_nothing_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, 10**6)

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module.os, "fsync", disk_full)
    with pytest.raises(OSError):
        spool.append(lines(1), 0, 0)
    assert (spool.segments(), list(tmp_path.iterdir())) == ([], [])


def test_segment_file_is_fsynced_before_it_is_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[list[str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(sorted(p.name for p in tmp_path.iterdir()))
        real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", fsync)
    Spool(tmp_path, 10**6).append(lines(1), 0, 0)
    assert synced[0] == [".tmp-0-0-1.jsonl"]  # the data, before the rename
    assert synced[-1] == ["0-0-1.jsonl"]  # the directory, after it


def test_read_sets_lines_that_are_not_events_apart(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6)
    (tmp_path / "0-2-3.jsonl").write_bytes(line(1) + b"\n{broken\n[1, 2]\n\n" + line(3) + b"\n")
    spool = Spool(tmp_path, 10**6)
    [segment] = spool.segments()
    contents = spool.read(segment)
    assert [e["i"] for e in contents.events] == [1, 3]
    assert contents.lines == lines(1, 3)
    assert contents.corrupt == [b"{broken", b"[1, 2]"]


# (op, ordinal): append a one-event segment at it, check the oldest out, remove or
# check in a segment (the ordinal picks which of those present).
SPOOL_OPS = st.lists(
    st.tuples(st.sampled_from(["append", "checkout", "remove", "checkin"]), st.integers(10, 99)),
    max_size=60,
)
SEGMENT2 = len(line(10)) + 1  # a two-digit event's


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=SPOOL_OPS, bound=st.integers(1, 12))
def test_order_oldest_and_discards_match_a_model_that_sorts_every_time(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]], bound: int
) -> None:
    spool = Spool(tmp_path_factory.mktemp("spool"), bound * SEGMENT2)
    model: dict[int, int] = {}  # first -> its event, as on disk
    out: set[int] = set()
    for op, n in ops:
        present = sorted(model)
        if op == "append" and n not in model:
            discarded = spool.append(lines(n), n, n)
            # The reference: sort everything, discard the oldest not checked out.
            expect = 0
            for first in sorted(f for f in model if f not in out):
                if len(model) + 1 <= bound:
                    break
                if n < first:
                    break
                del model[first]
                expect += 1
            if len(model) + 1 <= bound:
                model[n] = n
            else:
                expect += 1
            assert discarded == expect
        elif op == "checkout" and (oldest := spool.oldest()) is not None:
            spool.checkout(oldest)
            out.add(oldest.first)
        elif op in ("remove", "checkin") and present:
            first = present[n % len(present)]
            segment = next(s for s in spool.segments() if s.first == first)
            if op == "remove":
                spool.remove(segment)
                del model[first]
                out.discard(first)
            else:
                spool.checkin(segment)
                out.discard(first)
        assert [s.first for s in spool.segments()] == sorted(model)
        waiting = sorted(f for f in model if f not in out)
        oldest = spool.oldest()
        assert (oldest.first if oldest else None) == (waiting[0] if waiting else None)
        assert spool.event_count == len(waiting)
    # What a restart finds on disk: the same segments, in the same order.
    again = Spool(spool.directory, bound * SEGMENT2)
    assert [s.first for s in again.segments()] == sorted(model)


def test_past_the_bound_the_oldest_segments_are_discarded(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 3 * SEGMENT)
    assert spool.append(lines(1, 2), 0, 1) == 0
    assert spool.append(lines(3), 2, 2) == 0
    assert spool.append(lines(4), 3, 3) == 2
    assert ids(spool) == [[3], [4]]
    assert spool.size_bytes == 2 * SEGMENT


def test_a_batch_alone_over_the_bound_is_discarded_itself(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 2 * SEGMENT)
    spool.append(lines(1), 0, 0)
    assert spool.append(lines(2, 3, 4), 1, 3) == 3
    assert ids(spool) == [[1]]


def test_a_new_batch_older_than_everything_is_the_one_discarded(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 2 * SEGMENT)
    spool.append(lines(5, 6), 5, 6)
    assert spool.append(lines(1), 1, 1) == 1
    assert ids(spool) == [[5, 6]]


def test_a_checked_out_segment_is_neither_offered_nor_discarded(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 2 * SEGMENT)
    spool.append(lines(1), 0, 0)
    segment = spool.oldest()
    assert segment is not None
    spool.checkout(segment)
    assert spool.oldest() is None
    assert spool.event_count == 0
    assert spool.append(lines(2, 3), 1, 2) == 2  # no room: the replayed one holds it
    assert ids(spool) == [[1]]


def test_checkin_offers_the_segment_again_at_its_place(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6)
    spool.append(lines(1), 0, 0)
    segment = spool.oldest()
    assert segment is not None
    spool.checkout(segment)
    spool.append(lines(2), 1, 1)
    spool.checkin(segment)
    assert spool.oldest() == segment
    assert spool.event_count == 2


def test_remove_deletes_the_segment_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6)
    spool.append(lines(1), 0, 0)
    [segment] = spool.segments()
    spool.remove(segment)
    assert (spool.segments(), spool.event_count, spool.size_bytes) == ([], 0, 0)
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_the_content_and_keeps_the_place(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6)
    spool.append(lines(1, 2, 3), 0, 2)
    [segment] = spool.segments()
    new = spool.rewrite(segment, lines(1, 3))
    assert new is not None and (new.first, new.count) == (0, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["0-2-2.jsonl"]
    assert ids(spool) == [[1, 3]]


def test_rewrite_with_nothing_left_removes_the_segment(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6)
    spool.append(lines(1), 0, 0)
    [segment] = spool.segments()
    assert spool.rewrite(segment, []) is None
    assert spool.segments() == []


def test_two_segments_cannot_start_at_the_same_ordinal(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6)
    spool.append(lines(1), 0, 0)
    with pytest.raises(ValueError):
        spool.append(lines(2), 0, 0)


# -- the directory removed at run time (state_dir deleted) ------------------------------


def test_a_removed_directory_is_made_again_by_the_next_append(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "spool" / "loki"
    spool = Spool(directory, 10**6)
    spool.append(lines(1, 2), 0, 1)
    shutil.rmtree(tmp_path / "state")
    assert spool.append(lines(3), 2, 2) == 0
    assert [p.name for p in directory.iterdir()] == ["2-2-1.jsonl"]
    assert spool.read(spool.segments()[1]).events == [{"type": "request", "i": 3}]


def test_reading_a_segment_that_vanished_with_its_directory_raises_oserror(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool", 10**6)
    spool.append(lines(1), 0, 0)
    shutil.rmtree(tmp_path / "spool")
    [segment] = spool.segments()
    with pytest.raises(OSError):
        spool.read(segment)
    spool.remove(segment)  # what the exporter does next: no error, nothing left
    assert (spool.segments(), spool.event_count, spool.size_bytes) == ([], 0, 0)


@attrs.define
class SwitchableSink:
    """Answers at once: ``Retry`` while down, else ``Delivered``; keeps what it got."""

    name: str = "switchable"
    down: bool = True
    received: list[int] = attrs.Factory(list)

    def deliver(self, events: Sequence[dict[str, Any]]) -> Deferred[Verdict]:
        if self.down:
            return succeed(Retry("down"))
        self.received.extend(e["i"] for e in events)
        return succeed(Delivered())

    def close(self) -> Deferred[None]:
        return succeed(None)


def test_segments_vanished_with_the_directory_are_counted_lost_and_the_rest_delivered(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "state" / "spool"
    spool = Spool(directory, 10**6)
    spool.append(lines(0, 1), 0, 1)
    spool.append(lines(2, 3), 2, 3)
    clock = Clock()
    sink = SwitchableSink()
    settings = ExporterSettings(
        name="t", type="fake", batch_size=2, max_retries=0, backoff_min=1.0, backoff_max=1.0
    )
    dead = DeadLetter(tmp_path / "state" / "dead.jsonl", "t")
    exporter = BatchingExporter(settings, sink, clock, spool, dead, lambda: 0.0)
    assert exporter.stats()["recovered"] == 4
    shutil.rmtree(tmp_path / "state")
    exporter.start()  # replays: both segments are gone

    def publish(*numbers: int) -> None:
        for i in numbers:
            exporter.publish(StoredEvent({"type": "request", "i": i}))
        clock.pump([0.5] * 10)

    assert exporter.stats()["dropped_by_reason"] == {"spool_read_failed": 4}
    publish(4, 5)  # the sink is down: spooled, into the directory made anew
    assert [p.name for p in directory.iterdir()] == ["4-5-2.jsonl"]
    sink.down = False
    publish(6, 7)
    stats = exporter.stats()
    assert sink.received == [4, 5, 6, 7]
    assert stats["dropped_by_reason"] == {"spool_read_failed": 4}
    assert stats["spooled"] == 0 and spool.segments() == []
    parts = ("sent", "in_flight", "queued", "spooled", "dead_lettered", "dropped")
    assert stats["accepted"] == sum(stats[k] for k in parts) == 8
    assert exporter.stop(1.0).called
    assert clock.getDelayedCalls() == []


# -- dead-letter file -------------------------------------------------------------------


def read(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def test_dead_letter_appends_one_line_per_event_with_time_sink_and_reason(
    tmp_path: Path,
) -> None:
    dead = DeadLetter(tmp_path / "dl" / "loki.jsonl", "loki")
    dead.append([({"i": 1}, "HTTP 400: bad"), ({"i": 2}, "too old")], now=1.5)
    dead.append([({"i": 3}, "x")], now=2.0)
    assert read(dead.path) == [
        {"ts": "1970-01-01T00:00:01.500000Z", "sink": "loki", "reason": "HTTP 400: bad",
         "event": {"i": 1}},
        {"ts": "1970-01-01T00:00:01.500000Z", "sink": "loki", "reason": "too old",
         "event": {"i": 2}},
        {"ts": "1970-01-01T00:00:02.000000Z", "sink": "loki", "reason": "x", "event": {"i": 3}},
    ]  # fmt: skip


def test_dead_letter_keeps_unreadable_lines_as_text(tmp_path: Path) -> None:
    dead = DeadLetter(tmp_path / "dl.jsonl", "f")
    dead.append_raw([b"{broken \xff"], "spool_corrupt", now=0.0)
    [entry] = read(dead.path)
    assert (entry["reason"], entry["raw"]) == ("spool_corrupt", "{broken \ufffd")


def test_dead_letter_fsyncs_once_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        deadletter_module.os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))
    )
    DeadLetter(tmp_path / "dl.jsonl", "f").append([({"i": n}, "r") for n in range(50)], 0.0)
    assert len(calls) == 1


def test_dead_letter_makes_its_removed_directory_again(tmp_path: Path) -> None:
    dead = DeadLetter(tmp_path / "state" / "deadletter" / "loki.jsonl", "loki")
    dead.append([({"i": 1}, "r")], now=0.0)
    shutil.rmtree(tmp_path / "state")
    dead.append([({"i": 2}, "r")], now=0.0)
    assert [e["event"] for e in read(dead.path)] == [{"i": 2}]


def test_dead_letter_writes_to_its_path_after_the_file_was_moved(tmp_path: Path) -> None:
    dead = DeadLetter(tmp_path / "loki.jsonl", "loki")
    dead.append([({"i": 1}, "r")], now=0.0)
    dead.path.rename(tmp_path / "loki.jsonl.1")
    dead.append([({"i": 2}, "r")], now=0.0)
    assert [e["event"] for e in read(tmp_path / "loki.jsonl.1")] == [{"i": 1}]
    assert [e["event"] for e in read(dead.path)] == [{"i": 2}]
