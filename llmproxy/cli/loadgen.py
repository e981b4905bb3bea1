"""The load generator of ``llmproxy benchmark``: sends a run's requests and records
what came back (tests: tests/unit/cli/test_benchmark.py, tests/integration/test_bench_cli.py).

A ``Plan`` says what to send: ``requests`` POSTs of a JSON body to one URL (or as
many as ``duration`` seconds allow), at most ``concurrency`` in flight over as
many kept-alive connections.  ``Benchmark`` sends
them on a reactor, one worker per connection, and appends each response's
figures to a ``Recorder``: latency, time to first byte (a streamed body's first
event), the ``X-LLMProxy-Overhead-Ms`` header, the status, the cache outcome, the
bytes and SSE events read, or why the request failed.  The figures and the report
are llmproxy/cli/benchmark_report.py; the command is llmproxy/cli/benchmark.py.

- Bodies are the same for every request.  Without ``cache`` each request says
  ``Cache-Control: no-store``, so no cache answers or keeps it; with ``cache`` it
  opts in to caching instead.  Every request of a run carries the same
  ``X-Session-ID`` (``llmproxy-bench-<run>``): the proxy's session log keeps a
  run as one session (a nonce in ``user``, as before, made one per request).
- A run stops early when the first wave of requests cannot even connect (the
  address is wrong or down), and ``interrupt`` (Ctrl-C) stops sending and cancels
  what is in flight without counting it as failed.

The measuring path is kept cheap: one ``perf_counter`` per event of interest,
plain lists and counters; everything else (sorting, percentiles, formatting) is
done once at the end.
"""

from __future__ import annotations

import math
import secrets as _secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
import orjson
from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from llmproxy.export.http import BytesBody, quiet_pool

__all__ = [
    "CONNECT_KINDS",
    "OVERHEAD_HEADER",
    "SAMPLE_BODY_LIMIT",
    "Benchmark",
    "Plan",
    "Recorder",
    "Sample",
    "cache_outcome",
    "describe_error",
    "error_kind",
    "parse_overhead",
]

OVERHEAD_HEADER = b"x-llmproxy-overhead-ms"
X_CACHE = b"x-proxy-cache"
CACHE_STATUS = b"cache-status"
# Failures that mean the address itself is wrong or down (abort a run early).
CONNECT_KINDS = frozenset({"connection refused", "dns lookup failed", "connect timeout"})
SAMPLE_BODY_LIMIT = 2000


# -- what to send and what was measured ------------------------------------------------


@attrs.frozen
class Plan:
    """Everything one run sends, resolved from the flags."""

    url: str
    requests: int
    concurrency: int
    template: dict[str, Any] = attrs.field(repr=False)
    headers: tuple[tuple[str, str], ...] = attrs.field(repr=False)
    secrets: tuple[str, ...] = attrs.field(repr=False)
    stream: bool = False
    cache: bool = False
    debug: bool = False
    timeout: float = 60.0
    connect_timeout: float = 10.0
    # Seconds to keep sending for (None: until ``requests`` were sent); no request
    # starts after it, those in flight finish.
    duration: float | None = None
    run_id: str = attrs.Factory(lambda: _secrets.token_hex(4))

    def body(self, i: int) -> bytes:
        """The body of request ``i``: the template (with ``"stream": true`` for streams)."""
        body = dict(self.template)
        if self.stream:
            body["stream"] = True
        return orjson.dumps(body)

    def wants_more(self, issued: int, elapsed: float) -> bool:
        """Whether another request starts, ``issued`` sent and ``elapsed`` seconds in."""
        if issued >= self.requests:
            return False
        return self.duration is None or elapsed < self.duration

    def raw_headers(self) -> Headers:
        h = Headers()
        for name, value in self.headers:
            h.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        return h


