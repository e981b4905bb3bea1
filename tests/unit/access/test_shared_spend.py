"""Spend per project and model with ``[state] store = redis``: proxies sharing a
real redis-server add every answer to the spend table of each window in the
script run that charges the budgets, and ``llmproxy spend`` (the installed
command, in a process of its own) reads it: the sums of every process, windows
that vanish with their day and month, a bounded table under hostile model
names, and a clear error when Redis does not answer
(llmproxy/access/budgets.py, llmproxy/state/counters.py, llmproxy/cli/spend.py)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import threads
from twisted.internet.task import Clock

from llmproxy.access.budgets import (
    NANO,
    OTHER_MODEL,
    SpendBook,
    SpendFile,
    spend_table_key,
    window,
)
from llmproxy.access.tokens import Token
from llmproxy.capture.record import ExchangeRecord
from llmproxy.config.model import Settings, StateSettings
from llmproxy.pricing.pricer import Pricer
from tests.integration.daemon import BIN
from tests.integration.redis_server import free_port
from tests.unit.access import test_shared
from tests.unit.access.test_shared import Cluster, Proxy

redis_module = test_shared.redis_module
redis = test_shared.redis

PRICER = Pricer()
# (model, input tokens, output tokens): models the installed price table knows.
ANSWERS = [("gpt-4o", 1200, 300), ("gpt-4o-mini", 5000, 800), ("gpt-4o", 90, 10)]


class SpendCluster(Cluster):
    """Proxies on the real time (``llmproxy spend`` reads the current window),
    their books bounded to ``spend_rows`` (project, model) rows."""

    def __init__(self, redis: Any, tmp_path: Path, spend_rows: int = 1000) -> None:
        super().__init__(redis, tmp_path)
        self.clock = Clock()
        self.clock.advance(time.time())
        self.spend_rows = spend_rows

    async def proxy(self, fail_open: bool = False, *, wait: bool = True) -> Proxy:
        proxy = await super().proxy(fail_open, wait=wait)
        assert proxy.access.spend is not None
        proxy.access.spend.max_rows = self.spend_rows
        return proxy

    def ini(self, url: str | None = None, extra: str = "") -> Path:
        path = self.tmp_path / "llmproxy.ini"
        path.write_text(
            f"[server]\nstate_dir = {self.tmp_path / 'cli-state'}\n\n"
            f"[state]\nstore = redis\nprefix = t:\n{extra}\n"
            f"[redis]\nurl = {url or self.redis.url}\ntimeout = 1\n"
        )
        return path


@pytest_twisted.async_yield_fixture
async def spend_cluster(redis: Any, tmp_path: Path) -> AsyncIterator[SpendCluster]:
    c = SpendCluster(redis, tmp_path)
    yield c
    await c.close()


def priced(model: str, n_in: int, n_out: int, when: float) -> dict[str, Any]:
    """A response event as the capture pump makes it: usage and the pricer's cost."""
    usage = {"input_tokens": n_in, "output_tokens": n_out}
    cost = PRICER.cost(
        route="secure",
        provider="openai",
        upstream_host="api.openai.com",
        model=model,
        usage=usage,
        when=when,
    )
    assert cost is not None, model
    return {"model": model, "usage": usage, "cost": cost}


async def charge(proxy: Proxy, token: Token, event: dict[str, Any]) -> None:
    """``proxy``'s capture pump charged an answer of ``token``; once it is in Redis
    (the charges held for this turn sent now, and answered)."""
    record = ExchangeRecord(
        "r", proxy.clock.seconds(), "POST", "/secure/v1/chat/completions", "", "secure",
        "openai", "api.openai.com", "", "", [], token_id=token.id, project=token.project,
        ended_at=0.1,
    )  # fmt: skip
    proxy.access.charge(record, event)
    await proxy.state.counters.flush()
    spend = proxy.access.spend
    assert spend is not None and spend.shared is proxy.state.counters
    assert spend.shared_errors == 0


