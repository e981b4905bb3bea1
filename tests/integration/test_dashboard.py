"""docs/grafana/llmproxy-dashboard.json, and the alert rules of
docs/prometheus/llmproxy-alerts.yml, query only what llmproxy exposes: every
metric name in their PromQL is a sample name of the real service's /metrics, and
every Loki stream selector uses only the labels the Loki sink sets."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.access.tokens import TokenFile
from llmproxy.export.sinks.loki import APP, EVENT_LABELS
from tests.fakes.loki import FakeLoki, RunningFakeLoki, listen_fake_loki
from tests.integration.harness import Running, running_fixture, wait_until
from tests.integration.redis_server import RedisServer

pytestmark = pytest.mark.integration
DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "llmproxy-dashboard.json"
RULES = DASHBOARD.parents[1] / "prometheus" / "llmproxy-alerts.yml"
# Labels Prometheus adds when it scrapes, absent from the exposition itself.
SCRAPE_LABELS = {"instance", "job"}

# -- reading the dashboard ------------------------------------------------------------


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text("utf-8"))
    return dashboard


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def queries(dashboard: dict[str, Any], kind: str) -> list[tuple[str, str]]:
    """(panel title, expr) of every target whose datasource is of ``kind``."""
    out = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            ds = target.get("datasource") or panel.get("datasource") or {}
            if ds.get("type") == kind:
                out.append((panel["title"], target["expr"]))
    return out


_STRING = re.compile(r'"(?:\\.|[^"\\])*"|`[^`]*`|\'(?:\\.|[^\'\\])*\'')
_GROUPING = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", re.IGNORECASE
)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
_KEYWORDS |= {"group_left", "group_right"}  # also written without a label list
_IDENT = re.compile(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:\\.|[^"\\])*")')


def promql_metrics(expr: str) -> set[str]:
    """The metric (sample) names a PromQL expression selects."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, subqueries
    text = _GROUPING.sub(" ", text)
    return {m for m in _IDENT.findall(text) if m.lower() not in _KEYWORDS}


def promql_labels(expr: str) -> set[str]:
    """Label names in matchers and in by/without/on/ignoring clauses."""
    names = {m[0] for block in re.findall(r"\{([^}]*)\}", expr) for m in _MATCHER.findall(block)}
    for _, inside in _GROUPING.findall(_STRING.sub('""', expr)):
        names.update(n.strip() for n in inside.split(",") if n.strip())
    return names


def histogram_arguments(expr: str) -> set[str]:
    """Metric names inside histogram_quantile(...)."""
    out: set[str] = set()
    for m in re.finditer(r"histogram_quantile\s*\(", expr):
        depth, i = 1, m.end()
        while depth and i < len(expr):
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            i += 1
        out |= promql_metrics(expr[m.end() : i - 1].split(",", 1)[1])
    return out


def alert_expressions() -> list[tuple[str, str]]:
    """(alert, expr) of the alerting rules file (promtool checks its syntax and
    semantics: tests/integration/test_alert_rules.py)."""
    text = RULES.read_text("utf-8")
    out = []
    for block in [text]:
        for rule in re.split(r"\n\s*- alert: ", block)[1:]:
            name = rule.split("\n", 1)[0].strip()
            m = re.search(r"\n(\s*)expr: (.*?)\n\1(?=\w)", rule, re.S)
            assert m, f"alert {name}: no expr"
            expr = m.group(2).strip()
            if expr.startswith(">"):  # a folded block
                expr = " ".join(line.strip() for line in expr[1:].splitlines())
            out.append((name, expr))
    return out


def logql_selectors(expr: str) -> list[dict[str, tuple[str, str]]]:
    """Each stream selector: label name -> (operator, value)."""
    found = []
    for block in re.findall(r"\{([^{}]*)\}", expr):
        found.append({name: (op, json.loads(value)) for name, op, value in _MATCHER.findall(block)})
    return found


def logql_json_fields(expr: str) -> set[str]:
    """The event fields a ``| json a="x.y"`` stage extracts (top-level part)."""
    fields = set()
    for stage in re.findall(r"\|\s*json\s+([^|]*)", expr):
        for _, path in re.findall(r'(\w+)\s*=\s*"([^"]*)"', stage):
            fields.add(path.split(".")[0])
    return fields