@attrs.define
class Recorder:
    """What the run measured, appended to as responses finish (times in seconds)."""

    latencies: list[float] = attrs.Factory(list)
    ttfbs: list[float] = attrs.Factory(list)
    # (overhead ms, latency s) of each response that carried the overhead header.
    overheads: list[tuple[float, float]] = attrs.Factory(list)
    statuses: Counter[int] = attrs.Factory(Counter)
    errors: Counter[str] = attrs.Factory(Counter)
    cache: Counter[str] = attrs.Factory(Counter)
    bytes_received: int = 0
    events: int = 0
    not_sse: int = 0
    first_error: str = ""

    @property
    def responses(self) -> int:
        return len(self.latencies)

    @property
    def finished(self) -> int:
        return len(self.latencies) + sum(self.errors.values())

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


@attrs.frozen
class Sample:
    """One exchange as sent and received, for ``--debug``."""

    method: str
    url: str
    request_headers: tuple[tuple[str, str], ...] = attrs.field(repr=False)
    request_body: bytes = attrs.field(repr=False)
    version: str = "HTTP/1.1"
    status: int = 0
    phrase: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    body_size: int = 0
    error: str = ""


# -- what one response or failure says (pure) ------------------------------------------


def parse_overhead(values: Sequence[bytes] | None) -> float | None:
    """The overhead header in ms; None when absent or not a finite, non-negative number."""
    if not values:
        return None
    try:
        ms = float(values[0])
    except ValueError:
        return None
    return ms if math.isfinite(ms) and ms >= 0 else None


def cache_outcome(x_cache: bytes | None, cache_status: bytes | None) -> str | None:
    """What a cache did with one response: llmproxy's ``X-PROXY-CACHE`` label (``hit``,
    ``miss``, ``stored``, ``bypass``, ``conditional-hit``), else one read from the RFC
    9211 ``Cache-Status`` member nearest the client; None without either header."""
    if x_cache is not None and x_cache.strip():
        return x_cache.strip().lower().decode("latin-1")
    if cache_status is None or not cache_status.strip():
        return None
    member = cache_status.decode("latin-1").split(",")[-1]
    params = [p.strip().lower() for p in member.split(";")[1:]]
    if "hit" in params:
        return "hit"
    fwd = next((p[4:].strip('"') for p in params if p.startswith("fwd=")), "")
    if fwd in ("bypass", "method"):
        return "bypass"
    return "stored" if "stored" in params else "miss"


def error_kind(exc: BaseException) -> str:
    """A short, stable name for why a request got no (complete) response."""
    if isinstance(exc, defer.TimeoutError):
        return "timeout"
    if isinstance(exc, ierror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ierror.DNSLookupError):
        return "dns lookup failed"
    if isinstance(exc, ierror.TCPTimedOutError | ierror.TimeoutError):
        return "connect timeout"
    if isinstance(exc, ResponseNeverReceived):
        return "closed before response"
    if isinstance(exc, ResponseFailed):
        return "response cut short"
    if isinstance(exc, RequestTransmissionFailed):
        return "request not sent"
    if type(exc).__module__.startswith("OpenSSL"):
        return "tls error"
    if isinstance(exc, ierror.ConnectionLost | ierror.ConnectionDone):
        return "connection lost"
    return type(exc).__name__


def describe_error(exc: BaseException) -> str:
    """The underlying reason, for a person (the first wrapped reason of a web failure)."""
    reasons = getattr(exc, "reasons", None)
    if reasons:
        inner = reasons[0].value
        if isinstance(inner, BaseException):
            return describe_error(inner)
    return str(exc).strip() or type(exc).__name__


# -- sending (Twisted) ------------------------------------------------------------------


