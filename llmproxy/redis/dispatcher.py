"""The dispatcher of the Redis bus: Redis stream to a sink, at least once (tests:
tests/unit/cli/test_dispatcher.py, tests/unit/redis/test_dispatcher.py,
tests/integration/test_dispatcher.py).  The ``llmproxy dispatcher`` command that
runs one as a process is llmproxy/cli/dispatcher.py.

One dispatcher is one consumer of a consumer group on the proxy's stream
(llmproxy/redis/stream.py).  Dispatchers in one group share the entries; each group
gets every entry.

- Start (and after Redis lost the group): ``XGROUP CREATE <stream> <group> 0
  MKSTREAM`` (an existing group is fine), then the consumer's own pending entries
  from an earlier run (``XREADGROUP ... 0``) are read again.
- Reading: each entry becomes a ``StoredEvent`` in a ``BatchingExporter`` built
  for the sink with no spool and unlimited retries.  At most ``buffer`` entries
  are held unsettled; reading pauses while the exporter is that full.  A
  non-blocking read runs in one ``MULTI`` with ``XINFO GROUPS`` and ``XINFO
  STREAM`` (trimming detection, below); when it finds nothing, an ``XREADGROUP
  BLOCK`` waits for the next entries.
- Acknowledging: an entry is ``XACK``-ed only once the exporter settled it as
  delivered or dead-lettered.  Anything else (the drain's deadline passed) leaves
  it pending in Redis.  ACKs are batched, one ``XACK`` on the wire at a time.  An
  ``XACK`` that fails in flight (the connection dropped, no reply within
  ``timeout``, or a "not now" answer such as ``LOADING``) may or may not have been
  applied; its ids are queued again and sent once the connection is usable (at
  once when it is back, else after ``RETRY_PAUSE``): an ACK sent twice is
  harmless, one never sent means a duplicate delivery.  Only a definitive refusal
  (``WRONGTYPE``, ``NOPERM``: see ``is_refusal``) gives its ids up
  (``acks_lost``); they stay pending and are delivered again.
- Claiming: every ``claim_idle / 3`` seconds the dispatcher resets the idle time
  of the entries it holds, or delivered and has not acknowledged yet (``XCLAIM
  ... JUSTID``: a slow sink is not a dead consumer), then ``XAUTOCLAIM``s entries
  idle longer than ``claim_idle`` from dead consumers (or its own, left pending)
  and delivers them, except those it holds or waits to acknowledge.
- Trimming: the stream is ``MAXLEN ~``.  Entries the group had not read when
  they were trimmed are lost; the dispatcher sees it atomically before it reads
  past them (``entries-added - length - entries-read`` of the group, Redis >= 7)
  and logs a warning with the count (``missed_trimmed``).  Pending entries
  trimmed before their delivery show up as deleted in ``XAUTOCLAIM`` or with no
  fields in a re-read (``missed_pending``).  A gap that opens in the one round
  trip between an empty read and the blocking read that follows it is not seen
  (it takes ``maxlen`` new entries in that instant).
- Drain (SIGTERM): reading stops, the read in progress ends (``block`` seconds at
  most), the exporter flushes within the deadline, the ACKs are sent (an ``XACK``
  in flight that fails is sent again, after the connection is back, while the
  deadline allows); entries not delivered or not acknowledged by then stay
  pending for another dispatcher (``claim_idle``).

Delivery is at least once: a dispatcher killed after its sink accepted a batch
but before the ACK reached Redis delivers that batch again (it, or another one).
Order is kept per dispatcher (``max_in_flight = 1``), not across dispatchers.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import orjson
from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.config.model import ExporterSettings, RedisSettings
from llmproxy.deferreds import within
from llmproxy.events.envelope import Envelope, StoredEvent
from llmproxy.export.deadletter import DeadLetter
from llmproxy.interfaces import RedisClient

__all__ = [
    "ACK_CHUNK",
    "RETRY_PAUSE",
    "SETTLED_ACK",
    "UNLIMITED_RETRIES",
    "DispatchExporter",
    "Dispatcher",
    "ExporterFactory",
    "GroupState",
    "Settled",
    "build_dispatcher",
    "dispatch_exporter_settings",
    "parse_group_state",
    "trimmed_unread",
]

log = Logger()

SETTLED_ACK = ("sent", "dead_lettered")  # outcomes after which an entry is acknowledged
UNLIMITED_RETRIES = 1_000_000_000  # the dispatcher's exporter never gives a batch up
ACK_CHUNK = 1000
RETRY_PAUSE = 1.0  # after an unexpected error from Redis


class DispatchExporter(Protocol):
    """What the dispatcher needs from its exporter (a ``BatchingExporter``)."""

    @property
    def name(self) -> str: ...

    @property
    def dead_letter(self) -> DeadLetter: ...

    def publish(self, envelope: Envelope) -> None: ...

    def start(self) -> None: ...

    def stop(self, timeout: float) -> Deferred[None]: ...

    def stats(self) -> dict[str, Any]: ...


Settled = Callable[[Envelope, str], None]
ExporterFactory = Callable[[Settled], DispatchExporter]


@attrs.frozen
class GroupState:
    """What ``XINFO GROUPS`` and ``XINFO STREAM`` say about the group and stream."""

    last_delivered: str
    entries_read: int | None
    lag: int | None
    pending: int
    length: int
    entries_added: int | None
    first_entry: str | None


def _pairs(reply: Any) -> dict[str, Any]:
    """A RESP2 flat ``[key, value, ...]`` list as a dict with str keys."""
    if not isinstance(reply, list):
        return {}
    out: dict[str, Any] = {}
    for i in range(0, len(reply) - 1, 2):
        key = reply[i]
        out[key.decode() if isinstance(key, bytes) else str(key)] = reply[i + 1]
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_group_state(groups_reply: Any, stream_reply: Any, group: str) -> GroupState | None:
    """Our group's state from the two XINFO replies, or ``None`` when it is absent."""
    stream = _pairs(stream_reply)
    for raw in groups_reply if isinstance(groups_reply, list) else []:
        info = _pairs(raw)
        if _text(info.get("name", b"")) != group:
            continue
        first = stream.get("first-entry")
        entries_read = info.get("entries-read")
        lag = info.get("lag")
        added = stream.get("entries-added")
        return GroupState(
            last_delivered=_text(info.get("last-delivered-id", b"0-0")),
            entries_read=entries_read if isinstance(entries_read, int) else None,
            lag=lag if isinstance(lag, int) else None,
            pending=int(info.get("pending", 0) or 0),
            length=int(stream.get("length", 0) or 0),
            entries_added=added if isinstance(added, int) else None,
            first_entry=_text(first[0]) if isinstance(first, list) and first else None,
        )
    return None


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)


