"""One view of N workers: their /stats documents and /metrics families combined
key by key, for the master's admin listener (tests: tests/unit/runtime/test_aggregate.py)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["combine_rule", "monotonic_families", "parse_families", "sum_families", "sum_stats"]


def combine_rule(name: str) -> str:
    """How one value is combined over workers: most are sums (counts, bytes,
    requests in flight); ages and timestamps take the max, "connected" the min,
    means a mean, and the token count (every worker reads the same file) the max."""
    words = name.lower().split("_")
    if "connected" in words:
        return "min"
    if "age" in words or "last" in words or "max" in words or name == "tokens":
        return "max"
    if "mean" in words or "ratio" in words:
        return "mean"
    return "sum"


def _combine(rule: str, values: Sequence[float]) -> float:
    if rule == "max":
        return max(values)
    if rule == "min":
        return min(values)
    if rule == "mean":
        return sum(values) / len(values)
    return sum(values)


def parse_families(text: str) -> list[Metric]:
    """One worker's /metrics text as metric families (ValueError if it is not
    the Prometheus text format)."""
    return list(text_string_to_metric_families(text))


def sum_families(groups: Iterable[Iterable[Metric]]) -> list[Metric]:
    """Sum the families of several workers: samples with the same name and
    labels are added (counters, histogram buckets, sums and counts, gauges),
    except the gauges :func:`combine_rule` names (ages: max, ...)."""
    out: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for families in groups:
        for fam in families:
            if fam.name not in out:
                out[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                values[fam.name] = {}
            samples = values[fam.name]
            for s in fam.samples:
                samples.setdefault((s.name, tuple(sorted(s.labels.items()))), []).append(s.value)
    for name, fam in out.items():
        rule = combine_rule(name) if fam.type == "gauge" else "sum"
        for (sample, labels), vals in values[name].items():
            fam.add_sample(sample, dict(labels), _combine(rule, vals))
    return list(out.values())


def monotonic_families(families: Iterable[Metric]) -> list[Metric]:
    """The families that only grow (counters, histograms, summaries): what a dead
    worker leaves behind so the sums do not go backwards when it restarts."""
    return [f for f in families if f.type in ("counter", "histogram", "summary")]


def sum_stats(docs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine several workers' /stats documents key by key: numbers as
    :func:`combine_rule` says (mostly sums), booleans "any", nested objects
    recursively; other values are kept when the workers agree, else listed."""
    out: dict[str, Any] = {}
    keys: list[str] = []
    for doc in docs:
        keys.extend(k for k in doc if k not in keys)
    for key in keys:
        present = [doc[key] for doc in docs if key in doc and doc[key] is not None]
        if not present:
            out[key] = None
        elif all(isinstance(v, bool) for v in present):
            out[key] = any(present)
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
            rule = combine_rule(key)
            total = _combine(rule, present)
            ints = all(isinstance(v, int) for v in present) and rule != "mean"
            # Money keeps nano-dollars: one answer can cost a few millionths.
            digits = 9 if "usd" in key.lower().split("_") else 6
            out[key] = int(total) if ints else round(total, digits)
        elif all(isinstance(v, Mapping) for v in present):
            out[key] = sum_stats(present)
        else:
            distinct: list[Any] = []
            for v in present:
                if v not in distinct:
                    distinct.append(v)
            out[key] = distinct[0] if len(distinct) == 1 else distinct
    return out