class _Reader(Protocol):
    """Reads a body to its end: first-byte time, size, SSE event count, a kept prefix."""

    def __init__(self, ended: Callable[[Failure], None], count_events: bool, keep: bool) -> None:
        self.ended = ended
        self.first = 0.0
        self.size = 0
        self.events = 0
        self._count = count_events
        self._tail = b""
        self.kept: list[bytes] | None = [] if keep else None

    def dataReceived(self, data: bytes) -> None:
        if not self.first:
            self.first = time.perf_counter()
        self.size += len(data)
        if self._count:
            joined = self._tail + data
            # Event ends: a blank line (LF or CRLF); the 2-byte tail catches ones split
            # across chunks, less those already counted inside the tail itself.
            self.events += (
                joined.count(b"\n\n") + joined.count(b"\n\r\n") - self._tail.count(b"\n\n")
            )
            self._tail = joined[-2:]
        if self.kept is not None and self.size - len(data) < SAMPLE_BODY_LIMIT:
            self.kept.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended(reason)


@implementer(IAgentEndpointFactory)
class _OneEndpoint:
    """The endpoint of the one URL a run loads, built once: Agent's own factory builds one
    per request, and its IDNA host check costs more than the rest of the client."""

    def __init__(self, reactor: Any, url: str, connect_timeout: float) -> None:
        parts = urlsplit(url)
        host = parts.hostname or ""
        https = parts.scheme == "https"
        port = parts.port or (443 if https else 80)
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            reactor, host, port, timeout=connect_timeout
        )
        if https:
            creator = BrowserLikePolicyForHTTPS().creatorForNetloc(host.encode("idna"), port)
            endpoint = wrapClientTLS(creator, endpoint)
        self._endpoint = endpoint

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return self._endpoint


