"""The streaming reverse proxy resource (tests: tests/integration/test_proxy.py,
tests/integration/test_cache.py).

One :class:`Exchange` per request: resolve the route, send the (already
buffered) body upstream through the pooled client (:mod:`llmproxy.proxy.client`),
relay the response body with the upstream connection registered as a streaming
producer on the client (so a slow client pauses the upstream), tee a capped copy
into the :class:`ExchangeRecord`, and hand two events to the bus.  Nothing here
encodes JSON for events or waits for a sink.

With a response cache (:mod:`llmproxy.cache`) and a cached route, the exchange
asks its ticket first: a hit is answered from the entry with no upstream call,
and is recorded like any exchange (both events, marked with the cache status,
key and the entry's age; its body handed over by reference, teed into the
capture by the pump); a miss goes upstream as above with the body teed to the
ticket.
Without one, the plain path costs one ``is None`` check.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from llmproxy.access.decision import Allow, Deny, PassthroughAccess
from llmproxy.capture.record import ExchangeRecord
from llmproxy.config.model import CaptureSettings, ServerSettings
from llmproxy.http.errors import error_body
from llmproxy.http.headers import (
    PROXY_REQUEST_ID,
    client_request_id,
    filter_headers,
    upstream_request_headers,
)
from llmproxy.http.router import Refusal, Router, Target
from llmproxy.interfaces import AccessPolicy, Auditor, EventSink
from llmproxy.proxy.client import UpstreamPool, UpstreamResponse
from llmproxy.proxy.metrics import ProxyMetrics

if TYPE_CHECKING:
    from llmproxy.cache.cache import CacheTicket, ResponseCache
    from llmproxy.cache.entry import CachedResponse

__all__ = ["Exchange", "ProxyResource", "answered_outcome"]

log = Logger()

_SSE = b"text/event-stream"
_DONE = Failure(ResponseDone())


@attrs.define(eq=False, slots=False, kw_only=True)
class ProxyResource(Resource):
    isLeaf = True

    router: Router
    upstream: UpstreamPool
    clock: IReactorTime
    limits: ServerSettings = attrs.field(alias="server")
    capture: CaptureSettings
    events: EventSink
    metrics: ProxyMetrics
    auditor: Auditor
    machine: str
    access: AccessPolicy = attrs.field(factory=PassthroughAccess)
    _file_body: Callable[[Any], IBodyProducer] = attrs.field(
        default=FileBodyProducer, alias="cooperator_body"
    )
    cache: ResponseCache | None = None
    open: set[Exchange] = attrs.field(init=False, factory=set)

    def __attrs_pre_init__(self) -> None:
        super().__init__()

    def render(self, request: Request) -> int | bytes:
        Exchange(self, request).start()
        return NOT_DONE_YET

    def reject_early(self, request: Request, status: int, message: str) -> None:
        """Answer before the body was read (413) and close: nothing reached render."""
        rid = client_request_id(request.requestHeaders)
        body = error_body(status, message)
        reason = http.RESPONSES.get(status, b"Error")
        request.channel.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"X-LLMProxy-Request-ID: %s\r\nConnection: close\r\n\r\n%s"
            % (status, reason, len(body), rid.encode(), body)
        )
        request.channel.loseConnection()  # type: ignore[union-attr]
        record = self._bare_record(request, rid)
        record.status = status
        record.outcome = "rejected"
        record.error = message
        record.ended_at = 0.0
        self.metrics.finished("-", status, "rejected", 0.0, None, 0, len(body))
        if self.events.enabled:
            self.events.request_finished(record)

    def _bare_record(self, request: Request, rid: str) -> ExchangeRecord:
        uri = request.uri
        path, _, query = uri.partition(b"?")
        return ExchangeRecord(
            request_id=rid,
            started_at=self.clock.seconds(),
            method=request.method.decode("latin-1"),
            path=path.decode("latin-1"),
            query=query.decode("latin-1"),
            route="-",
            provider="",
            upstream_url="",
            upstream_host="",
            client_addr=_client_addr(request),
            request_headers=list(_raw_pairs(request.requestHeaders)),
            environment=self.limits.environment,
            machine=self.machine,
        )


def _raw_pairs(headers: Headers) -> Any:
    for name, values in headers.getAllRawHeaders():
        for v in values:
            yield (name, v)


def _client_addr(request: Request) -> str:
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    return f"{host}:{getattr(peer, 'port', '')}" if host else str(peer)


class _Relay(TwistedProtocol):
    """Receives the upstream body; its transport is the upstream connection."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def connectionMade(self) -> None:
        self.exchange.relay_started(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.exchange.relay_data(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.exchange.relay_ended(reason)


class Exchange:
    __slots__ = (
        "_cache",
        "_cache_wait",
        "_cap_left",
        "_capture",
        "_done",
        "_first_byte_timer",
        "_idle_timer",
        "_last_data",
        "_later",
        "_pending",
        "_relay_transport",
        "_relaying",
        "_t0",
        "_t_dispatch",
        "_timed_out",
        "alive",
        "bytes_in",
        "bytes_out",
        "proxy",
        "record",
        "request",
        "stream",
    )

    def __init__(self, proxy: ProxyResource, request: Request) -> None:
        self.proxy = proxy
        self.request = request
        self.record: ExchangeRecord | None = None
        self.alive = True
        self._done = False
        self._pending: defer.Deferred[UpstreamResponse] | None = None
        self._first_byte_timer: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self._relay_transport: Any = None
        self._relaying = False  # between relay_started (client still there) and relay_ended
        self._timed_out = ""
        self._last_data = 0.0
        self._t0 = 0.0
        self._t_dispatch = 0.0
        self._cap_left = 0
        self._capture = proxy.events.enabled
        self._cache: CacheTicket | None = None
        self._cache_wait: defer.Deferred[CachedResponse | None] | None = None
        self._later: tuple[Allow, bytes | IBodyProducer | None, list[Any], bytes, bytes] | None = (
            None
        )
        self.stream = False
        self.bytes_in = 0
        self.bytes_out = 0

    # -- request side -------------------------------------------------------

    def start(self) -> None:
        proxy = self.proxy
        request = self.request
        self._t0 = time.perf_counter()
        uri = request.uri
        path, _, query = uri.partition(b"?")
        rid = client_request_id(request.requestHeaders)
        target = proxy.router.resolve(path)
        content = request.content
        if isinstance(content, io.BytesIO):
            body = content.getvalue()
            producer: bytes | IBodyProducer | None = body or None
            size = len(body)
        else:
            assert content is not None
            content.seek(0, io.SEEK_END)
            size = content.tell()
            content.seek(0)
            body = content.read(proxy.capture.request_body_bytes) if self._capture else b""
            content.seek(0)
            producer = proxy._file_body(content)
        self.bytes_in = size
        started = proxy.clock.seconds()
        raw_headers = list(request.requestHeaders.getAllRawHeaders())
        if isinstance(target, Target):
            url = target.url(query)
            route, provider, host = target.route, target.provider, target.host
        else:
            url, route, provider, host = b"", "-", target.provider, target.host.encode()
        record = self.record = ExchangeRecord(
            request_id=rid,
            started_at=started,
            method=request.method.decode("latin-1"),
            path=path.decode("latin-1"),
            query=query.decode("latin-1"),
            route=route,
            provider=provider,
            upstream_url=url.decode("latin-1"),
            upstream_host=host.decode("latin-1"),
            client_addr=_client_addr(request) if self._capture else "",
            request_headers=[(n, v) for n, vs in raw_headers for v in vs] if self._capture else [],
            request_body=body[: proxy.capture.request_body_bytes] if self._capture else b"",
            request_body_size=size,
            environment=proxy.limits.environment,
            machine=proxy.machine,
        )
        request.notifyFinish().addBoth(self._client_finished)
        proxy.open.add(self)
        proxy.metrics.open_requests += 1
        if isinstance(target, Refusal):
            if target.status == 403:
                proxy.auditor.refused_host(record, target.message)
            self.fail(target.status, target.message, "rejected")
            return
        decision = proxy.access.check(request, target, record)
        if decision.__class__ is Deny:
            assert isinstance(decision, Deny)
            self.fail(
                decision.status, decision.message, "rejected", decision.headers, decision.code
            )
            return
        if isinstance(decision, defer.Deferred):
            # Shared state asked (a quota in Redis): go on when it answers.
            later = (target, producer, raw_headers, url, body, content, size)
            decision.addCallback(self._access_answer, later).addErrback(self._access_failed)
            return
        assert isinstance(decision, Allow)
        self._admitted(decision, target, producer, raw_headers, url, body, content, size)

    def _access_answer(
        self,
        decision: Allow | Deny,
        later: tuple[Target, bytes | IBodyProducer | None, list[Any], bytes, bytes, Any, int],
    ) -> None:
        if not self.alive:
            self.finish_record(
                "client_disconnected", "client went away during the access check", publish=False
            )
            return
        if isinstance(decision, Deny):
            self.fail(decision.status, decision.message, "rejected", decision.headers)
            return
        self._admitted(decision, *later)

    def _access_failed(self, failure: Failure) -> None:
        # The policy's Deferred never fails; if it did, answer rather than hang.
        log.failure(
            "access check failed for {rid}", failure, rid=self.record and self.record.request_id
        )
        if not self._done:
            self.fail(500, "the access check failed", "rejected")

    def _admitted(
        self,
        decision: Allow,
        target: Target,
        producer: bytes | IBodyProducer | None,
        raw_headers: list[Any],
        url: bytes,
        body: bytes,
        content: Any,
        size: int,
    ) -> None:
        proxy = self.proxy
        request = self.request
        record = self.record
        assert record is not None
        record.tenant = decision.namespace
        cache = proxy.cache
        if cache is not None:
            ticket = self._cache = cache.admit(
                request, target, url, decision.namespace, content, size
            )
            if ticket is not None and not ticket.bypass:
                self._later = (decision, producer, raw_headers, url, body)
                d = self._cache_wait = ticket.lookup()
                d.addCallbacks(self._cache_answer, self._cache_gone)
                return
        self._forward(decision, producer, raw_headers, url, body)

    def _forward(
        self,
        decision: Allow,
        producer: bytes | IBodyProducer | None,
        raw_headers: list[Any],
        url: bytes,
        body: bytes,
    ) -> None:
        proxy = self.proxy
        request = self.request
        record = self.record
        assert record is not None
        if self._capture:
            self._request_started(record, body)
        if decision.masked:
            record.masked = decision.masked
        drop = decision.drop_headers
        if decision.set_headers:
            drop = drop | {n.lower() for n, _ in decision.set_headers}
        headers = upstream_request_headers(raw_headers, drop)
        headers.extend(decision.set_headers)
        headers.append((b"X-Request-ID", record.request_id.encode()))
        self._cap_left = proxy.capture.response_body_bytes
        self._t_dispatch = time.perf_counter()
        try:
            d = self._pending = proxy.upstream.request(request.method, url, headers, producer)
        except ValueError as e:  # an upstream URL the client cannot use (a bad route)
            self.fail(502, f"bad upstream URL: {e}", "upstream_error")
            return
        self._first_byte_timer = proxy.clock.callLater(
            proxy.limits.first_byte_timeout, self._first_byte_timeout
        )
        d.addCallbacks(self._got_response, self._request_failed)

    def _request_started(self, record: ExchangeRecord, body: bytes) -> None:
        """Queue the request for its event (and the session tracker)."""
        events = self.proxy.events
        content = self.request.content
        if (
            record.request_body_size > len(body)
            and not isinstance(content, io.BytesIO)
            and record.request_body_size <= events.whole_body_bytes
        ):
            # A long conversation sits in a temp file and the capture keeps only
            # its head: the tracker needs all of it to fingerprint the history
            # (up to its bound: a bigger one is never read back).
            assert content is not None
            content.seek(0)
            body = content.read()
            content.seek(0)
        events.request_started(record, body)

    # -- the response cache -------------------------------------------------

    def _cache_answer(self, entry: CachedResponse | None) -> None:
        self._cache_wait = None
        later, self._later = self._later, None
        ticket = self._cache
        assert ticket is not None and later is not None
        if not self.alive:
            ticket.abandon()
            self.finish_record(
                "client_disconnected", "client went away during the cache lookup", publish=False
            )
            return
        if entry is None:
            self._forward(*later)
            return
        record = self.record
        assert record is not None
        if self._capture:
            # A hit is an exchange too: its request event, session and reply.
            self._request_started(record, later[4])  # the body as start() read it
        overhead = time.perf_counter() - self._t0
        rid = record.request_id.encode()
        self.bytes_out = ticket.write_hit(self.request, entry, rid, b"%.3f" % (overhead * 1000))
        self.alive = False
        record.status = self.request.code
        record.first_byte_at = self.proxy.clock.seconds() - record.started_at
        record.cache_age = ticket.age
        if self._capture:
            # References only: the capture pump tees the body a turn later.
            record.response_headers = ticket.served_headers(entry)
            if ticket.status == "hit":
                record.replayed = entry.chunks
        # An answer like any other for the events; the request counters keep
        # hits apart (outcome cache_hit), counted once, here.
        self.finish_record("ok", None, counted_as="cache_hit")

    def _cache_gone(self, failure: Failure) -> Failure | None:
        self._cache_wait = None
        self._later = None
        if self._cache is not None:
            self._cache.abandon()
        if failure.check(defer.CancelledError):
            # Only a client that went away cancels the wait (see _client_finished).
            self.finish_record(
                "client_disconnected", "client went away waiting for the cache", publish=False
            )
            return None
        # Store errors become misses in the ticket: this is a bug, and stays loud.
        self.fail(502, "the response cache failed", "upstream_error")
        return failure

    def _first_byte_timeout(self) -> None:
        self._first_byte_timer = None
        self._timed_out = "no response from upstream within first_byte_timeout"
        if self._pending is not None:
            self._pending.cancel()

    def _request_failed(self, failure: Failure) -> None:
        self._pending = None
        if self._first_byte_timer is not None and self._first_byte_timer.active():
            self._first_byte_timer.cancel()
        self._first_byte_timer = None
        if not self.alive:
            self.finish_record("client_disconnected", "client went away before the response")
            return
        if self._timed_out:
            self.fail(504, self._timed_out, "timeout")
        elif failure.check(error.TimeoutError):
            self.fail(504, "timed out connecting to the upstream", "timeout")
        elif failure.check(error.DNSLookupError):
            self.fail(502, "upstream host name could not be resolved", "upstream_error")
        elif failure.check(error.ConnectError):
            self.fail(502, "upstream connection failed: " + _reason(failure), "upstream_error")
        else:
            self.fail(
                502, "upstream failed before responding: " + _reason(failure), "upstream_error"
            )

    # -- response side ------------------------------------------------------

    def _got_response(self, response: UpstreamResponse) -> None:
        self._pending = None
        t_resp = time.perf_counter()
        if self._first_byte_timer is not None and self._first_byte_timer.active():
            self._first_byte_timer.cancel()
        self._first_byte_timer = None
        proxy = self.proxy
        record = self.record
        assert record is not None
        now = proxy.clock.seconds()
        record.first_byte_at = now - record.started_at
        record.status = response.code
        raw = response.headers
        if self._capture:
            record.response_headers = [(n, v) for n, vs in raw for v in vs]
        if not self.alive:
            response.deliverBody(_Relay(self))
            return
        request = self.request
        request.setResponseCode(response.code, response.phrase)
        out = request.responseHeaders
        for name, values in filter_headers(raw, upstream=False):
            out.setRawHeaders(name, values)
            if name.lower() == b"content-type" and values and values[0].startswith(_SSE):
                self.stream = True
        if response.length is not None and request.method != b"HEAD":
            # (A HEAD response's Content-Length is the GET body's: keep the upstream's.)
            out.setRawHeaders(b"content-length", [b"%d" % response.length])
        # The upstream's own x-request-id / request-id went through above.
        out.setRawHeaders(PROXY_REQUEST_ID, [record.request_id.encode()])
        if self._cache is not None:
            self._cache.on_response(response.code, raw, response.length, out)
        # What the proxy added before the client sees a byte: routing, header
        # rewriting and capture setup before the upstream call, and header
        # copying after the upstream answered.
        overhead = (time.perf_counter() - t_resp) + (self._t_dispatch - self._t0)
        proxy.metrics.overhead.observe(overhead)
        out.setRawHeaders(b"x-llmproxy-overhead-ms", [b"%.3f" % (overhead * 1000)])
        if self.stream:
            proxy.metrics.open_streams += 1
        response.deliverBody(_Relay(self))
        # A small answer that came with its head has been relayed and ended by
        # now: only a body still under way needs the idle timer.  (Started here,
        # not in relay_started, so that the common case costs no timed call;
        # the same reactor turn, so the deadline is the same.)
        if self._relaying:
            self._idle_timer = proxy.clock.callLater(proxy.limits.idle_timeout, self._idle_check)

    def relay_started(self, transport: Any) -> None:
        self._relay_transport = transport
        if not self.alive:
            transport.stopProducing()
            return
        self.request.registerProducer(transport, True)
        self._last_data = self.proxy.clock.seconds()
        self._relaying = True

    def relay_data(self, data: bytes) -> None:
        n = len(data)
        self.bytes_out += n
        clock = self.proxy.clock
        now = self._last_data = clock.seconds()
        if self._capture:
            record = self.record
            assert record is not None
            record.response_body_size += n
            left = self._cap_left
            if left > 0:
                piece = data if n <= left else data[:left]
                record.response_chunks.append((now - record.started_at, piece))
                self._cap_left = left - len(piece)
                if len(piece) < n:
                    record.response_truncated = True
            else:
                record.response_truncated = True
        if self._cache is not None:
            self._cache.feed(data)
        if self.alive:
            self.request.write(data)

    def _idle_check(self) -> None:
        idle = self.proxy.limits.idle_timeout
        waited = self.proxy.clock.seconds() - self._last_data
        if waited < idle:
            self._idle_timer = self.proxy.clock.callLater(idle - waited, self._idle_check)
            return
        self._idle_timer = None
        self._timed_out = f"upstream sent nothing for {idle:g}s (idle_timeout)"
        if self._relay_transport is not None:
            self._relay_transport.stopProducing()

    def relay_ended(self, reason: Failure) -> None:
        self._relaying = False
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        if self.stream:
            self.proxy.metrics.open_streams -= 1
        # (isinstance, not reason.check(): that formats each class's qualified
        # name per call, and twisted.web.http's module attributes go through a
        # deprecation proxy, 2 us per lookup: PotentialDataLoss is imported.)
        done = isinstance(reason.value, ResponseDone)
        clean = done or isinstance(reason.value, PotentialDataLoss)
        if self._cache is not None:
            # Close-delimited bodies (PotentialDataLoss) may be cut short: never stored.
            self._cache.ended(done)
        if self.alive:
            self.request.unregisterProducer()
            if clean:
                self.alive = False
                self.request.finish()
            else:
                # The body is incomplete: closing without the final chunk tells
                # the client so, where a clean finish() would hide it.
                self.alive = False
                self.request.loseConnection()
        if clean:
            self.finish_record(answered_outcome(self.record.status if self.record else None), None)
        elif self._timed_out:
            self.finish_record("timeout", self._timed_out)
        elif self.record is not None and self.record.outcome == "client_disconnected":
            self.finish_record("client_disconnected", "client went away mid-response")
        else:
            self.finish_record("upstream_error", "upstream body ended early: " + _reason(reason))

    # -- endings ------------------------------------------------------------

    def _client_finished(self, result: object) -> None:
        if not isinstance(result, Failure):
            return
        # Connection lost before finish(): stop everything upstream at once.
        was_alive = self.alive
        self.alive = False
        if not was_alive or self._done:
            return
        if self.record is not None:
            self.record.outcome = "client_disconnected"
        if self._pending is not None:
            self._pending.cancel()
        elif self._relay_transport is not None:
            self._relay_transport.stopProducing()
        elif self._cache_wait is not None and self._cache is not None:
            self._cache.cancel_wait()

    def fail(
        self,
        status: int,
        message: str,
        outcome: str,
        extra_headers: tuple[tuple[bytes, bytes], ...] = (),
        code: str | None = None,
    ) -> None:
        if self.alive:
            request = self.request
            body = error_body(status, message, code)
            request.setResponseCode(status)
            h = request.responseHeaders
            for name, value in extra_headers:
                h.setRawHeaders(name, [value])
            h.setRawHeaders(b"content-type", [b"application/json"])
            h.setRawHeaders(b"content-length", [b"%d" % len(body)])
            if self.record is not None:
                h.setRawHeaders(PROXY_REQUEST_ID, [self.record.request_id.encode()])
            request.write(body)
            self.alive = False
            request.finish()
            self.bytes_out = len(body)
        if self.record is not None:
            self.record.status = status
        self.finish_record(outcome, message)

    def finish_record(
        self,
        outcome: str,
        error_text: str | None,
        publish: bool = True,
        counted_as: str | None = None,
    ) -> None:
        """End the exchange: metrics (under ``counted_as``, else ``outcome``),
        access, the cache ticket, and the record to the events when ``publish``."""
        if self._done:
            return
        self._done = True
        proxy = self.proxy
        proxy.open.discard(self)
        proxy.metrics.open_requests -= 1
        record = self.record
        assert record is not None
        record.ended_at = proxy.clock.seconds() - record.started_at
        record.outcome = outcome
        record.error = error_text
        proxy.metrics.finished(
            record.route,
            record.status or 0,
            counted_as or outcome,
            record.ended_at,
            record.first_byte_at,
            self.bytes_in,
            self.bytes_out,
            project=record.project,
        )
        proxy.access.finished(record)
        ticket = self._cache
        if ticket is not None:
            ticket.abandon()
            record.cache_status = ticket.status
            if ticket.key:
                record.cache_key = ticket.key
        if self._capture and publish:
            proxy.events.request_finished(record)

    def abort(self) -> None:
        """Drain deadline reached: drop the client and the upstream now."""
        if self._pending is not None:
            self._pending.cancel()
        if self._relay_transport is not None:
            self._relay_transport.stopProducing()
        if self.alive:
            self.alive = False
            self.request.channel.transport.abortConnection()  # type: ignore[union-attr]


def answered_outcome(status: int | None) -> str:
    """The outcome of an exchange whose answer reached the client whole: ``ok``
    for 1xx-3xx, ``client_error`` for a 4xx the upstream gave (the request was
    refused there), ``upstream_rate_limited`` for its 429, ``upstream_error``
    for its 5xx.  Dashboards and alerts count every outcome but ``ok`` and
    ``cache_hit`` as an error (docs/operations.md, "Reading /stats and /metrics")."""
    if status is None or status < 400:
        return "ok"
    if status == 429:
        return "upstream_rate_limited"
    if status >= 500:
        return "upstream_error"
    return "client_error"


def _reason(failure: Failure) -> str:
    inner = getattr(failure.value, "reasons", None)
    if inner:
        return "; ".join(_reason(f) for f in inner)
    text = str(failure.value) or type(failure.value).__name__
    return text[:300]
