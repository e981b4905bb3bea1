"""The admin listener: health, readiness, stats and Prometheus metrics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import Running, running_fixture

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