# -- the extractors themselves --------------------------------------------------------


def test_promql_names_are_extracted_without_functions_labels_or_strings() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, route) (rate(llmproxy_ttfb_seconds_bucket"
        '{route=~"$route", x="a_b"}[$__rate_interval]))) / on (route) group_left '
        "sum(llmproxy_open_streams offset 5m) > bool 0 and time() - llmproxy_exporter_last_success"
    )
    assert promql_metrics(expr) == {
        "llmproxy_ttfb_seconds_bucket",
        "llmproxy_open_streams",
        "llmproxy_exporter_last_success",
    }
    assert promql_labels(expr) == {"le", "route", "x"}
    assert histogram_arguments(expr) == {"llmproxy_ttfb_seconds_bucket"}


def test_logql_selectors_and_json_fields_are_extracted() -> None:
    expr = (
        'sum by (route) (count_over_time({app="llmproxy", log_type=~"resp.*"} '
        '| json route="route", tokens="usage.total_tokens" | route != "" [$__auto]))'
    )
    assert logql_selectors(expr) == [{"app": ("=", "llmproxy"), "log_type": ("=~", "resp.*")}]
    assert logql_json_fields(expr) == {"route", "usage"}


# -- the dashboard as a Grafana model -------------------------------------------------


def test_dashboard_is_a_grafana_model_with_datasource_variables() -> None:
    dashboard = load()
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["prometheus"]["type"] == "datasource"
    assert variables["prometheus"]["query"] == "prometheus"
    assert variables["loki"]["type"] == "datasource"
    assert variables["loki"]["query"] == "loki"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        uid = panel["datasource"]["uid"]
        assert uid in ("${prometheus}", "${loki}"), panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
    # Both sources are used, and what the brief asks for is there.
    assert queries(dashboard, "prometheus") and queries(dashboard, "loki")
    titles = {p["title"] for p in panels(dashboard)}
    for title in ("Requests by route", "Access denials", "Cache hit ratio", "Dropped events"):
        assert title in titles


# -- against the real service ---------------------------------------------------------


def _config(loki_url: str) -> str:
    return f"""
[route:secure]
prefix = /secure
upstream = http://127.0.0.1:{{upstream_port}}
auth = token
api_key = sk-test-dashboard

[cache]
enabled = true

[sessions]
enabled = true

[exporter:events]
type = file
flush_interval = 0.1

[exporter:loki]
type = loki
url = {loki_url}
flush_interval = 0.1

# A buffer of one and no spool: the second event is dropped (dropped_total samples).
[exporter:tiny]
type = file
path = tiny.jsonl
buffer = 1
spool_max_bytes = 0
flush_interval = 60
"""


async def _chat(proxy: Running, messages: list[dict[str, str]]) -> dict[str, Any]:
    body = json.dumps({"model": "gpt-4o-mini", "messages": messages}).encode()
    resp = await proxy.client.post(
        proxy.url("/mock/v1/chat/completions"),
        data=body,
        headers={"Content-Type": "application/json", "Authorization": "Bearer sk-client"},
    )
    assert resp.code == 200
    reply: dict[str, Any] = json.loads(await resp.content())
    return reply["choices"][0]["message"]


async def _traffic(proxy: Running, token: str) -> None:
    first = [{"role": "user", "content": "hi"}]
    reply = await _chat(proxy, first)
    await _chat(proxy, [*first, reply, {"role": "user", "content": "and then?"}])
    await _chat(proxy, [*first, reply, {"role": "user", "content": "something else"}])  # fork
    for _ in range(2):  # a miss, then a hit
        resp = await proxy.client.get(proxy.url("/mock/cacheable?cc=max-age%3D60"))
        await resp.content()
    denied = await proxy.client.get(proxy.url("/secure/v1/models"))  # no proxy token: 401
    await denied.content()
    assert denied.code == 401
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    billed = await proxy.client.post(  # the project families
        proxy.url("/secure/v1/chat/completions"),
        data=body.encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    await billed.content()
    assert billed.code == 200


async def _scrape(proxy: Running) -> dict[str, Any]:
    resp = await proxy.client.get(proxy.admin + "/metrics")
    assert resp.code == 200
    text = (await resp.content()).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis-server")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def loki() -> Iterator[RunningFakeLoki]:
    running = listen_fake_loki(FakeLoki())
    try:
        yield running
    finally:
        pytest_twisted.blockon(running.stop())


@pytest.fixture
def proxy(tmp_path: Path, loki: RunningFakeLoki) -> Iterator[tuple[Running, str]]:
    """File, Loki and a tiny exporter, the cache and sessions on the memory bus, and
    a proxy token (made before the proxy reads the token file)."""
    secret, _ = TokenFile.in_state_dir(tmp_path / "memory" / "state").create("dash", time.time())
    for running in running_fixture(tmp_path / "memory", extra=_config(loki.url)):
        yield running, secret


@pytest.fixture
def bus_proxy(tmp_path: Path, redis: RedisServer) -> Iterator[Running]:
    """With [events] bus = redis a proxy exports nothing itself, but has the Redis
    bus families; with [state] store = redis the shared state's."""
    extra = f"[events]\nbus = redis\n[state]\nstore = redis\n[redis]\nurl = {redis.url}\n"
    yield from running_fixture(tmp_path / "redis", extra=extra)


@pytest_twisted.ensureDeferred
async def test_every_dashboard_query_names_what_the_service_exposes(
    proxy: tuple[Running, str], bus_proxy: Running, loki: RunningFakeLoki
) -> None:
    fake = loki.fake
    running, token = proxy
    await _traffic(running, token)
    await wait_until(
        lambda: (
            bool(fake.entries({"log_type": "fork"}))
            and bool(fake.entries({"log_type": "response"}))
        )
    )
    # Both proxies' samples: a family one of them has without samples (the
    # shared state's, with store = local) must not hide the other's.
    families = [*(await _scrape(bus_proxy)).values(), *(await _scrape(running)).values()]

    samples: dict[str, set[str]] = {}  # sample name -> its label names
    kinds: dict[str, str] = {}
    for family in families:
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
            kinds[sample.name] = family.type
    dashboard = load()

    alerts = alert_expressions()
    assert len(alerts) >= 5
    for title, expr in queries(dashboard, "prometheus") + alerts:
        names = promql_metrics(expr)
        assert names, f"{title}: no metric in {expr!r}"
        missing = names - samples.keys()
        assert not missing, f"{title}: {sorted(missing)} not in /metrics ({expr})"
        known_labels = set().union(*(samples[n] for n in names)) | SCRAPE_LABELS
        unknown = promql_labels(expr) - known_labels
        assert not unknown, f"{title}: labels {sorted(unknown)} not on {sorted(names)}"
        for name in histogram_arguments(expr):
            assert name.endswith("_bucket") and kinds[name] == "histogram", (title, name)
        for name in names:
            if re.search(rf"\b(rate|increase)\s*\(\s*{name}\b", expr):
                assert kinds[name] in ("counter", "histogram"), f"{title}: rate() of {name}"
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query" and variable["datasource"]["type"] == "prometheus":
            metric, label = re.fullmatch(
                r"label_values\((\w+),\s*(\w+)\)", variable["definition"]
            ).groups()  # type: ignore[union-attr]
            assert metric in samples and label in samples[metric], variable["name"]

    # Loki: the selectors use the sink's labels only, with values it sends.
    emitted = {name for stream in fake.streams() for name in stream}
    assert emitted == {"app", *EVENT_LABELS}
    log_types = {stream["log_type"] for stream in fake.streams()}
    assert {"request", "response", "session_start", "fork"} <= log_types
    response = next(e for e in fake.entries({"log_type": "response"}))
    fields = set(json.loads(response.line))
    loki_queries = queries(dashboard, "loki") + [
        (v["name"], v["query"]["stream"])
        for v in dashboard["templating"]["list"]
        if v["type"] == "query" and v["datasource"]["type"] == "loki"
    ]
    for title, expr in loki_queries:
        selectors = logql_selectors(expr)
        assert selectors, f"{title}: no stream selector in {expr!r}"
        for selector in selectors:
            assert set(selector) <= emitted, f"{title}: {sorted(set(selector) - emitted)}"
            assert selector.get("app") == ("=", APP), title
            op, value = selector.get("log_type", ("=", "response"))
            if op == "=":
                assert value in log_types, f"{title}: log_type {value!r} is never sent"
        assert logql_json_fields(expr) <= fields, f"{title}: {logql_json_fields(expr) - fields}"
