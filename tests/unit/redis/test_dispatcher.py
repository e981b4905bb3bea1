"""The dispatcher's loop on a Clock, against a small in-memory model of a Redis
stream with one consumer group: reading, acknowledging only settled entries,
room, claiming, trimming, malformed entries, an XACK that fails in flight, and
the drain."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import txredisapi
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from txredisapi import ResponseError

from llmproxy.config.model import RedisSettings
from llmproxy.events.envelope import Envelope
from llmproxy.export.deadletter import DeadLetter
from llmproxy.redis.connection import RedisUnavailable
from llmproxy.redis.dispatcher import RETRY_PAUSE, Dispatcher, Settled


@attrs.define(eq=False)
class Streams:
    """One stream, one group; enough of XREADGROUP/XACK/XCLAIM/XAUTOCLAIM/XINFO."""

    clock: Clock
    entries: list[list[Any]] = attrs.field(factory=list)  # [id, fields] as Redis sends
    delivered: int = 0  # index of the next entry for ">"
    pel: dict[bytes, str] = attrs.field(factory=dict)
    acked: list[bytes] = attrs.field(factory=list)
    added: int = 0
    entries_read: int | None = 0
    group_exists: bool = False
    claimable: list[bytes] = attrs.field(factory=list)  # what XAUTOCLAIM hands out
    deleted_on_claim: list[bytes] = attrs.field(factory=list)
    heartbeats: list[bytes] = attrs.field(factory=list)
    blocked: list[Deferred[Any]] = attrs.field(factory=list)

    def add(self, *events: dict[str, Any] | bytes) -> None:
        for event in events:
            self.added += 1
            raw = event if isinstance(event, bytes) else orjson.dumps(event)
            self.entries.append([f"{self.added}-0".encode(), [b"event", raw]])
        for d in self.blocked:
            self.clock.callLater(0, self._wake, d)
        self.blocked = []

    def _wake(self, d: Deferred[Any]) -> None:
        if not d.called:
            d.callback(None)  # the blocked read ends; the next read finds the entries

    def trim(self, keep: int) -> None:
        drop = len(self.entries) - keep
        self.entries = self.entries[drop:]
        self.delivered = max(0, self.delivered - drop)

    def reply(self, consumer_of: Callable[[], str], args: tuple[Any, ...]) -> Any:
        cmd = args[0]
        if cmd == "XGROUP":
            if self.group_exists:
                raise ResponseError("BUSYGROUP Consumer Group name already exists")
            self.group_exists = True
            return b"OK"
        if not self.group_exists and cmd == "XACK":
            return 0  # as Redis 7.0: no NOGROUP from XACK, nothing to acknowledge
        if not self.group_exists and cmd == "XREADGROUP":
            raise ResponseError("NOGROUP No such key or consumer group")
        if cmd == "XREADGROUP":
            consumer = args[3]
            count = args[args.index("COUNT") + 1]
            start = args[-1]
            if start != ">":
                after = int(str(start).split("-")[0])
                mine = [
                    e
                    for e in self.entries
                    if self.pel.get(e[0]) == consumer and int(e[0].split(b"-")[0]) > after
                ]
                return [[b"s", mine[:count]]] if mine else [[b"s", []]]
            batch = self.entries[self.delivered : self.delivered + count]
            if not batch:
                if "BLOCK" in args:
                    d: Deferred[Any] = Deferred()
                    self.blocked.append(d)
                    block = args[args.index("BLOCK") + 1] / 1000
                    self.clock.callLater(block, self._wake, d)
                    return d
                return None
            self.delivered += len(batch)
            if self.entries_read is not None:
                self.entries_read += len(batch)
            for entry_id, _ in batch:
                self.pel[entry_id] = consumer
            return [[b"s", batch]]
        if cmd == "XACK":
            ids = list(args[3:])
            for entry_id in ids:
                self.pel.pop(entry_id, None)
            self.acked.extend(ids)
            return len(ids)
        if cmd == "XCLAIM":
            ids = list(args[5:-1])
            self.heartbeats.extend(ids)
            return ids
        if cmd == "XAUTOCLAIM":
            consumer = args[3]
            found = [e for e in self.entries if e[0] in self.claimable]
            for entry_id, _ in found:
                self.pel[entry_id] = consumer
            self.claimable = []
            deleted, self.deleted_on_claim = self.deleted_on_claim, []
            return [b"0-0", found, deleted]
        if cmd == "XINFO" and args[1] == "GROUPS":
            last = self.entries[self.delivered - 1][0] if self.delivered else b"0-0"
            return [
                [
                    b"name", b"g", b"consumers", 1, b"pending", len(self.pel),
                    b"last-delivered-id", last, b"entries-read", self.entries_read,
                    b"lag", 0,
                ]
            ]  # fmt: skip
        if cmd == "XINFO" and args[1] == "STREAM":
            first = list(self.entries[0]) if self.entries else None
            return [
                b"length", len(self.entries), b"entries-added", self.added,
                b"first-entry", first,
            ]  # fmt: skip
        raise AssertionError(f"unexpected command {args!r}")


@attrs.define(eq=False)
class FakeConnection:
    """A RedisClient over ``Streams``, with MULTI/EXEC."""

    streams: Streams
    usable: bool = True
    started: bool = False
    stopped: bool = False
    callbacks: list[Callable[[], object]] = attrs.field(factory=list)
    commands: list[tuple[Any, ...]] = attrs.field(factory=list)
    queued: list[tuple[Any, ...]] | None = None
    hold: set[str] = attrs.field(factory=set)  # these commands wait on the wire
    on_the_wire: list[Deferred[Any]] = attrs.field(factory=list)

    def when_ready(self, callback: Callable[[], object]) -> None:
        self.callbacks.append(callback)

    def start(self) -> None:
        self.started = True

    def stop(self) -> Deferred[None]:
        self.stopped = True
        return succeed(None)

    def abort(self) -> None:
        self.usable = False

    def fail_on_the_wire(self, error: Exception, *, drop: bool) -> None:
        """The held commands fail (unapplied); with ``drop`` the connection is lost,
        in RedisConnection's order: the commands fail first, while it still looks
        usable, then it is not."""
        on_the_wire, self.on_the_wire = self.on_the_wire, []
        for d in on_the_wire:
            d.errback(error)
        if drop:
            self.usable = False

    def come_back(self) -> None:
        self.usable = True
        for callback in self.callbacks:
            callback()

    def execute(self, *args: Any, timeout: float | None = None) -> Deferred[Any]:
        if not self.usable:
            return fail(RedisUnavailable("down"))
        self.commands.append(args)
        if args[0] in self.hold:
            on_the_wire: Deferred[Any] = Deferred()
            self.on_the_wire.append(on_the_wire)
            return on_the_wire
        if args[0] == "MULTI":
            self.queued = []
            return succeed(b"OK")
        if args[0] == "EXEC":
            queued, self.queued = self.queued or [], None
            results: list[Any] = []
            for command in queued:
                try:
                    results.append(self.streams.reply(lambda: "", command))
                except ResponseError as e:
                    results.append(e)
            return succeed(results)
        if self.queued is not None:
            self.queued.append(args)
            return succeed(b"QUEUED")
        try:
            result = self.streams.reply(lambda: "", args)
        except ResponseError as e:
            return fail(e)
        return result if isinstance(result, Deferred) else succeed(result)


@attrs.define(eq=False)
class FakeExporter:
    """Records what it is given; the test settles events by hand."""

    dead_letter: DeadLetter
    on_settled: Settled
    name: str = "fake"
    published: list[Envelope] = attrs.field(factory=list)
    closed: list[float] = attrs.field(factory=list)
    started: bool = False

    def publish(self, envelope: Envelope) -> None:
        self.published.append(envelope)

    def start(self) -> None:
        self.started = True

    def stop(self, timeout: float) -> Deferred[None]:
        self.closed.append(timeout)
        return succeed(None)

    def stats(self) -> dict[str, Any]:
        return {"accepted": len(self.published)}

    def settle(self, n: int, outcome: str) -> None:
        for envelope in [e for e in self.published if e.payload()["n"] == n]:
            self.on_settled(envelope, outcome)


def make(
    tmp_path: Path, *, buffer: int = 100, read_count: int = 10, claim_idle: float = 3.0
) -> tuple[Dispatcher, Streams, FakeConnection, FakeConnection, Clock]:
    clock = Clock()
    streams = Streams(clock)
    reader, control = FakeConnection(streams), FakeConnection(streams)
    holder: list[FakeExporter] = []

    def factory(on_settled: Settled) -> FakeExporter:
        holder.append(FakeExporter(DeadLetter(tmp_path / "dead.jsonl", "fake"), on_settled))
        return holder[0]

    settings = RedisSettings(stream="s", group="g", claim_idle=claim_idle, block=1.0)
    dispatcher = Dispatcher(
        settings, reader, control, factory, clock, "me", buffer=buffer, read_count=read_count
    )
    return dispatcher, streams, reader, control, clock


def exporter(dispatcher: Dispatcher) -> FakeExporter:
    found = dispatcher.exporter
    assert isinstance(found, FakeExporter)
    return found


def ev(n: int) -> dict[str, Any]:
    return {"type": "request", "n": n}


def published(dispatcher: Dispatcher) -> list[int]:
    return [e.payload()["n"] for e in exporter(dispatcher).published]


def test_entries_reach_the_exporter_and_only_settled_ones_are_acknowledged(
    tmp_path: Path,
) -> None:
    dispatcher, streams, _, control, clock = make(tmp_path)
    streams.add(*(ev(n) for n in range(3)))
    dispatcher.start()
    assert streams.group_exists and published(dispatcher) == [0, 1, 2]
    assert set(streams.pel) == {b"1-0", b"2-0", b"3-0"}
    exporter(dispatcher).settle(0, "sent")
    exporter(dispatcher).settle(1, "dead_lettered")
    exporter(dispatcher).settle(2, "dropped")  # e.g. the drain's deadline: stays pending
    clock.advance(0)
    assert streams.acked == [b"1-0", b"2-0"]
    assert set(streams.pel) == {b"3-0"}
    stats = dispatcher.stats()
    assert (stats["read"], stats["acked"], stats["left_pending"], stats["held"]) == (3, 2, 1, 0)
    acks = [c for c in control.commands if c[0] == "XACK"]
    assert len(acks) == 1  # one XACK for the lot
    dispatcher.stop(5.0)
    clock.advance(2.0)


def test_new_entries_wake_the_blocking_read(tmp_path: Path) -> None:
    dispatcher, streams, reader, _, clock = make(tmp_path)
    dispatcher.start()
    assert any("BLOCK" in c for c in reader.commands)
    streams.add(ev(7))
    clock.advance(0)
    assert published(dispatcher) == [7]
    dispatcher.stop(5.0)
    clock.advance(2.0)


def test_reading_pauses_while_the_exporter_holds_buffer_entries(tmp_path: Path) -> None:
    dispatcher, streams, _, _, clock = make(tmp_path, buffer=2)
    streams.add(*(ev(n) for n in range(5)))
    dispatcher.start()
    assert published(dispatcher) == [0, 1]
    clock.advance(1.0)
    assert published(dispatcher) == [0, 1]  # no room: no read
    exporter(dispatcher).settle(0, "sent")
    clock.advance(0)
    assert published(dispatcher) == [0, 1, 2]
    dispatcher.stop(5.0)
    clock.advance(2.0)


def test_held_entries_are_kept_alive_and_idle_ones_of_others_are_claimed(
    tmp_path: Path,
) -> None:
    dispatcher, streams, _, _, clock = make(tmp_path, claim_idle=3.0)
    streams.add(ev(0), ev(1))
    dispatcher.start()
    # An entry another consumer read, then died with.
    streams.entries.append([b"50-0", [b"event", orjson.dumps(ev(2))]])
    streams.delivered = len(streams.entries)
    streams.pel[b"50-0"] = "dead-one"
    streams.claimable = [b"50-0"]
    streams.deleted_on_claim = [b"9-0"]
    clock.advance(1.0)  # the claim tick (claim_idle / 3)
    assert set(streams.heartbeats) == {b"1-0", b"2-0"}
    assert published(dispatcher) == [0, 1, 2] and streams.pel[b"50-0"] == "me"
    stats = dispatcher.stats()
    assert stats["claimed"] == 1 and stats["missed_pending"] == 1
    # A claimed entry we hold already is not handed over twice.
    streams.claimable = [b"1-0"]
    clock.advance(1.0)
    assert published(dispatcher).count(0) == 1
    assert dispatcher.stats()["duplicates_skipped"] == 1
    dispatcher.stop(5.0)
    clock.advance(2.0)


def test_own_pending_entries_from_an_earlier_run_are_read_first(tmp_path: Path) -> None:
    dispatcher, streams, _, _, clock = make(tmp_path)
    streams.group_exists = True
    streams.add(ev(0), ev(1), ev(2))
    streams.delivered = 2
    streams.pel = {b"1-0": "me", b"2-0": "someone-else"}
    dispatcher.start()
    assert published(dispatcher) == [0, 2]
    assert dispatcher.stats()["claimed"] == 1 and dispatcher.stats()["read"] == 1
    dispatcher.stop(5.0)
    clock.advance(2.0)


def test_a_malformed_entry_is_dead_lettered_and_acknowledged(tmp_path: Path) -> None:
    dispatcher, streams, _, _, clock = make(tmp_path)
    streams.add(b"not json", ev(1))
    streams.entries.append([b"99-0", None])  # trimmed while pending: no fields
    dispatcher.start()
    clock.advance(0)
    assert published(dispatcher) == [1]
    assert b"1-0" in streams.acked and b"99-0" in streams.acked
    line = orjson.loads((tmp_path / "dead.jsonl").read_bytes().splitlines()[0])
    assert "malformed stream entry 1-0" in orjson.dumps(line).decode()
    assert dispatcher.stats()["malformed"] == 1 and dispatcher.stats()["missed_pending"] == 1
    dispatcher.stop(5.0)
    clock.advance(2.0)


def test_trimming_past_the_group_is_counted_once(tmp_path: Path) -> None:
    dispatcher, streams, _, _, clock = make(tmp_path, read_count=5)
    streams.group_exists = True
    streams.entries_read = 0
    streams.add(*(ev(n) for n in range(20)))
    streams.trim(keep=8)  # 12 gone before the group read any
    dispatcher.start()
    clock.advance(0)
    assert dispatcher.stats()["missed_trimmed"] == 12
    assert published(dispatcher) == list(range(12, 20))
    dispatcher.stop(5.0)
    clock.advance(2.0)


def test_acks_wait_for_the_connection_and_the_drain_sends_them(tmp_path: Path) -> None:
    dispatcher, streams, reader, control, clock = make(tmp_path)
    streams.add(ev(0))
    dispatcher.start()
    control.usable = False
    exporter(dispatcher).settle(0, "sent")
    clock.advance(0)
    assert streams.acked == [] and dispatcher.stats()["ack_queue"] == 1
    control.usable = True
    for callback in control.callbacks:
        callback()
    assert streams.acked == [b"1-0"]
    done: list[object] = []
    dispatcher.stop(5.0).addCallback(done.append)
    clock.pump([0.1] * 30)
    assert done == [None]
    assert exporter(dispatcher).closed and reader.stopped and control.stopped


def test_a_lost_group_is_created_again(tmp_path: Path) -> None:
    dispatcher, streams, reader, _, clock = make(tmp_path)
    dispatcher.start()
    streams.group_exists = False  # Redis restarted without persistence
    clock.advance(1.0)  # the blocking read ends; the next read finds no group
    streams.add(ev(5))
    clock.pump([0.1] * 20)
    assert streams.group_exists
    assert published(dispatcher) == [5]
    assert sum(1 for c in reader.commands if c[0] == "XGROUP") == 2
    dispatcher.stop(5.0)
    clock.advance(2.0)


def test_stop_before_start_is_quick_and_idempotent(tmp_path: Path) -> None:
    dispatcher, _, reader, control, clock = make(tmp_path)
    first = dispatcher.stop(1.0)
    assert dispatcher.stop(1.0) is first
    clock.advance(1.0)
    assert first.called and reader.stopped and control.stopped


def xacks(control: FakeConnection) -> list[tuple[Any, ...]]:
    return [c[3:] for c in control.commands if c[0] == "XACK"]


def with_an_xack_on_the_wire(
    tmp_path: Path, count: int = 3
) -> tuple[Dispatcher, Streams, FakeConnection, Clock]:
    """Entries 1-0..count-0 delivered; their XACK sent and not answered yet."""
    dispatcher, streams, _, control, clock = make(tmp_path)
    streams.add(*(ev(n) for n in range(count)))
    dispatcher.start()
    control.hold.add("XACK")
    for n in range(count):
        exporter(dispatcher).settle(n, "sent")
    clock.advance(0)
    assert len(control.on_the_wire) == 1 and dispatcher.stats()["acks_in_flight"] == count
    control.hold.clear()
    return dispatcher, streams, control, clock


IDS = (b"1-0", b"2-0", b"3-0")

# What can fail an XACK on the wire without Redis refusing its ids, and whether the
# connection is gone with it.  RedisConnection turns every loss and timeout into
# RedisUnavailable; the others are there because "not refused" is the rule, not
# a list of the exceptions one client happens to raise today.
NOT_REFUSED = [
    pytest.param(RedisUnavailable("connection lost (redis://h:6379/0)"), True, id="lost"),
    pytest.param(RedisUnavailable("no reply within the timeout"), True, id="timeout"),
    pytest.param(txredisapi.ConnectionError("Lost connection"), True, id="txredisapi-lost"),
    pytest.param(txredisapi.TimeoutError("Not received Redis response"), True, id="txredisapi-to"),
    pytest.param(CancelledError(), False, id="cancelled"),
    pytest.param(ResponseError("LOADING Redis is loading the dataset"), False, id="LOADING"),
    pytest.param(ResponseError("BUSY Redis is busy running a script."), False, id="BUSY"),
    pytest.param(ResponseError("READONLY You can't write to a replica."), False, id="READONLY"),
    pytest.param(RuntimeError("something unexpected"), False, id="unexpected"),
]  # fmt: skip


@pytest.mark.parametrize(("error", "drops"), NOT_REFUSED)
def test_an_xack_that_fails_in_flight_is_sent_again(
    tmp_path: Path, error: Exception, drops: bool
) -> None:
    dispatcher, streams, control, clock = with_an_xack_on_the_wire(tmp_path)
    control.fail_on_the_wire(error, drop=drops)
    stats = dispatcher.stats()
    assert (stats["ack_queue"], stats["acks_in_flight"], stats["acks_lost"]) == (3, 0, 0)
    assert stats["acks_resent"] == 1 and set(streams.pel) == set(IDS)
    if drops:
        clock.advance(RETRY_PAUSE)
        assert len(xacks(control)) == 1  # nothing is sent without a connection
        control.come_back()  # sent as soon as it is back
    else:
        clock.advance(RETRY_PAUSE)  # the connection stayed: sent after a pause
    assert xacks(control)[1:] == [IDS]
    assert streams.pel == {} and streams.acked == list(IDS)
    stats = dispatcher.stats()
    assert (stats["acked"], stats["ack_queue"], stats["acks_lost"]) == (3, 0, 0)
    dispatcher.stop(5.0)
    clock.advance(2.0)


def test_acks_settled_meanwhile_follow_the_ones_sent_again(tmp_path: Path) -> None:
    dispatcher, streams, control, clock = with_an_xack_on_the_wire(tmp_path)
    streams.add(ev(3))
    clock.advance(1.0)  # the blocking read ends and finds the new entry
    control.fail_on_the_wire(RedisUnavailable("connection lost"), drop=True)
    exporter(dispatcher).settle(3, "sent")
    clock.advance(0)
    assert dispatcher.stats()["ack_queue"] == 4
    control.come_back()
    assert [i for ids in xacks(control)[1:] for i in ids] == [*IDS, b"4-0"]
    assert streams.pel == {}
    dispatcher.stop(5.0)
    clock.advance(2.0)


@pytest.mark.parametrize(
    "answer",
    [
        "WRONGTYPE Operation against a key holding the wrong kind of value",
        "NOPERM this user has no permissions to run the 'xack' command",
        "NOGROUP No such key 's' or consumer group 'g'",
        "Invalid stream ID specified as stream command argument",  # ERR, as txredisapi gives it
    ],
)
def test_an_xack_refused_by_redis_is_counted_lost_not_sent_again(
    tmp_path: Path, answer: str
) -> None:
    dispatcher, streams, control, clock = with_an_xack_on_the_wire(tmp_path)
    control.fail_on_the_wire(ResponseError(answer), drop=False)
    clock.advance(RETRY_PAUSE)
    control.come_back()
    assert len(xacks(control)) == 1 and set(streams.pel) == set(IDS)
    stats = dispatcher.stats()
    assert (stats["acks_lost"], stats["ack_queue"], stats["acked"]) == (3, 0, 0)
    assert stats["last_error"] == f"XACK refused: {answer}"
    dispatcher.stop(5.0)
    clock.advance(2.0)


def test_the_drain_sends_again_an_xack_lost_in_flight_once_redis_is_back(
    tmp_path: Path,
) -> None:
    dispatcher, streams, control, clock = with_an_xack_on_the_wire(tmp_path)
    done: list[object] = []
    dispatcher.stop(10.0).addCallback(done.append)
    clock.pump([0.1] * 15)  # the read loop ends; the drain waits for the XACK
    assert not done and len(xacks(control)) == 1
    control.fail_on_the_wire(RedisUnavailable("connection lost"), drop=True)
    clock.pump([0.1] * 20)  # two seconds without a connection
    assert not done and len(xacks(control)) == 1
    control.come_back()
    clock.advance(0)
    assert done == [None]
    assert xacks(control)[1:] == [IDS] and streams.pel == {}
    assert dispatcher.stats()["acks_lost"] == 0 and dispatcher.stats()["acked"] == 3
    assert clock.getDelayedCalls() == []


def test_the_drain_sends_again_after_a_not_now_answer(tmp_path: Path) -> None:
    dispatcher, streams, control, clock = with_an_xack_on_the_wire(tmp_path)
    done: list[object] = []
    dispatcher.stop(10.0).addCallback(done.append)
    control.hold.add("XACK")
    control.fail_on_the_wire(ResponseError("LOADING Redis is loading"), drop=False)
    clock.pump([0.1] * 15)
    assert len(xacks(control)) == 2  # sent again after RETRY_PAUSE, and held again
    control.hold.clear()
    control.fail_on_the_wire(ResponseError("LOADING Redis is loading"), drop=False)
    clock.pump([0.1] * 15)
    assert done == [None] and streams.pel == {}
    assert dispatcher.stats()["acks_lost"] == 0 and dispatcher.stats()["acks_resent"] == 2
    assert clock.getDelayedCalls() == []


def test_acks_the_drain_could_not_send_by_its_deadline_are_counted(tmp_path: Path) -> None:
    dispatcher, streams, control, clock = with_an_xack_on_the_wire(tmp_path)
    done: list[object] = []
    dispatcher.stop(5.0).addCallback(done.append)
    control.fail_on_the_wire(RedisUnavailable("connection lost"), drop=True)
    clock.pump([0.1] * 60)  # Redis stays away past the deadline
    assert done == [None]
    assert dispatcher.stats()["acks_lost"] == 3 and set(streams.pel) == set(IDS)
    assert clock.getDelayedCalls() == []


def test_an_xack_still_unanswered_at_the_deadline_is_counted(tmp_path: Path) -> None:
    dispatcher, streams, control, clock = with_an_xack_on_the_wire(tmp_path)
    done: list[object] = []
    dispatcher.stop(5.0).addCallback(done.append)
    clock.pump([0.1] * 60)
    assert done == [None] and control.stopped
    assert dispatcher.stats()["acks_lost"] == 3 and set(streams.pel) == set(IDS)


def test_entries_whose_xack_failed_are_kept_alive_and_not_delivered_again(
    tmp_path: Path,
) -> None:
    # Redis restarted and still loads its data: the XACK gets LOADING, again and
    # again, while claim ticks find the entries idle past claim_idle.
    dispatcher, streams, control, clock = with_an_xack_on_the_wire(tmp_path)
    control.hold.add("XACK")
    control.fail_on_the_wire(ResponseError("LOADING Redis is loading"), drop=False)
    streams.claimable = list(IDS)
    clock.advance(1.0)  # a claim tick (claim_idle / 3), and the XACK on the wire again
    assert len(control.on_the_wire) == 1 and set(streams.pel) == set(IDS)
    assert set(streams.heartbeats) == set(IDS)  # still ours: nobody else claims them
    assert published(dispatcher) == [0, 1, 2]  # claimed back, not delivered again
    assert dispatcher.stats()["duplicates_skipped"] == 3
    control.hold.clear()
    control.fail_on_the_wire(ResponseError("LOADING Redis is loading"), drop=False)
    clock.advance(RETRY_PAUSE)
    assert streams.pel == {} and dispatcher.stats()["acked"] == 3
    dispatcher.stop(5.0)
    clock.advance(2.0)
