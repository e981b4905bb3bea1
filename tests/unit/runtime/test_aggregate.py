"""The master's sums over workers (llmproxy/runtime/supervisor.py), the per-worker paths
(llmproxy/runtime/worker.py) and ``server.workers`` parsing (llmproxy/config/loader.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.config.loader import ConfigError, load_settings
from llmproxy.proxy.metrics import MetricsCollector, ProxyMetrics, make_registry
from llmproxy.runtime.aggregate import (
    combine_rule,
    monotonic_families,
    parse_families,
    sum_families,
    sum_stats,
)
from llmproxy.runtime.worker import worker_settings


def _worker_text(requests: list[tuple[str, int, float]], open_requests: int, age: float) -> str:
    m = ProxyMetrics()
    for route, status, duration in requests:
        m.finished(route, status, "ok", duration, duration / 2, 10, 20)
    m.open_requests = open_requests

    def extra() -> object:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily("llmproxy_exporter_oldest_queued_age_s", "age", value=age)
        yield GaugeMetricFamily("llmproxy_bus_connected", "up", value=1 if age < 5 else 0)

    registry = make_registry(MetricsCollector(m.families, extra))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _exposed(families: list) -> str:  # type: ignore[type-arg]
    class Collector:
        def collect(self) -> object:
            return iter(families)

    registry = make_registry(Collector())  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_counters_histograms_and_gauges_are_summed() -> None:
    a = _worker_text([("chat", 200, 0.003), ("chat", 502, 0.2)], open_requests=2, age=1.5)
    b = _worker_text([("chat", 200, 0.004), ("embed", 200, 0.02)], open_requests=3, age=7.0)
    total = _samples(_exposed(sum_families([parse_families(a), parse_families(b)])))
    req = "llmproxy_requests_total"
    assert total[(req, (("outcome", "ok"), ("route", "chat"), ("status", "200")))] == 2
    assert total[(req, (("outcome", "ok"), ("route", "chat"), ("status", "502")))] == 1
    assert total[(req, (("outcome", "ok"), ("route", "embed"), ("status", "200")))] == 1
    hist = "llmproxy_request_duration_seconds"
    assert total[(hist + "_count", (("route", "chat"),))] == 3
    assert total[(hist + "_sum", (("route", "chat"),))] == pytest.approx(0.207)
    assert total[(hist + "_bucket", (("le", "0.005"), ("route", "chat")))] == 2
    assert total[(hist + "_bucket", (("le", "+Inf"), ("route", "chat")))] == 3
    assert total[(hist + "_bucket", (("le", "0.0025"), ("route", "chat")))] == 0
    assert total[("llmproxy_bytes_total", (("direction", "out"),))] == 80
    assert total[("llmproxy_open_requests", ())] == 5
    # Ages take the oldest; "connected" only when every worker is.
    assert total[("llmproxy_exporter_oldest_queued_age_s", ())] == 7.0
    assert total[("llmproxy_bus_connected", ())] == 0


def test_the_sum_is_valid_exposition_with_one_family_per_name() -> None:
    a = parse_families(_worker_text([("chat", 200, 0.01)], 0, 0.0))
    b = parse_families(_worker_text([("x", 200, 0.01)], 0, 0.0))
    text = _exposed(sum_families([a, b]))
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))
    assert text.count("# TYPE llmproxy_request_duration_seconds histogram") == 1


def test_only_monotonic_families_are_carried_over() -> None:
    fams = parse_families(_worker_text([("chat", 200, 0.01)], open_requests=4, age=3.0))
    kept = {f.name for f in monotonic_families(fams)}
    assert "llmproxy_requests" in kept and "llmproxy_request_duration_seconds" in kept
    assert "llmproxy_open_requests" not in kept


def test_parse_families_refuses_garbage() -> None:
    with pytest.raises(ValueError):
        parse_families("this is { not prometheus\n")


def test_stats_are_summed_recursively() -> None:
    one = {
        "ready": True,
        "draining": False,
        "proxy": {
            "requests_total": 3,
            "routes": {"chat": {"requests": 3, "by_status": {"200": 3}}},
        },
        "exporters": {"events": {"sent": 3, "oldest_queued_age_s": 0.5, "last_success": 10.0}},
        "access": {"tokens": 4, "denied": 1},
        "cache": {"store": "memory", "hits": 2},
        "sessions": None,
    }
    two = {
        "ready": False,
        "draining": False,
        "proxy": {
            "requests_total": 5,
            "routes": {"embed": {"requests": 5, "by_status": {"200": 5}}},
        },
        "exporters": {"events": {"sent": 4, "oldest_queued_age_s": 2.0, "last_success": 12.0}},
        "access": {"tokens": 4, "denied": 0},
        "cache": {"store": "memory", "hits": 1},
        "sessions": None,
    }
    total = sum_stats([one, two])
    assert total["proxy"]["requests_total"] == 8
    assert total["proxy"]["routes"] == {
        "chat": {"requests": 3, "by_status": {"200": 3}},
        "embed": {"requests": 5, "by_status": {"200": 5}},
    }
    assert total["exporters"]["events"] == {
        "sent": 7,
        "oldest_queued_age_s": 2.0,
        "last_success": 12.0,
    }
    assert total["access"] == {"tokens": 4, "denied": 1}  # one tokens file read by both
    assert total["cache"] == {"store": "memory", "hits": 3}
    assert total["ready"] is True and total["draining"] is False
    assert total["sessions"] is None
    assert sum_stats([]) == {}


def test_combine_rules() -> None:
    assert combine_rule("requests_total") == "sum"
    assert combine_rule("open_streams") == "sum"
    assert combine_rule("llmproxy_exporter_last_success") == "max"
    assert combine_rule("overhead_mean_ms") == "mean"
    assert combine_rule("llmproxy_bus_connected") == "min"


def _settings(tmp_path: Path, extra: str = "") -> object:
    text = f"""
