"""Event bus stats as Prometheus metric families (tests: tests/unit/redis/test_stream.py).

Read from ``MemoryBus.stats()`` or ``RedisBus.stats()`` (the delivery engine's
counts under the bus's names) at scrape time; a key a bus does not report is left
out.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["bus_families"]

_COUNTERS = (
    ("accepted", "Events published on the bus (Redis bus: plus recovered from its spool)"),
    ("published", "Events handed on (memory bus: to subscribers; Redis bus: XADD confirmed)"),
    ("subscriber_errors", "Local subscribers that raised"),
    ("recovered", "Events found in the Redis bus spool at start"),
    ("replayed", "Events replayed from the Redis bus spool"),
    ("batches", "Pipelined XADD batches confirmed"),
    ("batches_failed", "XADD batches that failed (retried; durable on disk meanwhile)"),
)
_GAUGES = (
    ("in_flight", "Events in the XADD batch on its way"),
    ("queued", "Events waiting in memory for XADD (a retried batch included)"),
    ("spooled", "Events in the Redis bus spool (Redis unreachable or refusing)"),
    ("spool_bytes", "Bytes in the Redis bus spool"),
    ("connected", "1 while the Redis connection is usable"),
    ("last_success", "Unix time of the last confirmed XADD batch"),
)


def bus_families(stats: Mapping[str, Any]) -> Iterator[Metric]:
    kind = str(stats.get("type", "memory"))
    for key, doc in _COUNTERS:
        if key in stats:
            fam = CounterMetricFamily(f"llmproxy_bus_{key}", doc, labels=["bus"])
            fam.add_metric([kind], float(stats[key] or 0))
            yield fam
    if "dropped_by_reason" in stats:
        dropped = CounterMetricFamily(
            "llmproxy_bus_dropped", "Events the bus dropped, by reason", labels=["bus", "reason"]
        )
        for reason, n in sorted(stats["dropped_by_reason"].items()):
            dropped.add_metric([kind, reason], float(n))
        yield dropped
    for key, doc in _GAUGES:
        if key in stats:
            gauge = GaugeMetricFamily(f"llmproxy_bus_{key}", doc, labels=["bus"])
            gauge.add_metric([kind], float(stats[key] or 0))
            yield gauge
