"""Exporter stats as Prometheus metric families (tests: tests/integration/test_admin.py).

Reads the dicts from ``BatchingExporter.stats()`` at scrape time, so the
exporters keep plain counters and nothing is registered twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["exporter_families"]

_COUNTERS = (
    ("accepted", "Events accepted by the exporter"),
    ("sent", "Events delivered to the sink"),
    ("dead_lettered", "Events written to the dead-letter file (permanent refusals)"),
    ("retries", "Delivery attempts that were retried"),
    ("batches_sent", "Batches delivered"),
    ("batches_failed", "Delivery attempts that failed"),
    ("recovered", "Events found in the spool at start"),
    ("replayed", "Events read back from the spool to be sent"),
    ("spool_writes", "Segments written to the spool (while failing, or a full buffer)"),
    ("spool_write_errors", "Spool writes the disk refused (the events stayed in memory)"),
)
_GAUGES = (
    ("in_flight", "Events being delivered now"),
    ("queued", "Events waiting in memory (incl. batches in backoff, writes to the spool)"),
    ("failing", "1 while the sink is failing (from a failed attempt to the next delivery)"),
    ("spooled", "Events in the disk spool"),
    ("queue_bytes", "Estimated bytes waiting in memory"),
    ("oldest_queued_age_s", "Age of the oldest event waiting in memory, seconds"),
    ("last_success", "Unix time of the last successful delivery"),
)


def exporter_families(stats: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    for key, doc in _COUNTERS:
        fam = CounterMetricFamily(f"llmproxy_exporter_{key}", doc, labels=["exporter"])
        for name, s in sorted(stats.items()):
            fam.add_metric([name], float(s.get(key) or 0))
        yield fam
    dropped = CounterMetricFamily(
        "llmproxy_exporter_dropped", "Events dropped, by reason", labels=["exporter", "reason"]
    )
    for name, s in sorted(stats.items()):
        for reason, n in sorted((s.get("dropped_by_reason") or {}).items()):
            dropped.add_metric([name, reason], float(n))
    yield dropped
    for key, doc in _GAUGES:
        fam_g = GaugeMetricFamily(f"llmproxy_exporter_{key}", doc, labels=["exporter"])
        for name, s in sorted(stats.items()):
            fam_g.add_metric([name], float(s.get(key) or 0))
        yield fam_g
