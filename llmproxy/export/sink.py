"""Where batches go, and how a sink says how it went (tests: tests/unit/export/test_exporter.py,
tests/unit/export/test_http.py).

A sink is an encoder and a judge, nothing more (ARCHITECTURE.md, "The seam that
keeps sinks small").  It answers every batch with a *verdict*
(:mod:`llmproxy.export.verdict`: ``Delivered``, ``Retry``, ``Rejected``).

Buffering, batching, backoff, the spool, the dead-letter file and accounting live
once, in :mod:`llmproxy.export.exporter`.  ``HTTPSink`` is the base for HTTP
backends: a subclass writes ``encode`` (and ``judge`` when the default rules do not
fit); the base POSTs with treq (:mod:`llmproxy.export.http`), reads the answer,
and turns transport failures into ``Retry``.

An answer is read up to a bound, ``EncodedBatch.answer_limit`` decoded bytes
(``ANSWER_LIMIT``, 64 KiB, unless the sink sizes it for its batch, as Lunary does
for its per-event results): a broken or hostile receiver cannot make the daemon
hold more.  Past the bound the connection is closed and ``judge`` sees the start
of the answer (a 5xx is still ``Retry``, a 400 still ``Rejected`` with its text).
"""

from __future__ import annotations

import email.utils
from collections.abc import Sequence
from typing import Any, Self
from urllib.parse import urlsplit

import attrs
from hyperlink import EncodedURL
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web import _newclient
from twisted.web.http_headers import Headers

from llmproxy.config.model import ExporterSettings
from llmproxy.export.http import NoCookies, read_answer
from llmproxy.export.verdict import Delivered, Rejected, Retry, Verdict
from llmproxy.interfaces import HTTPClient, ReopenableSink, Sink

__all__ = [
    "ANSWER_LIMIT",
    "EncodedBatch",
    "HTTPSink",
    "ReopenableSink",
    "Sink",
    "checked_endpoint",
    "parse_retry_after",
]

# The most of a sink's answer that is read (decoded bytes), unless its batch says
# otherwise: enough for any error text or status document a backend sends.
ANSWER_LIMIT = 64 * 1024


@attrs.frozen
class EncodedBatch:
    """One HTTP request body for a batch, with its headers (and URL when not the
    default), and the most of the answer to it that is read (decoded bytes)."""

    body: bytes
    headers: dict[str, str]
    url: str | None = None
    answer_limit: int = ANSWER_LIMIT


# Per request, so treq does not build an empty jar for each (it does unless given one).
_NO_COOKIES = NoCookies()


