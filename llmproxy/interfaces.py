"""The seams between the packages, declared in one place (tests: tests/unit/test_interfaces.py).

Each is a ``typing.Protocol``: a component names the protocol it takes, never
``Any``, and a capability a component may have is a protocol of its own, checked
with ``isinstance`` (they are ``runtime_checkable``), not discovered with
``getattr``.  The types these signatures mention are imported for the type
checker only, so this module imports none of the packages it describes.

- the request path hands exchanges to capture: ``EventSink``; it asks access
  control: ``AccessPolicy``; refusals are audited: ``Auditor``; token budgets
  count spend in ``SpendCounters`` (in memory, or shared);
- capture publishes events on an ``EventBus`` to ``Subscriber``s (the exporters);
- the delivery engine delivers batches to a ``Sink`` (optionally a
  ``PreparingSink``, a ``LineSink``, a ``ReopenableSink``); HTTP sinks post with an
  ``HTTPClient``; blocking work goes through a ``RunBlocking``;
- Redis is reached through a ``RedisExecutor`` (one command) or, where the
  connection's life matters, a ``RedisClient``;
- the response cache keeps entries in a ``CacheStore`` (memory or Redis); a store
  shared by several processes is also a ``LockingStore`` (cross-process coalescing);
- the session tracker's decisions are taken in a ``SharedSessionState`` with
  ``[state] store = redis``;
- long-lived components share one ``Lifecycle``: ``start()``, ``stop(timeout)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from http.cookiejar import CookieJar

    from hyperlink import EncodedURL
    from twisted.web.http_headers import Headers
    from twisted.web.server import Request

    from llmproxy.access.decision import Allow, Deny
    from llmproxy.cache.entry import CachedResponse
    from llmproxy.capture.record import ExchangeRecord
    from llmproxy.events.envelope import Envelope
    from llmproxy.export.verdict import Verdict
    from llmproxy.http.router import Target
    from llmproxy.state.counters import TableAdd
    from llmproxy.state.sessions import AssignOp, RecordOp

__all__ = [
    "AccessPolicy",
    "Auditor",
    "CacheStore",
    "EventBus",
    "EventSink",
    "HTTPClient",
    "Lifecycle",
    "LineSink",
    "LockingStore",
    "PreparingSink",
    "RedisClient",
    "RedisExecutor",
    "ReopenableSink",
    "RunBlocking",
    "SharedSessionState",
    "Sink",
    "SpendCounters",
    "Subscriber",
]

_T = TypeVar("_T")


# -- life cycle -----------------------------------------------------------------------


@runtime_checkable
class Lifecycle(Protocol):
    """A component that runs from ``start()`` until ``stop(timeout)``.

    ``stop`` fires within ``timeout`` seconds whatever happens (what could not be
    finished by then is spooled, left for another process, or dropped and
    counted, as the component documents), and is idempotent.
    """

    def start(self) -> None: ...

    def stop(self, timeout: float) -> Deferred[None]: ...


@runtime_checkable
class RunBlocking(Protocol):
    """Runs blocking work off the reactor thread; the Deferred fires in the reactor
    thread with its result (``twisted.internet.threads.deferToThreadPool``)."""

    def __call__(self, work: Callable[[], _T], /) -> Deferred[_T]: ...


# -- the request path -----------------------------------------------------------------


@runtime_checkable
class EventSink(Protocol):
    """Where the proxy hands its exchanges: queued for the next reactor turn, where
    the session tracker and the events take them (``capture.pump.CapturePump``)."""

    @property
    def enabled(self) -> bool: ...

    @property
    def whole_body_bytes(self) -> int:
        """Up to which size ``request_started`` needs a body the capture cut short
        (read back from its temp file): a session tracker's bound, else 0."""

    def request_started(self, record: ExchangeRecord, body: bytes) -> None:
        """``body``: the request body; whole up to ``whole_body_bytes``, else as captured."""

    def request_finished(self, record: ExchangeRecord) -> None: ...


