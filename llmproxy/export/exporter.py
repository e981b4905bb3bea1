"""The batching exporter core: the one delivery engine (tests: tests/unit/export/test_exporter.py,
test_exporter_property.py, test_exporter_durable.py).

One ``BatchingExporter`` per target: a sink (file, Loki, ...) or the Redis stream
(llmproxy/redis/stream.py, whose delivery is XADD).  The bus calls ``publish`` on the
request path; everything else (encoding, batching, delivery, backoff, spool,
dead-letter file) happens later, on the injected clock, so a slow or dead target
never slows requests.

Where an accepted event can be, at every moment (``stats()``)::

    accepted = sent + in_flight + queued + spooled + dead_lettered + dropped

- ``accepted``: every ``publish`` call, plus events recovered from the spool at
  start (also counted in ``recovered``).
- ``sent``: confirmed by the sink (``Delivered``, minus its per-event rejections).
- ``in_flight``: in batches handed to ``sink.deliver`` and not yet answered.
- ``queued``: in memory: the buffer (``queue_depth``), batches waiting out a
  backoff before their next attempt (``retrying``, a part of ``queued``), events
  on their way to the spool (``spooling``, a part of ``queued``: a write is under
  way in a thread), and events published during the drain that are spooled when
  it ends.
- ``spooled``: on disk in the spool, waiting for replay (a segment being replayed,
  or a failing batch made durable, counts as in flight, or retrying).
- ``dead_lettered``: written to the dead-letter file (refused for good).
- ``dropped``: lost, each with a reason in ``dropped_by_reason``: ``buffer_full``
  (buffer full and no spool, or the spool cannot keep up), ``retries_exhausted``
  (no spool), ``spool_full`` (discarded by the spool's size bound),
  ``shutdown_no_spool``, ``closed`` (published after close, no spool),
  ``spool_write_failed`` (the buffer was full and the disk refused the spill, or a
  write failed at shutdown), ``dead_letter_failed``, ``spool_corrupt`` (a segment
  held fewer lines than its name says), ``spool_read_failed``, ``encode_failed``
  (``json()`` raised), ``bad_envelope`` (``size_hint`` raised).

Batches.  A batch is sent when ``batch_size`` events (or ``batch_bytes``) wait and
a slot is free, or at the ``flush_interval`` tick with whatever waits.  A target
may send earlier (``send_at``, the Redis bus: 10): once that many wait and a slot
is free, the batch takes up to ``batch_size`` of them, so a batch grows with the
backlog that built up while the one before was in flight.  At a low rate no
reactor turn then hands a hundred events to the target at once (each such turn
is a stall for whichever request waits meanwhile: the c1 p99), and at a high rate
the batches are as large as ever.  Spool segments keep ``batch_size``.

Durable while failing.  Healthy, the exporter works from memory and never touches
the disk.  Once the target is known to be failing (an attempt was answered
``Retry``, until one is ``Delivered``), what waits in memory is written to the
spool at once, then each batch as it fills up (where a healthy sink would have
been sent it: memory holds about a batch, as when healthy), and every
``spool_interval`` seconds the rest: the buffer, in batch-sized segments, and
every batch in flight or waiting out a backoff (as a
checked-out segment, removed once it is delivered).  Writes run through
``run_blocking`` (a thread in production), so the reactor never waits for the
disk.  The bound: a ``kill -9`` at any moment of an outage loses at most the
events published in the last ``spool_interval`` (plus those whose write was under
way, a few milliseconds' worth: a tick hands the buffer to the disk one segment
per reactor turn, so that requests are served between them); everything older is
on disk and replayed after the restart.  A batch that was on disk and delivered
just before the kill can be delivered again (at least once).

Disk trouble.  A failed spool write (``ENOSPC``, a vanished or read-only
directory) loses nothing while memory has room: the events go back to the buffer
in order, the disk is left alone for ``spool_interval``, and the write is tried
again.  Only a full buffer then drops new events (``spool_write_failed``).
Memory is bounded by ``buffer`` (events and bytes) plus as much again on its way
to the spool.

Order.  Every event gets an ordinal at publish; spool segments are named by their
first ordinal.  The next batch sent is always the oldest available: the oldest
spool segment when it is older than the head of the buffer, else the buffer; a
segment still being written that is older than the buffer's head is waited for.
Every route into the spool keeps the spool older than the buffer (a full buffer
spills its *oldest* events; a batch that exhausted its retries is older than what
is queued), so with ``max_in_flight = 1`` events reach the sink in publish order,
and across restarts too.  With more batches in flight, order is not kept.

Backoff.  Before retry ``n`` (0 for the first) the batch waits a uniform random
time in ``[backoff_min, min(backoff_max, backoff_min * 2**(n+1))]`` (full jitter,
floored at ``backoff_min`` so a failing sink is never hammered), and at least the
server's ``Retry-After``, itself capped at ``backoff_max`` (so a bogus date cannot
stall the pipeline).  A retrying batch keeps its slot: with ``max_in_flight = 1``
nothing overtakes it.  After ``max_retries`` retries the batch goes to the spool (a
replayed or durable segment simply stays there), and the exporter pauses for one
more backoff before it sends anything; the next batch is then the oldest (that
one again), which is how the sink's recovery is probed.  A spool segment is
replayed only while no batch is waiting out a backoff (the sink is not known to be
failing), one at a time.

Buffer full.  With a spool, the oldest queued events are spilled to it, one batch's
worth at a time (one file write per ``batch_size`` events: the cost of overload is
paid rarely, and order is kept); without one, the new event is dropped.  An event
arriving at an empty buffer is always accepted, even alone over ``buffer_bytes``.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import random as _random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.config.model import ExporterSettings
from llmproxy.events.envelope import Envelope, StoredEvent
from llmproxy.export.deadletter import DeadLetter
from llmproxy.export.spool import PendingSegment, Segment, Spool
from llmproxy.export.verdict import Delivered, Rejected, Retry, Verdict
from llmproxy.interfaces import LineSink, PreparingSink, ReopenableSink, RunBlocking, Sink

__all__ = [
    "CLOSED",
    "CLOSING",
    "RUNNING",
    "BatchingExporter",
    "run_here",
]

log = Logger()

RUNNING = "running"
CLOSING = "closing"
CLOSED = "closed"

# (ordinal, envelope, size_hint, enqueued_at)
_Entry = tuple[int, Envelope, int, float]

_T = TypeVar("_T")


def run_here(work: Callable[[], _T]) -> Deferred[_T]:
    """A ``RunBlocking`` that runs the work at once, in the caller's thread (tests,
    and tools that have no reactor thread to protect)."""
    return maybeDeferred(work)


def _cancel(call: IDelayedCall | None) -> None:
    # IDelayedCall's methods are zope interface methods: mypy (without mypy-zope)
    # sees them without ``self``.
    if call is not None and call.active():  # type: ignore[misc]
        call.cancel()  # type: ignore[misc]


@attrs.define(eq=False)
class _Batch:
    """One batch on its way: in flight, or waiting out a backoff (``timer`` set)."""

    events: list[dict[str, Any]] = attrs.field(repr=False)
    lines: list[bytes] = attrs.field(repr=False)  # the JSON of each event, for the spool
    first: int  # ordinals of the first and last event
    last: int
    enqueued_at: float | None  # when its oldest event was queued (None: from the spool)
    # Its queue entries, to put back in memory when the disk refuses it (empty for
    # a batch read from the spool, which stays on disk).
    entries: list[_Entry] = attrs.field(factory=list, repr=False)
    segment: Segment | None = None  # its spool segment (replayed, or made durable)
    retries: int = 0
    attempt: int = 0
    deferred: Deferred[Any] | None = None
    timer: IDelayedCall | None = None
    settled: bool = False  # its outcome is handled: late answers are ignored
    outcome: str = ""  # once settled: "sent" | "dead_lettered" | "put_back"
    persisting: bool = False  # a spool write of it is under way
    # What the sink's ``prepare`` made of each event when it was published (None
    # for an event replayed from the spool, or when the sink has no ``prepare``).
    prepared: list[Any] = attrs.field(factory=list, repr=False)

    @property
    def envelopes(self) -> list[Envelope]:
        return [entry[1] for entry in self.entries]


@attrs.define(eq=False)
class _Write:
    """A spool write under way: a chunk of the buffer, or a batch made durable."""

    pending: PendingSegment
    entries: list[_Entry] = attrs.field(repr=False)  # put back in memory if it fails
    batch: _Batch | None = None  # the batch it makes durable (None: a buffer chunk)
    counted: int = 0  # its events counted as ``spooling`` (not in flight)


@attrs.define(eq=False)
class BatchingExporter:
    """Buffers, batches and delivers events to one target; see the module docstring."""

    _settings: ExporterSettings
    _sink: Sink
    _clock: IReactorTime
    _spool: Spool | None
    _dead_letter: DeadLetter
    _random: Callable[[], float] = _random.random
    # Told where each published event ended: "sent" | "dead_lettered" | "spooled" |
    # "dropped" (the dispatcher ACKs Redis entries on it).  Events replayed from the
    # spool have no envelope and are not reported.
    _on_settled: Callable[[Envelope, str], None] | None = None
    # Where spool writes run: a thread in production (registry.build_exporter), at
    # once by default (unit tests drive time with a Clock).
    _run_blocking: RunBlocking = run_here
    # A batch goes once this many events wait and a slot is free (0: ``batch_size``);
    # it takes up to ``batch_size`` of them, so batches grow with the backlog.  For a
    # target whose cost per batch is small (the Redis bus): no reactor turn sends a
    # hundred events at once while the rate is low (module docstring, "Batches").
    _send_at: int = 0

    _state: str = attrs.field(init=False, default=RUNNING)
    _started: bool = attrs.field(init=False, default=False)
    _queue: deque[_Entry] = attrs.field(init=False, factory=deque)
    _queue_bytes: int = attrs.field(init=False, default=0)
    _late: deque[_Entry] = attrs.field(init=False, factory=deque)
    _active: list[_Batch] = attrs.field(init=False, factory=list)
    _writes: list[_Write] = attrs.field(init=False, factory=list)
    _writing_events: int = attrs.field(init=False, default=0)  # in ``_writes`` for the buffer
    _next_ordinal: int = attrs.field(init=False, default=0)
    _loop: LoopingCall | None = attrs.field(init=False, default=None)
    _pump_timer: IDelayedCall | None = attrs.field(init=False, default=None)
    _cooldown: IDelayedCall | None = attrs.field(init=False, default=None)
    _durable_timer: IDelayedCall | None = attrs.field(init=False, default=None)
    # The buffer goes to disk a segment per reactor turn (``_persist_step``): this
    # many events of it are still to go, and the next step.
    _persist_left: int = attrs.field(init=False, default=0)
    _persist_timer: IDelayedCall | None = attrs.field(init=False, default=None)
    _deadline: IDelayedCall | None = attrs.field(init=False, default=None)
    _disk_refused_until: float = attrs.field(init=False, default=float("-inf"))
    _pumping: bool = attrs.field(init=False, default=False)
    _repump: bool = attrs.field(init=False, default=False)
    _repump_flush: bool = attrs.field(init=False, default=False)
    _close_started: bool = attrs.field(init=False, default=False)
    _close_fired: bool = attrs.field(init=False, default=False)
    _close_waiters: list[Deferred[None]] = attrs.field(init=False, factory=list)
    _sink_closing: Deferred[Any] | None = attrs.field(init=False, default=None)
    _sink_closed_done: bool = attrs.field(init=False, default=False)
    _failing: bool = attrs.field(init=False, default=False)
    _warned: set[str] = attrs.field(init=False, factory=set)
    # A sink's ``prepare(event, line)``: its per-event part of encoding, done when
    # the event is published (a reactor turn's worth at a time) rather than for a
    # whole batch in the turn that sends it; results by ordinal until batched.
    _prepare: Callable[[dict[str, Any], bytes], Any] | None = attrs.field(init=False, default=None)
    _preparing: PreparingSink | None = attrs.field(init=False, default=None)
    _lines: LineSink | None = attrs.field(init=False, default=None)
    _prepared: dict[int, Any] = attrs.field(init=False, factory=dict)
    # counters
    _accepted: int = attrs.field(init=False, default=0)
    _recovered: int = attrs.field(init=False, default=0)
    _sent: int = attrs.field(init=False, default=0)
    _dead_lettered: int = attrs.field(init=False, default=0)
    _dropped: dict[str, int] = attrs.field(init=False, factory=dict)
    _retries: int = attrs.field(init=False, default=0)
    _batches_sent: int = attrs.field(init=False, default=0)
    _batches_failed: int = attrs.field(init=False, default=0)
    _after_close: int = attrs.field(init=False, default=0)
    _replayed: int = attrs.field(init=False, default=0)
    _spool_writes: int = attrs.field(init=False, default=0)
    _spool_write_errors: int = attrs.field(init=False, default=0)
    _last_success: float | None = attrs.field(init=False, default=None)
    _last_error: str | None = attrs.field(init=False, default=None)
    _last_error_at: float | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        # The sink's declared capabilities (llmproxy.interfaces), looked at once.
        sink = self._sink
        self._preparing = sink if isinstance(sink, PreparingSink) else None
        self._lines = sink if isinstance(sink, LineSink) else None
        self._prepare = self._preparing.prepare if self._preparing is not None else None
        if self._spool is not None:
            self._recovered = self._accepted = self._spool.event_count
            self._next_ordinal = self._spool.next_ordinal
            if self._recovered:
                log.info(
                    "exporter {name}: {n} events recovered from the spool; replaying them",
                    name=self.name,
                    n=self._recovered,
                )

    @property
    def name(self) -> str:
        return self._settings.name

    @property
    def spool(self) -> Spool | None:
        return self._spool

    @property
    def dead_letter(self) -> DeadLetter:
        return self._dead_letter

    @property
    def sink(self) -> Sink:
        return self._sink

    # -- intake -------------------------------------------------------------------

    def publish(self, envelope: Envelope) -> None:
        """Accept one event: O(1), never waits on the sink or the disk, never raises.

        When the buffer is full and a spool is configured, one batch's worth of the
        oldest events is handed to the spool first (rare, amortised over a batch).
        """
        self._accepted += 1
        try:
            size = envelope.size_hint
        except Exception:
            self._drop(1, "bad_envelope")
            self._report((envelope,), "dropped")
            self._warn("bad_envelope", "an event's size_hint raised; event dropped")
            return
        try:
            if self._state != RUNNING:
                self._publish_after_close(envelope, size)
                return
            if self._full(size):
                self._make_room(size)
            if self._full(size):
                reason = "buffer_full"
                if self._spool is not None and not self._disk_usable():
                    reason = "spool_write_failed"
                self._drop(1, reason)
                self._report((envelope,), "dropped")
                return
            ordinal = self._take_ordinal()
            self._queue.append((ordinal, envelope, size, self._now()))
            self._queue_bytes += size
            if self._prepare is not None:
                self._prepare_one(ordinal, envelope)
            if self._pump_timer is None and self._has_free_slot() and self._batch_ready():
                # Batches are built off the request path, in the next reactor turn.
                self._pump_timer = self._later(0, self._pump_soon)
            elif self._failing and len(self._queue) >= self._settings.batch_size:
                self._persist_batch()
        except Exception:
            # A bug, not a failure path: logged as an error (tests fail on it).
            log.failure("exporter {name}: publish failed", name=self.name)

    def _prepare_one(self, ordinal: int, envelope: Envelope) -> None:
        """The sink's per-event work, now; an event it fails on is prepared again
        (or reported) when its batch is sent."""
        assert self._prepare is not None
        with contextlib.suppress(Exception):
            self._prepared[ordinal] = self._prepare(envelope.payload(), envelope.json())

    def _full(self, size: int) -> bool:
        if not self._queue:
            return False
        return (
            len(self._queue) >= self._settings.buffer
            or self._queue_bytes + size > self._settings.buffer_bytes
        )

    def _make_room(self, size: int) -> None:
        """Spill the oldest events to the spool, while as much again is not already
        on its way there (what bounds memory when the disk is slow)."""
        if self._spool is None or not self._disk_usable():
            return
        while self._queue and self._full(size) and self._writing_events < self._settings.buffer:
            self._spool_async(self._take_chunk(self._queue, for_spool=True))

    def _publish_after_close(self, envelope: Envelope, size: int) -> None:
        self._after_close += 1
        if self._spool is None:
            self._drop(1, "closed")
            self._report((envelope,), "dropped")
            return
        entry = (self._take_ordinal(), envelope, size, self._now())
        if self._state == CLOSING:
            self._late.append(entry)  # spooled with the rest when the drain ends
            return
        self._spool_now(self._take_chunk(deque([entry])), "closed")

    def _take_ordinal(self) -> int:
        ordinal = self._next_ordinal
        self._next_ordinal += 1
        return ordinal

    def _take_chunk(self, source: deque[_Entry], *, for_spool: bool = False) -> _Batch:
        """Pop one batch's worth from the head of ``source`` (at least one event)."""
        if for_spool:
            chunk = self._take_for_spool(source)
            if chunk is not None:
                return chunk
        settings = self._settings
        events: list[dict[str, Any]] = []
        lines: list[bytes] = []
        entries: list[_Entry] = []
        prepared: list[Any] = []
        pop_prepared = self._prepared.pop
        first = last = source[0][0]
        enqueued_at = source[0][3]
        size = 0
        while source and len(lines) < settings.batch_size:
            entry = source[0]
            ordinal, envelope, hint, _ = entry
            try:
                line = envelope.json()
                event = {} if for_spool else envelope.payload()
            except Exception:
                source.popleft()
                pop_prepared(ordinal, None)
                if source is self._queue:
                    self._queue_bytes -= hint
                self._drop(1, "encode_failed")
                self._report((envelope,), "dropped")
                self._warn("encode_failed", "an event could not be encoded; event dropped")
                continue
            if lines and size + len(line) > settings.batch_bytes:
                break
            source.popleft()
            if source is self._queue:
                self._queue_bytes -= hint
            if not lines:
                first = ordinal
            last = ordinal
            events.append(event)
            lines.append(line)
            entries.append(entry)
            # A spilled event keeps what was prepared for it only until it is
            # back in memory: replayed events are prepared again.
            prepared.append(pop_prepared(ordinal, None))
            size += len(line)
        return _Batch(events, lines, first, last, enqueued_at, entries, prepared=prepared)

    def _take_for_spool(self, source: deque[_Entry]) -> _Batch | None:
        """:meth:`_take_chunk` for the spool, a comprehension per step instead of a
        loop per event (5 -> ~1.5 µs an event: an outage spools every event).
        None when an event's ``json()`` raises: the loop then counts it."""
        settings = self._settings
        head = list(itertools.islice(source, settings.batch_size))
        try:
            lines = [entry[1].json() for entry in head]
        except Exception:
            return None
        # The first events that fit in batch_bytes (always at least one).
        count = max(
            1,
            bisect.bisect_right(list(itertools.accumulate(map(len, lines))), settings.batch_bytes),
        )
        if count < len(head):
            del head[count:], lines[count:]
        for _ in range(count):
            source.popleft()
        if source is self._queue:
            self._queue_bytes -= sum([entry[2] for entry in head])
        pop_prepared = self._prepared.pop
        return _Batch(
            [{} for _ in head],
            lines,
            head[0][0],
            head[-1][0],
            head[0][3],
            head,
            prepared=[pop_prepared(entry[0], None) for entry in head],
        )

    def _requeue(self, entries: list[_Entry]) -> None:
        """Put events back in the buffer, in ordinal order (a spool write failed)."""
        if not entries:
            return
        if not self._queue or entries[-1][0] < self._queue[0][0]:
            self._queue.extendleft(reversed(entries))
        else:  # rare: interleaved with what is queued
            merged = sorted([*self._queue, *entries], key=lambda entry: entry[0])
            self._queue = deque(merged)
        self._queue_bytes += sum(entry[2] for entry in entries)

    # -- dispatch -----------------------------------------------------------------

    def start(self) -> None:
        """Begin the flush timer and replay what the spool holds."""
        if self._started or self._state != RUNNING:
            return
        self._started = True
        loop = LoopingCall(self._on_tick)
        loop.clock = self._clock
        self._loop = loop
        loop.start(self._settings.flush_interval, now=False).addErrback(self._loop_failed)
        self._pump()

    def _loop_failed(self, failure: Failure) -> None:
        self._warn("loop", f"flush timer stopped: {failure.getErrorMessage()}")

    def _on_tick(self) -> None:
        self._pump(flush=True)

    def _pump_soon(self) -> None:
        self._pump_timer = None
        self._pump()

    def _pump(self, flush: bool = False) -> None:
        """Send what is ready; re-entrant calls (a sink answering synchronously) are
        folded into the running loop instead of recursing."""
        if self._pumping:
            self._repump = True
            self._repump_flush = self._repump_flush or flush
            return
        self._pumping = True
        try:
            while True:
                self._dispatch(flush)
                if not self._repump:
                    break
                self._repump = False
                flush = flush or self._repump_flush
                self._repump_flush = False
        except Exception:
            log.failure("exporter {name}: sending failed", name=self.name)
        finally:
            self._pumping = False

    def _has_free_slot(self) -> bool:
        return self._cooldown is None and len(self._active) < self._settings.max_in_flight

    def _batch_ready(self) -> bool:
        return (
            len(self._queue) >= (self._send_at or self._settings.batch_size)
            or self._queue_bytes >= self._settings.batch_bytes
        )

    def _dispatch(self, flush: bool) -> None:
        while self._started and self._state != CLOSED and self._has_free_slot():
            segment = self._replay_candidate()
            if segment is not None:
                self._replay(segment)
                continue
            if self._older_on_its_way_to_disk():
                break  # sent once written, as a replay: order is kept
            if self._queue and (flush or self._state == CLOSING or self._batch_ready()):
                self._send(self._take_chunk(self._queue))
                continue
            break

    def _older_on_its_way_to_disk(self) -> bool:
        if self._spool is None or not self._queue:
            return False
        pending = self._spool.oldest_pending
        return pending is not None and pending < self._queue[0][0]

    def _replay_candidate(self) -> Segment | None:
        if self._spool is None:
            return None
        if any(b.segment is not None or b.timer is not None for b in self._active):
            return None  # one replay at a time, and not while the sink is failing
        if self._state == CLOSING and not self._queue:
            return None  # the drain flushes memory; the spool waits for the next start
        segment = self._spool.oldest()
        if segment is None or (self._queue and self._queue[0][0] < segment.first):
            return None
        return segment

    def _replay(self, segment: Segment) -> None:
        spool = self._spool
        assert spool is not None
        try:
            contents = spool.read(segment)
        except OSError as e:
            spool.remove(segment)
            self._drop(segment.count, "spool_read_failed")
            self._warn("spool_read", f"spool segment unreadable: {e.strerror}")
            return
        batch = _Batch(contents.events, contents.lines, segment.first, segment.last, None)
        found = len(contents.events) + len(contents.corrupt)
        replayed: Segment | None = segment
        if contents.corrupt or found != segment.count:
            # Make the file match what is sendable, so a failed replay does not
            # count its corrupt lines twice.
            if found > segment.count:
                self._accepted += found - segment.count
                self._recovered += found - segment.count
            try:
                replayed = spool.rewrite(segment, contents.lines)
            except OSError as e:
                # Carry the events in memory: a failure spools them anew.
                spool.remove(segment)
                replayed = None
                batch.entries = self._entries_of(batch)
                self._warn("spool_rewrite", f"spool segment not rewritable: {e.strerror}")
            if found < segment.count:
                self._drop(segment.count - found, "spool_corrupt")
            self._dead_letter_raw(contents.corrupt, "spool_corrupt")
        elif not batch.events:
            spool.remove(segment)
        if not batch.events:
            return
        batch.segment = replayed
        if replayed is not None:
            spool.checkout(replayed)
        self._replayed += len(batch.events)
        self._send(batch)

    def _entries_of(self, batch: _Batch) -> list[_Entry]:
        """Queue entries for a batch read from disk, to carry it in memory."""
        now = self._now()
        return [
            (min(batch.first + i, batch.last), StoredEvent(event), len(line), now)
            for i, (event, line) in enumerate(zip(batch.events, batch.lines, strict=True))
        ]

    def _send(self, batch: _Batch) -> None:
        if not batch.events:
            return
        self._active.append(batch)
        self._attempt(batch)

    def _attempt(self, batch: _Batch) -> None:
        batch.timer = None
        batch.attempt += 1
        d: Deferred[Any]
        if self._preparing is not None:  # ... and it prepared them when published
            prepared = batch.prepared or [None] * len(batch.events)
            d = maybeDeferred(self._preparing.deliver_prepared, batch.events, batch.lines, prepared)
        elif self._lines is not None:  # the sink writes the events' JSON as it is
            d = maybeDeferred(self._lines.deliver_lines, batch.events, batch.lines)
        else:
            d = maybeDeferred(self._sink.deliver, batch.events)
        batch.deferred = d
        d.addBoth(self._on_answer, batch, batch.attempt)

    def _on_answer(self, result: object, batch: _Batch, attempt: int) -> None:
        if batch.settled or attempt != batch.attempt:
            return  # cancelled at the deadline, or an answer to an older attempt
        batch.deferred = None
        verdict: Verdict
        if isinstance(result, Delivered | Retry | Rejected):
            verdict = result
        elif isinstance(result, Failure):
            kind = result.type.__name__ if result.type is not None else "error"
            verdict = Retry(f"deliver() failed: {kind}")
            self._warn(
                f"deliver:{kind}",
                f"deliver() failed unexpectedly ({kind}); treated as a retry",
            )
        else:
            kind = type(result).__name__
            verdict = Retry(f"deliver() answered {kind}")
            self._warn(f"answer:{kind}", f"deliver() answered {kind}; treated as a retry")
        try:
            self._apply(batch, verdict)
        except Exception:
            log.failure("exporter {name}: handling an answer failed", name=self.name)

    def _apply(self, batch: _Batch, verdict: Verdict) -> None:
        now = self._now()
        if isinstance(verdict, Delivered):
            refused = [i for i in sorted(verdict.rejected) if 0 <= i < len(batch.events)]
            self._settle(batch, "sent")
            rejected = [(batch.events[i], verdict.rejected[i]) for i in refused]
            self._sent += len(batch.events) - len(rejected)
            envelopes = batch.envelopes
            if envelopes:
                skip = set(refused)
                self._report([e for i, e in enumerate(envelopes) if i not in skip], "sent")
            self._batches_sent += 1
            self._last_success = now
            self._recovered_from_failure()
            self._dead_letter_events(rejected, [envelopes[i] for i in refused if envelopes])
        elif isinstance(verdict, Rejected):
            self._batches_failed += 1
            self._error(f"rejected: {verdict.reason}")
            self._settle(batch, "dead_lettered")
            self._dead_letter_events(
                [(event, verdict.reason) for event in batch.events], batch.envelopes
            )
        else:
            self._batches_failed += 1
            self._error(verdict.reason)
            self._now_failing(verdict.reason)
            if batch.retries < self._settings.max_retries and self._state != CLOSED:
                delay = self._backoff(batch.retries, verdict.after)
                batch.retries += 1
                self._retries += 1
                batch.timer = self._later(delay, self._retry, batch)
                self._make_durable(batch)
                return
            _cancel(self._cooldown)  # another batch may have started one already
            self._cooldown = self._later(
                self._backoff(self._settings.max_retries, None), self._end_cooldown
            )
            self._settle(batch, "put_back")
            self._put_back(batch, "retries_exhausted")
        self._after_batch()

    def _retry(self, batch: _Batch) -> None:
        batch.timer = None
        if not batch.settled:
            self._attempt(batch)

    def retry_now(self) -> None:
        """The target says it is reachable again (the Redis connection is back): a
        batch waiting out a backoff is attempted now, and a pause ends."""
        if self._state == CLOSED:
            return
        for batch in list(self._active):
            if batch.timer is not None:
                _cancel(batch.timer)
                self._attempt(batch)
        if self._cooldown is not None:
            _cancel(self._cooldown)
            self._cooldown = None
        self._pump(flush=True)

    def _end_cooldown(self) -> None:
        self._cooldown = None
        self._pump()

    def _backoff(self, retries: int, after: float | None) -> float:
        settings = self._settings
        ceiling = min(settings.backoff_max, settings.backoff_min * 2.0 ** min(retries + 1, 64))
        delay = settings.backoff_min + self._random() * max(0.0, ceiling - settings.backoff_min)
        if after is not None:
            delay = max(delay, min(after, settings.backoff_max))
        return delay

    def _settle(self, batch: _Batch, outcome: str) -> None:
        """The batch's outcome is known; its segment (if any) is removed when it
        left for good, or waits again in the spool when it was put back."""
        batch.settled = True
        batch.outcome = outcome
        self._active.remove(batch)
        if batch.segment is not None and self._spool is not None:
            if outcome == "put_back":
                self._spool.checkin(batch.segment)
            else:
                self._spool.remove(batch.segment)

    def _put_back(self, batch: _Batch, no_spool_reason: str) -> None:
        """An undelivered batch goes (back) to the spool, or is dropped without one."""
        if batch.segment is not None:
            self._report(batch.envelopes, "spooled")  # it is there already
            return
        if batch.persisting:
            # Its write under way puts it there; until then it is on its way.
            write = next(w for w in self._writes if w.batch is batch)
            write.counted = len(batch.lines)
            self._writing_events += write.counted
            return
        if self._spool is None:
            self._drop(len(batch.lines), no_spool_reason)
            self._report(batch.envelopes, "dropped")
            return
        self._spool_async(batch)

    def _after_batch(self) -> None:
        if self._state == CLOSING and self._drained():
            self._finish_close(at_deadline=False)
        else:
            self._pump()

    # -- durable while failing --------------------------------------------------------

    def _now_failing(self, reason: str) -> None:
        if self._failing:
            return
        self._failing = True
        log.info(
            "exporter {name}: delivery failed ({reason}); retrying", name=self.name, reason=reason
        )
        if self._spool is not None and self._state == RUNNING:
            # The failing batch goes to disk at once (_make_durable); what waits in
            # memory every spool_interval.
            self._durable_timer = self._later(self._settings.spool_interval, self._durable_tick)

    def _recovered_from_failure(self) -> None:
        if not self._failing:
            return
        self._failing = False
        for call in (self._durable_timer, self._persist_timer):
            _cancel(call)
        self._durable_timer = self._persist_timer = None
        log.info("exporter {name}: sink delivers again", name=self.name)

    def _durable_tick(self) -> None:
        self._durable_timer = None
        if not self._failing or self._state != RUNNING:
            return
        try:
            self._persist_memory()
        except Exception:
            log.failure("exporter {name}: spooling failed", name=self.name)
        self._durable_timer = self._later(self._settings.spool_interval, self._durable_tick)

    def _persist_memory(self) -> None:
        """Everything in memory that is not on disk yet goes there: batches in flight
        or in backoff, then the buffer, oldest first."""
        if self._spool is None or not self._disk_usable():
            return
        for batch in list(self._active):
            self._make_durable(batch)
        self._persist_left = len(self._queue)
        self._persist_step()

    def _persist_batch(self) -> None:
        """While failing, a full batch goes to the spool as it fills up (next reactor
        turn), as it would go to the sink: memory holds about a batch, as when the
        sink is healthy, instead of a ``spool_interval``'s worth (a second of events
        kept alive made every young-generation collection of the cyclic GC
        several times longer: the outage's p99).  The tick takes the rest."""
        if self._spool is not None and self._state == RUNNING and self._persist_timer is None:
            self._persist_timer = self._later(0, self._persist_step)

    def _persist_step(self) -> None:
        """One segment of the buffer to the spool, and the next in the next reactor
        turn: a second's worth of events handed over in one turn was a stall of
        5-10 ms every ``spool_interval`` during an outage (the requests of that turn
        waited; the outage's p99).  The tick's events are on their way to disk
        within a few turns; those published meanwhile wait for the next tick."""
        self._persist_timer = None
        if not self._failing or self._state != RUNNING or self._spool is None:
            return
        if not self._persist_due() or not self._disk_usable():
            return
        batch = self._take_chunk(self._queue, for_spool=True)
        self._persist_left -= len(batch.entries) or 1  # or only undecodable events
        if batch.lines:
            self._spool_async(batch)
        if self._persist_due():
            self._persist_timer = self._later(0, self._persist_step)

    def _persist_due(self) -> bool:
        """What the tick left to spool, or a full batch."""
        queued = len(self._queue)
        return queued > 0 and (self._persist_left > 0 or queued >= self._settings.batch_size)

    def _make_durable(self, batch: _Batch) -> None:
        """Write a failing batch to the spool as it is retried (checked out: it is
        not replayed meanwhile, and removed once delivered)."""
        if (
            batch.segment is None
            and not batch.persisting
            and not batch.settled
            and self._spool is not None
            and self._disk_usable()
        ):
            self._spool_async(batch)

    # -- where events end -----------------------------------------------------------

    def _disk_usable(self) -> bool:
        return self._now() >= self._disk_refused_until

    def _spool_async(self, batch: _Batch) -> None:
        """Hand a batch to the spool; the write runs through ``run_blocking``.  Until
        it is done its events stay counted where they were: a batch in flight or
        retrying as such, anything else as ``spooling`` (a part of ``queued``)."""
        spool = self._spool
        assert spool is not None
        in_flight = batch in self._active
        try:
            pending, discarded = spool.begin(batch.lines, batch.first, batch.last)
        except ValueError as e:  # a bug: two segments at one ordinal
            self._warn("spool_write", f"spool write failed: {e}")
            if not in_flight:
                self._drop(len(batch.lines), "spool_write_failed")
                self._report(batch.envelopes, "dropped")
            return
        if pending is None:
            # The bound left no room for it (it is the oldest, or alone too big).
            discarded -= len(batch.lines)
        if discarded:
            self._drop(discarded, "spool_full")
            self._warn("spool_full", "the spool is full: its oldest events were discarded")
        if pending is None:
            if not in_flight:
                self._drop(len(batch.lines), "spool_full")
                self._report(batch.envelopes, "dropped")
            return
        write = _Write(pending, batch.entries, batch if in_flight or batch.settled else None)
        if write.batch is not None:
            batch.persisting = True
        if not in_flight:
            write.counted = len(batch.lines)
            self._writing_events += write.counted
        self._writes.append(write)
        self._spool_writes += 1
        try:
            done: Deferred[None] = self._run_blocking(lambda: spool.write(pending))
        except Exception:
            done = maybeDeferred(_broken_runner)
        done.addBoth(self._written, write)

    def _written(self, result: object, write: _Write) -> None:
        try:
            self._land(result, write)
        except Exception:
            log.failure("exporter {name}: finishing a spool write failed", name=self.name)
        if self._state == CLOSED:
            self._maybe_fire_closed()
        elif self._state == CLOSING and self._drained():
            self._finish_close(at_deadline=False)
        elif self._pump_timer is None:
            # What waited for this segment may go now; in a turn of its own, as a
            # write may land in the middle of sending or answering.
            self._pump_timer = self._later(0, self._pump_soon)

    def _land(self, result: object, write: _Write) -> None:
        spool = self._spool
        assert spool is not None
        self._writes.remove(write)
        self._writing_events -= write.counted
        batch = write.batch
        if batch is not None:
            batch.persisting = False
        if isinstance(result, Failure):
            spool.abort(write.pending)
            self._spool_write_errors += 1
            error = result.value
            reason = error.strerror if isinstance(error, OSError) else type(error).__name__
            self._disk_refused_until = self._now() + self._settings.spool_interval
            self._warn("spool_write", f"spool write failed ({reason}); kept in memory, retrying")
            if batch is None or batch.outcome == "put_back":
                self._back_in_memory(write.entries)
            return
        segment = spool.commit(write.pending)
        if batch is None or batch.outcome == "put_back":
            self._report([entry[1] for entry in write.entries], "spooled")
        elif not batch.settled:
            batch.segment = segment
            spool.checkout(segment)
        else:
            spool.remove(segment)  # delivered (or dead-lettered) while it was written

    def _back_in_memory(self, entries: list[_Entry]) -> None:
        """Events the disk refused wait in the buffer again; after the drain has
        ended there is nowhere left for them."""
        if self._state == CLOSED:
            self._drop(len(entries), "spool_write_failed")
            self._report([entry[1] for entry in entries], "dropped")
            return
        self._requeue(entries)

    def _spool_now(self, batch: _Batch, no_spool_reason: str) -> None:
        """Write a batch to the spool synchronously (the drain's end, after close)."""
        count = len(batch.lines)
        if not count:
            return
        if self._spool is None:
            self._drop(count, no_spool_reason)
            self._report(batch.envelopes, "dropped")
            return
        try:
            discarded = self._spool.append(batch.lines, batch.first, batch.last)
        except (OSError, ValueError) as e:
            self._drop(count, "spool_write_failed")
            self._report(batch.envelopes, "dropped")
            reason = e.strerror if isinstance(e, OSError) else str(e)
            self._warn("spool_write", f"spool write failed: {reason}")
            return
        self._report(batch.envelopes, "spooled")
        if discarded:
            self._drop(discarded, "spool_full")

    def _dead_letter_events(
        self, entries: list[tuple[dict[str, Any], str]], envelopes: Sequence[Envelope] = ()
    ) -> None:
        if not entries:
            return
        try:
            self._dead_letter.append(entries, self._now())
        except OSError as e:
            self._drop(len(entries), "dead_letter_failed")
            self._report(envelopes, "dropped")
            self._warn("dead_letter", f"dead-letter write failed: {e.strerror}")
        else:
            self._dead_lettered += len(entries)
            self._report(envelopes, "dead_lettered")

    def _report(self, envelopes: Iterable[Envelope], outcome: str) -> None:
        """Tell ``on_settled`` where these events ended; its errors are its own."""
        if self._on_settled is None:
            return
        for envelope in envelopes:
            try:
                self._on_settled(envelope, outcome)
            except Exception:
                log.failure("exporter {name}: on_settled failed", name=self.name)

    def _dead_letter_raw(self, lines: list[bytes], reason: str) -> None:
        if not lines:
            return
        try:
            self._dead_letter.append_raw(lines, reason, self._now())
        except OSError as e:
            self._drop(len(lines), "dead_letter_failed")
            self._warn("dead_letter", f"dead-letter write failed: {e.strerror}")
        else:
            self._dead_lettered += len(lines)

    def _drop(self, count: int, reason: str) -> None:
        self._dropped[reason] = self._dropped.get(reason, 0) + count

    # -- shutdown -------------------------------------------------------------------

    def stop(self, timeout: float) -> Deferred[None]:
        """Stop intake, flush, wait for deliveries; at ``timeout`` seconds spool the rest.

        Idempotent: every call returns a Deferred that fires when the first stop is
        done, by the deadline even if the sink never answers (``Lifecycle``).
        """
        if self._close_fired:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._close_waiters.append(waiter)
        if self._close_started:
            return waiter
        self._close_started = True
        self._state = CLOSING
        self._stop_loop()
        for call in (self._pump_timer, self._durable_timer, self._persist_timer):
            _cancel(call)
        self._pump_timer = self._durable_timer = self._persist_timer = None
        self._deadline = self._later(timeout, self._on_deadline)
        if not self._started or self._drained():
            self._finish_close(at_deadline=False)
        else:
            self._pump(flush=True)
        return waiter

    def reopen(self) -> Deferred[None]:
        """Have the sink reopen its files (SIGHUP); a no-op for a sink without any."""
        if isinstance(self._sink, ReopenableSink):
            return maybeDeferred(self._sink.reopen)
        return succeed(None)

    def _drained(self) -> bool:
        return not self._queue and not self._active and not self._writes

    def _on_deadline(self) -> None:
        self._deadline = None
        if self._state != CLOSED:
            self._finish_close(at_deadline=True)
        # Drained in time, but sink.close() (or a spool write) did not answer:
        # stop waiting for it.
        closing, self._sink_closing = self._sink_closing, None
        self._fire_closed()
        if closing is not None:
            closing.cancel()

    def _finish_close(self, *, at_deadline: bool) -> None:
        if self._state == CLOSED:
            return
        self._state = CLOSED
        self._stop_loop()
        for call in (self._pump_timer, self._cooldown, self._durable_timer, self._persist_timer):
            _cancel(call)
        self._pump_timer = self._cooldown = self._durable_timer = self._persist_timer = None
        for batch in sorted(self._active, key=lambda b: b.first):
            _cancel(batch.timer)
            batch.timer = None
            deferred, batch.deferred = batch.deferred, None
            self._settle(batch, "put_back")
            if deferred is not None:
                deferred.cancel()  # its answer is ignored: the batch is settled
            if batch.segment is None and not batch.persisting:
                self._spool_now(batch, "shutdown_no_spool")
            else:
                self._put_back(batch, "shutdown_no_spool")
        while self._queue:
            self._spool_now(self._take_chunk(self._queue), "shutdown_no_spool")
        while self._late:
            self._spool_now(self._take_chunk(self._late), "closed")
        try:
            closing: Deferred[Any] = maybeDeferred(self._sink.close)
        except Exception:  # pragma: no cover - maybeDeferred does not raise
            closing = succeed(None)
        closing.addErrback(self._sink_close_failed)
        if at_deadline:
            self._sink_closed_done = True
            return
        self._sink_closing = closing
        closing.addBoth(self._sink_closed)

    def _sink_close_failed(self, failure: Failure) -> None:
        self._warn("sink_close", f"sink close failed: {failure.getErrorMessage()}")

    def _sink_closed(self, _: object) -> None:
        self._sink_closing = None
        self._sink_closed_done = True
        self._maybe_fire_closed()

    def _maybe_fire_closed(self) -> None:
        """Closed once the sink closed and the last spool writes landed."""
        if self._sink_closed_done and not self._writes:
            self._fire_closed()

    def _fire_closed(self) -> None:
        if self._close_fired:
            return
        self._close_fired = True
        _cancel(self._deadline)
        self._deadline = None
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _stop_loop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    # -- reporting ------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The accounting and health of this exporter (see the module docstring)."""
        in_flight = sum(len(b.events) for b in self._active if b.timer is None)
        retrying = sum(len(b.events) for b in self._active if b.timer is not None)
        queued = len(self._queue) + retrying + len(self._late) + self._writing_events
        spooled = self._spool.event_count if self._spool is not None else 0
        times = [
            b.enqueued_at for b in self._active if b.timer is not None and b.enqueued_at is not None
        ]
        if self._queue:
            times.append(self._queue[0][3])
        oldest_age = max(0.0, self._now() - min(times)) if times else 0.0
        return {
            "accepted": self._accepted,
            "sent": self._sent,
            "in_flight": in_flight,
            "queued": queued,
            "spooled": spooled,
            "dead_lettered": self._dead_lettered,
            "dropped": sum(self._dropped.values()),
            "dropped_by_reason": dict(self._dropped),
            "recovered": self._recovered,
            "retrying": retrying,
            "spooling": self._writing_events,
            "replayed": self._replayed,
            "after_close": self._after_close,
            "retries": self._retries,
            "batches_sent": self._batches_sent,
            "batches_failed": self._batches_failed,
            "spool_writes": self._spool_writes,
            "spool_write_errors": self._spool_write_errors,
            "failing": self._failing,
            "queue_depth": len(self._queue),
            "queue_bytes": self._queue_bytes,
            "oldest_queued_age_s": oldest_age,
            "spool_bytes": self._spool.size_bytes if self._spool is not None else 0,
            "spool_segments": self._spool.segment_count if self._spool is not None else 0,
            "last_success": self._last_success,
            "last_error": self._last_error,
            "last_error_at": self._last_error_at,
            "state": self._state,
        }

    def _later(self, delay: float, call: Callable[..., object], *args: object) -> IDelayedCall:
        timer: IDelayedCall = self._clock.callLater(delay, call, *args)  # type: ignore[misc, arg-type]
        return timer

    def _now(self) -> float:
        now: float = self._clock.seconds()  # type: ignore[misc]
        return now

    def _error(self, message: str) -> None:
        self._last_error = message
        self._last_error_at = self._now()

    def _warn(self, key: str, message: str) -> None:
        """Log a problem once per exporter (stats keep counting); never at error level:
        these are expected failure paths, not bugs."""
        self._error(message)
        if key in self._warned:
            return
        self._warned.add(key)
        log.warn("exporter {name}: {message}", name=self.name, message=message)


def _broken_runner() -> None:
    raise RuntimeError("run_blocking raised")