def llmproxy(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")}
    argv = [str(BIN / "llmproxy"), *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)


async def spend(config: Path, *args: str) -> dict[str, Any]:
    done = await threads.deferToThread(llmproxy, "spend", "--config", str(config), "--json", *args)
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


@pytest_twisted.ensureDeferred
async def test_llmproxy_spend_shows_what_every_process_charged_per_project_and_model(
    spend_cluster: SpendCluster,
) -> None:
    cluster = spend_cluster
    a, b = await cluster.proxy(), await cluster.proxy()
    store = await cluster.store()
    now = cluster.clock.seconds()
    _, alpha = await store.create("alpha", now, max_usd=100.0, period="day")
    _, beta = await store.create("beta", now)
    await cluster.refresh()
    expected: dict[tuple[str, str], list[int]] = {}
    for i, (token, proxy) in enumerate([(alpha, a), (alpha, b), (beta, a), (beta, b)]):
        for model, n_in, n_out in ANSWERS[i % 2 :]:
            event = priced(model, n_in, n_out, now)
            await charge(proxy, token, event)
            sums = expected.setdefault((token.project, model), [0, 0, 0])
            sums[0] += round(event["cost"]["total"] * NANO)
            sums[1] += n_in + n_out
            sums[2] += 1
    config = cluster.ini()
    for period in ("day", "month", "total"):
        doc = await spend(config, "--period", period)
        assert doc["source"] == {"store": "redis", "url": cluster.redis.url}
        got = {(r["project"], r["model"]): r for r in doc["rows"]}
        if doc["window"] != window(period, now).key:
            assert got == {}  # the command ran in the next day or month: nothing yet
            continue
        assert set(got) == set(expected)
        for key, (nanos, tokens, requests) in expected.items():
            row = got[key]
            assert (row["usd"], row["tokens"], row["requests"], row["unpriced"]) == (
                round(nanos / NANO, 9),
                tokens,
                requests,
                0,
            )
    only = await spend(config, "--period", "total", "--project", "beta")
    assert {r["project"] for r in only["rows"]} == {"beta"}
    table = await threads.deferToThread(llmproxy, "spend", "--config", str(config))
    assert table.returncode == 0, table.stderr
    assert f"from the shared state at {cluster.redis.url} (every host and worker)" in (table.stdout)
    total = sum(nanos for nanos, _, _ in expected.values()) / NANO
    assert table.stdout.strip().splitlines()[-1].split()[:2] == ["TOTAL", f"{total:.6f}"]
    # `token list` reads the budget counters the same script run added to.
    listed = await threads.deferToThread(
        llmproxy, "token", "list", "--config", str(config), "--json"
    )
    assert listed.returncode == 0, listed.stderr
    rows = {r["id"]: r for r in json.loads(listed.stdout)}
    alpha_usd = sum(v[0] for k, v in expected.items() if k[0] == "alpha") / NANO
    assert rows[alpha.id]["spent_usd"] == alpha_usd or (
        window("day", time.time()).key != window("day", now).key
    )
    # --local reads this host's files instead: the CLI's state_dir has none.
    local = await spend(config, "--local", "--period", "total")
    assert local["source"]["store"] == "local" and local["rows"] == []


@pytest_twisted.ensureDeferred
async def test_the_windows_tables_vanish_with_their_day_and_month(
    spend_cluster: SpendCluster,
) -> None:
    cluster = spend_cluster
    a = await cluster.proxy()
    _, token = await cluster.create()
    await cluster.refresh()
    now = cluster.clock.seconds()
    await charge(a, token, priced("gpt-4o", 100, 10, now))
    day, month = window("day", now), window("month", now)
    for w in (day, month):
        assert w.resets_at is not None
        expires_ms = cluster.redis.command("PEXPIRETIME", "t:" + spend_table_key(w.key))
        assert int(expires_ms) == int(w.resets_at * 1000)
    assert int(cluster.redis.command("PEXPIRETIME", "t:spend:total")) == -1  # kept
    # An answer charged at the end of a day that is over (a clock behind): its day's
    # table is gone at once, the total kept it.
    yesterday = day.resets_at - 86400.0 - 1.0 if day.resets_at else 0.0
    cluster.clock.advance(yesterday - now)
    await charge(a, token, priced("gpt-4o", 100, 10, yesterday))
    gone = spend_table_key(window("day", yesterday).key)
    assert int(cluster.redis.command("EXISTS", "t:" + gone)) == 0
    rows = cluster.redis.command("HGET", "t:spend:total", "proj-x\tgpt-4o\trequests")
    assert int(rows) == 2


@pytest_twisted.ensureDeferred
async def test_endless_model_names_fold_into_other_and_nothing_is_lost(
    redis: Any, tmp_path: Path
) -> None:
    cluster = SpendCluster(redis, tmp_path, spend_rows=3)
    try:
        a, b = await cluster.proxy(), await cluster.proxy()
        _, token = await cluster.create()
        await cluster.refresh()
        now = cluster.clock.seconds()
        names = [f"gpt-4o-{i}" for i in range(8)] + ["x" * 129, "gpt-4o\x1b[2J", "a\tb"]
        total_nanos = 0
        for i, name in enumerate(names):
            event = priced("gpt-4o", 1000 + i, 10, now)
            event["model"] = name  # what a hostile upstream answers
            await charge(a if i % 2 else b, token, event)
            total_nanos += round(event["cost"]["total"] * NANO)
        # Exactly three named rows over both processes, plus the project's "other".
        for key in ("t:spend:total", "t:" + spend_table_key(window("month", now).key)):
            assert int(cluster.redis.command("HLEN", key)) == (3 + 1) * 4
        doc = await spend(cluster.ini(), "--period", "total")
        got = {r["model"]: r for r in doc["rows"]}
        assert set(got) == {"gpt-4o-0", "gpt-4o-1", "gpt-4o-2", OTHER_MODEL}
        assert got[OTHER_MODEL]["requests"] == len(names) - 3
        assert sum(r["requests"] for r in doc["rows"]) == len(names)
        assert round(sum(r["usd"] for r in doc["rows"]) * NANO) == total_nanos
        # Each process's own file is bounded the same way (per day, per process).
        for proxy in (a, b):
            assert proxy.access.spend is not None
            models = {row.model for row in proxy.access.spend.rows()}
            assert len(models - {OTHER_MODEL}) <= 3 and OTHER_MODEL in models
    finally:
        await cluster.close()


@pytest_twisted.ensureDeferred
async def test_a_redis_that_does_not_answer_is_a_clear_error_without_its_password(
    tmp_path: Path,
) -> None:
    port = free_port()
    cluster = SpendCluster(None, tmp_path)
    config = cluster.ini(url=f"redis://spender:hunter2-s3cret@127.0.0.1:{port}/2")
    done = await threads.deferToThread(llmproxy, "spend", "--config", str(config))
    assert done.returncode == 1
    assert f"redis://127.0.0.1:{port}/2" in done.stderr and "--local" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout and "spender" not in done.stderr
    assert "Traceback" not in done.stderr
    local = await spend(config, "--local")
    assert local["source"] == {"store": "local", "state_dir": str(tmp_path / "cli-state")}


def test_spend_rows_bound_the_local_book_per_day(tmp_path: Path) -> None:
    book = SpendBook(SpendFile(tmp_path / "spend.json"), max_rows=2)
    now = 1_800_000_000.0
    usage = {"input_tokens": 1, "output_tokens": 1}
    for model in ("m1", "m2", "m3", "m1", "m4"):
        book.charge("tok_1", "p", model, usage, {"total": 0.5}, now)
    assert sorted((r.model, r.requests) for r in book.rows()) == [
        ("m1", 2),
        ("m2", 1),
        (OTHER_MODEL, 2),
    ]
    book.charge("tok_1", "p", "m3", usage, {"total": 0.5}, now + 86400)  # a new day
    assert ("m3", window("day", now + 86400).key) in {(r.model, r.day) for r in book.rows()}
    # A book read back from its file knows the day's rows.
    book.close()
    again = SpendBook(SpendFile(tmp_path / "spend.json"), max_rows=2)
    again.load()
    again.charge("tok_1", "p", "m9", usage, {"total": 0.5}, now)
    assert "m9" not in {r.model for r in again.rows()}


def test_spend_rows_is_checked() -> None:
    from llmproxy.state import state_problems

    settings = Settings(state=StateSettings(spend_rows=0))
    assert state_problems(settings) == ["state.spend_rows: must be 1 or more"]
