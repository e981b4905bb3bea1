"""The Redis Streams bus, the proxy's side: a target of the one delivery engine
(tests: tests/unit/redis/test_stream.py, tests/integration/test_redis_bus.py).

With ``[events] bus = redis`` the bus is the in-memory fan-out
(llmproxy/export/bus.py) with one more subscriber: a ``BatchingExporter``
(llmproxy/export/exporter.py) whose sink is ``RedisStreamSink``.  Its delivery is
``XADD <stream> MAXLEN ~ <maxlen> * event <json>`` for every event of a batch, in
one round trip (one ``EVAL`` of a small script that runs the XADDs; where scripts
are refused, pipelined XADDs).  ``llmproxy dispatcher`` processes read the stream
(llmproxy/redis/dispatcher.py).  Everything else (the bounded buffer, batching: a
batch goes once ``SEND_AT`` events wait, or every ``flush_interval``, and takes up to
``batch_size``, so batches grow with the backlog; retries with backoff, the disk spool
while Redis is away, replay in order, accounting, the drain) is the engine's, so it
holds for the Redis bus exactly as for the sinks.

Redis unreachable.  Requests never wait for Redis: a batch sent while there is no
usable connection is answered ``Retry`` at once, and the engine writes what waits
in memory to the spool every ``spool_interval`` while Redis is away; a ``kill -9``
then loses at most that interval.  A batch whose XADDs failed half-way (the
connection lost, Redis refused) is sent again: the stream may hold some of its
events twice (at least once).  When the connection is back, the waiting batch is
retried at once and the spool replayed, oldest first, before newer events.

Stats (``stats()``, ``llmproxy_bus_*`` metrics) are the engine's, under the
names this bus always had: ``published`` (confirmed by Redis), ``batches``,
``replayed``, ``connected`` ...
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.config.model import ExporterSettings, RedisSettings, Settings
from llmproxy.events.envelope import Envelope
from llmproxy.export.bus import MemoryBus
from llmproxy.export.deadletter import DeadLetter
from llmproxy.export.exporter import BatchingExporter, run_here
from llmproxy.export.spool import Spool
from llmproxy.export.verdict import Delivered, Rejected, Retry, Verdict
from llmproxy.interfaces import RedisClient, RunBlocking, Subscriber

__all__ = [
    "ERROR_PAUSE",
    "TARGET",
    "XADD_SCRIPT",
    "RedisBus",
    "RedisStreamSink",
    "build_redis_bus",
    "target_settings",
]

log = Logger()

TARGET = "redis-bus"  # the engine's name for the stream target (logs, spool directory)
SEND_AT = 10  # events: a batch goes once this many wait (up to batch_size)
ERROR_PAUSE = 1.0  # seconds before a batch Redis refused is sent again

# One round trip per batch: the XADDs run in Redis.  KEYS[1] the stream, ARGV[1]
# the MAXLEN, ARGV[2] the batch's events, one JSON document a line (JSON as the
# proxy writes it never holds a raw newline).  One argument rather than one per
# event: encoding a command costs the client per argument (measured with
# txredisapi: 2-5 us per 1 KB argument, against one join for the whole batch).
# Returns how many events were added.
XADD_SCRIPT = """
local n = 0
for line in string.gmatch(ARGV[2], '[^\\n]+') do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'event', line)
  n = n + 1
end
return n
"""


@attrs.define(eq=False)
class RedisStreamSink:
    """Delivers a batch as XADDs to the stream; the engine's sink for the Redis bus."""

    _settings: RedisSettings
    _client: RedisClient
    name: str = TARGET
    _scripts: bool = attrs.field(init=False, default=True)  # EVAL allowed so far

    @property
    def connected(self) -> bool:
        return self._client.usable

    def deliver(self, events: Sequence[dict[str, Any]]) -> Deferred[Verdict]:
        import orjson

        return self.deliver_lines(events, [orjson.dumps(event) for event in events])

    def deliver_lines(
        self, events: Sequence[dict[str, Any]], lines: Sequence[bytes]
    ) -> Deferred[Verdict]:
        """XADD each line; ``Delivered`` once Redis confirmed them all."""
        settings = self._settings
        if self._scripts:
            joined = b"\n".join(lines)
            if joined.count(b"\n") != len(lines) - 1:
                return succeed(Rejected("an event's JSON holds a raw newline"))
            d = self._client.execute(
                "EVAL", XADD_SCRIPT, 1, settings.stream, settings.maxlen, joined
            )
        else:
            d = gatherResults(
                [
                    self._client.execute(
                        "XADD", settings.stream, "MAXLEN", "~", settings.maxlen, "*", "event", line
                    )
                    for line in lines
                ],
                consumeErrors=True,
            )
        return d.addBoth(self._judge, len(lines))

    def _judge(self, result: object, count: int) -> Verdict:
        from llmproxy.redis.connection import RedisUnavailable, is_response_error

        if not isinstance(result, Failure):
            if self._scripts and result != count:
                return Retry(f"the XADD script added {result!r} of {count} events")
            return Delivered()
        error = result
        if isinstance(error.value, FirstError):
            error = error.value.subFailure
        if error.check(RedisUnavailable):
            return Retry(f"Redis unavailable: {error.getErrorMessage()}")
        if self._scripts and (
            is_response_error(error, "NOPERM")
            or is_response_error(error, "unknown command")
            or is_response_error(error, "NOSCRIPT")
        ):
            # Scripting is off for this user or server: XADDs, pipelined.
            self._scripts = False
            log.info("redis bus: EVAL refused ({why}); using pipelined XADD", why=_brief(error))
            return Retry("EVAL refused; retrying with XADD", after=0.0)
        # Redis answered but refused (OOM, a wrong type...): try again a bit later.
        return Retry(f"Redis refused XADD: {_brief(error)}", after=ERROR_PAUSE)

    def close(self) -> Deferred[None]:
        return self._client.stop()