def checked_endpoint(where: str, endpoint: str, what: str, instead: str = "api_key") -> str:
    """``endpoint`` when it is an http(s) URL without credentials; else ``ValueError``
    saying so (``where``: ``exporter:NAME``; ``what``: the service's API, for the
    message; ``instead``: where credentials belong)."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where}: endpoint must be an http(s) URL of {what}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{where}: endpoint must not carry credentials (use {instead})")
    return endpoint


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta seconds or an HTTP-date).

    ``now`` is the injected clock's epoch time; a date in the past gives ``0.0``.
    Anything unparseable gives ``None`` (the exporter then uses its own backoff).
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if seconds != seconds or seconds in (float("inf"), float("-inf")):
            return None
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; obsolete forms may omit it
        return None
    return max(0.0, when.timestamp() - now)


def _transport_reason(failure: Failure) -> str:
    """Name a transport failure without echoing it: exception texts can carry the URL
    (and a URL can carry credentials), so only the kind of failure is reported."""
    exc = failure.value
    kind = type(exc).__name__
    if isinstance(exc, CancelledError):
        return "cancelled"
    if isinstance(exc, net_error.TimeoutError):
        return "timed out"
    if isinstance(exc, net_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, net_error.DNSLookupError):
        return "DNS lookup failed"
    if isinstance(exc, net_error.ConnectError):
        return f"connection failed ({kind})"
    if isinstance(exc, _newclient.ResponseNeverReceived | _newclient.ResponseFailed):
        # The Agent wraps a cancellation (our timeout, or the exporter's deadline).
        if any(isinstance(reason.value, CancelledError) for reason in exc.reasons):
            return "cancelled"
        return f"connection lost ({kind})"
    if isinstance(exc, net_error.ConnectionLost | net_error.ConnectionDone):
        return "connection lost"
    return f"transport error ({kind})"


@attrs.define(kw_only=True)
class HTTPSink:
    """Base for HTTP sinks: POST an encoded batch, read the body, judge the answer.

    A subclass implements ``encode`` and may override ``judge``.  ``timeout`` covers
    the whole exchange (headers and body), enforced on the injected clock by
    cancelling the request, which closes the connection, also while the answer is
    being read; treq's own ``timeout=`` is not used, as it covers only the headers
    and schedules on the global reactor.
    """

    name: str
    url: str
    _client: HTTPClient
    _clock: IReactorTime
    _timeout: float = 10.0
    _urls: dict[str, EncodedURL] = attrs.field(factory=dict, init=False, repr=False)

    @classmethod
    def configured(
        cls,
        settings: ExporterSettings,
        url: str,
        client: HTTPClient,
        clock: IReactorTime,
        **own: Any,
    ) -> Self:
        """The sink of ``[exporter:NAME]`` posting to ``url``: the fields every HTTP
        sink takes from its section, plus the subclass's ``own`` (already checked)."""
        return cls(
            name=settings.name, url=url, client=client, clock=clock, timeout=settings.timeout, **own
        )

    def encode(self, events: Sequence[dict[str, Any]]) -> EncodedBatch:
        raise NotImplementedError

    def judge(self, status: int, headers: dict[str, str], body: bytes) -> Verdict:
        """Default rules: 2xx delivered; 408, 429, 5xx retried (honouring Retry-After);
        any other status rejected for good with the start of the body."""
        if 200 <= status < 300:
            return Delivered()
        if status in (408, 429) or 500 <= status < 600:
            now = self._clock.seconds()  # type: ignore[misc]  # zope method, no mypy-zope
            after = parse_retry_after(headers.get("retry-after"), now)
            return Retry(f"HTTP {status}", after)
        text = body.decode("utf-8", errors="replace")[:500]
        return Rejected(f"HTTP {status}: {text}")

    def deliver(self, events: Sequence[dict[str, Any]]) -> Deferred[Verdict]:
        try:
            batch = self.encode(events)
        except Exception:
            # A bug in an encoder: the exporter treats an errback as Retry and logs it.
            return fail()
        return self.post(batch)

    def post(self, batch: EncodedBatch) -> Deferred[Verdict]:
        """Send an encoded batch; fire with the verdict on the answer (or on a
        transport error, or on the timeout: both ``Retry``)."""
        d: Deferred[Any] = self._client.request(
            "POST",
            self._parsed(batch.url or self.url),
            data=batch.body,
            headers=Headers({name: [value] for name, value in batch.headers.items()}),
            cookies=_NO_COOKIES,
            unbuffered=True,  # read once, within a bound: treq's buffer would only copy it
        )
        d.addCallback(self._read_and_judge, batch.answer_limit)
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            d.cancel()

        timer = self._clock.callLater(self._timeout, expire)  # type: ignore[misc, arg-type]

        def stop_timer(result: object) -> object:
            if timer.active():  # type: ignore[misc]
                timer.cancel()  # type: ignore[misc]
            return result

        def failed(failure: Failure) -> Verdict:
            if expired:
                return Retry(f"timed out after {self._timeout:g}s")
            return Retry(_transport_reason(failure))

        d.addBoth(stop_timer)
        d.addErrback(failed)
        return d

    def close(self) -> Deferred[None]:
        return succeed(None)

    def _parsed(self, url: str) -> EncodedURL:
        # treq parses a str URL on every request (hyperlink, ~35 us of a batch POST:
        # benchmarks/bench_sink_post.py); a sink posts to one URL, or a few.
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = EncodedURL.from_text(url)
            if len(self._urls) < 16:
                self._urls[url] = parsed
        return parsed

    def _read_and_judge(self, response: Any, limit: int) -> Deferred[Verdict]:
        status = int(response.code)
        headers = {
            name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
            for name, values in response.headers.getAllRawHeaders()
        }
        answer = read_answer(response, limit)
        return answer.addCallback(lambda read: self.judge(status, headers, read.body))
