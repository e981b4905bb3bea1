"""Request metrics kept as plain numbers on the hot path
(tests: tests/unit/proxy/test_metrics.py, tests/integration/test_admin.py,
tests/unit/runtime/test_aggregate.py, tests/integration/test_alert_rules.py).

prometheus_client's own metric objects take a lock per update; the request path
only adds to dicts and lists here, and :class:`MetricsCollector` turns them into
metric families (prometheus_client writes the exposition format) when
``/metrics`` is scraped.  ``snapshot()`` gives the same numbers as JSON for
``/stats``.

Outcomes (the ``outcome`` label) tell how an exchange ended, whatever the
status: ``ok``, ``cache_hit``, ``client_error`` (the upstream's 4xx),
``upstream_rate_limited`` (its 429), ``upstream_error`` (its 5xx, or a failed or
cut upstream), ``timeout``, ``client_disconnected``, ``rejected`` (the proxy
refused).  Every one but ``ok`` and ``cache_hit`` is an error for the
dashboards and alerts.

Requests made with a proxy token are counted by project too, and so are the
tokens their answers used (:meth:`ProxyMetrics.usage`, from the capture pump).
What answers cost is counted by project and model (:meth:`ProxyMetrics.spent`,
from the capture pump, which priced them), and so are their tokens; answers
with usage but no price (a model in no price table) are counted by model.
Exchanges without a proxy token count under the project ``-``.
The label set is bounded: the first ``max_projects`` projects seen keep their
name for the life of the process, the rest are counted as ``other``; models
likewise (the first ``max_models``, by default as many as projects).  (Not the
top N by volume: a project moving in or out of the top would make its series
and ``other`` go backwards, which counters must never do.)
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

if TYPE_CHECKING:
    from llmproxy.capture.record import ExchangeRecord

__all__ = [
    "LATENCY_BUCKETS",
    "OTHER_PROJECTS",
    "OVERHEAD_BUCKETS",
    "Histogram",
    "MetricsCollector",
    "ProjectLabels",
    "ProxyMetrics",
    "make_registry",
]

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
)  # fmt: skip


class Histogram:
    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(bound), float(running)))
        out.append(("+Inf", float(self.count)))
        return out


OTHER_PROJECTS = "other"
# usage_dict keys -> the kind label of llmproxy_project_tokens_total
_TOKEN_KINDS = (
    ("input_tokens", "input"),
    ("output_tokens", "output"),
    ("cache_read_tokens", "cache_read"),
    ("cache_creation_tokens", "cache_creation"),
)


class ProjectLabels:
    """Project name -> its label value: the first ``limit`` names seen are their
    own label, any later one is ``other``."""

    __slots__ = ("_labels", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._labels: dict[str, str] = {}

    def __call__(self, project: str) -> str:
        label = self._labels.get(project)
        if label is None:
            label = project if len(self._labels) < self.limit else OTHER_PROJECTS
            # Remembered either way: a name is judged once, so its label never changes.
            if len(self._labels) < 10 * self.limit + 1000:
                self._labels[project] = label
        return label


class ProxyMetrics:
    """Counters for the proxy listener; one instance per process."""

    def __init__(self, max_projects: int = 50, max_models: int | None = None) -> None:
        self.requests: dict[tuple[str, int, str], int] = {}
        self.project_label = ProjectLabels(max_projects)
        # Models are bounded as projects are (server.metrics_projects), unless told.
        self.model_label = ProjectLabels(max_projects if max_models is None else max_models)
        # (project, model) -> USD; (project, model, kind) -> tokens; model -> answers
        self.cost_usd: dict[tuple[str, str], float] = {}
        self.model_tokens: dict[tuple[str, str, str], int] = {}
        self.cost_unknown: dict[str, int] = {}
        self.project_requests: dict[tuple[str, str], int] = {}
        self.project_tokens: dict[tuple[str, str], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.ttfb: dict[str, Histogram] = {}
        self.overhead = Histogram(OVERHEAD_BUCKETS)
        self.bytes_in = 0
        self.bytes_out = 0
        self.open_requests = 0
        self.open_streams = 0
        self.connections = 0
        # Requests and connections refused by a client limit, by the setting's name.
        self.limits: dict[str, int] = {}

    def limit_hit(self, limit: str) -> None:
        self.limits[limit] = self.limits.get(limit, 0) + 1

    def finished(
        self,
        route: str,
        status: int,
        outcome: str,
        duration: float,
        ttfb: float | None,
        bytes_in: int,
        bytes_out: int,
        *,
        project: str | None = None,
    ) -> None:
        key = (route, status, outcome)
        self.requests[key] = self.requests.get(key, 0) + 1
        if project is not None:
            pkey = (self.project_label(project), outcome)
            self.project_requests[pkey] = self.project_requests.get(pkey, 0) + 1
        h = self.latency.get(route)
        if h is None:
            h = self.latency[route] = Histogram(LATENCY_BUCKETS)
        h.observe(duration)
        if ttfb is not None:
            t = self.ttfb.get(route)
            if t is None:
                t = self.ttfb[route] = Histogram(LATENCY_BUCKETS)
            t.observe(ttfb)
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def usage(self, project: str, usage: dict[str, Any]) -> None:
        """Add the tokens one answer of ``project`` used (a ``usage`` dict of an event)."""
        label = self.project_label(project)
        tokens = self.project_tokens
        for field, kind in _TOKEN_KINDS:
            n = usage.get(field)
            if type(n) is int and n > 0:
                key = (label, kind)
                tokens[key] = tokens.get(key, 0) + n

    def spent(self, record: ExchangeRecord, event: Mapping[str, Any]) -> None:
        """Count what one answer cost and used, by project and model (a response
        event with ``usage`` and ``cost``)."""
        usage = event.get("usage")
        if usage is None:
            return
        project = self.project_label(record.project) if record.project is not None else "-"
        model = self.model_label(event.get("model") or "-")
        tokens = self.model_tokens
        for field, kind in _TOKEN_KINDS:
            n = usage.get(field)
            if type(n) is int and n > 0:
                key3 = (project, model, kind)
                tokens[key3] = tokens.get(key3, 0) + n
        cost = event.get("cost")
        if cost is None:
            self.cost_unknown[model] = self.cost_unknown.get(model, 0) + 1
            return
        key = (project, model)
        self.cost_usd[key] = self.cost_usd.get(key, 0.0) + cost["total"]

    def snapshot(self) -> dict[str, Any]:
        by_route: dict[str, dict[str, Any]] = {}
        for (route, status, outcome), n in sorted(self.requests.items()):
            r = by_route.setdefault(route, {"requests": 0, "by_status": {}, "by_outcome": {}})
            r["requests"] += n
            r["by_status"][str(status)] = r["by_status"].get(str(status), 0) + n
            r["by_outcome"][outcome] = r["by_outcome"].get(outcome, 0) + n
        for route, h in self.latency.items():
            by_route.setdefault(route, {})["mean_latency_ms"] = round(
                1000 * h.total / max(h.count, 1), 3
            )
        by_project: dict[str, dict[str, Any]] = {}
        for (project, outcome), n in sorted(self.project_requests.items()):
            p = by_project.setdefault(project, {"requests": 0, "by_outcome": {}, "tokens": {}})
            p["requests"] += n
            p["by_outcome"][outcome] = n
        for (project, kind), n in sorted(self.project_tokens.items()):
            p = by_project.setdefault(project, {"requests": 0, "by_outcome": {}, "tokens": {}})
            p["tokens"][kind] = n
        cost: dict[str, dict[str, dict[str, float]]] = {}
        for (project, model), usd in sorted(self.cost_usd.items()):
            cost.setdefault(project, {})[model] = {"usd": round(usd, 9)}
        return {
            "requests_total": sum(self.requests.values()),
            "routes": by_route,
            "projects": by_project,
            "cost": cost,
            "cost_unknown": dict(sorted(self.cost_unknown.items())),
            "open_requests": self.open_requests,
            "open_streams": self.open_streams,
            "connections": self.connections,
            # Keyed by the setting's full name ("server.max_connections": a sum
            # over workers, where a bare "max_..." key would be taken for a maximum).
            "limit_rejections": {
                (k if "." in k else f"server.{k}"): n for k, n in sorted(self.limits.items())
            },
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "overhead_mean_ms": round(1000 * self.overhead.total / max(self.overhead.count, 1), 4),
        }

    def families(self) -> Iterator[Metric]:
        counters: tuple[tuple[str, str, list[str], Mapping[Any, float]], ...] = (
            ("llmproxy_requests", "Proxied requests", ["route", "status", "outcome"],
             self.requests),
            ("llmproxy_project_requests", "Requests made with a proxy token, by its project "
             "(the first N projects; the rest as other)", ["project", "outcome"],
             self.project_requests),
            ("llmproxy_project_tokens", "Tokens the answers to a project's requests used, by "
             "kind (from the response usage; counted when events are on)", ["project", "kind"],
             self.project_tokens),
            ("llmproxy_model_tokens", "Tokens the answers used, by project, model and kind (the "
             "first N of each; the rest as other; '-': no proxy token)",
             ["project", "model", "kind"], self.model_tokens),
            ("llmproxy_cost_usd", "What the answers cost in USD, by project and model "
             "(genai-prices or the ini's prices; cache hits cost 0)", ["project", "model"],
             self.cost_usd),
            ("llmproxy_cost_unknown", "Answers with token usage but no price (a model in no "
             "price table), by model", ["model"], self.cost_unknown),
            ("llmproxy_limit_rejections", "Requests and connections refused by a client limit "
             "(header_timeout, min_body_rate, max_connections, max_connections_per_client, "
             "max_header_bytes, max_header_count, max_body_bytes)", ["limit"], self.limits),
        )  # fmt: skip
        for name, doc, labels, counts in counters:
            counter = CounterMetricFamily(name, doc, labels=labels)
            for key, n in sorted(counts.items()):
                parts = key if isinstance(key, tuple) else (key,)
                counter.add_metric([str(part) for part in parts], n)
            yield counter
        for name, doc, hists in (
            ("llmproxy_request_duration_seconds", "Whole exchange duration", self.latency),
            ("llmproxy_ttfb_seconds", "Time to upstream response headers", self.ttfb),
        ):
            fam = HistogramMetricFamily(name, doc, labels=["route"])
            for route, h in sorted(hists.items()):
                fam.add_metric([route], h.cumulative(), h.total)
            yield fam
        ov = HistogramMetricFamily(
            "llmproxy_overhead_seconds", "Time the proxy itself added before the first byte"
        )
        ov.add_metric([], self.overhead.cumulative(), self.overhead.total)
        yield ov
        b = CounterMetricFamily("llmproxy_bytes", "Body bytes", labels=["direction"])
        b.add_metric(["in"], self.bytes_in)
        b.add_metric(["out"], self.bytes_out)
        yield b
        for name, doc, value in (
            ("llmproxy_open_requests", "Requests in flight", self.open_requests),
            ("llmproxy_open_streams", "Responses being streamed", self.open_streams),
            ("llmproxy_client_connections", "Open client connections", self.connections),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


class MetricsCollector:
    """A prometheus_client collector over callables yielding metric families."""

    def __init__(self, *sources: Callable[[], Iterator[Metric]]) -> None:
        self._sources = list(sources)

    def add(self, source: Callable[[], Iterator[Metric]]) -> None:
        self._sources.append(source)

    def collect(self) -> Iterator[Metric]:
        for source in self._sources:
            yield from source()


def make_registry(collector: MetricsCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    return registry
