"""Spend and budgets end to end: the real service on 127.0.0.1, a real upstream
whose answers cost a known amount (a route price), a token with a USD budget,
the events in a file sink, /stats and /metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import defer

from llmproxy.access.tokens import Token, TokenFile
from tests.integration.harness import Running, running_fixture, wait_until

pytestmark = pytest.mark.integration

# The fake upstream's chat answer uses 9 input and 9 output tokens: at 200 USD per
# million tokens each way, every answer costs 18 * 200 / 1e6 = 0.0036 USD.
COST = 0.0036
BUDGET = 0.01
ROUTE = """
[route:budget]
prefix = /budget
upstream = http://127.0.0.1:{upstream_port}
provider = openai
auth = token
api_key = sk-upstream-key-for-budget-tests-0123
price_input = 200
price_output = 200

[exporter:file]
type = file
path = events.jsonl
flush_interval = 0.05
"""
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Running]:
    yield from running_fixture(tmp_path, extra=ROUTE)


def _token(env: Running, **kw: Any) -> tuple[str, Token]:
    tokens = TokenFile.in_state_dir(env.service.settings.server.state_dir)
    secret, token = tokens.create("team-budget", time.time(), **kw)
    env.service.access.reload()
    return secret, token


async def _chat(env: Running, secret: str) -> tuple[int, Any, Any]:
    resp = await env.client.post(
        env.url("/budget/v1/chat/completions"),
        json=CHAT,
        headers={"authorization": f"Bearer {secret}"},
    )
    body = orjson.loads(await resp.content())
    return resp.code, body, resp.headers


def _charged(env: Running) -> int:
    spend = env.service.access.spend
    assert spend is not None
    return spend.charged


@pytest_twisted.ensureDeferred
async def test_a_usd_budget_refuses_exactly_after_it_is_spent(env: Running) -> None:
    secret, token = _token(env, max_usd=BUDGET)
    codes = []
    for n in range(1, 6):
        code, body, headers = await _chat(env, secret)
        codes.append(code)
        if code != 200:
            break
        # Charged once the answer ended (the capture pump, a turn later).
        await wait_until(lambda n=n: _charged(env) >= n, what=f"answer {n} charged")
    assert codes == [200, 200, 200, 429]  # spent 0, 0.0036, 0.0072 < 0.01; 0.0108 is not
    assert body["error"]["code"] == "budget_exceeded"
    assert body["error"]["type"] == "rate_limit_error"
    assert (
        "USD budget of this proxy token is spent ($0.010800 of $0.01" in (body["error"]["message"])
    )
    assert "does not reset" in body["error"]["message"]
    assert headers.getRawHeaders(b"retry-after") is None
    assert len(env.upstream.requests) == 3  # the refused one never went upstream

    stats = orjson.loads(await (await env.client.get(env.admin + "/stats")).content())
    mine = stats["access"]["spend"]["tokens"][token.id]
    assert mine["usd"] == pytest.approx(3 * COST) and mine["tokens"] == 3 * 18
    assert mine["max_usd"] == BUDGET
    assert stats["access"]["spend"]["projects_this_month"]["team-budget"]["usd"] == (
        pytest.approx(3 * COST)
    )
    metrics = (await (await env.client.get(env.admin + "/metrics")).content()).decode()
    line = next(
        x
        for x in metrics.splitlines()
        if x.startswith("llmproxy_cost_usd_total{") and 'project="team-budget"' in x
    )
    assert 'model="gpt-4o-mini-2024-07-18"' in line
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(3 * COST)

    # Every answer's event carries its cost into the sink.
    path = env.service.settings.server.state_dir / "events.jsonl"

    def responses() -> list[dict[str, Any]]:
        if not path.exists():
            return []
        events = [orjson.loads(x) for x in path.read_bytes().splitlines()]
        return [e for e in events if e["type"] == "response"]

    await wait_until(lambda: len(responses()) == 4, what="four response events")
    priced = [e["cost"] for e in responses() if e["status"] == 200]
    assert [c["total"] for c in priced] == pytest.approx([COST] * 3)
    assert {(c["source"], c["version"], c["currency"]) for c in priced} == {
        ("config", "route:budget", "USD")
    }
    (refused,) = [e for e in responses() if e["status"] == 429]
    assert refused["cost"] is None and refused["token_id"] == token.id


@pytest_twisted.ensureDeferred
async def test_concurrent_requests_overshoot_by_at_most_those_in_flight(env: Running) -> None:
    secret, token = _token(env, max_usd=BUDGET)
    burst = 12
    results = await defer.gatherResults(
        [defer.ensureDeferred(_chat(env, secret)) for _ in range(burst)]
    )
    ok = sum(1 for code, _, _ in results if code == 200)
    assert ok >= 3  # the budget held for at least as many as it pays for
    refused = [body for code, body, _ in results if code != 200]
    assert all(b["error"]["code"] == "budget_exceeded" for b in refused)
    await wait_until(lambda: _charged(env) >= ok, what="every answer charged")
    spend = env.service.access.spend
    assert spend is not None
    usd, _ = spend.spent(token.id, "total", time.time())
    assert usd == pytest.approx(ok * COST)  # every answer let through was counted
    assert usd - BUDGET < burst * COST  # over by less than the requests in flight
    # Once spent, a burst gets nothing through.
    again = await defer.gatherResults(
        [defer.ensureDeferred(_chat(env, secret)) for _ in range(burst)]
    )
    assert {code for code, _, _ in again} == {429}
    assert len(env.upstream.requests) == ok


@pytest_twisted.ensureDeferred
async def test_the_drain_writes_the_spend_of_the_last_answers(env: Running) -> None:
    from llmproxy.access.budgets import read_spend

    secret, token = _token(env, max_usd=BUDGET)
    code, _, _ = await _chat(env, secret)
    assert code == 200
    # Stopped at once: the answer may not be priced yet; the drain prices it
    # (the capture pump's stage) and writes the spend after.
    await env.pool.closeCachedConnections()
    await env.service.stopService()
    (row,) = read_spend(env.service.settings.server.state_dir)
    assert (row.token_id, row.requests) == (token.id, 1)
    assert row.usd_nanos == round(COST * 1e9)
