"""From captured exchanges to events, once the reactor has sent what the request
path wrote (tests: tests/unit/capture/test_pump.py,
tests/integration/test_sessions_e2e.py, tests/integration/test_capture_after_send.py).

The proxy only queues: ``request_started(record, body)`` when a request goes
upstream or is answered from the response cache, ``request_finished(record)``
when its exchange ended.  After the reactor's next poll, which hands the
request to its upstream or the reply's last bytes to the client,
:meth:`CapturePump.flush` takes everything queued, in order: the session
tracker assigns the request its session (and later reads the reply), each event
is built and encoded to JSON once, and the envelope goes to the bus.  A cache
hit's record holds the entry's chunks uncaptured (``record.replayed``): they are
teed into the capture here, before the tracker reads the reply, so a hit costs
the request path no copying.

Why not on the request path: none of this changes what the client or the
upstream see, and it is most of what instrumentation costs.  Why every turn and
not in the exporters' batches: a batch of events built in one go is a stall of
milliseconds for whichever request is waiting meanwhile (the c1 p99); built a
turn's worth at a time, each turn does only what the turn before brought in.
Exporters then find the JSON ready (``Envelope.json()`` memoises it) and their
batches are only collected and written.

The tokens an answer used are counted per project here too (``usage``, the
proxy metrics' :meth:`~llmproxy.proxy.metrics.ProxyMetrics.usage`), read from the
response event just built: no second parse of the body.  The answer is priced
here (``pricer``, llmproxy/pricing/: the event's ``cost``), and whoever counts
spend (``spent``: the metrics by project and model, the token budgets) is told
once the event is built, off the request path and after the exchange ended.

Order is kept: a request's start is handled before its end, and requests in the
order they went upstream, so the tracker sees turns of a conversation in the
order they happened.

With ``[state] store = redis`` the tracker decides a request's session in Redis
(its ``assign`` answers with a Deferred): the request's event, and its response
event after it, wait until it is decided (a round trip, shared by the requests
of a turn; up to ``[state] continuation_wait`` for a turn whose history another
process has not recorded yet).  Only they wait: the events of other exchanges
go out meanwhile, so across exchanges events are published in the order their
sessions are known, not always in the order of the queue (a session's own
events stay in order: its ``session_start`` or ``fork`` comes before its
request event, and its turns are decided one after the other).  The tracker
goes on with the next entries, so its operations reach Redis in the order of
the queue.

Bounded: one turn handles what fits in ``TURN_BUDGET`` (5 ms; the entry that
crosses it is finished), the rest in the next turn, after the reactor has served
whatever arrived meanwhile.  With the tracker's own bound on what it parses
(``[sessions] max_body_bytes``), no burst of large conversations holds the
reactor for longer than that.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from llmproxy.capture.events import RecordEnvelope, prepare_request
from llmproxy.capture.record import ExchangeRecord
from llmproxy.capture.sessions import SessionTracker
from llmproxy.config.model import CaptureSettings
from llmproxy.pricing import Pricer

__all__ = ["CapturePump", "Publisher", "SpendListener", "Tracker"]

log = Logger()


class Tracker(Protocol):
    """The session tracker's side (llmproxy.capture.sessions.SessionTracker)."""

    @property
    def max_body_bytes(self) -> int: ...

    def assign(self, record: ExchangeRecord, body: bytes) -> Deferred[None] | None:
        """None: decided now; else a Deferred (never failing) for when it is."""

    def finished(self, record: ExchangeRecord) -> None: ...


class Publisher(Protocol):
    def publish(self, envelope: Any) -> None: ...


# Told of every answer once its response event (with usage and cost) is built.
SpendListener = Callable[[ExchangeRecord, Mapping[str, Any]], None]

_FINISHED = None  # the queue entry's body for an ended exchange
# Time (perf_counter) one reactor turn spends on queued records before it lets the reactor
# serve the requests that arrived meanwhile; the rest waits one turn.
TURN_BUDGET = 0.005


