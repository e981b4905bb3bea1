"""``llmproxy benchmark``: load a deployment and say where the time goes (tests:
tests/unit/test_bench.py, tests/integration/test_bench_cli.py).

It sends ``--requests`` POSTs with a JSON body, at most ``--concurrency`` in
flight over as many kept-alive connections, to ``--base-url`` + ``--endpoint``,
then prints the throughput, latency percentiles, a status table, the cache
outcomes and the split between the proxy's own overhead (the
``X-LLMProxy-Overhead-Ms`` response header) and the rest of each request's time
(upstream and network).  docs/benchmarking.md shows how to read it.

- Bodies: ``--json`` (inline or ``@file``, a JSON object) or a small OpenAI chat
  completion.  Without ``--cache`` each body carries a nonce (OpenAI's ``user``,
  Anthropic's ``metadata.user_id`` on ``/messages`` endpoints), so no cache can
  answer; with ``--cache`` every body is the same and the request opts in to
  caching (``Cache-Control: public, max-age=300``, llmproxy/cache/policy.py).
- ``--stream`` sets ``"stream": true`` and reads each event stream to its end;
  the time to the first body byte (the first event) is reported beside the total.
- Percentiles are nearest-rank: p99 is a latency that 99% of the responses did
  not exceed, always one that was measured, never interpolated.

The measuring path is kept cheap: one ``perf_counter`` per event of interest,
plain lists and counters; everything else (sorting, percentiles, formatting) is
done once at the end by the pure functions at the top of this module.
"""

from __future__ import annotations

import argparse
import math
import secrets as _secrets
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any
from urllib.parse import urlsplit

import attrs
import orjson
from twisted.internet import defer, task
from twisted.internet import error as ierror
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from llmproxy.cli.args import Subcommands, positive_int
from llmproxy.export.http import BytesBody

OVERHEAD_HEADER = b"x-llmproxy-overhead-ms"
X_CACHE = b"x-proxy-cache"
CACHE_STATUS = b"cache-status"
CACHE_OPT_IN = b"public, max-age=300"
DEFAULT_ENDPOINT = "/v1/chat/completions"
DEFAULT_BODY: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 16,
}
# Header values never printed: shown as their scheme (if any) and ****.
CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie"}
)
MASK = "****"
# Failures that mean the address itself is wrong or down (abort a run early).
CONNECT_KINDS = frozenset({"connection refused", "dns lookup failed", "connect timeout"})
SAMPLE_BODY_LIMIT = 2000