[server]
state_dir = {tmp_path / "state"}
workers = 2
[route:r]
prefix = /
upstream = http://127.0.0.1:9
[exporter:inside]
type = file
path = events.jsonl
[exporter:outside]
type = file
path = {tmp_path / "logs" / "events.jsonl"}
spool_dir = {tmp_path / "spools"}
dead_letter_path = {tmp_path / "dead.jsonl"}
[exporter:sessions]
type = sessions
{extra}
"""
    return load_settings(text=text, env={})


def test_worker_paths_move_under_the_worker_or_get_its_name(tmp_path: Path) -> None:
    base = _settings(tmp_path)
    s = worker_settings(base, 1)  # type: ignore[arg-type]
    state = tmp_path / "state"
    own = state / "worker-1"
    assert s.server.state_dir == own
    by_name = {e.name: e for e in s.exporters}
    assert by_name["inside"].path == own / "events.jsonl"
    assert by_name["inside"].spool_dir is None  # the default: under the worker's state_dir
    assert by_name["outside"].path == tmp_path / "logs" / "events.worker-1.jsonl"
    assert by_name["outside"].spool_dir == tmp_path / "spools" / "worker-1"
    assert by_name["outside"].dead_letter_path == tmp_path / "dead.worker-1.jsonl"
    assert s.sessions.state_file == own / "session-state.jsonl"
    # Shared: the audit log (append-only lines) and the routes.
    assert s.audit_path == state / "audit.jsonl"
    assert s.routes == base.routes  # type: ignore[attr-defined]
    other = worker_settings(base, 0)  # type: ignore[arg-type]
    paths = {e.path for e in s.exporters if e.path is not None}
    assert len(paths) == 2
    assert paths.isdisjoint(e.path for e in other.exporters)


def test_workers_setting(tmp_path: Path) -> None:
    def workers(value: str) -> int:
        text = f"[server]\nworkers = {value}\nstate_dir = {tmp_path}\n"
        return load_settings(text=text, env={}).server.workers

    assert workers("auto") == (os.cpu_count() or 1)
    assert workers(" AUTO ") == (os.cpu_count() or 1)
    assert workers("4") == 4
    for bad, why in (("0", "must be at least 1"), ("-2", "must be at least 1"), ("lots", "auto")):
        with pytest.raises(ConfigError) as e:
            workers(bad)
        assert any(p.startswith("server.workers: ") and why in p for p in e.value.problems)
    env = {"LLMPROXY_SERVER_WORKERS": "auto"}
    assert load_settings(text="[server]\n", env=env).server.workers == (os.cpu_count() or 1)


def test_money_is_summed_to_the_nano_dollar() -> None:
    """One answer may cost a few millionths of a dollar: USD sums keep 9 digits,
    other floats 6."""
    one = {"cost": {"p": {"gpt-4o": {"usd": 0.0000675}}}, "mean_latency_ms": 1.0000004}
    two = {"cost": {"p": {"gpt-4o": {"usd": 0.000000125}}}, "mean_latency_ms": 1.0000004}
    total = sum_stats([one, two])
    assert total["cost"]["p"]["gpt-4o"]["usd"] == 0.000067625
    assert total["mean_latency_ms"] == 1.0