@runtime_checkable
class AccessPolicy(Protocol):
    """Decides, per request, whether it may go upstream (``access.policy``)."""

    def check(
        self, request: Request, target: Target, record: ExchangeRecord
    ) -> Allow | Deny | Deferred[Allow | Deny]:
        """The decision now, or a Deferred of it (shared state asked); the
        Deferred never fails."""

    def finished(self, record: ExchangeRecord) -> None: ...


@runtime_checkable
class Auditor(Protocol):
    """The audit log (``access.audit.AuditLog``): one line per security decision."""

    def write(self, action: str, **fields: Any) -> None: ...

    def refused_host(self, record: ExchangeRecord, reason: str) -> None: ...


@runtime_checkable
class SpendCounters(Protocol):
    """Whole-number counters that vanish at ``expire_at`` (epoch seconds), where
    token budgets count spend (``access.budgets``): the shape of the shared
    state's counters, so a Redis-backed one plugs in for ``[state] store = redis``."""

    def add(
        self, key: str, amount: int, now: float, expire_at: float | None = None
    ) -> Deferred[int]: ...

    def add_many(
        self, amounts: Sequence[tuple[str, int, float | None]], now: float
    ) -> Deferred[None]:
        """``add`` for each ``(key, amount, expire_at)``, in one round trip."""

    def charge(
        self, amounts: Sequence[tuple[str, int, float | None]], table: TableAdd, now: float
    ) -> Deferred[None]:
        """``add_many``, and ``table``'s row added to its tables, in one round trip."""

    def read(self, keys: Sequence[str], now: float) -> Deferred[list[int]]: ...


# -- events ---------------------------------------------------------------------------


@runtime_checkable
class Subscriber(Protocol):
    """Anything with an O(1), never-raising ``publish`` (an exporter)."""

    def publish(self, envelope: Envelope) -> None: ...


@runtime_checkable
class EventBus(Protocol):
    """Hands every published envelope to every subscriber."""

    def subscribe(self, subscriber: Subscriber) -> None: ...

    def unsubscribe(self, subscriber: Subscriber) -> None: ...

    def publish(self, envelope: Envelope) -> None:
        """Never blocks, never raises: it runs on the request path."""


# -- delivery -------------------------------------------------------------------------


@runtime_checkable
class Sink(Protocol):
    """A target the delivery engine hands batches of canonical event dicts to."""

    @property
    def name(self) -> str:
        """The exporter name (``[exporter:NAME]``), used in stats and logs."""

    def deliver(self, events: Sequence[dict[str, Any]]) -> Deferred[Verdict]:
        """Send one batch; fire with a verdict.  An errback counts as ``Retry``.

        The event dicts are shared with the other sinks' exporters: never mutate them.
        The exporter may ``cancel()`` the Deferred at its shutdown deadline.
        """

    def close(self) -> Deferred[None]:
        """Release resources; called once, after the exporter's final flush."""


@runtime_checkable
class LineSink(Sink, Protocol):
    """A sink that writes each event's JSON as the capture encoded it (the file
    sink, the Redis stream): the engine hands it the lines, no second encoding."""

    def deliver_lines(
        self, events: Sequence[dict[str, Any]], lines: Sequence[bytes]
    ) -> Deferred[Verdict]: ...


@runtime_checkable
class PreparingSink(Sink, Protocol):
    """A sink that does its per-event part of encoding when the event is published
    (a reactor turn's worth at a time), so the turn that sends a batch only
    assembles it (the Loki sink)."""

    def prepare(self, event: dict[str, Any], line: bytes) -> Any:
        """What ``deliver_prepared`` needs of this event; may raise (the event is
        then prepared again when its batch is sent)."""

    def deliver_prepared(
        self, events: Sequence[dict[str, Any]], lines: Sequence[bytes], prepared: Sequence[Any]
    ) -> Deferred[Verdict]:
        """``prepared[i]`` is ``prepare``'s result for ``events[i]``, or ``None`` (an
        event replayed from the spool, or one ``prepare`` failed on)."""