# -- statistics (pure) ------------------------------------------------------------------


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty sequence (0 < pct <= 100)."""
    if not ordered:
        raise ValueError("percentile of no values")
    rank = math.ceil(pct / 100.0 * len(ordered))
    return ordered[min(max(rank, 1), len(ordered)) - 1]


@attrs.frozen
class Percentiles:
    """A distribution in milliseconds."""

    count: int
    min: float
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Percentiles | None:
        ordered = sorted(values)
        if not ordered:
            return None
        return cls(
            count=len(ordered),
            min=ordered[0],
            mean=math.fsum(ordered) / len(ordered),
            p50=percentile(ordered, 50),
            p90=percentile(ordered, 90),
            p99=percentile(ordered, 99),
            max=ordered[-1],
        )

    def as_dict(self) -> dict[str, float | int]:
        return {
            "count": self.count,
            "min": round(self.min, 3),
            "mean": round(self.mean, 3),
            "p50": round(self.p50, 3),
            "p90": round(self.p90, 3),
            "p99": round(self.p99, 3),
            "max": round(self.max, 3),
        }


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
class Summary:
    """The report of one run; ``format_summary`` and ``summary_json`` render it."""

    url: str
    planned: int
    concurrency: int
    stream: bool
    cache_mode: bool
    elapsed: float  # seconds from the first request sent to the last one finished
    responses: int
    statuses: dict[int, int]
    errors: dict[str, int]
    cache: dict[str, int]
    latency: Percentiles | None
    ttfb: Percentiles | None
    overhead: Percentiles | None
    upstream: Percentiles | None  # latency - overhead, per response with the header
    overhead_seen: int  # responses that carried the overhead header
    bytes_received: int
    events_per_stream: float | None
    not_sse: int
    interrupted: bool = False

    @property
    def finished(self) -> int:
        return self.responses + sum(self.errors.values())

    @property
    def throughput(self) -> float:
        return self.responses / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def cache_hits(self) -> int:
        return self.cache.get("hit", 0) + self.cache.get("conditional-hit", 0)

    @property
    def cache_lookups(self) -> int:
        """Responses a cache looked up (hits and misses; bypasses are not lookups)."""
        return sum(n for label, n in self.cache.items() if label != "bypass")


def summarize(
    rec: Recorder,
    *,
    url: str,
    planned: int,
    concurrency: int,
    elapsed: float,
    stream: bool = False,
    cache_mode: bool = False,
    interrupted: bool = False,
) -> Summary:
    """Turn what was recorded into the figures (all times in ms)."""
    ms = 1000.0
    upstream = [lat * ms - over for over, lat in rec.overheads]
    return Summary(
        url=url,
        planned=planned,
        concurrency=concurrency,
        stream=stream,
        cache_mode=cache_mode,
        elapsed=elapsed,
        responses=rec.responses,
        statuses=dict(sorted(rec.statuses.items())),
        errors=dict(sorted(rec.errors.items(), key=lambda kv: (-kv[1], kv[0]))),
        cache=dict(sorted(rec.cache.items(), key=lambda kv: (-kv[1], kv[0]))),
        latency=Percentiles.of(v * ms for v in rec.latencies),
        ttfb=Percentiles.of(v * ms for v in rec.ttfbs) if stream else None,
        overhead=Percentiles.of(over for over, _ in rec.overheads),
        upstream=Percentiles.of(upstream),
        overhead_seen=len(rec.overheads),
        bytes_received=rec.bytes_received,
        events_per_stream=(rec.events / rec.responses) if stream and rec.responses else None,
        not_sse=rec.not_sse,
        interrupted=interrupted,
    )


# -- rendering (pure) -------------------------------------------------------------------


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def _row(label: str, p: Percentiles) -> str:
    cells = (p.min, p.mean, p.p50, p.p90, p.p99, p.max)
    return f"  {label:<16}" + "".join(f"{v:>10.3f}" for v in cells)


def format_summary(s: Summary) -> str:
    """The human-readable report."""
    lines: list[str] = []
    mode = "stream" if s.stream else "json"
    bodies = "identical, cacheable" if s.cache_mode else "unique"
    lines.append(
        f"llmproxy benchmark: {s.planned} requests to {s.url}, concurrency {s.concurrency} "
        f"({mode}, {bodies} bodies)"
    )
    if s.interrupted:
        lines.append(f"interrupted: {s.finished} of {s.planned} requests finished")
    lines.append("")
    failed = sum(s.errors.values())
    lines.append(f"  total time      {s.elapsed:.3f} s")
    lines.append(
        f"  throughput      {s.throughput:.1f} req/s ({s.responses} responses, {failed} failed)"
    )
    lines.append(f"  received        {_size(s.bytes_received)}")
    if s.events_per_stream is not None:
        lines.append(f"  events/stream   {s.events_per_stream:.1f}")
    lines.append("")
    if s.latency is None:
        lines.append("latency: no responses")
    else:
        lines.append(
            "latency (ms)"
            + " " * 8
            + "".join(f"{h:>10}" for h in ("min", "mean", "p50"))
            + "".join(f"{h:>10}" for h in ("p90", "p99", "max"))
        )
        lines.append(_row("total", s.latency))
        if s.ttfb is not None:
            lines.append(_row("first byte", s.ttfb))
        if s.overhead is not None and s.upstream is not None:
            lines.append(_row("proxy overhead", s.overhead))
            lines.append(_row("upstream+network", s.upstream))
    lines.append("")
    lines.extend(_overhead_lines(s))
    lines.append("")
    lines.append("status     count")
    if not s.statuses and not s.errors:
        lines.append("  (none)")
    for code, n in s.statuses.items():
        lines.append(f"  {code:<8} {n:>6}")
    for kind, n in s.errors.items():
        lines.append(f"  {kind:<8} {n:>6}")
    if s.not_sse:
        lines.append(f"  ({s.not_sse} responses were not text/event-stream)")
    lines.append("")
    lines.append(_cache_line(s))
    return "\n".join(lines)


def _overhead_lines(s: Summary) -> list[str]:
    if s.responses == 0:
        return ["proxy overhead: no responses"]
    if s.overhead is None or s.upstream is None:
        return [
            "proxy overhead: the responses carry no X-LLMProxy-Overhead-Ms header, so the "
            "proxy's share cannot be told (is the base URL an llmproxy?)"
        ]
    assert s.latency is not None
    share = 100.0 * s.overhead.mean / s.latency.mean if s.latency.mean > 0 else 0.0
    seen = (
        ""
        if s.overhead_seen == s.responses
        else f" (header on {s.overhead_seen} of {s.responses} responses)"
    )
    return [
        f"proxy overhead: mean {s.overhead.mean:.3f} ms, p50 {s.overhead.p50:.3f} ms, "
        f"p99 {s.overhead.p99:.3f} ms; {share:.1f}% of the mean latency{seen}",
        f"upstream+network: mean {s.upstream.mean:.3f} ms, p50 {s.upstream.p50:.3f} ms, "
        f"p99 {s.upstream.p99:.3f} ms (latency minus the proxy's overhead)",
    ] + (
        [f"  ({s.cache_hits} cache hits never reached the upstream: theirs is network time)"]
        if s.cache_hits
        else []
    )


def _cache_line(s: Summary) -> str:
    if not s.cache:
        return "cache: no X-PROXY-CACHE or Cache-Status header in the responses"
    counts = ", ".join(f"{label} {n}" for label, n in s.cache.items())
    lookups = s.cache_lookups
    # Floored: 1999 of 2000 is 99.9%, never a rounded-up 100.0%.
    pct = math.floor(1000.0 * s.cache_hits / lookups) / 10 if lookups else 0.0
    ratio = f"; hit ratio {pct:.1f}%" if lookups else ""
    return f"cache: {s.cache_hits} hits ({counts}){ratio}"


def summary_json(s: Summary) -> dict[str, Any]:
    """The report for scripts (``--output json``); times in ms."""

    def dist(p: Percentiles | None) -> dict[str, float | int] | None:
        return p.as_dict() if p is not None else None

    return {
        "url": s.url,
        "requests": s.planned,
        "concurrency": s.concurrency,
        "stream": s.stream,
        "cache_mode": s.cache_mode,
        "interrupted": s.interrupted,
        "elapsed_s": round(s.elapsed, 6),
        "responses": s.responses,
        "failed": sum(s.errors.values()),
        "throughput_rps": round(s.throughput, 3),
        "bytes_received": s.bytes_received,
        "latency_ms": dist(s.latency),
        "ttfb_ms": dist(s.ttfb),
        "overhead_ms": dist(s.overhead),
        "upstream_ms": dist(s.upstream),
        "overhead_header_seen": s.overhead_seen,
        "statuses": {str(code): n for code, n in s.statuses.items()},
        "errors": dict(s.errors),
        "cache": dict(s.cache),
        "cache_hits": s.cache_hits,
        "events_per_stream": s.events_per_stream,
        "not_sse": s.not_sse,
    }


def progress_line(
    done: int, total: int, failed: int, elapsed: float, width: int = 30, bar: bool = True
) -> str:
    """``[#####-----]  512/1000  51%  2.0s  256 req/s  0 failed  eta 2s``."""
    frac = done / total if total else 1.0
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = f"eta {math.ceil((total - done) / rate)}s" if rate > 0 and done < total else ""
    head = ""
    if bar:
        filled = int(frac * width)
        head = "[" + "#" * filled + "-" * (width - filled) + "]  "
    return (
        f"{head}{done}/{total}  {100 * frac:3.0f}%  {elapsed:.1f}s  {rate:.0f} req/s  "
        f"{failed} failed  {eta}".rstrip()
    )


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ****."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def masked_header(name: str, value: str) -> str:
    """A credential header's value as ``Bearer ****``; other headers unchanged."""
    if name.lower() not in CREDENTIAL_HEADERS:
        return value
    scheme, sep, _ = value.partition(" ")
    return f"{scheme} {MASK}" if sep and scheme.isalpha() else MASK


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


def _clip(body: bytes, size: int, limit: int) -> str:
    text = body[:limit].decode("utf-8", errors="replace")
    more = size - min(len(body), limit)
    return text + (f"\n[... {more} more bytes]" if more > 0 else "")


def format_sample(sample: Sample, secrets: Iterable[str], limit: int = SAMPLE_BODY_LIMIT) -> str:
    """The request and response of ``sample``, credentials masked, bodies clipped."""
    lines = [f"> {sample.method} {sample.url}"]
    lines += [f"> {n}: {masked_header(n, v)}" for n, v in sample.request_headers]
    lines.append(">")
    lines.append(_clip(sample.request_body, len(sample.request_body), limit))
    lines.append("")
    if sample.error:
        lines.append(f"< no response: {sample.error}")
    else:
        lines.append(f"< {sample.version} {sample.status} {sample.phrase}".rstrip())
        lines += [f"< {n}: {masked_header(n, v)}" for n, v in sample.headers]
        lines.append("<")
        lines.append(_clip(sample.body, sample.body_size, limit))
    return mask_secrets("\n".join(lines), secrets)


# -- the plan: what to send (pure) ---------------------------------------------------------


def load_json_body(text: str) -> dict[str, Any]:
    """``--json``: an inline JSON object, or ``@path`` to a file holding one."""
    where = "--json"
    raw: bytes
    if text.startswith("@"):
        path = text[1:]
        where = path
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot read {path}: {e.strerror}") from None
    else:
        raw = text.encode()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise argparse.ArgumentTypeError(f"{where}: the body must be a JSON object")
    return body


def base_url(text: str) -> str:
    """``--base-url``: ``http(s)://host[:port][/prefix]``, without a trailing slash."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} has a bad port") from None
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError("--base-url takes no query; put it in --endpoint")
    return text.strip().rstrip("/")


def endpoint_path(text: str) -> str:
    """``--endpoint``: a path (a leading / is added), optionally with a query."""
    text = text.strip()
    if not text or "://" in text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a path like /v1/chat/completions")
    return text if text.startswith("/") else "/" + text


def header_arg(text: str) -> tuple[str, str]:
    """``-H 'Name: value'``."""
    name, sep, value = text.partition(":")
    name = name.strip()
    if not sep or not name or any(c.isspace() for c in name):
        raise argparse.ArgumentTypeError(f"{text!r} is not 'Name: value'")
    return name, value.strip()


def token_arg(text: str) -> str:
    """``--token``: the token, or ``@path`` to a file holding it (kept out of ``ps``)."""
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as f:
                text = f.readline()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {e.strerror}") from None
    text = text.strip()
    if not text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError("the token is empty or contains spaces")
    return text


def _seconds(text: str) -> float:
    try:
        n = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(n) or n <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return n


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
    run_id: str = attrs.Factory(lambda: _secrets.token_hex(4))

    @property
    def nonce_in_metadata(self) -> bool:
        """Anthropic's Messages API has no ``user`` field: its nonce goes in metadata."""
        return urlsplit(self.url).path.rstrip("/").endswith("/messages")

    def body(self, i: int) -> bytes:
        """The body of request ``i``: the same every time with ``cache``, else unique."""
        body = dict(self.template)
        if self.stream:
            body["stream"] = True
        if not self.cache:
            nonce = f"llmproxy-bench-{self.run_id}-{i}"
            if self.nonce_in_metadata:
                metadata = body.get("metadata")
                body["metadata"] = {
                    **(metadata if isinstance(metadata, dict) else {}),
                    "user_id": nonce,
                }
            else:
                body["user"] = nonce
        return orjson.dumps(body)

    def raw_headers(self) -> Headers:
        h = Headers()
        for name, value in self.headers:
            h.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        return h


def make_plan(args: argparse.Namespace) -> Plan:
    url = args.base_url + args.endpoint
    headers: list[tuple[str, str]] = [
        ("Content-Type", "application/json"),
        ("User-Agent", "llmproxy-benchmark"),
    ]
    secrets = [args.token] if args.token else []
    if args.token:
        headers.append(("Authorization", f"Bearer {args.token}"))
    if args.cache:
        headers.append(("Cache-Control", CACHE_OPT_IN.decode()))
    for name, value in args.header or ():
        headers = [(n, v) for n, v in headers if n.lower() != name.lower()]
        headers.append((name, value))
        if name.lower() in CREDENTIAL_HEADERS:
            scheme, sep, credential = value.partition(" ")
            secrets.append(credential.strip() if sep and scheme.isalpha() else value)
    template = args.json if args.json is not None else dict(DEFAULT_BODY)
    return Plan(
        url=url,
        requests=args.requests,
        concurrency=min(args.concurrency, args.requests),
        template=template,
        headers=tuple(headers),
        secrets=tuple(s for s in secrets if s),
        stream=args.stream,
        cache=args.cache,
        debug=args.debug,
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
    )


# -- the load generator (Twisted) ------------------------------------------------------------


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
        pool = HTTPConnectionPool(self.reactor, persistent=True)
        pool.maxPersistentPerHost = plan.concurrency
        pool.retryAutomatically = False
        pool._factory.noisy = False  # type: ignore[attr-defined]
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
        while self.issued < plan.requests and not (self.interrupted or self._aborted):
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


class Progress:
    """A bar redrawn in place on a terminal, else one line every few seconds."""

    def __init__(self, bench: Benchmark, out: IO[str], tty: bool, clock: Any) -> None:
        self.bench = bench
        self.out = out
        self.tty = tty
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(0.1 if self.tty else 2.0, now=False)

    def tick(self) -> None:
        b = self.bench
        line = progress_line(
            b.rec.finished,
            b.plan.requests,
            b.rec.failed,
            time.perf_counter() - b.started,
            bar=self.tty,
        )
        self.out.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.out.flush()

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self.tty:
            self.tick()
            self.out.write("\n")
            self.out.flush()


async def run_benchmark(
    reactor: Any,
    plan: Plan,
    out: IO[str],
    err: IO[str],
    *,
    output: str = "text",
    progress: bool = True,
) -> int:
    """Run ``plan`` and print the report; the exit code (0 ok, 1 nothing answered,
    130 interrupted)."""
    bench = Benchmark(reactor, plan)
    tty = progress and err.isatty()
    bar = Progress(bench, err, tty, reactor) if progress else None
    reported: defer.Deferred[None] = defer.Deferred()

    def on_shutdown() -> defer.Deferred[None]:
        # Ctrl-C: stop, and keep the reactor up until the partial report is out.
        bench.interrupt()
        return reported

    trigger = reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
    try:
        if bar is not None:
            bar.start()
        rec = await bench.run()
        if bar is not None:
            bar.stop()
        return _report(bench, rec, out, err, output)
    finally:
        if bench.interrupted:
            reported.callback(None)
        else:
            reactor.removeSystemEventTrigger(trigger)


def _report(bench: Benchmark, rec: Recorder, out: IO[str], err: IO[str], output: str) -> int:
    plan = bench.plan
    if rec.responses == 0 and (bench.aborted or set(rec.errors) <= CONNECT_KINDS):
        if bench.interrupted and not rec.errors:
            err.write("llmproxy benchmark: interrupted before any response\n")
            return 130
        err.write(f"llmproxy benchmark: cannot reach {plan.url}: {rec.first_error}\n")
        return 1
    summary = summarize(
        rec,
        url=plan.url,
        planned=plan.requests,
        concurrency=plan.concurrency,
        elapsed=bench.ended - bench.started,
        stream=plan.stream,
        cache_mode=plan.cache,
        interrupted=bench.interrupted,
    )
    if output == "json":
        report = summary_json(summary)
        if plan.debug and bench.sample is not None:
            report["sample"] = format_sample(bench.sample, plan.secrets)
        out.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        if plan.debug:
            out.write("sample response (the last request):\n")
            if bench.sample is not None:
                out.write(format_sample(bench.sample, plan.secrets) + "\n\n")
            else:
                out.write("(none: the last request was not sent)\n\n")
        out.write(format_summary(summary) + "\n")
    out.flush()
    if bench.interrupted:
        return 130
    if rec.responses == 0:
        err.write("llmproxy benchmark: no request got a response\n")
        return 1
    return 0


# -- the command line ---------------------------------------------------------------------


def add_benchmark_command(sub: Subcommands) -> None:
    """Register ``llmproxy benchmark``."""
    p = sub.add_parser(
        "benchmark",
        help="load a deployment; report throughput, latency and the proxy's overhead",
        description="Send --requests POSTs, at most --concurrency at a time, to "
        "--base-url + --endpoint and report throughput, latency percentiles, the status "
        "codes, cache outcomes and the proxy's own overhead (X-LLMProxy-Overhead-Ms) "
        "against upstream time. See docs/benchmarking.md.",
    )
    p.add_argument(
        "--base-url", required=True, type=base_url, help="the proxy, e.g. http://127.0.0.1:8080"
    )
    p.add_argument(
        "--endpoint",
        type=endpoint_path,
        default=DEFAULT_ENDPOINT,
        help=f"path to POST to (default: {DEFAULT_ENDPOINT})",
    )
    p.add_argument(
        "--token",
        type=token_arg,
        default=None,
        help="sent as Authorization: Bearer; @FILE reads it",
    )
    p.add_argument(
        "-H",
        "--header",
        type=header_arg,
        action="append",
        metavar="'NAME: VALUE'",
        help="an extra request header (repeatable)",
    )
    p.add_argument(
        "--requests", "-n", type=positive_int, default=100, help="how many (default 100)"
    )
    p.add_argument(
        "--concurrency", "-c", type=positive_int, default=10, help="in flight at most (default 10)"
    )
    p.add_argument(
        "--json",
        type=load_json_body,
        default=None,
        metavar="BODY",
        help="request body: a JSON object, or @FILE (default: a small gpt-4o-mini chat)",
    )
    p.add_argument("--stream", action="store_true", help='"stream": true; read each SSE stream')
    p.add_argument(
        "--cache",
        action="store_true",
        help="identical, cacheable requests (exercise the proxy's cache)",
    )
    p.add_argument("--debug", action="store_true", help="print one sample exchange first")
    p.add_argument(
        "--output", choices=("text", "json"), default="text", help="report format (default text)"
    )
    p.add_argument(
        "--timeout", type=_seconds, default=60.0, help="per request, seconds (default 60)"
    )
    p.add_argument("--connect-timeout", type=_seconds, default=10.0, help="seconds (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    p.set_defaults(func=_benchmark_command)


def _benchmark_command(args: argparse.Namespace) -> int:
    plan = make_plan(args)

    async def main(reactor: Any) -> None:
        code = await run_benchmark(
            reactor,
            plan,
            sys.stdout,
            sys.stderr,
            output=args.output,
            progress=not args.no_progress,
        )
        if code:
            raise SystemExit(code)

    task.react(main)
