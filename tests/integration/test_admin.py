"""The admin listener: health, readiness, stats and Prometheus metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.access.tokens import TokenFile
from tests.integration.harness import Running, running_fixture, wait_until
from tests.integration.stats_jq import run_documented_jq

pytestmark = pytest.mark.integration


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Running]:
    yield from running_fixture(tmp_path)


@pytest.fixture
def locked(tmp_path: Any) -> Iterator[Running]:
    yield from running_fixture(tmp_path, server="admin_token = s3cret-admin-token\n")


@pytest_twisted.ensureDeferred
async def test_health_and_ready(env: Running) -> None:
    for path, body in (("/health", {"status": "ok"}), ("/ready", {"status": "ready"})):
        resp = await env.client.get(env.admin + path)
        assert resp.code == 200
        assert await resp.json() == body


@pytest_twisted.ensureDeferred
async def test_ready_is_503_while_draining(env: Running) -> None:
    env.service.ready = False
    resp = await env.client.get(env.admin + "/ready")
    assert resp.code == 503
    assert (await resp.json())["status"] == "draining"


@pytest_twisted.ensureDeferred
async def test_stats_count_requests_by_route_status_and_outcome(env: Running) -> None:
    for path in ("/mock/v1/chat/completions", "/status/500", "/openai/evil.test/x"):
        resp = await env.client.post(env.url(path), json={})
        await resp.content()
    stats = await (await env.client.get(env.admin + "/stats")).json()
    routes = stats["proxy"]["routes"]
    assert routes["mock"]["by_status"] == {"200": 1}
    assert routes["root"]["by_status"] == {"500": 1}
    assert routes["-"]["by_outcome"] == {"rejected": 1}
    assert stats["proxy"]["requests_total"] == 3
    assert stats["proxy"]["open_requests"] == 0


@pytest_twisted.ensureDeferred
async def test_the_documented_jq_reads_one_processs_stats(billed: tuple[Running, str]) -> None:
    env, _ = billed
    stats = await (await env.client.get(env.admin + "/stats")).json()
    assert run_documented_jq(stats) == {
        "events": {
            "sent": 0,
            "spooled": 0,
            "dropped": 0,
            "failing": False,
            "last_error": None,
            "last_error_at": None,
        }
    }


@pytest_twisted.ensureDeferred
async def test_metrics_are_prometheus_text_with_the_request_families(env: Running) -> None:
    resp = await env.client.post(env.url("/mock/v1/chat/completions"), json={})
    await resp.content()
    resp = await env.client.get(env.admin + "/metrics")
    assert resp.code == 200
    assert resp.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    text = (await resp.content()).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "llmproxy_requests",
        "llmproxy_request_duration_seconds",
        "llmproxy_ttfb_seconds",
        "llmproxy_overhead_seconds",
        "llmproxy_bytes",
        "llmproxy_open_requests",
        "llmproxy_open_streams",
    ):
        assert name in families, name
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for s in families["llmproxy_requests"].samples
    }
    key = ("llmproxy_requests_total", (("outcome", "ok"), ("route", "mock"), ("status", "200")))
    assert samples[key] == 1.0
    count = [
        s.value
        for s in families["llmproxy_request_duration_seconds"].samples
        if s.name.endswith("_count") and s.labels["route"] == "mock"
    ]
    assert count == [1.0]


async def request_samples(env: Running) -> dict[tuple[str, str, str], float]:
    """``llmproxy_requests_total`` of a scrape: (route, status, outcome) -> count."""
    text = (await (await env.client.get(env.admin + "/metrics")).content()).decode()
    return {
        (s.labels["route"], s.labels["status"], s.labels["outcome"]): s.value
        for f in text_string_to_metric_families(text)
        if f.name == "llmproxy_requests"
        for s in f.samples
    }


@pytest_twisted.ensureDeferred
async def test_upstream_errors_are_counted_apart_from_ok(env: Running) -> None:
    for path in ("/mock/v1/chat/completions", "/status/500", "/status/503", "/status/429"):
        resp = await env.client.post(env.url(path), json={})
        await resp.content()
    resp = await env.client.get(env.url("/status/404"))
    await resp.content()
    assert await request_samples(env) == {
        ("mock", "200", "ok"): 1.0,
        ("root", "500", "upstream_error"): 1.0,
        ("root", "503", "upstream_error"): 1.0,
        ("root", "429", "upstream_rate_limited"): 1.0,
        ("root", "404", "client_error"): 1.0,
    }
    stats = await (await env.client.get(env.admin + "/stats")).json()
    assert stats["proxy"]["routes"]["root"]["by_outcome"] == {
        "client_error": 1,
        "upstream_error": 2,
        "upstream_rate_limited": 1,
    }


@pytest_twisted.ensureDeferred
async def test_the_probes_answer_without_the_admin_token(locked: Running) -> None:
    for path, body in (("/health", {"status": "ok"}), ("/ready", {"status": "ready"})):
        resp = await locked.client.get(locked.admin + path)
        assert resp.code == 200, path
        assert await resp.json() == body
    resp = await locked.client.get(locked.admin + "/metrics")
    assert resp.code == 401
    await resp.content()
    audit = locked.service.settings.audit_path
    assert audit is not None
    denied = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(d["action"], d["path"]) for d in denied] == [("admin_denied", "/metrics")]


@pytest_twisted.ensureDeferred
async def test_admin_token_is_required_when_configured(locked: Running) -> None:
    resp = await locked.client.get(locked.admin + "/stats")
    assert resp.code == 401
    await resp.content()
    resp = await locked.client.get(
        locked.admin + "/stats", headers={"Authorization": "Bearer wrong"}
    )
    assert resp.code == 401
    await resp.content()
    resp = await locked.client.get(
        locked.admin + "/stats", headers={"Authorization": "Bearer s3cret-admin-token"}
    )
    assert resp.code == 200
    await resp.content()


KEY = {"Authorization": "Bearer sk-test-tenant-a"}


@pytest.fixture
def cached(tmp_path: Any) -> Iterator[Running]:
    yield from running_fixture(tmp_path, extra="[cache]\nenabled = true\ndefault_ttl = 60\n")


@pytest_twisted.ensureDeferred
async def test_the_service_builds_the_cache_from_config_and_exposes_it(cached: Running) -> None:
    codes = []
    for _ in range(2):
        # A credential names the tenant (else treq's cookie jar would: the upstream
        # sets a cookie, and a cookie-only client gets a namespace per cookie).
        resp = await cached.client.get(cached.url("/cacheable?cc=max-age%3D60"), headers=KEY)
        await resp.content()
        codes.append(resp.headers.getRawHeaders(b"x-proxy-cache", [b"-"])[0])
    assert codes == [b"stored", b"hit"]
    assert cached.upstream.cacheable_served == 1
    stats = await (await cached.client.get(cached.admin + "/stats")).json()
    assert stats["cache"]["hits"] == 1
    text = (await (await cached.client.get(cached.admin + "/metrics")).content()).decode()
    assert 'llmproxy_cache_requests_total{result="hit"} 1.0' in text
    resp = await cached.client.post(cached.admin + "/cache/purge?all=1")
    await resp.content()
    assert resp.code == 200
    resp = await cached.client.get(cached.url("/cacheable?cc=max-age%3D60"), headers=KEY)
    await resp.content()
    assert cached.upstream.cacheable_served == 2


PROJECT_ROUTE = """
[route:billed]
prefix = /billed
upstream = http://127.0.0.1:{upstream_port}
provider = openai
auth = token
api_key = sk-upstream-test-key