def _brief(failure: Failure) -> str:
    return f"{type(failure.value).__name__}: {failure.getErrorMessage()}"[:300]


def target_settings(redis: RedisSettings) -> ExporterSettings:
    """The engine's settings for the stream target, from ``[redis]``."""
    return ExporterSettings(
        name=TARGET,
        type="redis",
        buffer=redis.publish_buffer,
        batch_size=redis.batch_size,
        flush_interval=redis.flush_interval,
        max_in_flight=1,  # the stream receives events in publish order
        timeout=redis.timeout,
        max_retries=10,
        backoff_min=0.1,  # Redis' reconnection backs off from 0.1 s to 2 s too
        backoff_max=2.0,
        spool_max_bytes=redis.spool_max_bytes,
        spool_interval=redis.spool_interval,
    )


@attrs.define(eq=False)
class RedisBus:
    """The fan-out to local subscribers plus the engine that feeds the stream."""

    _settings: RedisSettings
    _client: RedisClient
    _clock: IReactorTime
    _spool: Spool | None
    _run_blocking: RunBlocking = run_here
    _dead_letter: DeadLetter | None = None
    _random: Callable[[], float] = _random.random

    _fanout: MemoryBus = attrs.field(init=False, factory=MemoryBus)
    _sink: RedisStreamSink = attrs.field(init=False)
    _exporter: BatchingExporter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._sink = RedisStreamSink(self._settings, self._client)
        dead_letter = self._dead_letter
        if dead_letter is None:
            # Redis refuses no event for good: the file is not expected to be written.
            base = self._spool.directory.parent if self._spool is not None else Path(".")
            dead_letter = DeadLetter(base / "deadletter" / f"{TARGET}.jsonl", TARGET)
        self._exporter = BatchingExporter(
            target_settings(self._settings),
            self._sink,
            self._clock,
            self._spool,
            dead_letter,
            self._random,
            run_blocking=self._run_blocking,
            send_at=min(SEND_AT, self._settings.batch_size),
        )
        self._fanout.subscribe(self._exporter)
        self._client.when_ready(self._exporter.retry_now)

    @property
    def exporter(self) -> BatchingExporter:
        return self._exporter

    # -- the EventBus interface ------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> None:
        """Local subscribers get every envelope too, as on the memory bus."""
        self._fanout.subscribe(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber is not self._exporter:
            self._fanout.unsubscribe(subscriber)

    def publish(self, envelope: Envelope) -> None:
        """Hand one event to every subscriber and to the stream's engine: O(1)."""
        self._fanout.publish(envelope)

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """Connect, and start the engine (its spool is replayed once Redis answers)."""
        self._client.start()
        self._exporter.start()

    def stop(self, timeout: float) -> Deferred[None]:
        """Send what is queued; at ``timeout`` spool the rest; close the connection."""
        return self._exporter.stop(timeout)

    def stats(self) -> dict[str, Any]:
        """The engine's accounting, under the bus's names (module docstring)."""
        s = self._exporter.stats()
        fanout = self._fanout.stats()
        return {
            "type": "redis",
            "accepted": s["accepted"],
            "published": s["sent"],
            "in_flight": s["in_flight"],
            "queued": s["queued"],
            "spooled": s["spooled"],
            "dropped": s["dropped"],
            "dropped_by_reason": s["dropped_by_reason"],
            "recovered": s["recovered"],
            "replayed": s["replayed"],
            "retrying": s["retrying"],
            "spooling": s["spooling"],
            "batches": s["batches_sent"],
            "batches_failed": s["batches_failed"],
            "after_close": s["after_close"],
            "subscribers": fanout["subscribers"] - 1,  # the engine is not a local one
            "subscriber_errors": fanout["subscriber_errors"],
            "connected": self._sink.connected,
            "spool_bytes": s["spool_bytes"],
            "spool_segments": s["spool_segments"],
            "last_success": s["last_success"],
            "last_error": s["last_error"],
            "last_error_at": s["last_error_at"],
            "state": s["state"],
        }


def build_redis_bus(
    settings: Settings, reactor: Any, run_blocking: RunBlocking = run_here
) -> RedisBus:
    """The bus for ``[events] bus = redis``: its connection and its spool under
    ``state_dir`` (``spool_max_bytes <= 0`` would disable it; config refuses that)."""
    from llmproxy.redis.connection import RedisConnection, parse_redis_url

    redis = settings.redis
    state_dir = settings.server.state_dir
    directory = redis.spool_dir if redis.spool_dir is not None else Path("spool") / "redis-bus"
    if not directory.is_absolute():
        directory = state_dir / directory
    connection = RedisConnection(
        reactor, parse_redis_url(redis.url), redis.timeout, "llmproxy-proxy"
    )
    return RedisBus(
        redis,
        connection,
        reactor,
        Spool(directory, redis.spool_max_bytes),
        run_blocking,
        DeadLetter(state_dir / "deadletter" / f"{TARGET}.jsonl", TARGET),
    )