def trimmed_unread(state: GroupState) -> int | None:
    """How many entries were trimmed from the stream before the group read them.

    ``entries-added - length`` entries left the stream, oldest first; the group
    has read the first ``entries-read`` of all entries ever added.  ``None`` when
    a gap exists but cannot be counted (Redis < 7, or entries deleted with XDEL
    in the middle of the stream)."""
    if state.first_entry is None:
        return 0  # nothing left to read: nothing was skipped yet
    if _id_tuple(state.last_delivered) >= _id_tuple(state.first_entry):
        return 0  # the group is inside what the stream still holds
    if state.entries_added is not None:
        removed = state.entries_added - state.length
        if state.entries_read is not None:
            return max(0, removed - state.entries_read)
        if state.last_delivered == "0-0":
            return max(0, removed)
    # The group's position is before the first entry: something may be missing.
    # Only the first entry directly following the last delivered one is no gap;
    # without the counters we cannot tell, so say so.
    return None


@attrs.define(eq=False)
class Dispatcher:
    """Reads the stream for one consumer and feeds one exporter; see the module
    docstring."""

    _settings: RedisSettings
    _reader: RedisClient  # the blocking reads have a connection to themselves
    _control: RedisClient  # group setup, ACKs, claims
    _exporter_factory: ExporterFactory
    _clock: IReactorTime
    _consumer: str
    _buffer: int  # entries held unsettled at most
    _read_count: int  # entries per read
    _cleanup: Callable[[], Deferred[Any]] | None = None  # last step of a drain (HTTP pool)

    _exporter: DispatchExporter = attrs.field(init=False)
    _reading: bool = attrs.field(init=False, default=False)
    _loop_done: Deferred[None] | None = attrs.field(init=False, default=None)
    _wake: Deferred[None] | None = attrs.field(init=False, default=None)
    _wake_timer: IDelayedCall | None = attrs.field(init=False, default=None)
    _group_ready: bool = attrs.field(init=False, default=False)
    _own_cursor: str | None = attrs.field(init=False, default=None)
    _claim_cursor: str = attrs.field(init=False, default="0-0")
    _claim_loop: LoopingCall | None = attrs.field(init=False, default=None)
    _claiming: bool = attrs.field(init=False, default=False)
    _held: dict[bytes, Envelope] = attrs.field(init=False, factory=dict)
    _held_ids: dict[int, bytes] = attrs.field(init=False, factory=dict)
    _to_ack: list[bytes] = attrs.field(init=False, factory=list)
    _acking: Deferred[Any] | None = attrs.field(init=False, default=None)
    _acking_ids: list[bytes] = attrs.field(init=False, factory=list)  # in that XACK
    _control_waiters: list[Deferred[None]] = attrs.field(init=False, factory=list)
    _draining: bool = attrs.field(init=False, default=False)
    _ack_soon: IDelayedCall | None = attrs.field(init=False, default=None)
    _stopping: Deferred[None] | None = attrs.field(init=False, default=None)
    _warned: set[str] = attrs.field(init=False, factory=set)
    _state: GroupState | None = attrs.field(init=False, default=None)
    # counters
    _read: int = attrs.field(init=False, default=0)
    _claimed: int = attrs.field(init=False, default=0)
    _acked: int = attrs.field(init=False, default=0)
    _left_pending: int = attrs.field(init=False, default=0)
    _missed_trimmed: int = attrs.field(init=False, default=0)
    _missed_pending: int = attrs.field(init=False, default=0)
    _trim_gaps_uncounted: int = attrs.field(init=False, default=0)
    _malformed: int = attrs.field(init=False, default=0)
    _duplicates: int = attrs.field(init=False, default=0)
    _acks_lost: int = attrs.field(init=False, default=0)
    _acks_resent: int = attrs.field(init=False, default=0)  # XACKs that failed in flight
    _last_error: str | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._exporter = self._exporter_factory(self._on_settled)
        self._reader.when_ready(self._poke)
        self._control.when_ready(self._on_control_ready)

    @property
    def exporter(self) -> DispatchExporter:
        return self._exporter

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        if self._reading or self._stopping is not None:
            return
        self._reading = True
        self._reader.start()
        self._control.start()
        self._exporter.start()
        interval = max(0.05, min(self._settings.claim_idle / 3.0, 10.0))
        loop = LoopingCall(self._claim_tick)
        loop.clock = self._clock
        self._claim_loop = loop
        loop.start(interval, now=False).addErrback(self._loop_failed)
        self._loop_done = Deferred.fromCoroutine(self._read_loop())

    def stop(self, timeout: float) -> Deferred[None]:
        """Drain within ``timeout`` seconds; idempotent."""
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._drain(timeout))
        return self._stopping

    async def _drain(self, timeout: float) -> None:
        clock = self._clock
        deadline = clock.seconds() + timeout  # type: ignore[misc]

        def left() -> float:
            return max(0.0, deadline - clock.seconds())  # type: ignore[misc]

        self._reading = False
        self._draining = True
        if self._claim_loop is not None and self._claim_loop.running:
            self._claim_loop.stop()
        self._poke()
        log.info(
            "dispatcher {consumer}: draining ({held} entries held, deadline {t:g}s)",
            consumer=self._consumer,
            held=len(self._held),
            t=timeout,
        )
        # The read in progress ends within ``block``; past a quarter of the budget
        # its connection is dropped (what it read stays pending, for a claim).
        loop_done = self._loop_done
        if loop_done is not None and not loop_done.called:
            budget = min(left() * 0.25, self._settings.block + 1)
            if not await within(loop_done, budget, self._clock):
                self._reader.abort()
                await within(loop_done, 1.0, self._clock)
        reserve = min(2.0, left() * 0.2)  # for the last ACKs
        await self._exporter.stop(max(0.1, left() - reserve))
        await self._send_last_acks(left)
        # An XACK still on the wire at the deadline may or may not be applied.
        unacknowledged = len(self._to_ack) + len(self._acking_ids)
        if unacknowledged:
            self._acks_lost += unacknowledged
            log.warn(
                "dispatcher {consumer}: {n} delivered entries not acknowledged; "
                "they stay pending and will be delivered again",
                consumer=self._consumer,
                n=unacknowledged,
            )
        self._cancel_timers()
        self._control_waiters = []
        await gatherResults([self._reader.stop(), self._control.stop()], consumeErrors=True)
        if self._cleanup is not None:
            await within(self._cleanup(), max(0.1, left()), self._clock)
        log.info(
            "dispatcher {consumer}: stopped (read {read}, claimed {claimed}, acked {acked})",
            consumer=self._consumer,
            read=self._read,
            claimed=self._claimed,
            acked=self._acked,
        )

    async def _send_last_acks(self, left: Callable[[], float]) -> None:
        """Send every waiting ACK before the deadline, waiting for a lost control
        connection to come back and sending again what failed in flight."""
        while (self._to_ack or self._acking is not None) and left() > 0:
            if not self._control.usable:
                await within(self._control_ready(), left(), self._clock)
                continue
            resent = self._acks_resent
            if not await within(self._flush_acks(), left(), self._clock):
                return
            if self._acks_resent != resent:
                # It failed and its ids are queued again.  A dropped connection
                # still looks usable while it reports the loss: wait for the new
                # one, or a pause for Redis to recover from a "not now" answer.
                await within(self._control_ready(), min(RETRY_PAUSE, left()), self._clock)

    def _control_ready(self) -> Deferred[None]:
        """Fires the next time the control connection becomes usable."""
        ready: Deferred[None] = Deferred()
        self._control_waiters.append(ready)
        return ready

    def _cancel_timers(self) -> None:
        for call in (self._ack_soon, self._wake_timer):
            if call is not None and call.active():  # type: ignore[misc]
                call.cancel()  # type: ignore[misc]
        self._ack_soon = self._wake_timer = None

    def _loop_failed(self, failure: Failure) -> None:
        self._warn("claim_loop", f"claim timer stopped: {failure.getErrorMessage()}")

    # -- reading ---------------------------------------------------------------------

    def _poke(self) -> None:
        """Wake the read loop (a connection is back, room was freed, or stop)."""
        wake, self._wake = self._wake, None
        if self._wake_timer is not None and self._wake_timer.active():  # type: ignore[misc]
            self._wake_timer.cancel()  # type: ignore[misc]
        self._wake_timer = None
        if wake is not None and not wake.called:
            wake.callback(None)

    def _sleep(self, seconds: float) -> Deferred[None]:
        """Wait until poked, or ``seconds`` at most."""
        self._poke()
        wake: Deferred[None] = Deferred()
        self._wake = wake
        self._wake_timer = self._clock.callLater(seconds, self._poke)  # type: ignore[misc, arg-type]
        return wake

    def _room(self) -> int:
        return self._buffer - len(self._held)

    async def _read_loop(self) -> None:
        from llmproxy.redis.connection import RedisUnavailable, is_response_error

        while self._reading:
            try:
                if not self._reader.usable:
                    await self._sleep(1.0)
                elif not self._group_ready:
                    await self._create_group()
                elif self._room() <= 0:
                    await self._sleep(1.0)
                elif self._own_cursor is not None:
                    self._feed(await self._read_own_pending(), claimed=True)
                else:
                    self._feed(await self._read_new(), claimed=False)
            except RedisUnavailable as e:
                self._last_error = str(e)
                if self._reading:
                    await self._sleep(1.0)
            except Exception as e:
                failure = Failure()
                if is_response_error(failure, "NOGROUP"):
                    # Redis lost the group (restarted without persistence, or the
                    # stream was deleted): make it again.
                    self._group_ready = False
                    self._warn("nogroup", "the consumer group disappeared; creating it again")
                    continue
                self._last_error = f"{type(e).__name__}: {e}"
                self._warn(f"read:{type(e).__name__}", f"reading failed: {self._last_error}")
                if self._reading:
                    await self._sleep(RETRY_PAUSE)

    async def _create_group(self) -> None:
        from llmproxy.redis.connection import is_response_error

        s = self._settings
        try:
            await self._reader.execute("XGROUP", "CREATE", s.stream, s.group, "0", "MKSTREAM")
            log.info(
                "dispatcher {consumer}: created group {group} on {stream}",
                consumer=self._consumer,
                group=s.group,
                stream=s.stream,
            )
        except Exception:
            if not is_response_error(Failure(), "BUSYGROUP"):
                raise
        self._group_ready = True
        self._own_cursor = "0"  # this consumer's pending entries from an earlier run

    def _read_command(self, count: int, cursor: str, block_ms: int | None = None) -> list[Any]:
        """``XREADGROUP`` for this consumer: ``cursor`` ``>`` for new entries, else
        an id among its own pending ones; ``block_ms`` to wait for new ones."""
        s = self._settings
        block = [] if block_ms is None else ["BLOCK", block_ms]
        return ["XREADGROUP", "GROUP", s.group, self._consumer, "COUNT", count, *block,
                "STREAMS", s.stream, cursor]  # fmt: skip

    async def _read_own_pending(self) -> list[Any]:
        cursor = self._own_cursor or "0"
        count = min(self._room(), self._read_count)
        reply = await self._reader.execute(*self._read_command(count, cursor))
        entries = _stream_entries(reply)
        self._own_cursor = _text(entries[-1][0]) if entries else None
        return entries

    async def _read_new(self) -> list[Any]:
        """One atomic non-blocking read with the trimming check; if it found
        nothing, a blocking read."""
        from llmproxy.redis.connection import is_response_error

        s = self._settings
        count = min(self._room(), self._read_count)
        reader = self._reader
        transaction = [
            reader.execute("MULTI"),
            reader.execute("XINFO", "GROUPS", s.stream),
            reader.execute("XINFO", "STREAM", s.stream),
            reader.execute(*self._read_command(count, ">")),
            reader.execute("EXEC"),
        ]  # fmt: skip
        try:
            replies = await gatherResults(transaction, consumeErrors=True)
        except FirstError as e:
            e.subFailure.raiseException()  # the first command's own error
            raise
        results = replies[-1]
        if not isinstance(results, list) or len(results) != 3:
            raise RuntimeError("unexpected reply to EXEC")
        for result in results:
            if isinstance(result, Exception):
                if "NOGROUP" in str(result) or "no such key" in str(result):
                    self._group_ready = False
                    return []
                raise result
        self._check_trimming(results[0], results[1])
        entries = _stream_entries(results[2])
        if entries or not self._reading:
            return entries
        block_ms = int(s.block * 1000)
        try:
            reply = await reader.execute(
                *self._read_command(count, ">", block_ms), timeout=s.block + s.timeout
            )
        except Exception:
            if is_response_error(Failure(), "NOGROUP"):
                self._group_ready = False
                return []
            raise
        return _stream_entries(reply)

    def _check_trimming(self, groups_reply: Any, stream_reply: Any) -> None:
        state = parse_group_state(groups_reply, stream_reply, self._settings.group)
        self._state = state
        if state is None:
            return
        missed = trimmed_unread(state)
        if missed == 0:
            return
        if missed is None:
            self._trim_gaps_uncounted += 1
            log.warn(
                "dispatcher {consumer}: missed events due to trimming: the stream starts "
                "after the group's last read entry (count unknown; needs Redis >= 7); "
                "raise [redis] maxlen or add dispatchers",
                consumer=self._consumer,
            )
            return
        self._missed_trimmed += missed
        log.warn(
            "dispatcher {consumer}: missed {n} events due to trimming: the stream was "
            "trimmed (maxlen {maxlen}) before group {group} read them; raise [redis] "
            "maxlen or add dispatchers",
            consumer=self._consumer,
            n=missed,
            maxlen=self._settings.maxlen,
            group=self._settings.group,
        )

    def _feed(self, entries: Sequence[Any], *, claimed: bool) -> None:
        """Hand entries to the exporter; remember each until it settles."""
        # Delivered, its XACK not through yet (Redis came back with LOADING, and a
        # claim found it idle): delivering it again would make a duplicate.
        unacknowledged = (
            {*self._to_ack, *self._acking_ids} if self._to_ack or self._acking_ids else set()
        )
        for entry in entries:
            entry_id: bytes = entry[0] if isinstance(entry[0], bytes) else str(entry[0]).encode()
            if entry_id in self._held or entry_id in unacknowledged:
                self._duplicates += 1
                continue  # we hold it already (claimed back, or re-read), or delivered it
            fields = entry[1] if len(entry) > 1 else None
            if fields is None:
                # Trimmed while it was pending: the data is gone.
                self._missed_pending += 1
                self._warn("missed_pending", "pending entries were trimmed before delivery")
                self._ack(entry_id)
                continue
            envelope = self._envelope(entry_id, fields)
            if envelope is None:
                self._ack(entry_id)  # dead-lettered as malformed
                continue
            if claimed:
                self._claimed += 1
            else:
                self._read += 1
            self._held[entry_id] = envelope
            self._held_ids[id(envelope)] = entry_id
            self._exporter.publish(envelope)

    def _envelope(self, entry_id: bytes, fields: Any) -> Envelope | None:
        values = _pairs(fields)
        raw = values.get("event")
        event: Any = None
        if isinstance(raw, bytes):
            try:
                event = orjson.loads(raw)
            except orjson.JSONDecodeError:
                event = None
        if isinstance(event, dict):
            return StoredEvent(event)
        self._malformed += 1
        line = raw if isinstance(raw, bytes) else repr(fields).encode()
        try:
            self._exporter.dead_letter.append_raw(
                [line], f"malformed stream entry {entry_id.decode()}", self._now()
            )
        except OSError as e:
            self._warn("dead_letter", f"dead-letter write failed: {e.strerror}")
        self._warn("malformed", "a stream entry is not an event; dead-lettered")
        return None

    # -- settling and acknowledging -----------------------------------------------------

    def _on_settled(self, envelope: Envelope, outcome: str) -> None:
        try:
            entry_id = self._held_ids.pop(id(envelope), None)
            if entry_id is None:
                return
            self._held.pop(entry_id, None)
            if outcome in SETTLED_ACK:
                self._ack(entry_id)
            else:
                self._left_pending += 1  # stays pending in Redis: claimed later
            if self._room() > 0:
                self._poke()
        except Exception:
            log.failure("dispatcher: settling an entry failed")

    def _ack(self, entry_id: bytes) -> None:
        self._to_ack.append(entry_id)
        if self._ack_soon is None and self._acking is None:
            self._ack_soon = self._clock.callLater(0, self._ack_now)  # type: ignore[misc, arg-type]

    def _ack_now(self) -> None:
        self._ack_soon = None
        self._flush_acks()

    def _flush_acks(self) -> Deferred[Any]:
        """Send the waiting ACKs (one XACK at a time, up to ACK_CHUNK ids each)."""
        if self._acking is not None:
            return self._acking
        if not self._to_ack or not self._control.usable:
            return succeed(None)
        ids, self._to_ack = self._to_ack[:ACK_CHUNK], self._to_ack[ACK_CHUNK:]
        s = self._settings
        self._acking_ids = ids
        d = self._control.execute("XACK", s.stream, s.group, *ids)
        self._acking = d

        def done(result: object) -> None:
            from llmproxy.redis.connection import is_refusal

            self._acking = None
            self._acking_ids = []
            if not isinstance(result, Failure):
                self._acked += len(ids)
            elif is_refusal(result):
                # Redis said no to these ids (the key is no stream any more, an
                # ACL forbids XACK): sending them again gets the same answer.
                self._acks_lost += len(ids)
                self._warn("ack", f"XACK refused: {result.getErrorMessage()}")
            else:
                # Lost with the connection, no reply in time, or "not now": it may
                # or may not have been applied, and an ACK is idempotent.
                self._to_ack[:0] = ids
                self._acks_resent += 1
                self._warn(
                    "ack_again", f"XACK failed, sending it again: {result.getErrorMessage()}"
                )
                if not self._draining:  # the drain sends them itself
                    self._ack_later(RETRY_PAUSE)
                return
            if self._to_ack and self._control.usable:
                self._flush_acks()

        d.addBoth(done)
        return d

    def _ack_later(self, seconds: float) -> None:
        """Flush the ACKs after ``seconds`` (sooner if the connection comes back)."""
        if self._ack_soon is None or not self._ack_soon.active():  # type: ignore[misc]
            self._ack_soon = self._clock.callLater(seconds, self._ack_now)  # type: ignore[misc, arg-type]

    def _on_control_ready(self) -> None:
        self._flush_acks()
        waiters, self._control_waiters = self._control_waiters, []
        for ready in waiters:
            if not ready.called:
                ready.callback(None)

    # -- claiming ----------------------------------------------------------------------

    def _claim_tick(self) -> None:
        if self._claiming or not self._control.usable or not self._group_ready:
            return
        self._claiming = True
        d = Deferred.fromCoroutine(self._claim())

        def done(result: object) -> None:
            self._claiming = False
            if isinstance(result, Failure):
                self._last_error = result.getErrorMessage()
                self._warn(f"claim:{result.type}", f"claiming failed: {self._last_error}")

        d.addBoth(done)

    async def _claim(self) -> None:
        s = self._settings
        control = self._control
        held = [*self._held, *self._acking_ids, *self._to_ack]
        for start in range(0, len(held), ACK_CHUNK):
            # Still alive: reset the idle time of what we hold or delivered and have
            # not acknowledged yet, so nobody claims it.
            chunk = held[start : start + ACK_CHUNK]
            await control.execute("XCLAIM", s.stream, s.group, self._consumer, 0, *chunk, "JUSTID")
        room = min(self._room(), self._read_count)
        if room <= 0 or not self._reading:
            return
        reply = await control.execute(
            "XAUTOCLAIM",
            s.stream,
            s.group,
            self._consumer,
            int(s.claim_idle * 1000),
            self._claim_cursor,
            "COUNT",
            room,
        )
        if not isinstance(reply, list) or len(reply) < 2:
            return
        self._claim_cursor = _text(reply[0])
        entries = [e for e in reply[1] or [] if isinstance(e, list) and e]
        deleted = reply[2] if len(reply) > 2 and isinstance(reply[2], list) else []
        if deleted:
            # Pending entries whose data was trimmed: Redis dropped them from the PEL.
            self._missed_pending += len(deleted)
            log.warn(
                "dispatcher {consumer}: {n} pending entries were trimmed before delivery",
                consumer=self._consumer,
                n=len(deleted),
            )
        if entries:
            log.info(
                "dispatcher {consumer}: claimed {n} entries idle over {idle:g}s",
                consumer=self._consumer,
                n=len(entries),
                idle=s.claim_idle,
            )
            self._feed(entries, claimed=True)

    # -- reporting -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        state = self._state
        return {
            "stream": self._settings.stream,
            "group": self._settings.group,
            "consumer": self._consumer,
            "connected": self._reader.usable and self._control.usable,
            "read": self._read,
            "claimed": self._claimed,
            "held": len(self._held),
            "acked": self._acked,
            "ack_queue": len(self._to_ack),
            "acks_in_flight": len(self._acking_ids),
            "acks_resent": self._acks_resent,
            "acks_lost": self._acks_lost,
            "left_pending": self._left_pending,
            "missed_trimmed": self._missed_trimmed,
            "missed_pending": self._missed_pending,
            "trim_gaps_uncounted": self._trim_gaps_uncounted,
            "malformed": self._malformed,
            "duplicates_skipped": self._duplicates,
            "group_lag": state.lag if state is not None else None,
            "group_pending": state.pending if state is not None else None,
            "stream_length": state.length if state is not None else None,
            "last_error": self._last_error,
            "exporter": self._exporter.stats(),
        }

    def _now(self) -> float:
        now: float = self._clock.seconds()  # type: ignore[misc]
        return now

    def _warn(self, key: str, message: str) -> None:
        """Log a problem once per dispatcher (stats keep counting)."""
        self._last_error = message
        if key in self._warned:
            return
        self._warned.add(key)
        log.warn("dispatcher {consumer}: {message}", consumer=self._consumer, message=message)