class Benchmark:
    """Runs a :class:`Plan` on ``reactor``; :meth:`run` fires with the :class:`Recorder`."""

    def __init__(self, reactor: Any, plan: Plan) -> None:
        self.reactor = reactor
        self.plan = plan
        self.rec = Recorder()
        self.sample: Sample | None = None
        self.started = 0.0
        self.ended = 0.0
        self.issued = 0
        self.interrupted = False
        self._aborted = False
        self._cancelling = False
        self._inflight: dict[int, Callable[[], None]] = {}
        self._url = plan.url.encode("ascii")
        self._headers = plan.raw_headers()

    @property
    def aborted(self) -> bool:
        """Stopped early: the first wave of requests could not even connect."""
        return self._aborted

    def run(self) -> defer.Deferred[Recorder]:
        plan = self.plan
        pool = quiet_pool(self.reactor, persistent=True)
        pool.maxPersistentPerHost = plan.concurrency
        pool.retryAutomatically = False
        endpoints = _OneEndpoint(self.reactor, plan.url, plan.connect_timeout)
        self._agent = Agent.usingEndpointFactory(self.reactor, endpoints, pool=pool)
        self.started = time.perf_counter()
        workers = [self._worker() for _ in range(plan.concurrency)]

        rec = self.rec

        def finish(_: object) -> defer.Deferred[None]:
            self.ended = time.perf_counter()
            closed: defer.Deferred[None] = pool.closeCachedConnections()
            return closed

        d: defer.Deferred[Any] = defer.gatherResults(workers, consumeErrors=True)
        d.addCallback(finish)
        d.addCallback(lambda _: rec)
        return d

    def interrupt(self) -> None:
        """Stop sending; cancel what is in flight without counting it as failed."""
        self.interrupted = True
        self._cancelling = True
        for cancel in list(self._inflight.values()):
            cancel()

    def _worker(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._loop())

    async def _loop(self) -> None:
        plan = self.plan
        clock = self.reactor
        start = clock.seconds()
        while plan.wants_more(self.issued, clock.seconds() - start) and not (
            self.interrupted or self._aborted
        ):
            i = self.issued
            self.issued += 1
            await self._one(i)

    def _one(self, i: int) -> defer.Deferred[None]:
        plan = self.plan
        body = plan.body(i)
        keep = plan.debug and i == plan.requests - 1
        t0 = time.perf_counter()
        state: dict[str, Any] = {"timed_out": False, "reader": None}
        done: defer.Deferred[None] = defer.Deferred()
        d = self._agent.request(b"POST", self._url, self._headers, BytesBody(body))

        def cancel() -> None:
            reader = state["reader"]
            if reader is None:
                d.cancel()
            elif reader.transport is not None:
                reader.transport.stopProducing()

        def expire() -> None:
            state["timed_out"] = True
            cancel()

        deadline: IDelayedCall = self.reactor.callLater(plan.timeout, expire)
        self._inflight[i] = cancel

        def settle() -> None:
            self._inflight.pop(i, None)
            if deadline.active():
                deadline.cancel()
            done.callback(None)

        def failed(failure: Failure) -> None:
            if not (self._cancelling and not state["timed_out"]):
                exc = defer.TimeoutError() if state["timed_out"] else failure.value
                assert exc is not None
                self._failed(exc, keep, body)
            settle()

        def got(response: IResponse) -> None:
            t_headers = time.perf_counter()
            ctype = response.headers.getRawHeaders(b"content-type") or [b""]
            sse = ctype[0].lower().startswith(b"text/event-stream")
            if plan.stream and not sse:
                self.rec.not_sse += 1

            def ended(reason: Failure) -> None:
                if not reason.check(ResponseDone, PotentialDataLoss):
                    failed(reason)
                    return
                self._record(response, t0, t_headers, reader)
                if keep:
                    self.sample = _sample_of(plan, body, response, reader)
                settle()

            reader = _Reader(ended, plan.stream and sse, keep)
            state["reader"] = reader
            response.deliverBody(reader)

        d.addCallbacks(got, failed)
        return done

    def _record(self, response: IResponse, t0: float, t_headers: float, reader: _Reader) -> None:
        rec = self.rec
        t_end = time.perf_counter()
        latency = t_end - t0
        rec.latencies.append(latency)
        if self.plan.stream:
            rec.ttfbs.append((reader.first or t_headers) - t0)
            rec.events += reader.events
        rec.statuses[response.code] += 1
        rec.bytes_received += reader.size
        headers = response.headers
        overhead = parse_overhead(headers.getRawHeaders(OVERHEAD_HEADER))
        if overhead is not None:
            rec.overheads.append((overhead, latency))
        xc = headers.getRawHeaders(X_CACHE)
        cs = headers.getRawHeaders(CACHE_STATUS)
        outcome = cache_outcome(xc[-1] if xc else None, b", ".join(cs) if cs else None)
        if outcome is not None:
            rec.cache[outcome] += 1

    def _failed(self, exc: BaseException, keep: bool, body: bytes) -> None:
        rec = self.rec
        kind = error_kind(exc)
        rec.errors[kind] += 1
        if not rec.first_error:
            rec.first_error = f"{kind} ({describe_error(exc)})"
        if keep:
            self.sample = Sample(
                "POST", self.plan.url, self.plan.headers, body, error=rec.first_error
            )
        if (
            rec.responses == 0
            and kind in CONNECT_KINDS
            and sum(rec.errors[k] for k in CONNECT_KINDS) >= self.plan.concurrency
        ):
            self._aborted = True


def _sample_of(plan: Plan, body: bytes, response: IResponse, reader: _Reader) -> Sample:
    proto, major, minor = response.version
    return Sample(
        method="POST",
        url=plan.url,
        request_headers=plan.headers,
        request_body=body,
        version=f"{proto.decode()}/{major}.{minor}",
        status=response.code,
        phrase=response.phrase.decode("latin-1"),
        headers=tuple(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, values in response.headers.getAllRawHeaders()
            for value in values
        )
        # Twisted's client consumes Content-Length: put it back, it was received.
        + ((("Content-Length", str(response.length)),) if isinstance(response.length, int) else ()),
        body=b"".join(reader.kept or ()),
        body_size=reader.size,
    )
