"""The figures and the report of one ``llmproxy benchmark`` run, all pure functions
(tests: tests/unit/cli/test_benchmark.py).

``summarize`` turns a ``Recorder`` (llmproxy/cli/loadgen.py) into a ``Summary``:
latency percentiles, the split between the proxy's own overhead (the
``X-LLMProxy-Overhead-Ms`` response header) and the rest of each request's time
(upstream and network), the status table and the cache outcomes.
``format_summary`` renders it for a person, ``summary_json`` for scripts
(``--output json``); ``format_sample`` renders the ``--debug`` exchange with every
credential masked.  docs/benchmarking.md shows how to read the report.

Percentiles are nearest-rank: p99 is a latency that 99% of the responses did not
exceed, always one that was measured, never interpolated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from llmproxy.cli.loadgen import SAMPLE_BODY_LIMIT, Recorder, Sample

__all__ = [
    "CREDENTIAL_HEADERS",
    "MASK",
    "Percentiles",
    "Summary",
    "format_sample",
    "format_summary",
    "mask_secrets",
    "masked_header",
    "percentile",
    "progress_line",
    "summarize",
    "summary_json",
]

# Header values never printed: shown as their scheme (if any) and ****.
CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie"}
)
MASK = "****"

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
    duration: float | None = None  # --duration: seconds of sending asked for

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
    duration: float | None = None,
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
        duration=duration,
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
    bodies = "cacheable" if s.cache_mode else "no-store"
    how_many = f"{s.planned} requests"
    if s.duration is not None:
        how_many = f"{s.duration:g} s of requests ({s.planned} sent)"
    lines.append(
        f"llmproxy benchmark: {how_many} to {s.url}, concurrency {s.concurrency} ({mode}, {bodies})"
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
        "duration_s": s.duration,
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
    done: int,
    total: int,
    failed: int,
    elapsed: float,
    width: int = 30,
    bar: bool = True,
    duration: float | None = None,
) -> str:
    """``[#####-----]  512/1000  51%  2.0s  256 req/s  0 failed  eta 2s``; a timed run
    (``duration``) counts its seconds: ``[###---]  512 done  40%  2.0s/5s  ...``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    if duration is not None:
        frac = min(1.0, elapsed / duration)
        left = math.ceil(duration - elapsed) if elapsed < duration else 0
        count, clock, eta = f"{done} done", f"{elapsed:.1f}s/{duration:g}s", f"eta {left}s"
    else:
        frac = done / total if total else 1.0
        count, clock = f"{done}/{total}", f"{elapsed:.1f}s"
        eta = f"eta {math.ceil((total - done) / rate)}s" if rate > 0 and done < total else ""
    head = ""
    if bar:
        filled = int(frac * width)
        head = "[" + "#" * filled + "-" * (width - filled) + "]  "
    return (
        f"{head}{count}  {100 * frac:3.0f}%  {clock}  {rate:.0f} req/s  "
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
