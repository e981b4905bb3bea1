"""Exporter and event bus stats as Prometheus metric families (tests:
tests/integration/test_admin.py, tests/unit/redis/test_stream.py).

Reads the dicts from ``BatchingExporter.stats()`` and the bus's ``stats()``
(``MemoryBus`` or ``RedisBus``: the delivery engine's counts under the bus's
names) at scrape time, so they keep plain counters and nothing is registered
twice.  A key a bus does not report is left out.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["bus_families", "exporter_families"]

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


_BUS_COUNTERS = (
    ("accepted", "Events published on the bus (Redis bus: plus recovered from its spool)"),
    ("published", "Events handed on (memory bus: to subscribers; Redis bus: XADD confirmed)"),
    ("subscriber_errors", "Local subscribers that raised"),
    ("recovered", "Events found in the Redis bus spool at start"),
    ("replayed", "Events replayed from the Redis bus spool"),
    ("batches", "Pipelined XADD batches confirmed"),
    ("batches_failed", "XADD batches that failed (retried; durable on disk meanwhile)"),
)
_BUS_GAUGES = (
    ("in_flight", "Events in the XADD batch on its way"),
    ("queued", "Events waiting in memory for XADD (a retried batch included)"),
    ("spooled", "Events in the Redis bus spool (Redis unreachable or refusing)"),
    ("spool_bytes", "Bytes in the Redis bus spool"),
    ("connected", "1 while the Redis connection is usable"),
    ("last_success", "Unix time of the last confirmed XADD batch"),
)


def exporter_families(stats: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    """Every exporter's stats, labelled by its name."""
    return _families("llmproxy_exporter", "exporter", stats, _COUNTERS, _GAUGES)


def bus_families(stats: Mapping[str, Any]) -> Iterator[Metric]:
    """The bus's stats, labelled by its type."""
    kind = str(stats.get("type", "memory"))
    return _families("llmproxy_bus", "bus", {kind: stats}, _BUS_COUNTERS, _BUS_GAUGES)


def _families(
    prefix: str,
    label: str,
    stats: Mapping[str, Mapping[str, Any]],
    counters: tuple[tuple[str, str], ...],
    gauges: tuple[tuple[str, str], ...],
) -> Iterator[Metric]:
    """One family per key that some of ``stats`` (by label value) report, and the
    drops by reason."""
    for make, table in ((CounterMetricFamily, counters), (GaugeMetricFamily, gauges)):
        for key, doc in table:
            fam = make(f"{prefix}_{key}", doc, labels=[label])
            reporting = [(name, s) for name, s in sorted(stats.items()) if key in s]
            for name, s in reporting:
                fam.add_metric([name], float(s[key] or 0))
            if reporting:
                yield fam
    if any("dropped_by_reason" in s for s in stats.values()):
        dropped = CounterMetricFamily(
            f"{prefix}_dropped", "Events dropped, by reason", labels=[label, "reason"]
        )
        for name, s in sorted(stats.items()):
            for reason, n in sorted((s.get("dropped_by_reason") or {}).items()):
                dropped.add_metric([name, reason], float(n))
        yield dropped
