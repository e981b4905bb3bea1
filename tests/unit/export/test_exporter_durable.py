"""The exporter while its target fails: durable every ``spool_interval``, and what a
refusing disk does (``ENOSPC``).  One behaviour per test.

Time is a ``Clock``; spool writes run through a ``run_blocking`` the test controls
(``Writes``), so a write can be held "in the thread" while the test goes on.  A
``kill -9`` is a new exporter over the same spool directory, the old one simply
forgotten: what it held in memory is gone, what it wrote is there.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from llmproxy.config.model import ExporterSettings
from llmproxy.export.deadletter import DeadLetter
from llmproxy.export.exporter import BatchingExporter
from llmproxy.export.spool import PendingSegment, Spool
from llmproxy.export.verdict import Delivered, Retry
from tests.unit.export.test_exporter import FakeSink, Unencodable, ev, ids

_T = TypeVar("_T")

PARTS = ("sent", "in_flight", "queued", "spooled", "dead_lettered", "dropped")


@attrs.define
class Writes:
    """A ``run_blocking`` for spool writes: at once (``hold = False``) or held until
    the test releases them, like a thread that has not finished yet."""

    hold: bool = False
    held: list[tuple[Callable[[], Any], Deferred[Any]]] = attrs.Factory(list)

    def __call__(self, work: Callable[[], _T]) -> Deferred[_T]:
        if not self.hold:
            try:
                return succeed(work())
            except Exception:
                return fail()
        d: Deferred[_T] = Deferred()
        self.held.append((work, d))
        return d

    def release(self, count: int | None = None) -> None:
        """Let the held writes finish (the oldest ``count``, or all)."""
        count = len(self.held) if count is None else count
        held, self.held = self.held[:count], self.held[count:]
        for work, d in held:
            try:
                d.callback(work())
            except Exception:
                d.errback()


class DiskFull(Spool):
    """A spool on a disk that can fill up: ``write`` raises ENOSPC while ``full``."""

    full: bool = False

    def write(self, pending: PendingSegment) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().write(pending)


@attrs.define
class Rig:
    tmp: Path
    clock: Clock
    sink: FakeSink
    writes: Writes
    spool: Spool
    exporter: BatchingExporter

    def publish(self, *numbers: int) -> None:
        for i in numbers:
            self.exporter.publish(ev(i))

    def stats(self) -> dict[str, Any]:
        s = self.exporter.stats()
        assert s["accepted"] == sum(s[k] for k in PARTS), s
        return s

    def on_disk(self) -> list[int]:
        """Event ids in the spool directory, as a restarted process would find them."""
        spool = Spool(self.tmp / "spool", 10**9)
        return sorted(i for seg in spool.segments() for i in ids(spool.read(seg).events))

    def fail_all(self) -> None:
        """Answer every pending delivery with a retry."""
        while self.sink.pending:
            self.sink.answer(Retry("HTTP 503"))

    def step(self, seconds: float, by: float = 0.25) -> None:
        for _ in range(round(seconds / by)):
            self.clock.advance(by)


def rig(
    tmp: Path,
    *,
    spool_class: type[Spool] = Spool,
    hold: bool = False,
    restart_of: Rig | None = None,
    **settings: Any,
) -> Rig:
    clock = restart_of.clock if restart_of is not None else Clock()
    values: dict[str, Any] = {
        "flush_interval": 1.0,
        "backoff_min": 1.0,
        "backoff_max": 4.0,
        "max_retries": 1000,
        "batch_size": 10,
        "spool_interval": 1.0,
    }
    values.update(settings)
    spool = spool_class(tmp / "spool", 10**9)
    writes = Writes(hold)
    sink = FakeSink()
    exporter = BatchingExporter(
        ExporterSettings(name="t", type="fake", **values),
        sink,
        clock,
        spool,
        DeadLetter(tmp / "dead.jsonl", "t"),
        lambda: 0.0,
        run_blocking=writes,
    )
    exporter.start()
    return Rig(tmp, clock, sink, writes, spool, exporter)


def test_a_healthy_sink_never_touches_the_disk(tmp_path: Path) -> None:
    r = rig(tmp_path)
    for n in range(50):
        r.publish(n)
        r.clock.advance(0.1)
        while r.sink.pending:
            r.sink.answer(Delivered())
    assert r.stats()["spool_writes"] == 0
    assert r.on_disk() == []


def test_a_failing_batch_is_on_disk_while_it_is_retried(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.publish(*range(10))
    r.clock.advance(0)
    r.sink.answer(Retry("HTTP 503"))
    assert r.on_disk() == list(range(10))
    s = r.stats()
    assert (s["retrying"], s["spooled"]) == (10, 0)  # counted once: retrying, not spooled


def test_while_failing_the_buffer_goes_to_disk_every_spool_interval(tmp_path: Path) -> None:
    r = rig(tmp_path, spool_interval=2.0)
    r.publish(0)
    r.clock.advance(1.0)  # flush: [0] is sent
    r.sink.answer(Retry("HTTP 503"))
    r.publish(1, 2, 3)
    r.clock.advance(1.5)
    assert r.on_disk() == [0]  # the interval has not passed yet
    r.clock.advance(0.5)
    assert r.on_disk() == [0, 1, 2, 3]
    r.publish(4)
    r.step(2.0)
    r.fail_all()
    assert r.on_disk() == [0, 1, 2, 3, 4]
    assert r.stats()["queue_depth"] == 0


class TurnClock(Clock):
    """A Clock that numbers the calls it runs: each is a reactor turn of its own."""

    turn = 0

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        def in_a_turn(*a: Any, **k: Any) -> Any:
            self.turn += 1
            return callable(*a, **k)

        return super().callLater(delay, in_a_turn, *args, **kw)


def test_the_buffer_goes_to_disk_one_segment_per_reactor_turn(tmp_path: Path) -> None:
    clock = TurnClock()
    turns: list[int] = []

    def writes(work: Callable[[], _T]) -> Deferred[_T]:
        turns.append(clock.turn)
        return succeed(work())

    sink = FakeSink()
    exporter = BatchingExporter(
        ExporterSettings(
            name="t",
            type="fake",
            batch_size=10,
            flush_interval=1.0,
            spool_interval=1.0,
            backoff_min=5.0,
            backoff_max=5.0,
            max_retries=1000,
            buffer=1000,
        ),
        sink,
        clock,
        Spool(tmp_path / "spool", 10**9),
        DeadLetter(tmp_path / "dead.jsonl", "t"),
        lambda: 0.0,
        run_blocking=writes,
    )
    exporter.start()
    exporter.publish(ev(0))
    clock.advance(1.0)
    sink.answer(Retry("HTTP 503"))  # failing: [0] goes to disk now, the buffer each second
    for i in range(1, 96):
        exporter.publish(ev(i))
    turns.clear()
    clock.advance(1.0)
    # 95 events, 10 segments: each handed to the disk in a reactor turn of its own,
    # all of them within this tick (kill -9 bound unchanged).
    assert len(turns) == 10 and len(set(turns)) == 10, turns
    on_disk = Spool(tmp_path / "spool", 10**9)
    assert sorted(i for seg in on_disk.segments() for i in ids(on_disk.read(seg).events)) == list(
        range(96)
    )
    assert exporter.stats()["queue_depth"] == 0


def test_kill_during_an_outage_loses_at_most_the_last_interval(tmp_path: Path) -> None:
    r = rig(tmp_path, spool_interval=1.0)
    published = 0
    for _ in range(40):  # 10 s of outage, 4 events a second
        r.publish(published)
        published += 1
        r.step(0.25)
        r.fail_all()
    last_interval = set(range(published - 4, published))
    on_disk = set(r.on_disk())
    assert set(range(published)) - on_disk <= last_interval
    # kill -9, restart with the sink healthy: what was on disk is delivered, in order
    again = rig(tmp_path, restart_of=r)
    delivered: list[int] = []
    for _ in range(100):
        again.clock.advance(0.25)
        while again.sink.pending:
            delivered += again.sink.answer(Delivered())
    assert delivered == sorted(on_disk)
    assert again.on_disk() == []
    s = again.stats()
    assert s["recovered"] == len(on_disk) and s["sent"] == len(on_disk)


def test_recovery_replays_what_went_to_disk_before_newer_events(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.publish(*range(10))
    r.clock.advance(0)
    r.sink.answer(Retry("HTTP 503"))
    r.publish(*range(10, 25))
    r.step(1.0)  # 10..24 go to disk
    r.publish(*range(25, 28))  # only in memory
    r.step(1.0)  # the retry: answer it delivered
    got = r.sink.answer(Delivered())
    assert got == list(range(10))
    delivered = list(got)
    for _ in range(20):
        r.clock.advance(0.5)
        while r.sink.pending:
            delivered += r.sink.answer(Delivered())
    assert delivered == list(range(28))
    assert r.on_disk() == []
    assert r.stats()["sent"] == 28


def test_a_batch_delivered_while_its_write_is_under_way_leaves_nothing_on_disk(
    tmp_path: Path,
) -> None:
    r = rig(tmp_path, hold=True)
    r.publish(*range(10))
    r.clock.advance(0)
    r.sink.answer(Retry("HTTP 503"))  # its write is held "in the thread"
    r.clock.advance(1.0)
    r.sink.answer(Delivered())
    r.writes.release()  # the write lands after the delivery
    assert r.on_disk() == []
    assert r.stats()["sent"] == 10


def test_newer_events_wait_for_an_older_segment_still_being_written(tmp_path: Path) -> None:
    r = rig(tmp_path, hold=True)
    r.publish(0)
    r.clock.advance(1.0)
    r.sink.answer(Retry("HTTP 503"))  # [0] is written (held)
    r.publish(1, 2)
    r.clock.advance(1.0)  # the interval: [1, 2] start their write (held); [0] is retried
    r.publish(3)
    r.writes.release(1)  # [0] lands
    r.sink.answer(Delivered())  # the sink is back while [1, 2] are still being written
    r.clock.advance(1.0)
    assert r.sink.batches() == [[0], [0]]  # 3 waits: 1 and 2 are older
    r.writes.release()
    delivered: list[int] = []
    for _ in range(10):
        r.clock.advance(0.5)
        while r.sink.pending:
            delivered += r.sink.answer(Delivered())
    assert delivered == [1, 2, 3]
    assert r.on_disk() == []


def test_a_full_disk_keeps_events_in_memory_while_it_has_room(tmp_path: Path) -> None:
    r = rig(tmp_path, spool_class=DiskFull, buffer=1000)
    assert isinstance(r.spool, DiskFull)
    r.spool.full = True
    r.publish(*range(10))
    r.clock.advance(0)
    r.sink.answer(Retry("HTTP 503"))
    for n in range(10, 60):
        r.publish(n)
        r.step(0.25)
        r.fail_all()
    s = r.stats()
    assert s["dropped"] == 0
    assert s["spool_write_errors"] > 0
    assert r.on_disk() == []
    r.spool.full = False  # space again: the next interval writes it all
    r.step(1.0)
    r.fail_all()
    assert r.on_disk() == list(range(60))
    assert r.stats()["dropped"] == 0


def test_a_full_disk_and_a_full_buffer_drop_new_events_with_a_reason(tmp_path: Path) -> None:
    r = rig(tmp_path, spool_class=DiskFull, buffer=20)
    assert isinstance(r.spool, DiskFull)
    r.spool.full = True
    r.publish(*range(10))
    r.clock.advance(0)
    r.sink.answer(Retry("HTTP 503"))
    r.step(1.0)
    r.fail_all()
    r.publish(*range(10, 40))  # 20 fit in the buffer; the disk refuses the spill
    s = r.stats()
    assert s["dropped_by_reason"] == {"spool_write_failed": 10}
    assert s["queue_depth"] == 20


def test_a_batch_whose_retries_ran_out_on_a_full_disk_waits_in_memory(tmp_path: Path) -> None:
    r = rig(tmp_path, spool_class=DiskFull, max_retries=0, backoff_min=1.0)
    assert isinstance(r.spool, DiskFull)
    r.spool.full = True
    r.publish(*range(10))
    r.clock.advance(0)
    r.sink.answer(Retry("HTTP 503"))  # no retries: to the spool, which is full
    s = r.stats()
    assert (s["dropped"], s["queue_depth"]) == (0, 10)
    r.spool.full = False
    delivered: list[int] = []
    for _ in range(20):
        r.clock.advance(0.5)
        while r.sink.pending:
            delivered += r.sink.answer(Delivered())
    assert delivered == list(range(10))


def test_spool_writes_in_memory_are_bounded_by_the_buffer(tmp_path: Path) -> None:
    r = rig(tmp_path, hold=True, buffer=20, max_in_flight=1)
    r.publish(0)
    r.clock.advance(1.0)  # [0] in flight, never answered
    r.publish(*range(1, 200))  # the spills' writes never finish
    s = r.stats()
    assert s["spooling"] <= 20
    assert s["queue_depth"] <= 20
    assert s["dropped_by_reason"]["buffer_full"] == 199 - s["spooling"] - s["queue_depth"]


def test_close_waits_for_a_write_under_way_after_the_drain(tmp_path: Path) -> None:
    r = rig(tmp_path, hold=True)
    r.publish(*range(10))
    r.clock.advance(0)
    r.sink.answer(Retry("HTTP 503"))  # its durable write is held
    closed = r.exporter.stop(5.0)
    r.clock.advance(1.0)
    r.sink.answer(Delivered())  # the retry during the drain delivers it
    assert not closed.called  # the write is still under way
    r.writes.release()
    assert closed.called
    assert r.on_disk() == []
    assert r.stats()["sent"] == 10


def test_at_the_deadline_a_batch_being_written_lands_in_the_spool(tmp_path: Path) -> None:
    r = rig(tmp_path, hold=True)
    r.publish(*range(10))
    r.clock.advance(0)
    r.sink.answer(Retry("HTTP 503"))
    closed = r.exporter.stop(0.5)
    r.clock.advance(0.5)  # the deadline: the batch is settled, its write still held
    assert closed.called  # by the deadline, whatever is under way
    assert r.stats()["spooling"] == 10
    r.writes.release()  # (the reactor's thread pool finishes it before the process exits)
    assert r.on_disk() == list(range(10))
    assert r.stats()["spooled"] == 10


def test_close_fires_at_the_deadline_even_if_a_write_never_ends(tmp_path: Path) -> None:
    r = rig(tmp_path, hold=True)
    r.publish(*range(10))
    r.clock.advance(0)
    r.sink.answer(Retry("HTTP 503"))
    closed = r.exporter.stop(5.0)
    r.clock.advance(5.0)
    assert closed.called


@pytest.mark.parametrize("interval", [0.5, 2.0])
def test_spool_interval_is_the_period_of_the_writes(tmp_path: Path, interval: float) -> None:
    r = rig(tmp_path, spool_interval=interval)
    r.publish(0)
    r.clock.advance(1.0)
    r.sink.answer(Retry("HTTP 503"))
    writes = r.stats()["spool_writes"]
    for n in range(1, 41):  # 10 s, an event every 0.25 s
        r.publish(n)
        r.clock.advance(0.25)
        r.fail_all()
    buffer_writes = r.stats()["spool_writes"] - writes
    # one buffer write per interval at most, plus the retried batch's replays
    assert buffer_writes <= 10 / interval + 12


def test_spooled_segments_keep_batch_bytes_and_an_unencodable_event_is_counted(
    tmp_path: Path,
) -> None:
    size = len(ev(10).json())
    r = rig(tmp_path, batch_bytes=2 * size + 1)
    r.publish(10)
    r.clock.advance(1.0)
    r.sink.answer(Retry("HTTP 503"))  # failing: the buffer goes to disk every second
    r.publish(11, 12, 13, 14, 15)
    r.clock.advance(1.0)
    assert r.on_disk() == [10, 11, 12, 13, 14, 15]
    counts = sorted(seg.count for seg in r.spool.segments())
    assert counts == [1, 1, 2, 2], counts  # batch_bytes holds for the spool's segments too
    r.publish(16)
    r.exporter.publish(Unencodable())  # type: ignore[arg-type]
    r.publish(17)
    r.clock.advance(1.0)
    assert r.on_disk() == list(range(10, 18))
    s = r.stats()
    assert s["dropped_by_reason"] == {"encode_failed": 1} and s["queue_depth"] == 0


def test_while_failing_a_full_batch_goes_to_disk_as_it_fills_up(tmp_path: Path) -> None:
    r = rig(tmp_path, spool_interval=5.0)  # batch_size 10
    r.publish(0)
    r.clock.advance(1.0)
    r.sink.answer(Retry("HTTP 503"))  # failing; [0] is on disk
    r.publish(*range(1, 26))
    assert r.on_disk() == [0]  # publish itself never writes
    r.clock.advance(0)
    # Two full batches went to disk in the next turns, as they would have gone to a
    # healthy sink; memory holds less than a batch, as when the sink is healthy.
    assert r.on_disk() == list(range(21))
    assert r.stats()["queue_depth"] == 5
    r.clock.advance(5.0)  # the tick takes the rest
    r.fail_all()
    assert r.on_disk() == list(range(26))
    assert r.stats()["queue_depth"] == 0
