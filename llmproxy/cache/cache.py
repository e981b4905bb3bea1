"""The response cache as the proxy sees it (tests: tests/integration/test_cache.py).

:class:`ResponseCache` holds the store, the in-flight table and the counters;
:meth:`ResponseCache.admit` gives each request on a cached route a
:class:`CacheTicket`, which the exchange in :mod:`llmproxy.proxy.forward` asks,
in order: :meth:`~CacheTicket.lookup` (an entry to replay, or None to go
upstream), :meth:`~CacheTicket.on_response` when the upstream's headers arrive
(decides whether to store, adds the cache headers), :meth:`~CacheTicket.feed`
for each body chunk, :meth:`~CacheTicket.ended` when the body ends, and
:meth:`~CacheTicket.abandon` whatever happened.

Every response on a cached route carries ``X-PROXY-CACHE`` (``hit``, ``miss``,
``bypass``, ``stored``, ``conditional-hit``), ``X-PROXY-CACHE-KEY`` when a key
was derived, and an RFC 9211 ``Cache-Status``.  ``stored`` is said when the
headers allow storing; the entry is kept only if the body then completes within
``max_object_bytes`` (the record's ``cache_status`` says what really happened).

Identical concurrent misses make one upstream call: within the process through
the in-flight table (:mod:`llmproxy.cache.coalesce`), and, with a store shared by
several processes (a ``LockingStore``: Redis), across them: the process whose
request leads takes the store's lock on the key, a process that finds it taken
waits for the entry its holder stores (looking every few ms, up to
``lock_timeout``) and answers its own followers with it.  When the store does
not answer, a process leads on its own (fail open, counted as ``coalescing`` in
the shared-state metrics).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import IO, Any

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from llmproxy.cache.coalesce import InFlight
from llmproxy.cache.entry import CachedResponse
from llmproxy.cache.policy import (
    RequestPlan,
    cache_key,
    http_date,
    judge_response,
    namespace_for,
    not_modified,
    plan_request,
    vary_matches,
    vary_values,
)
from llmproxy.config.model import CacheSettings
from llmproxy.http.headers import PROXY_REQUEST_ID, filter_headers
from llmproxy.http.router import Target
from llmproxy.interfaces import CacheStore, LockingStore
from llmproxy.state.health import StateHealth

__all__ = [
    "CACHE_STATUS",
    "X_CACHE",
    "X_CACHE_KEY",
    "CacheTicket",
    "ResponseCache",
]

log = Logger()

X_CACHE = b"x-proxy-cache"
X_CACHE_KEY = b"x-proxy-cache-key"
CACHE_STATUS = b"cache-status"
_NOT_STORED = frozenset({b"set-cookie", b"set-cookie2", b"age"})
# Sent with a 304 (RFC 9110 15.4.5).
_NOT_MODIFIED_HEADERS = (b"cache-control", b"content-location", b"etag", b"expires", b"vary")

LEADER, FOLLOWER, SOLO = "leader", "follower", "solo"
# Looking for another process's entry: first after this long, then doubling up to the cap.
REMOTE_POLL_FIRST = 0.005
REMOTE_POLL_MAX = 0.1


@attrs.define(eq=False, kw_only=True)
class ResponseCache:
    """The cache of one proxy process: store, in-flight table, counters."""

    settings: CacheSettings
    store: CacheStore
    clock: IReactorTime
    health: StateHealth | None = None
    # Paces the look for another process's entry (default: the clock).
    timer: IReactorTime = attrs.field(
        default=attrs.Factory(lambda self: self.clock, takes_self=True)
    )
    # A store shared with other processes: misses coalesce across them.
    locking: LockingStore | None = attrs.field(init=False)
    inflight: InFlight[CachedResponse] = attrs.field(init=False)
    hits: int = attrs.field(init=False, default=0)
    conditional_hits: int = attrs.field(init=False, default=0)
    misses: int = attrs.field(init=False, default=0)
    bypasses: int = attrs.field(init=False, default=0)
    stores: int = attrs.field(init=False, default=0)
    store_refused: int = attrs.field(init=False, default=0)
    errors: int = attrs.field(init=False, default=0)
    purged: int = attrs.field(init=False, default=0)
    # Misses that waited for another process's entry, and those answered with it.
    remote_waits: int = attrs.field(init=False, default=0)
    remote_hits: int = attrs.field(init=False, default=0)
    lock_errors: int = attrs.field(init=False, default=0)
    _warned_at: float = attrs.field(init=False, default=-1e18)

    def __attrs_post_init__(self) -> None:
        self.locking = self.store if isinstance(self.store, LockingStore) else None
        if self.locking is not None and self.health is not None:
            self.health.watch("coalescing")
        self.inflight = InFlight(clock=self.clock, lock_timeout=self.settings.lock_timeout)

    # -- the request path ----------------------------------------------------------

    def admit(
        self,
        request: Request,
        target: Target,
        url: bytes,
        namespace: str,
        content: IO[bytes] | None,
        size: int,
    ) -> CacheTicket | None:
        """A ticket when ``target``'s route is cached, else None (the plain path)."""
        route = target.settings
        mode = route.cache if route is not None else "default"
        if mode == "off" or (mode == "default" and not self.settings.enabled):
            return None
        headers = request.requestHeaders
        method = request.method
        plan = plan_request(
            method,
            headers,
            route_on=mode == "on",
            body_size=size,
            max_object_bytes=self.settings.max_object_bytes,
        )
        ticket = CacheTicket(self, plan, method, headers)
        if plan.action == "bypass":
            self.bypasses += 1
            return ticket
        if route is not None and route.cache_ttl is not None:
            ticket.route_ttl = route.cache_ttl
        label = target.route if route is not None else "passthrough:" + target.host.decode()
        ticket.key = cache_key(
            route=label,
            upstream=url.partition(b"?")[0],
            method=method,
            query=request.uri.partition(b"?")[2],
            body=_read_all(content),
            headers=headers,
            namespace=namespace_for(namespace, headers),
        )
        return ticket

    def store_failed(self, failure: Failure, doing: str) -> None:
        self.errors += 1
        now = self.clock.seconds()
        if now - self._warned_at >= 10.0:  # one line per 10 s, not one per request
            self._warned_at = now
            log.warn(
                "response cache ({kind}) {doing} failed, serving without it: {err}",
                kind=self.store.kind,
                doing=doing,
                err=failure.getErrorMessage()[:200],
            )

    # -- operations ------------------------------------------------------------------

    def purge(self, *, key: str | None = None, prefix: str | None = None) -> defer.Deferred[int]:
        d = self.store.purge(key=key, prefix=prefix)

        def counted(n: int) -> int:
            self.purged += n
            return n

        return d.addCallback(counted)

    def stats(self) -> dict[str, Any]:
        return {
            "store": self.store.kind,
            "hits": self.hits,
            "conditional_hits": self.conditional_hits,
            "misses": self.misses,
            "bypasses": self.bypasses,
            "stores": self.stores,
            "store_refused": self.store_refused,
            "coalesced": self.inflight.followers,
            "remote_waits": self.remote_waits,
            "remote_hits": self.remote_hits,
            "lock_errors": self.lock_errors,
            "released": self.inflight.released,
            "in_flight": len(self.inflight),
            "waiting": self.inflight.waiting,
            "errors": self.errors,
            "purged": self.purged,
            **self.store.stats(),
        }

    def families(self) -> Iterator[Metric]:
        """Prometheus families; add to the service's ``MetricsCollector``."""
        s = self.stats()
        lookups = CounterMetricFamily(
            "llmproxy_cache_requests", "Requests on cached routes", labels=["result"]
        )
        for label, key in (
            ("hit", "hits"),
            ("conditional_hit", "conditional_hits"),
            ("miss", "misses"),
            ("bypass", "bypasses"),
        ):
            lookups.add_metric([label], s[key])
        yield lookups
        for name, doc, key in (
            ("llmproxy_cache_stores", "Responses stored", "stores"),
            (
                "llmproxy_cache_coalesced",
                "Requests answered by another's upstream call",
                "coalesced",
            ),
            (
                "llmproxy_cache_coalesced_remote",
                "Misses answered by another process's upstream call (shared store)",
                "remote_hits",
            ),
            ("llmproxy_cache_evictions", "Entries evicted to stay under max_bytes", "evictions"),
            ("llmproxy_cache_purged", "Entries purged", "purged"),
            ("llmproxy_cache_errors", "Store operations that failed", "errors"),
        ):
            if s.get(key, -1) >= 0:
                yield CounterMetricFamily(name, doc, value=s[key])
        for name, doc, key in (
            ("llmproxy_cache_bytes", "Bytes held by the memory store", "bytes"),
            ("llmproxy_cache_entries", "Entries held by the memory store", "entries"),
        ):
            if s.get(key, -1) >= 0:
                yield GaugeMetricFamily(name, doc, value=s[key])
        if "bytes_written" in s:
            yield CounterMetricFamily(
                "llmproxy_cache_written_bytes", "Bytes written to Redis", value=s["bytes_written"]
            )

    def start(self) -> None:
        self.store.start()

    def stop(self, timeout: float) -> defer.Deferred[None]:
        """Close the store (a Redis connection; memory is just dropped)."""
        return self.store.close()


