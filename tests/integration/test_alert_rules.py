"""The shipped alert rules (docs/prometheus/llmproxy-alerts.yml) and the dashboard's
error panels, evaluated by the real ``promtool`` on what a real proxy's /metrics
says after its upstream answered 500s and 429s.

The proxy runs in-process against the fake upstream on 127.0.0.1; /metrics is
scraped twice, one batch of requests apart, and the scraped counters become
``promtool test rules`` input series that keep growing at the rate seen between
the scrapes (one scrape a minute, as a Prometheus would see a steady stream of
such batches).  promtool then evaluates the rules file itself, unchanged, and a
Grafana panel's query with its variables filled in.  ``promtool`` is the
Debian package ``prometheus`` (scripts/system-deps installs it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import Running, running_fixture, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "docs" / "prometheus" / "llmproxy-alerts.yml"
DASHBOARD = ROOT / "docs" / "grafana" / "llmproxy-dashboard.json"
INSTANCE = "proxy-1:9090"
STEPS = 30  # minutes of the same traffic fed to promtool

HEALTHY_ROUTE = """
[route:healthy]
prefix = /healthy
upstream = http://127.0.0.1:{upstream_port}
provider = openai

[exporter:events]
type = file
path = events.jsonl
flush_interval = 0.05
"""
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
# One batch: route root's upstream fails a quarter of its requests with 500,
# route mock's refuses a quarter with 429 (its rate limit), route healthy's never.
BATCH = [
    ("/v1/chat/completions", 6),
    ("/status/500", 2),
    ("/mock/v1/chat/completions", 6),
    ("/mock/status/429", 2),
    ("/healthy/v1/chat/completions", 16),
]


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: install the Debian package prometheus (scripts/system-deps)"
    return path


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Running]:
    yield from running_fixture(tmp_path, extra=HEALTHY_ROUTE)


async def send_batch(env: Running) -> None:
    for path, times in BATCH:
        for _ in range(times):
            resp = await env.client.post(env.url(path), json=CHAT)
            await resp.content()


async def scrape(env: Running) -> dict[tuple[tuple[str, str], ...], float]:
    """``llmproxy_requests_total`` samples: sorted labels -> value."""
    text = (await (await env.client.get(env.admin + "/metrics")).content()).decode()
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "llmproxy_requests"
        for s in family.samples
        if s.name == "llmproxy_requests_total"
    }


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def input_series(
    first: dict[tuple[tuple[str, str], ...], float],
    second: dict[tuple[tuple[str, str], ...], float],
) -> list[dict[str, str]]:
    """Each scraped counter from its first value on, growing by what one batch added,
    once a minute, with the labels a Prometheus scrape adds."""
    out = []
    for labels, value in sorted(second.items()):
        start = first.get(labels, 0.0)
        step = value - start
        selector = ",".join(
            f'{k}="{v}"' for k, v in [*labels, ("instance", INSTANCE), ("job", "llmproxy")]
        )
        out.append(
            {
                "series": f"llmproxy_requests_total{{{selector}}}",
                "values": f"{_number(start)}+{_number(step)}x{STEPS}",
            }
        )
    return out


def run_promtool_tests(
    tmp_path: Path, tests: list[dict[str, Any]]
) -> subprocess.CompletedProcess[str]:
    # JSON is YAML: promtool reads this file as it reads its own test files.
    spec = tmp_path / "llmproxy-alerts.test.yml"
    spec.write_text(
        json.dumps({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests})
    )
    return subprocess.run(
        [promtool(), "test", "rules", str(spec)], capture_output=True, text=True, timeout=120
    )


def dashboard_expr(title: str) -> str:
    """A Prometheus panel's query with Grafana's variables as a dashboard showing
    every route would fill them."""
    for panel in json.loads(DASHBOARD.read_text("utf-8"))["panels"]:
        for candidate in [panel, *panel.get("panels", [])]:
            if candidate["title"] == title:
                expr: str = candidate["targets"][0]["expr"]
                return expr.replace("$route", ".*").replace("$__rate_interval", "5m")
    raise AssertionError(f"no panel {title!r}")


def test_promtool_accepts_the_rules_file() -> None:
    proc = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest_twisted.ensureDeferred
async def test_upstream_500s_and_429s_fire_the_error_alert_and_fill_the_error_panel(
    env: Running, tmp_path: Path
) -> None:
    await send_batch(env)
    first = await scrape(env)
    await send_batch(env)
    second = await scrape(env)
    # What the proxy says about them, before any rule reads it.
    errors = {
        (dict(labels)["route"], dict(labels)["status"], dict(labels)["outcome"]): value
        for labels, value in second.items()
        if dict(labels)["outcome"] != "ok"
    }
    assert errors == {
        ("root", "500", "upstream_error"): 4.0,
        ("mock", "429", "upstream_rate_limited"): 4.0,
    }

    per_batch = sum(times for _, times in BATCH)
    failed = 4  # two 500s and two 429s in each batch
    alert = {
        "eval_time": "15m",
        "alertname": "LLMProxyUpstreamErrors",
        "exp_alerts": [
            {
                "exp_labels": {"severity": "warning", "instance": INSTANCE, "route": route},
                "exp_annotations": {
                    "summary": f"route {route}: 25% of requests fail upstream",
                },
            }
            # Not route healthy: its upstream answered every request.
            for route in ("mock", "root")
        ],
    }
    panel = {
        "expr": dashboard_expr("Error ratio"),
        "eval_time": "15m",
        "exp_samples": [{"labels": "{}", "value": failed / per_batch}],
    }
    proc = run_promtool_tests(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": input_series(first, second),
                "alert_rule_test": [alert],
                "promql_expr_test": [panel],
            }
        ],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout

    # The events say the same, so the Loki panels (outcome != "ok") list them.
    events_file = env.service.settings.server.state_dir / "events.jsonl"

    def responses() -> list[dict[str, Any]]:
        if not events_file.exists():
            return []
        lines = [json.loads(line) for line in events_file.read_text().splitlines()]
        return [e for e in lines if e["type"] == "response"]

    await wait_until(lambda: len(responses()) == 2 * per_batch, what="every response event")
    outcomes = {(e["status"], e["outcome"]) for e in responses()}
    assert outcomes == {(200, "ok"), (500, "upstream_error"), (429, "upstream_rate_limited")}


@pytest_twisted.ensureDeferred
async def test_a_healthy_upstream_fires_no_error_alert(env: Running, tmp_path: Path) -> None:
    for _ in range(2):
        resp = await env.client.post(env.url("/healthy/v1/chat/completions"), json=CHAT)
        await resp.content()
    first = await scrape(env)
    for _ in range(4):
        resp = await env.client.post(env.url("/healthy/v1/chat/completions"), json=CHAT)
        await resp.content()
    second = await scrape(env)
    proc = run_promtool_tests(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": input_series(first, second),
                "alert_rule_test": [
                    {"eval_time": "15m", "alertname": "LLMProxyUpstreamErrors", "exp_alerts": []}
                ],
                "promql_expr_test": [
                    {
                        "expr": dashboard_expr("Error ratio"),
                        "eval_time": "15m",
                        "exp_samples": [{"labels": "{}", "value": 0}],
                    }
                ],
            }
        ],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_part_of_the_shared_state_without_redis_for_a_minute_pages(tmp_path: Path) -> None:
    # The family and its labels are checked against a real /metrics by
    # test_dashboard.py; here the rule: a blip is not an alert, a minute is.
    def series(part: str, values: str) -> dict[str, str]:
        labels = f'part="{part}",instance="{INSTANCE}",job="llmproxy"'
        return {"series": f"llmproxy_state_connected{{{labels}}}", "values": values}

    firing = {
        "exp_labels": {
            "severity": "page",
            "part": "access",
            "instance": INSTANCE,
            "job": "llmproxy",
        },
        "exp_annotations": {"summary": "shared state (access): Redis does not answer"},
    }
    proc = run_promtool_tests(
        tmp_path,
        [
            {
                "interval": "1m",
                # access: up, down from minute 2 on; sessions: one minute down at 2.
                "input_series": [
                    series("access", "1 1 0 0 0 0"),
                    series("sessions", "1 1 0 1 1 1"),
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "2m",
                        "alertname": "LLMProxySharedStateUnavailable",
                        "exp_alerts": [],
                    },
                    {
                        "eval_time": "4m",
                        "alertname": "LLMProxySharedStateUnavailable",
                        "exp_alerts": [firing],
                    },
                ],
            }
        ],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