@runtime_checkable
class ReopenableSink(Sink, Protocol):
    """A sink that keeps files open and reopens them on SIGHUP (logrotate)."""

    def reopen(self) -> Deferred[None]:
        """Close the files once the batches before are written; the next batch
        opens the configured paths again."""


@runtime_checkable
class HTTPClient(Protocol):
    """The part of treq's ``HTTPClient`` (and ``treq.testing.StubTreq``) the HTTP
    sinks use: ``llmproxy.export.http.sink_http_client`` in production."""

    def request(
        self,
        method: str,
        url: EncodedURL,
        *,
        headers: Headers | None = None,
        data: bytes | None = None,
        cookies: CookieJar | None = None,
        unbuffered: bool = False,
    ) -> Deferred[Any]: ...


# -- Redis ----------------------------------------------------------------------------


@runtime_checkable
class RedisExecutor(Protocol):
    """One Redis command at a time (``redis.connection.RedisConnection``)."""

    def start(self) -> None: ...

    def stop(self) -> Deferred[None]: ...

    def execute(
        self, *args: bytes | str | int | float, timeout: float | None = ...
    ) -> Deferred[Any]:
        """Fires with the raw reply (``bytes`` stay ``bytes``); fails with
        ``RedisUnavailable`` (no usable connection, lost, no reply in time) or
        the server's error reply."""


@runtime_checkable
class RedisClient(RedisExecutor, Protocol):
    """A supervised connection: whether it is usable now, and a callback each time
    it becomes usable (the bus retries at once, the dispatcher reads again)."""

    @property
    def usable(self) -> bool: ...

    def when_ready(self, callback: Callable[[], object]) -> None: ...

    def abort(self) -> None: ...


# -- the response cache ---------------------------------------------------------------


@runtime_checkable
class CacheStore(Protocol):
    """Where cached responses live: memory (LRU, bounded) or Redis (shared)."""

    kind: str

    def get(self, key: str) -> Deferred[CachedResponse | None]:
        """The fresh entry under ``key``, or None."""

    def put(self, key: str, entry: CachedResponse) -> Deferred[bool]:
        """Store ``entry`` until its ``expires_at``; False when it was not kept."""

    def purge(self, *, key: str | None = None, prefix: str | None = None) -> Deferred[int]:
        """Delete one key, or every key starting with ``prefix`` ('' = all); the count."""

    def stats(self) -> dict[str, int]:
        """At least ``entries``, ``bytes`` and ``evictions`` (-1 where the store cannot tell)."""

    def start(self) -> None:
        """Connect, where there is something to connect to (at service start)."""

    def close(self) -> Deferred[None]: ...


@runtime_checkable
class LockingStore(CacheStore, Protocol):
    """A store several processes share (Redis): the first process to miss a key
    takes a short lock on it, the others wait for its entry
    (``cache.redis_store.RedisStore``)."""

    def lock(self, key: str, ttl: float) -> Deferred[str | None]:
        """A token when this process got the lock on ``key`` (for ``ttl``
        seconds), None when another holds it."""

    def unlock(self, key: str, token: str) -> Deferred[None]:
        """Release the lock if it is still ours."""

    def peek(self, key: str) -> Deferred[tuple[CachedResponse | None, bool]]:
        """The fresh entry under ``key`` (or None), and whether a lock is held on it."""


# -- shared state ---------------------------------------------------------------------


@runtime_checkable
class SharedSessionState(Protocol):
    """Where the session tracker's operations run with ``[state] store = redis``
    (``state.sessions.RedisSessionState`` over a connection)."""

    @property
    def usable(self) -> bool: ...

    def apply(self, ops: Sequence[AssignOp | RecordOp]) -> Deferred[None]:
        """Run ``ops`` in order, atomically; fills in each assignment's result.
        Fails as a Redis command does (``RedisUnavailable``)."""
