"""Budgets with ``[state] store = redis``: every process adds its answers' cost
to the same counters in a real redis-server and checks them before forwarding."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from llmproxy.access.budgets import budget_key, window
from llmproxy.access.decision import Allow, Deny
from llmproxy.access.tokens import Token
from llmproxy.capture.record import ExchangeRecord
from llmproxy.cli.token import _shared_list
from tests.unit.access import test_shared
from tests.unit.access.test_shared import Cluster, Proxy

# The shared-state tests' fixtures: a real redis-server, proxies sharing it.
redis_module = test_shared.redis_module
redis = test_shared.redis
cluster = test_shared.cluster


async def charged(proxy: Proxy, token: Token, usd: float) -> None:
    """``proxy``'s capture pump priced an answer of ``token``; once its addition
    is in Redis (a read on the same connection comes after it)."""
    record = ExchangeRecord(
        "r", proxy.clock.seconds(), "POST", "/secure/v1/chat/completions", "", "secure",
        "openai", "", "", "", [], token_id=token.id, project=token.project, ended_at=0.1,
    )  # fmt: skip
    event: dict[str, Any] = {
        "model": "gpt-4o",
        "usage": {"input_tokens": 90, "output_tokens": 10},
        "cost": {"total": usd, "source": "genai-prices"},
    }
    proxy.access.charge(record, event)
    spend = proxy.access.spend
    assert spend is not None and spend.shared is not None
    await spend.shared.read(["-"], proxy.clock.seconds())


@pytest_twisted.ensureDeferred
async def test_a_budget_spent_through_one_process_refuses_in_every_other(
    cluster: Cluster,
) -> None:
    a, b = await cluster.proxy(), await cluster.proxy()
    secret, token = await cluster.create(max_usd=0.01, period="month")
    await cluster.refresh()
    assert isinstance(await a.ask(secret), Allow)
    await charged(a, token, 0.006)
    assert isinstance(await b.ask(secret), Allow)  # 0.006 spent of 0.01
    await charged(b, token, 0.006)
    # Each process alone spent 0.006, under the budget; together 0.012.
    assert (
        a.access.spend is not None
        and a.access.spend.refusal(token, cluster.clock.seconds()) is None
    )
    for proxy in (a, b):
        deny = await proxy.ask(secret)
        assert isinstance(deny, Deny) and deny.status == 429 and deny.code == "budget_exceeded"
        assert "$0.012000 of $0.01 this month" in deny.message
    now = cluster.clock.seconds()
    key = budget_key(token.id, "usd", window("month", now).key)
    assert int(cluster.redis.command("GET", "t:" + key)) == 12_000_000  # nano-USD
    assert int(cluster.redis.command("PTTL", "t:" + key)) > 0  # gone when the month ends
    store = await cluster.store()
    tokens, _, spend = await _shared_list(store, now)
    assert [t.id for t in tokens] == [token.id]
    assert spend[(token.id, "month")] == (12_000_000, 200)


@pytest.mark.parametrize("period", ["day", "month", "total"])
def test_the_shared_keys_are_those_the_local_book_counts(period: str) -> None:
    from pathlib import Path

    from llmproxy.access.budgets import SpendBook, SpendFile

    book = SpendBook(SpendFile(Path("/nonexistent/spend.json")))
    token = Token("tok_1", "0" * 64, "p", 0.0, max_usd=1.0, max_tokens=5, period=period)
    now = 1_800_000_000.0
    keys = [key for key, _, _ in book.budget_checks(token, now)]
    assert keys == [
        budget_key("tok_1", "usd", window(period, now).key),
        budget_key("tok_1", "tokens", window(period, now).key),
    ]


@pytest_twisted.ensureDeferred
async def test_with_shared_state_the_spend_record_is_still_written_and_read_back(
    cluster: Cluster,
) -> None:
    from llmproxy.access.budgets import read_spend

    a = await cluster.proxy()
    _, token = await cluster.create(max_usd=1.0)
    await cluster.refresh()
    await charged(a, token, 0.25)
    await a.stop()
    cluster.proxies.remove(a)
    (row,) = read_spend(a.state_dir)
    assert (row.token_id, row.usd_nanos, row.requests) == (token.id, 250_000_000, 1)