[exporter:events]
type = file
path = events.jsonl
"""


PROJECTS = ("team-a", "team-b", "team-c")


@pytest.fixture
def billed(tmp_path: Path) -> Iterator[tuple[Running, dict[str, str]]]:
    # Made before the proxy starts: it reads the token file at most once a second.
    tokens = TokenFile.in_state_dir(tmp_path / "state")
    secrets = {p: tokens.create(p, time.time())[0] for p in PROJECTS}
    for env in running_fixture(tmp_path, server="metrics_projects = 2\n", extra=PROJECT_ROUTE):
        yield env, secrets


@pytest_twisted.ensureDeferred
async def test_requests_and_tokens_are_counted_by_project_within_the_bound(
    billed: tuple[Running, dict[str, str]],
) -> None:
    env, secrets = billed
    plan = [("team-a", "/v1/chat/completions"), ("team-b", "/status/500"), ("team-c", "/v1/x")]
    plan += [("team-a", "/v1/chat/completions")]
    for project, path in plan:
        resp = await env.client.post(
            env.url("/billed" + path),
            json={"model": "m", "messages": []},
            headers={"Authorization": f"Bearer {secrets[project]}"},
        )
        await resp.content()
    resp = await env.client.post(env.url("/billed/v1/chat/completions"), json={})
    assert resp.code == 401  # no token: refused, and no project to count it under
    await resp.content()

    # Every record was queued by the time its answer ended: the pump's turn counts them.
    await wait_until(lambda: env.service.capture.pending() == 0, what="events built")
    text = (await (await env.client.get(env.admin + "/metrics")).content()).decode()
    counted: dict[str, dict[tuple[str, str], float]] = {}
    for f in text_string_to_metric_families(text):
        if f.name in ("llmproxy_project_requests", "llmproxy_project_tokens"):
            for sample in f.samples:
                other = sample.labels.get("outcome") or sample.labels["kind"]
                counted.setdefault(f.name, {})[(sample.labels["project"], other)] = sample.value
    # metrics_projects = 2: team-a and team-b keep their names, team-c is "other".
    assert counted["llmproxy_project_requests"] == {
        ("team-a", "ok"): 2.0,
        ("team-b", "upstream_error"): 1.0,
        ("other", "client_error"): 1.0,
    }
    # The fake upstream's chat completion says 9 prompt and 9 completion tokens.
    assert counted["llmproxy_project_tokens"] == {
        ("team-a", "input"): 18.0,
        ("team-a", "output"): 18.0,
    }