class CapturePump:
    """The proxy's ``EventSink``: queues records, publishes their events once what the
    request path wrote is sent."""

    def __init__(
        self,
        bus: Publisher,
        capture: CaptureSettings,
        clock: IReactorTime,
        *,
        enabled: bool,
        sessions: Tracker | None = None,
        usage: Callable[[str, dict[str, Any]], None] | None = None,
        pricer: Pricer | None = None,
        spent: Sequence[SpendListener] = (),
    ) -> None:
        self.bus = bus
        self.usage = usage
        self.pricer = pricer
        self.spent = tuple(spent)
        self.pricing_errors = 0
        self.capture = capture
        self.sessions = sessions
        self.enabled = enabled
        self._clock = clock
        self._queue: deque[tuple[ExchangeRecord, bytes | None]] = deque()
        # Events waiting for their exchange's session decision, in order ("request",
        # then "response" when the exchange ended meanwhile).
        self._held: dict[ExchangeRecord, list[str]] = {}
        self._drained: Deferred[None] | None = None  # stop(): fired once nothing is held
        self._call: IDelayedCall | None = None
        self.flushed = 0  # queue entries handled (stats)
        self.errors = 0
        self.yielded = 0  # turns that left entries to the next one (stats)

    @property
    def whole_body_bytes(self) -> int:
        """Only the session tracker reads past the capture cap (to fingerprint a
        long conversation), and only up to its bound; without it the proxy skips
        reading the temp file."""
        return 0 if self.sessions is None else self.sessions.max_body_bytes

    # -- the proxy's side (request path: O(1)) ------------------------------------

    def request_started(self, record: ExchangeRecord, body: bytes) -> None:
        """``body``: the whole request body, for the session tracker's fingerprints."""
        self._queue.append((record, body))
        if self._call is None:
            self._call = self._clock.callLater(0, self._after_poll)

    def request_finished(self, record: ExchangeRecord) -> None:
        self._queue.append((record, _FINISHED))
        if self._call is None:
            self._call = self._clock.callLater(0, self._after_poll)

    # -- the next turn ------------------------------------------------------------

    def _after_poll(self) -> None:
        """One hop more before the turn.  The reactor runs its due calls before it
        polls, and what the proxy wrote meanwhile (a reply's last bytes, a request
        for its upstream) waits in the transports until that poll: a turn
        scheduled straight from the request path would run first, and the client
        (or the upstream) would wait for the capture.  Scheduled from here, a
        due call, the turn comes after the poll that sends them."""
        self._call = self._clock.callLater(0, self._turn)

    def _turn(self) -> None:
        self._call = None
        self.flush(TURN_BUDGET)

    def flush(self, budget: float | None = None) -> None:
        """Handle what is queued now (also at the drain, before the tracker and the
        exporters close): everything, or with a ``budget`` (seconds, by perf_counter)
        what fits in it, the rest in the next reactor turn."""
        deadline = None if budget is None else time.perf_counter() + budget
        queue = self._queue
        capture = self.capture
        sessions = self.sessions
        # Our own tracker also takes the request body's JSON object (see below).
        tracker = sessions if isinstance(sessions, SessionTracker) else None
        held = self._held
        popleft = queue.popleft
        while queue:
            record, body = popleft()
            self.flushed += 1
            deciding: Deferred[None] | None = None
            try:
                if body is _FINISHED:
                    if record.replayed is not None:
                        # A cache hit: its body is teed here, off the request path.
                        record.capture_replayed(capture.response_body_bytes)
                    if sessions is not None:
                        sessions.finished(record)
                    kind = "response"
                else:
                    if tracker is not None:
                        # The request side first: it parses the body as JSON, and
                        # the tracker takes that object rather than parse it again.
                        try:
                            parsed = prepare_request(record, capture)
                        except Exception:
                            parsed = None  # the envelope's json() meets it again
                        deciding = tracker.assign(record, body, parsed)
                    elif sessions is not None:
                        deciding = sessions.assign(record, body)
                    kind = "request"
            except Exception:
                self.errors += 1
                log.failure("capture: no event for request {rid}", rid=record.request_id)
                continue
            if deciding is not None:
                held[record] = [kind]
                deciding.addBoth(self._decided, record)
            elif held and record in held:
                held[record].append(kind)  # its request event still waits
            else:
                self._publish(kind, record)
            if deadline is not None and queue and time.perf_counter() > deadline:
                # The requests arriving meanwhile are served first (a burst of
                # large conversations would otherwise stall every one of them).
                self.yielded += 1
                self._call = self._clock.callLater(0, self._turn)
                return

    def _decided(self, _: object, record: ExchangeRecord) -> None:
        """``record``'s session was decided: publish its events, in order."""
        kinds = self._held.pop(record, ())
        for kind in kinds:
            self._publish(kind, record)
        if not self._held and self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def _publish(self, kind: str, record: ExchangeRecord) -> None:
        try:
            envelope = RecordEnvelope(kind, record, self.capture)
        except Exception:
            self.errors += 1
            log.failure("capture: no event for request {rid}", rid=record.request_id)
            return
        if kind == "response" and (self.pricer is not None or self.spent):
            self._price(record, envelope)
        # Encoded once, here, for every exporter; one that fails is counted by
        # each exporter (encode_failed) when it takes the event.
        try:
            envelope.json()
        except Exception:
            pass
        else:
            if kind == "response" and record.project is not None and self.usage is not None:
                tokens = envelope.payload()["usage"]
                if tokens is not None:
                    self.usage(record.project, tokens)
        self.bus.publish(envelope)

    def _price(self, record: ExchangeRecord, envelope: RecordEnvelope) -> None:
        """Set the response event's ``cost`` and tell the spend listeners.  A
        failure here costs the event its cost, never the event."""
        try:
            event = envelope.payload()
            pricer = self.pricer
            if pricer is not None:
                event["cost"] = pricer.cost(
                    route=record.route,
                    provider=record.provider,
                    upstream_host=record.upstream_host,
                    model=event["model"],
                    usage=event["usage"],
                    when=record.started_at,
                    cache_hit=event["cache_status"] in ("hit", "conditional-hit"),
                )
            for listener in self.spent:
                listener(record, event)
        except Exception:
            self.pricing_errors += 1
            log.failure("capture: no cost for request {rid}", rid=record.request_id)

    def start(self) -> None:
        """Nothing to start: records are handled in the turn after they come."""

    def stop(self, timeout: float) -> Deferred[None]:
        """Stop the timer and handle what is queued: nothing is left behind (what
        waits for a session decision is published once it is decided, which the
        tracker bounds by its connection's deadline)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.flush()
        if not self._held:
            return succeed(None)
        if self._drained is None:
            self._drained = Deferred()
        return self._drained

    def pending(self) -> int:
        # The held events are counted here (only /stats asks), not on each change.
        return len(self._queue) + sum(len(kinds) for kinds in self._held.values())