def _stream_entries(reply: Any) -> list[Any]:
    """The entries of an XREADGROUP reply for one stream (``[[name, entries]]``)."""
    if not isinstance(reply, list) or not reply:
        return []
    first = reply[0]
    if not isinstance(first, list) or len(first) < 2 or not isinstance(first[1], list):
        return []
    return [e for e in first[1] if isinstance(e, list) and e]


# -- building one from settings ----------------------------------------------------------


def dispatch_exporter_settings(settings: ExporterSettings) -> ExporterSettings:
    """A dispatcher's exporter keeps undelivered events pending in Redis, not on
    disk: no spool, and retries until the sink answers or the drain ends."""
    return attrs.evolve(settings, spool_max_bytes=0, max_retries=UNLIMITED_RETRIES)


def build_dispatcher(
    redis: RedisSettings,
    exporter: ExporterSettings,
    *,
    reactor: Any,
    state_dir: Path,
    consumer: str = "",
) -> Dispatcher:
    """A dispatcher with real connections and the exporter for ``exporter``.

    Raises ``ValueError`` for sink settings the sink refuses."""
    from twisted.web.client import Agent

    from llmproxy.export.exporter import BatchingExporter
    from llmproxy.export.http import quiet_pool, sink_http_client
    from llmproxy.export.registry import build_sink
    from llmproxy.redis.connection import RedisConnection, default_consumer_name, parse_redis_url

    name = consumer or redis.consumer or default_consumer_name()
    settings = dispatch_exporter_settings(exporter)
    pool = quiet_pool(reactor, persistent=True)
    client = sink_http_client(Agent(reactor, pool=pool))
    sink = build_sink(settings, clock=reactor, http_client=client, state_dir=state_dir)
    dead_letter = settings.dead_letter_path or Path("deadletter") / f"{settings.name}.jsonl"
    if not dead_letter.is_absolute():
        dead_letter = state_dir / dead_letter

    def make_exporter(on_settled: Settled) -> DispatchExporter:
        return BatchingExporter(
            settings,
            sink,
            reactor,
            None,
            DeadLetter(dead_letter, settings.name),
            _random.random,
            on_settled=on_settled,
        )

    url = parse_redis_url(redis.url)
    return Dispatcher(
        redis,
        RedisConnection(reactor, url, redis.timeout, f"llmproxy-dispatcher-read:{name}"),
        RedisConnection(reactor, url, redis.timeout, f"llmproxy-dispatcher:{name}"),
        make_exporter,
        reactor,
        name,
        buffer=settings.buffer,
        read_count=settings.batch_size,
        cleanup=pool.closeCachedConnections,
    )