def _read_all(content: IO[bytes] | None) -> bytes:
    if content is None:
        return b""
    if isinstance(content, io.BytesIO):
        return content.getvalue()
    content.seek(0)
    data = content.read()
    content.seek(0)
    return data


class CacheTicket:
    """One request's dealings with the cache."""

    __slots__ = (
        "_cache",
        "_code",
        "_headers",
        "_lock",
        "_method",
        "_stored_headers",
        "_total",
        "_waiter",
        "_writing",
        "age",
        "chunks",
        "detail",
        "fwd",
        "key",
        "plan",
        "role",
        "route_ttl",
        "status",
        "storable_age",
        "storable_ttl",
        "storable_vary",
    )

    def __init__(
        self, cache: ResponseCache, plan: RequestPlan, method: bytes, headers: Headers
    ) -> None:
        self._cache = cache
        self.plan = plan
        self._method = method
        self._headers = headers
        self.key = ""
        self.age: float | None = None  # of the entry a hit was answered from, seconds
        self.route_ttl: float | None = None
        self.role = SOLO
        # What this request was, for X-PROXY-CACHE and the record.
        self.status = "bypass" if plan.action == "bypass" else "miss"
        self.fwd = plan.fwd or "miss"
        self.detail = plan.detail
        self._writing = False
        self._lock: str | None = None  # our token on the store's lock of the key
        self._waiter: defer.Deferred[CachedResponse | None] | None = None
        self._code = 0
        self._total = 0
        self.chunks: list[bytes] = []
        self._stored_headers: tuple[tuple[bytes, bytes], ...] = ()
        self.storable_ttl = 0.0
        self.storable_age = 0.0
        self.storable_vary: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def bypass(self) -> bool:
        return self.plan.action == "bypass"

    # -- lookup ------------------------------------------------------------------------

    def lookup(self) -> defer.Deferred[CachedResponse | None]:
        """Fires with an entry to replay, or None: go upstream (maybe leading followers)."""
        cache = self._cache
        if self.plan.action == "revalidate":
            cache.misses += 1
            return defer.succeed(None)
        d = cache.store.get(self.key)
        return d.addCallbacks(self._looked_up, self._lookup_failed)

    def _lookup_failed(self, failure: Failure) -> Failure | None:
        if failure.check(defer.CancelledError):
            return failure
        self._cache.store_failed(failure, "lookup")
        self._cache.bypasses += 1
        self.plan = RequestPlan("bypass", fwd="bypass", detail="store-error")
        self.status, self.fwd, self.detail = "bypass", "bypass", "store-error"
        return None

    def _looked_up(
        self, entry: CachedResponse | None
    ) -> CachedResponse | defer.Deferred[CachedResponse | None] | None:
        if entry is not None:
            why = self._unusable(entry)
            if why is None:
                return entry
            self.fwd = why
        self._cache.misses += 1
        waiter = self._cache.inflight.join(self.key)
        if waiter is None:
            self.role = LEADER
            if self._cache.locking is not None:
                return self._lead_across()
            return None
        self.role = FOLLOWER
        self._waiter = waiter
        return waiter.addCallback(self._followed)

    # -- across processes (a LockingStore) ---------------------------------------

    def _lead_across(self) -> defer.Deferred[CachedResponse | None]:
        """This process leads for the key: take the store's lock, or wait for the
        entry of the process holding it."""
        cache = self._cache
        store = cache.locking
        assert store is not None
        d = store.lock(self.key, cache.settings.lock_timeout)

        def locked(token: str | None) -> defer.Deferred[CachedResponse | None] | None:
            if cache.health is not None:
                cache.health.succeeded("coalescing")
            if token is not None:
                self._lock = token
                return None
            cache.remote_waits += 1
            waiting = self._waiter = _RemoteWait(self, store).result
            return waiting.addCallback(self._remote_answer)

        def failed(failure: Failure) -> None:
            if failure.check(defer.CancelledError):
                return None
            cache.lock_errors += 1
            if cache.health is not None:
                cache.health.failed("coalescing", "local", failure.getErrorMessage())
            return None  # lead on our own

        return d.addCallbacks(locked, failed)

    def _remote_answer(self, entry: CachedResponse | None) -> CachedResponse | None:
        self._waiter = None
        cache = self._cache
        if entry is None or not vary_matches(entry.vary, self._headers):
            return None  # the other process stored nothing usable: lead upstream
        # Our own followers get it too; the store has it already.
        cache.inflight.complete(self.key, entry)
        cache.inflight.settle(self.key)
        self.role = SOLO
        cache.misses -= 1
        cache.remote_hits += 1
        self.fwd = "collapsed"
        return entry

    def _unlock(self) -> None:
        token, self._lock = self._lock, None
        store = self._cache.locking
        if token is not None and store is not None:
            store.unlock(self.key, token).addErrback(lambda _: None)  # it expires anyway

    def _unusable(self, entry: CachedResponse) -> str | None:
        if not vary_matches(entry.vary, self._headers):
            return "vary-miss"
        max_age = self.plan.max_age
        if max_age is not None and entry.age_at(self._cache.clock.seconds()) > max_age:
            return "stale"
        return None

    def cancel_wait(self) -> None:
        """The client went away: stop waiting for a leader (a store lookup just ends)."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.cancel()

    def _followed(self, entry: CachedResponse | None) -> CachedResponse | None:
        self._waiter = None
        if entry is not None and vary_matches(entry.vary, self._headers):
            # Counted as a miss at lookup; it is answered without going upstream.
            self._cache.misses -= 1
            self.fwd = "collapsed"
            return entry
        self.role = SOLO
        return None

    # -- answering from an entry --------------------------------------------------------

    def write_hit(
        self, request: Request, entry: CachedResponse, request_id: bytes, overhead_ms: bytes
    ) -> int:
        """Answer ``request`` from ``entry`` (200 or 304) and finish it; the body bytes sent."""
        cache = self._cache
        now = cache.clock.seconds()
        out = request.responseHeaders
        conditional = self._method in (b"GET", b"HEAD") and not_modified(
            self._headers,
            entry.header(b"etag"),
            _maybe_date(entry.header(b"last-modified")),
            entry.stored_at,
        )
        if conditional:
            request.setResponseCode(304)
            for name, value in entry.headers:
                if name in _NOT_MODIFIED_HEADERS:
                    out.addRawHeader(name, value)
            self.status = "conditional-hit"
            cache.conditional_hits += 1
        else:
            request.setResponseCode(entry.status)
            for name, value in entry.headers:
                out.addRawHeader(name, value)
            self.status = "hit"
            cache.hits += 1
        ttl = max(0, int(entry.expires_at - now))
        age = self.age = entry.age_at(now)
        out.setRawHeaders(b"age", [b"%d" % int(age)])
        out.setRawHeaders(PROXY_REQUEST_ID, [request_id])
        out.setRawHeaders(b"x-llmproxy-overhead-ms", [overhead_ms])
        out.setRawHeaders(X_CACHE, [self.status.encode()])
        out.setRawHeaders(X_CACHE_KEY, [self.key.encode()])
        if self.fwd == "collapsed":
            status = b"llmproxy; fwd=miss; collapsed; ttl=%d" % ttl
        elif conditional:
            status = b'llmproxy; hit; ttl=%d; detail="conditional"' % ttl
        else:
            status = b"llmproxy; hit; ttl=%d" % ttl
        out.setRawHeaders(CACHE_STATUS, [status])
        sent = 0
        if not conditional:
            for chunk in entry.chunks:
                request.write(chunk)
                sent += len(chunk)
        request.finish()
        return sent

    def served_headers(self, entry: CachedResponse) -> list[tuple[bytes, bytes]]:
        """The entry's headers :meth:`write_hit` answered with (the upstream's, as
        stored; a 304 only those RFC 9110 sends with it), for the record."""
        if self.status == "conditional-hit":
            return [(n, v) for n, v in entry.headers if n in _NOT_MODIFIED_HEADERS]
        return list(entry.headers)

    # -- the upstream's answer -------------------------------------------------------

    def on_response(
        self, code: int, raw: list[tuple[bytes, list[bytes]]], length: int | None, out: Headers
    ) -> None:
        """Decide whether to store, and say so in ``out`` (the client's headers)."""
        cache = self._cache
        if self.plan.action == "bypass":
            self._say(out, b"bypass", b"llmproxy; fwd=%s; detail=%s" % self._fwd_detail())
            return
        settings = cache.settings
        judged = judge_response(
            code,
            raw,
            length=length,
            max_object_bytes=settings.max_object_bytes,
            fallback_ttl=self.plan.ttl_hint or self.route_ttl or settings.default_ttl,
        )
        fwd = self.fwd.encode()
        if judged.ttl > 0:
            self._writing = True
            self._code = code
            self.status = "stored"
            self.storable_ttl = judged.ttl
            self.storable_age = judged.age
            self.storable_vary = vary_values(judged.vary, self._headers)
            self._stored_headers = tuple(
                (name.lower(), v)
                for name, values in filter_headers(raw, upstream=False)
                if name.lower() not in _NOT_STORED
                for v in values
            )
            self._say(out, b"stored", b"llmproxy; fwd=%s; stored; ttl=%d" % (fwd, judged.ttl))
            return
        self.detail = judged.detail
        self._say(out, b"miss", b"llmproxy; fwd=%s; detail=%s" % (fwd, judged.detail.encode()))
        self._release()

    def _fwd_detail(self) -> tuple[bytes, bytes]:
        return self.fwd.encode(), self.detail.encode()

    def _say(self, out: Headers, value: bytes, status: bytes) -> None:
        out.setRawHeaders(X_CACHE, [value])
        if self.key:
            out.setRawHeaders(X_CACHE_KEY, [self.key.encode()])
        out.setRawHeaders(CACHE_STATUS, [status])

    def feed(self, data: bytes) -> None:
        if not self._writing:
            return
        self._total += len(data)
        if self._total > self._cache.settings.max_object_bytes:
            self._stop_writing("too-large")
            return
        self.chunks.append(data)

    def ended(self, complete: bool) -> None:
        """The upstream body ended; ``complete``: cleanly, every byte received."""
        if not self._writing:
            self._release()
            return
        if not complete:
            self._stop_writing("incomplete")
            return
        self._writing = False
        cache = self._cache
        now = cache.clock.seconds()
        chunks = self.chunks
        stream = any(
            n == b"content-type" and v.startswith(b"text/event-stream")
            for n, v in self._stored_headers
        )
        if not stream and len(chunks) > 1:
            # A stream keeps its chunks so a replay keeps the event boundaries.
            chunks = [b"".join(chunks)]
        entry = CachedResponse(
            status=self._code,
            headers=self._stored_headers,
            chunks=tuple(chunks),
            stored_at=now,
            expires_at=now + self.storable_ttl,
            age=self.storable_age,
            vary=self.storable_vary,
        )
        self.chunks = []
        key = self.key
        if self.role == LEADER:
            cache.inflight.complete(key, entry)
            self.role = SOLO
        d = cache.store.put(key, entry)

        def stored(kept: bool) -> None:
            if kept:
                cache.stores += 1
            else:
                cache.store_refused += 1
            cache.inflight.settle(key)
            self._unlock()

        def failed(failure: Failure) -> None:
            cache.store_failed(failure, "store")
            cache.inflight.settle(key)
            self._unlock()

        d.addCallbacks(stored, failed)

    def _stop_writing(self, why: str) -> None:
        self._writing = False
        self.chunks = []
        self.status = "miss"
        self.detail = why
        self._release()

    def _release(self) -> None:
        if self.role == LEADER:
            self.role = SOLO
            self._cache.inflight.complete(self.key, None)
        if self._lock is not None and not self._writing:
            self._unlock()

    def abandon(self) -> None:
        """The exchange ended, however: never leave followers waiting."""
        if self._writing:
            self._stop_writing("incomplete")
        else:
            self._release()


def _maybe_date(value: bytes | None) -> float | None:
    return None if value is None else http_date(value)


class _RemoteWait:
    """Looks for the entry another process is fetching: fires with it, or with
    None once its lock is gone without one or ``lock_timeout`` has passed.
    Cancelling it stops looking."""

    def __init__(self, ticket: CacheTicket, store: LockingStore) -> None:
        cache = ticket._cache
        self._store = store
        self._key = ticket.key
        self._clock = cache.timer
        self._deadline = cache.clock.seconds() + cache.settings.lock_timeout
        self._delay = REMOTE_POLL_FIRST
        self._timer: Any = None
        self._asking: defer.Deferred[Any] | None = None
        self.result: defer.Deferred[CachedResponse | None] = defer.Deferred(self._cancel)
        self._schedule()

    def _schedule(self) -> None:
        left = self._deadline - self._clock.seconds()
        if left <= 0:
            self._done(None)
            return
        self._timer = self._clock.callLater(min(self._delay, left), self._look)
        self._delay = min(self._delay * 2, REMOTE_POLL_MAX)

    def _look(self) -> None:
        self._timer = None
        d = self._asking = self._store.peek(self._key)
        d.addCallbacks(self._seen, self._unseen)

    def _seen(self, found: tuple[CachedResponse | None, bool]) -> None:
        self._asking = None
        entry, locked = found
        if entry is not None or not locked:
            self._done(entry)
        else:
            self._schedule()

    def _unseen(self, failure: Failure) -> None:
        self._asking = None
        if not failure.check(defer.CancelledError):
            self._done(None)  # the store does not answer: go on our own

    def _done(self, entry: CachedResponse | None) -> None:
        if not self.result.called:
            self.result.callback(entry)

    def _cancel(self, _: defer.Deferred[CachedResponse | None]) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._asking is not None:
            self._asking.cancel()
