"""The Redis Streams event bus, the proxy's side (tests: tests/unit/test_redis_bus.py,
tests/integration/test_redis_bus.py).

``publish`` is O(1) and never waits: the envelope is appended to a bounded
in-memory queue (and handed to local subscribers, like the memory bus).  A
flusher, on the injected clock, sends the queue to Redis as pipelined batches of
``XADD <stream> MAXLEN ~ <maxlen> * event <json>`` (one round trip per batch);
it runs every ``flush_interval`` and as soon as ``batch_size`` events wait.
``llmproxy dispatcher`` processes read the stream (llmproxy/dispatch.py).

Redis unreachable.  Requests never wait for Redis: while there is no usable
connection the flusher writes the queue to the disk spool (llmproxy/export/spool.py,
one segment per batch), so an outage costs memory for one flush interval at most
and the events survive a proxy restart.  A batch whose XADDs failed (connection
lost, timeout, an error reply) is spooled too: some of its entries may have
reached the stream, so a replay can add duplicates (at-least-once).  When the
connection is back the spool is replayed oldest first, one segment at a time,
before the queue: with one batch in flight (always) the stream receives events
in publish order, across outages and restarts.  After an error reply the flusher
pauses for a second (Redis is up but refusing, e.g. out of memory) and spools
meanwhile.

Buffer full.  With more than ``publish_buffer`` events queued, the oldest
``batch_size`` are spilled to the spool; without a spool, the new event is
dropped and counted.

Accounting, at every moment (``stats()``)::

    accepted = published + in_flight + queued + spooled + dropped

``accepted`` counts every publish plus the events recovered from the spool at
start (``recovered``); ``published`` the events Redis confirmed; ``dropped`` is
split by reason: ``buffer_full`` (no spool), ``spool_full``,
``spool_write_failed``, ``spool_read_failed``, ``spool_corrupt``,
``encode_failed``, ``bad_envelope``, ``closed`` (published after close, no spool),
``shutdown_no_spool``.

Close.  ``close(timeout)`` stops the timer, sends what is queued, and at the
deadline spools what is left (the batch in flight too); then the connection is
closed.  With older events in the spool, the queue is spooled behind them rather
than sent ahead of them.  Idempotent; a publish after close is spooled or counted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.bus.base import Subscriber
from llmproxy.export.envelope import Envelope
from llmproxy.export.spool import Segment, Spool
from llmproxy.settings import RedisSettings, Settings

log = Logger()

RUNNING = "running"
CLOSING = "closing"
CLOSED = "closed"
ERROR_PAUSE = 1.0  # seconds without XADD after Redis refused a batch


class RedisClient(Protocol):
    """What the bus needs from a connection (``RedisConnection``, or a fake)."""

    @property
    def usable(self) -> bool: ...

    def when_ready(self, callback: Callable[[], object]) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> Deferred[None]: ...

    def abort(self) -> None: ...

    def execute(
        self, *args: bytes | str | int | float, timeout: float | None = ...
    ) -> Deferred[Any]: ...


@attrs.define(eq=False)
class _Flight:
    """The one batch on its way to Redis."""

    lines: list[bytes] = attrs.field(repr=False)
    first: int
    last: int
    segment: Segment | None  # the spool segment it replays
    entries: list[tuple[int, Envelope]] = attrs.field(factory=list, repr=False)  # from the queue
    deferred: Deferred[Any] | None = None
    settled: bool = False


@attrs.define(eq=False)
class RedisBus:
    """Publishes envelopes to a Redis stream; see the module docstring."""

    _settings: RedisSettings
    _client: RedisClient
    _clock: IReactorTime
    _spool: Spool | None

    _state: str = attrs.field(init=False, default=RUNNING)
    _started: bool = attrs.field(init=False, default=False)
    _subscribers: tuple[Subscriber, ...] = attrs.field(init=False, default=())
    _queue: deque[tuple[int, Envelope]] = attrs.field(init=False, factory=deque)
    _flight: _Flight | None = attrs.field(init=False, default=None)
    _next_ordinal: int = attrs.field(init=False, default=0)
    _loop: LoopingCall | None = attrs.field(init=False, default=None)
    _soon: IDelayedCall | None = attrs.field(init=False, default=None)
    _paused: IDelayedCall | None = attrs.field(init=False, default=None)
    _deadline: IDelayedCall | None = attrs.field(init=False, default=None)
    _closed: Deferred[None] | None = attrs.field(init=False, default=None)
    _close_fired: bool = attrs.field(init=False, default=False)
    _close_waiters: list[Deferred[None]] = attrs.field(init=False, factory=list)
    _warned: set[str] = attrs.field(init=False, factory=set)
    # counters
    _accepted: int = attrs.field(init=False, default=0)
    _recovered: int = attrs.field(init=False, default=0)
    _published: int = attrs.field(init=False, default=0)
    _dropped: dict[str, int] = attrs.field(init=False, factory=dict)
    _batches: int = attrs.field(init=False, default=0)
    _batches_failed: int = attrs.field(init=False, default=0)
    _replayed: int = attrs.field(init=False, default=0)
    _subscriber_errors: int = attrs.field(init=False, default=0)
    _after_close: int = attrs.field(init=False, default=0)
    _last_success: float | None = attrs.field(init=False, default=None)
    _last_error: str | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        if self._spool is not None:
            self._recovered = self._accepted = self._spool.event_count
            self._next_ordinal = self._spool.next_ordinal
        self._client.when_ready(self._on_connected)

    # -- the EventBus interface ------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> None:
        """Local subscribers get every envelope too, as on the memory bus."""
        if not any(s is subscriber for s in self._subscribers):
            self._subscribers = (*self._subscribers, subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)

    def publish(self, envelope: Envelope) -> None:
        """Queue one event for Redis: O(1), never waits, never raises."""
        self._accepted += 1
        for subscriber in self._subscribers:
            try:
                subscriber.publish(envelope)
            except Exception as e:
                self._subscriber_errors += 1
                self._warn(
                    f"subscriber:{type(e).__name__}", f"a subscriber raised {type(e).__name__}"
                )
        try:
            if self._state == CLOSED:
                self._after_close += 1
                self._spool_entries([(self._take_ordinal(), envelope)], "closed")
                return
            if len(self._queue) >= self._settings.publish_buffer:
                if self._spool is None:
                    self._drop(1, "buffer_full")
                    return
                self._spill_oldest()
            self._queue.append((self._take_ordinal(), envelope))
            if (
                self._soon is None
                and self._started
                and len(self._queue) >= self._settings.batch_size
                and self._flight is None
            ):
                # Batches go out off the request path, in the next reactor turn.
                self._soon = self._clock.callLater(0, self._flush_soon)  # type: ignore[misc, arg-type]
        except Exception:
            log.failure("redis bus: publish failed")

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """Connect, start the flush timer, replay the spool once Redis answers."""
        if self._started or self._state != RUNNING:
            return
        self._started = True
        self._client.start()
        loop = LoopingCall(self._flush, True)
        loop.clock = self._clock
        self._loop = loop
        loop.start(self._settings.flush_interval, now=False).addErrback(self._loop_failed)

    def close(self, timeout: float) -> Deferred[None]:
        """Send what is queued; at ``timeout`` spool the rest; close the connection.

        Idempotent: every call fires when the first close is done."""
        if self._close_fired:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._close_waiters.append(waiter)
        if self._state != RUNNING:
            return waiter
        self._state = CLOSING
        self._stop_loop()
        self._cancel_soon()
        self._deadline = self._clock.callLater(timeout, self._on_deadline)  # type: ignore[misc, arg-type]
        if not self._started:
            self._finish()
            return waiter
        if self._spool is not None and self._spool.event_count and self._queue:
            # Older events wait on disk: the queue goes behind them, not ahead.
            self._spool_queue("shutdown_no_spool")
        self._flush(True)
        return waiter

    def _check_drained(self) -> None:
        if self._state == CLOSING and not self._queue and self._flight is None:
            self._finish()

    def _on_deadline(self) -> None:
        self._deadline = None
        self._finish()

    def _finish(self) -> None:
        if self._state == CLOSED:
            return
        self._state = CLOSED
        self._stop_loop()
        self._cancel_soon()
        for call in (self._paused, self._deadline):
            if call is not None and call.active():  # type: ignore[misc]
                call.cancel()  # type: ignore[misc]
        self._paused = self._deadline = None
        flight, self._flight = self._flight, None
        if flight is not None:
            flight.settled = True
            self._put_back(flight)
            if flight.deferred is not None:
                flight.deferred.cancel()
        self._spool_queue("shutdown_no_spool")
        stopping = self._client.stop() if self._started else succeed(None)
        stopping.addErrback(lambda f: self._warn("stop", f"closing: {f.getErrorMessage()}"))
        stopping.addBoth(lambda _: self._fire_closed())

    def _fire_closed(self) -> None:
        if self._close_fired:
            return
        self._close_fired = True
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _stop_loop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _cancel_soon(self) -> None:
        if self._soon is not None and self._soon.active():  # type: ignore[misc]
            self._soon.cancel()  # type: ignore[misc]
        self._soon = None

    def _loop_failed(self, failure: Failure) -> None:
        self._warn("loop", f"flush timer stopped: {failure.getErrorMessage()}")

    # -- flushing --------------------------------------------------------------------

    def _on_connected(self) -> None:
        if self._state != CLOSED and self._started:
            self._flush(True)

    def _flush_soon(self) -> None:
        self._soon = None
        self._flush(False)

    def _flush(self, partial: bool) -> None:
        """Send the next batch: the oldest spool segment first, then the queue.

        Without a usable connection (or while paused after an error reply), the
        queue goes to the spool instead.  A drain ends here once nothing is left."""
        try:
            self._flush_once(partial)
        except Exception:
            log.failure("redis bus: flushing failed")
        if self._state == CLOSING:
            self._check_drained()

    def _flush_once(self, partial: bool) -> None:
        if self._flight is not None or self._state == CLOSED or not self._started:
            return
        if not self._client.usable or self._paused is not None:
            if self._spool is not None:
                self._spool_queue("spool_write_failed")
            return
        segment = self._replay_candidate()
        if segment is not None:
            self._replay(segment)
        elif self._queue and (
            partial or self._state == CLOSING or len(self._queue) >= self._settings.batch_size
        ):
            self._send_queue_batch()

    def _replay_candidate(self) -> Segment | None:
        if self._spool is None:
            return None
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
            self._flush(True)
            return
        if contents.corrupt or len(contents.lines) != segment.count:
            # A torn or edited file: send what is sendable, count the rest.
            spool.remove(segment)
            found = len(contents.lines) + len(contents.corrupt)
            if found > segment.count:
                self._accepted += found - segment.count
                self._recovered += found - segment.count
            self._drop(len(contents.corrupt) + max(0, segment.count - found), "spool_corrupt")
            if contents.lines:
                self._send(_Flight(contents.lines, segment.first, segment.last, None))
            else:
                self._flush(True)
            return
        spool.checkout(segment)
        self._replayed += segment.count
        self._send(_Flight(contents.lines, segment.first, segment.last, segment))

    def _send_queue_batch(self) -> None:
        lines: list[bytes] = []
        entries: list[tuple[int, Envelope]] = []
        while self._queue and len(lines) < self._settings.batch_size:
            entry = self._queue.popleft()
            try:
                lines.append(entry[1].json())
            except Exception:
                self._drop(1, "encode_failed")
                self._warn("encode", "an event could not be encoded; event dropped")
                continue
            entries.append(entry)
        if lines:
            self._send(_Flight(lines, entries[0][0], entries[-1][0], None, entries))

    def _send(self, flight: _Flight) -> None:
        settings = self._settings
        self._flight = flight
        xadds = [
            self._client.execute(
                "XADD", settings.stream, "MAXLEN", "~", settings.maxlen, "*", "event", line
            )
            for line in flight.lines
        ]
        d: Deferred[Any] = gatherResults(xadds, consumeErrors=True)
        flight.deferred = d
        d.addBoth(self._on_answer, flight)

    def _on_answer(self, result: object, flight: _Flight) -> None:
        if flight.settled:
            return  # settled at the deadline: already spooled
        flight.settled = True
        flight.deferred = None
        self._flight = None
        try:
            if isinstance(result, Failure):
                self._failed(flight, result)
            else:
                self._published += len(flight.lines)
                self._batches += 1
                self._last_success = self._now()
                if flight.segment is not None and self._spool is not None:
                    self._spool.remove(flight.segment)
        except Exception:
            log.failure("redis bus: handling a reply failed")
        # Keep going while there is work: the spool and full batches right away
        # (a drain sends everything; _flush ends it when nothing is left).
        self._flush(self._state == CLOSING or self._spool_waiting())

    def _spool_waiting(self) -> bool:
        return self._spool is not None and self._spool.oldest() is not None

    def _failed(self, flight: _Flight, result: Failure) -> None:
        from llmproxy.bus.redisconn import RedisUnavailable

        self._batches_failed += 1
        error = result.value
        if isinstance(error, FirstError):
            error = error.subFailure.value
        reason = f"{type(error).__name__}: {error}"
        self._last_error = reason
        self._put_back(flight)
        if not isinstance(error, RedisUnavailable):
            # Redis answered but refused: pause, spooling meanwhile.
            self._warn(
                f"refused:{type(error).__name__}", f"Redis refused XADD ({reason}); spooling"
            )
            self._paused = self._clock.callLater(ERROR_PAUSE, self._end_pause)  # type: ignore[misc, arg-type]

    def _end_pause(self) -> None:
        self._paused = None
        self._flush(True)

    def _put_back(self, flight: _Flight) -> None:
        """An unconfirmed batch goes (back) to the spool, or back to the head of the
        queue without one."""
        if flight.segment is not None:
            if self._spool is not None:
                self._spool.checkin(flight.segment)
            return
        if self._spool is None:
            if self._state == CLOSED:
                self._drop(len(flight.lines), "shutdown_no_spool")
            else:
                self._queue.extendleft(reversed(flight.entries))  # back at the head, in order
            return
        self._spool_lines(flight.lines, flight.first, flight.last)

    # -- the spool -------------------------------------------------------------------

    def _spill_oldest(self) -> None:
        chunk = [
            self._queue.popleft() for _ in range(min(len(self._queue), self._settings.batch_size))
        ]
        self._spool_entries(chunk, "buffer_full")

    def _spool_queue(self, no_spool_reason: str) -> None:
        while self._queue:
            chunk = [
                self._queue.popleft()
                for _ in range(min(len(self._queue), self._settings.batch_size))
            ]
            self._spool_entries(chunk, no_spool_reason)

    def _spool_entries(self, entries: list[tuple[int, Envelope]], no_spool_reason: str) -> None:
        if self._spool is None:
            self._drop(len(entries), no_spool_reason)
            return
        lines: list[bytes] = []
        ordinals: list[int] = []
        for ordinal, envelope in entries:
            try:
                lines.append(envelope.json())
                ordinals.append(ordinal)
            except Exception:
                self._drop(1, "encode_failed")
        if lines:
            self._spool_lines(lines, ordinals[0], ordinals[-1])

    def _spool_lines(self, lines: list[bytes], first: int, last: int) -> None:
        assert self._spool is not None
        try:
            discarded = self._spool.append(lines, first, last)
        except (OSError, ValueError) as e:
            self._drop(len(lines), "spool_write_failed")
            reason = e.strerror if isinstance(e, OSError) else str(e)
            self._warn("spool_write", f"spool write failed: {reason}")
            return
        if discarded:
            self._drop(discarded, "spool_full")
            self._warn("spool_full", "the spool is full: its oldest events were discarded")

    # -- helpers ---------------------------------------------------------------------

    def _take_ordinal(self) -> int:
        ordinal = self._next_ordinal
        self._next_ordinal += 1
        return ordinal

    def _drop(self, count: int, reason: str) -> None:
        self._dropped[reason] = self._dropped.get(reason, 0) + count

    def _now(self) -> float:
        now: float = self._clock.seconds()  # type: ignore[misc]
        return now

    def _warn(self, key: str, message: str) -> None:
        """Log a problem once per bus (stats keep counting); a warning, not an error."""
        self._last_error = message
        if key in self._warned:
            return
        self._warned.add(key)
        log.warn("redis bus: {message}", message=message)

    def stats(self) -> dict[str, Any]:
        """The accounting and health of the bus (see the module docstring)."""
        flight = self._flight
        in_flight = len(flight.lines) if flight is not None else 0
        spooled = self._spool.event_count if self._spool is not None else 0
        usable = self._client.usable
        return {
            "type": "redis",
            "accepted": self._accepted,
            "published": self._published,
            "in_flight": in_flight,
            "queued": len(self._queue),
            "spooled": spooled,
            "dropped": sum(self._dropped.values()),
            "dropped_by_reason": dict(self._dropped),
            "recovered": self._recovered,
            "replayed": self._replayed,
            "batches": self._batches,
            "batches_failed": self._batches_failed,
            "after_close": self._after_close,
            "subscribers": len(self._subscribers),
            "subscriber_errors": self._subscriber_errors,
            "connected": usable,
            "spool_bytes": self._spool.size_bytes if self._spool is not None else 0,
            "spool_segments": self._spool.segment_count if self._spool is not None else 0,
            "last_success": self._last_success,
            "last_error": self._last_error,
            "state": self._state,
        }


def build_redis_bus(settings: Settings, reactor: Any) -> RedisBus:
    """The bus for ``[events] bus = redis``: its connection and its spool under
    ``state_dir`` (``spool_max_bytes <= 0`` would disable it; config refuses that)."""
    from llmproxy.bus.redisconn import RedisConnection, parse_redis_url

    redis = settings.redis
    state_dir = settings.server.state_dir
    directory = redis.spool_dir if redis.spool_dir is not None else Path("spool") / "redis-bus"
    if not directory.is_absolute():
        directory = state_dir / directory
    connection = RedisConnection(
        reactor, parse_redis_url(redis.url), redis.timeout, "llmproxy-proxy"
    )
    return RedisBus(redis, connection, reactor, Spool(directory, redis.spool_max_bytes))
