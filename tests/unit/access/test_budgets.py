"""Budgets per proxy token: checked before forwarding, charged after the answer,
per day, month or in total; driven by a Clock (no reactor, no sockets)."""

from __future__ import annotations

import calendar
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from llmproxy.access.budgets import (
    NANO,
    SpendBook,
    SpendFile,
    budget_key,
    read_spend,
    summarize,
    window,
)
from llmproxy.access.decision import Allow, Deny
from llmproxy.access.policy import build_access
from llmproxy.access.tokens import Token, TokenFile
from llmproxy.capture.record import ExchangeRecord
from llmproxy.cli import main as cli
from llmproxy.config.model import ServerSettings, Settings
from llmproxy.http.errors import error_body
from tests.unit.access.test_policy import ROUTES, World, open_world

# 2027-03-31 23:00 UTC: an hour before a new day and a new month.
NOW = float(calendar.timegm((2027, 3, 31, 23, 0, 0)))
COST = 0.004  # USD per answer below


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = open_world(tmp_path, NOW)
    yield w
    w.access.stop(0)


def make(world: World, **kw: Any) -> tuple[str, Token]:
    secret, token = world.tokens.create("proj-b", world.clock.seconds(), **kw)
    world.access.reload()
    return secret, token


def answered(world: World, token: Token, usd: float | None = COST, tokens: int = 100) -> None:
    """The capture pump's call once an answer of ``token`` was priced."""
    record = ExchangeRecord(
        request_id="r",
        started_at=world.clock.seconds(),
        method="POST",
        path="/secure/v1/chat/completions",
        query="",
        route="secure",
        provider="openai",
        upstream_url="",
        upstream_host="",
        client_addr="",
        request_headers=[],
        token_id=token.id,
        project=token.project,
        ended_at=0.5,
    )
    event = {
        "model": "gpt-4o",
        "usage": {"input_tokens": tokens - 10, "output_tokens": 10},
        "cost": None if usd is None else {"total": usd, "currency": "USD"},
    }
    world.access.charge(record, event)


def refused(decision: Allow | Deny) -> Deny:
    assert isinstance(decision, Deny), decision
    assert decision.status == 429 and decision.code == "budget_exceeded"
    return decision


def test_a_usd_budget_refuses_exactly_once_it_is_spent(world: World) -> None:
    secret, token = make(world, max_usd=0.01)
    allowed = 0
    for _ in range(10):
        decision = world.bearer(secret)
        if isinstance(decision, Deny):
            break
        allowed += 1
        answered(world, token)
    # 0, 0.004, 0.008 were under 0.01: three answers; at 0.012 the fourth is refused.
    assert allowed == 3
    deny = refused(world.bearer(secret))
    assert "USD budget" in deny.message and "$0.012000 of $0.01" in deny.message
    assert "over its life" in deny.message and "does not reset" in deny.message
    assert deny.headers == ()  # a total budget never resets: no Retry-After
    body = orjson.loads(error_body(deny.status, deny.message, deny.code))
    assert body["error"]["code"] == "budget_exceeded"
    assert body["error"]["type"] == "rate_limit_error"
    assert world.audit.lines[-1]["action"] == "budget_exceeded"
    assert world.audit.lines[-1]["token_id"] == token.id


def test_the_budget_is_checked_before_forwarding_and_charged_after(world: World) -> None:
    """Requests let through while the budget held all complete and are all counted:
    concurrent requests overshoot by at most what those in flight cost."""
    secret, token = make(world, max_usd=0.01)
    in_flight = [world.bearer(secret) for _ in range(5)]  # all before any answer ended
    assert all(isinstance(d, Allow) for d in in_flight)
    for _ in in_flight:
        answered(world, token)
    assert world.access.spend is not None
    usd, _ = world.access.spend.spent(token.id, "total", world.clock.seconds())
    assert usd == pytest.approx(5 * COST)  # nothing lost: every one was charged
    assert usd <= 0.01 + len(in_flight) * COST
    refused(world.bearer(secret))


def test_a_daily_budget_resets_at_utc_midnight_and_says_when(world: World) -> None:
    secret, token = make(world, max_tokens=250, period="day")
    for _ in range(3):
        assert isinstance(world.bearer(secret), Allow)
        answered(world, token, tokens=100)
    deny = refused(world.bearer(secret))
    assert "token budget" in deny.message and "300 of 250 tokens" in deny.message
    assert "this day" in deny.message and "2027-04-01T00:00:00Z" in deny.message
    assert deny.headers == ((b"retry-after", b"3600"),)
    world.clock.advance(3600)
    assert isinstance(world.bearer(secret), Allow)


def test_a_monthly_budget_counts_across_days_and_resets_with_the_month(
    world: World,
) -> None:
    secret, token = make(world, max_usd=0.01, period="month")
    world.clock.advance(-86400 * 5)  # 2027-03-26
    answered(world, token, usd=0.006)
    world.clock.advance(86400 * 5)  # 2027-03-31 again
    answered(world, token, usd=0.006)
    deny = refused(world.bearer(secret))
    assert "2027-04-01T00:00:00Z" in deny.message
    world.clock.advance(3600)  # April
    assert isinstance(world.bearer(secret), Allow)


def test_answers_without_a_price_count_tokens_not_dollars(world: World) -> None:
    secret, token = make(world, max_usd=0.01, max_tokens=150)
    answered(world, token, usd=None, tokens=100)
    assert isinstance(world.bearer(secret), Allow)
    answered(world, token, usd=None, tokens=100)
    deny = refused(world.bearer(secret))
    assert "token budget" in deny.message
    assert world.access.spend is not None
    (row,) = world.access.spend.rows()
    assert (row.usd_nanos, row.tokens, row.requests, row.unpriced) == (0, 200, 2, 2)


def test_tokens_without_budgets_are_never_refused_but_their_spend_is_kept(
    world: World,
) -> None:
    secret, token = make(world)
    for _ in range(20):
        assert isinstance(world.bearer(secret), Allow)
        answered(world, token, usd=1.0)
    stats = world.access.stats()["spend"]["tokens"][token.id]
    assert stats == {
        "project": "proj-b",
        "period": "total",
        "usd": 20.0,
        "tokens": 2000,
        "max_usd": None,
        "max_tokens": None,
    }


def test_spend_survives_a_restart(tmp_path: Path, world: World) -> None:
    secret, token = make(world, max_usd=0.01)
    for _ in range(3):
        answered(world, token)
    world.access.stop(0)  # a clean stop writes the spend
    settings = Settings(server=ServerSettings(state_dir=tmp_path), routes=ROUTES)
    again = build_access(settings, world.audit, world.clock)
    again.start()
    world.access = again
    refused(world.bearer(secret))
    assert again.spend is not None
    assert again.spend.spent(token.id, "total", NOW) == (pytest.approx(0.012), 300)


def test_spend_is_flushed_while_running(tmp_path: Path, world: World) -> None:
    _, token = make(world)
    answered(world, token)
    assert read_spend(tmp_path) == []
    world.clock.advance(5.0)  # the flush interval
    (row,) = read_spend(tmp_path)
    assert (row.token_id, row.model, row.day, row.usd_nanos) == (
        token.id,
        "gpt-4o",
        "2027-03-31",
        round(COST * NANO),
    )


def test_an_unreadable_spend_file_is_said_and_starts_from_zero(tmp_path: Path) -> None:
    (tmp_path / "token-spend.json").write_text("{not json")
    book = SpendBook(SpendFile.in_state_dir(tmp_path))
    book.load()  # logs a warning; must not raise
    assert book.rows() == []


def test_windows_and_keys() -> None:
    assert window("day", NOW).key == "2027-03-31"
    assert window("day", NOW).resets_at == NOW + 3600
    assert window("month", NOW).key == "2027-03"
    assert window("month", float(calendar.timegm((2027, 12, 15, 0, 0, 0)))).resets_at == float(
        calendar.timegm((2028, 1, 1, 0, 0, 0))
    )
    assert window("total", NOW).resets_at is None
    assert budget_key("tok_ab", "usd", "2027-03") == "budget:tok_ab:usd:2027-03"
    with pytest.raises(ValueError, match="unknown period"):
        window("week", NOW)


def test_token_file_keeps_budgets_and_rejects_a_bad_period(tmp_path: Path) -> None:
    tokens = TokenFile.in_state_dir(tmp_path)
    tokens.create("p", NOW, max_usd=2.5, max_tokens=1000, period="month")
    (read,) = tokens.read()
    assert (read.max_usd, read.max_tokens, read.period) == (2.5, 1000, "month")
    doc = orjson.loads(tokens.path.read_bytes())
    doc["tokens"][0]["period"] = "week"
    tokens.path.write_bytes(orjson.dumps(doc))
    from llmproxy.access.tokens import TokenFileError

    with pytest.raises(TokenFileError, match="period"):
        tokens.read()


def _ini(tmp_path: Path) -> str:
    path = tmp_path / "llmproxy.ini"
    path.write_text(f"[server]\nstate_dir = {tmp_path / 'state'}\n")
    return str(path)


def test_cli_creates_budgets_lists_spend_and_prints_the_spend_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _ini(tmp_path)
    args = ["token", "create", "--config", config, "--project", "team-a"]
    assert cli.main([*args, "--max-usd", "5", "--max-tokens", "9000", "--period", "day"]) == 0
    capsys.readouterr()
    (token,) = TokenFile.in_state_dir(tmp_path / "state").read()
    assert (token.max_usd, token.max_tokens, token.period) == (5.0, 9000, "day")
    import time

    today = window("day", time.time()).key
    rows = [
        {"token_id": token.id, "project": "team-a", "model": "gpt-4o", "day": today,
         "usd_nanos": 1_250_000_000, "tokens": 4000, "requests": 3, "unpriced": 0},
        {"token_id": token.id, "project": "team-a", "model": "o3", "day": today,
         "usd_nanos": 500_000_000, "tokens": 1000, "requests": 1, "unpriced": 0},
        {"token_id": token.id, "project": "team-a", "model": "gpt-4o", "day": "2001-01-01",
         "usd_nanos": 7 * NANO, "tokens": 1, "requests": 1, "unpriced": 0},
    ]  # fmt: skip
    state = tmp_path / "state"
    (state / "token-spend.json").write_bytes(orjson.dumps({"version": 1, "rows": rows[:2]}))
    (state / "worker-1").mkdir()
    (state / "worker-1" / "token-spend.json").write_bytes(
        orjson.dumps({"version": 1, "rows": rows[2:]})
    )
    assert cli.main(["token", "list", "--config", config, "--json"]) == 0
    (entry,) = orjson.loads(capsys.readouterr().out)
    assert (entry["period"], entry["spent_usd"], entry["spent_tokens"]) == ("day", 1.75, 5000)
    assert (entry["max_usd"], entry["max_tokens"]) == (5.0, 9000)

    assert cli.main(["spend", "--config", config, "--period", "day", "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["window"] == today
    assert [(r["project"], r["model"], r["usd"], r["tokens"]) for r in doc["rows"]] == [
        ("team-a", "gpt-4o", 1.25, 4000),
        ("team-a", "o3", 0.5, 1000),
    ]
    assert cli.main(["spend", "--config", config, "--period", "total"]) == 0
    table = capsys.readouterr().out
    assert "gpt-4o" in table and "8.250000" in table  # both workers' files, all days
    assert table.strip().splitlines()[-1].split()[:2] == ["TOTAL", "8.750000"]
    totals = summarize(read_spend(state), "total", NOW)
    assert totals[("team-a", "gpt-4o")]["requests"] == 4


@pytest.mark.parametrize("bad", ["0", "-1", "lots", "inf"])
def test_cli_refuses_a_bad_usd_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    config = _ini(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(["token", "create", "--config", config, "--project", "p", "--max-usd", bad])
    assert e.value.code == 2
    assert "--max-usd" in capsys.readouterr().err


class SharedCounters:
    """Counters another process shares: in memory here, behind the same
    interface the Redis-backed ones of the shared state have."""

    def __init__(self) -> None:
        from llmproxy.state.counters import LocalCounters

        self.inner = LocalCounters()
        self.adds: list[tuple[str, int, float | None]] = []
        self.tables: list[Any] = []

    def add(self, key: str, amount: int, now: float, expire_at: float | None = None) -> Any:
        self.adds.append((key, amount, expire_at))
        return self.inner.add(key, amount, now, expire_at)

    def add_many(self, amounts: Any, now: float) -> Any:
        self.adds += list(amounts)
        return self.inner.add_many(amounts, now)

    def charge(self, amounts: Any, table: Any, now: float) -> Any:
        self.tables.append(table)
        return self.add_many(amounts, now)

    def read(self, keys: Any, now: float) -> Any:
        return self.inner.read(keys, now)


def test_charges_go_to_the_shared_counters_and_refusals_read_them(tmp_path: Path) -> None:
    """The seam for ``[state] store = redis``: two books (two processes) sharing
    counters refuse a token the other one spent."""
    from llmproxy.interfaces import SpendCounters

    shared = SharedCounters()
    assert isinstance(shared, SpendCounters)
    one = SpendBook(SpendFile(tmp_path / "a.json"), shared=shared)
    two = SpendBook(SpendFile(tmp_path / "b.json"), shared=shared)
    token = Token("tok_1", "0" * 64, "p", NOW, max_usd=0.01, max_tokens=10_000, period="month")
    one.charge(
        token.id, "p", "gpt-4o", {"input_tokens": 5, "output_tokens": 5}, {"total": 0.011}, NOW
    )
    assert ("budget:tok_1:usd:2027-03", 11_000_000, window("month", NOW).resets_at) in shared.adds
    assert two.refusal(token, NOW) is None  # its own memory knows nothing
    out: list[Any] = []
    two.shared_refusal(token, NOW).addCallback(out.append)
    (refusal,) = out
    assert refusal is not None and refusal.unit == "usd" and refusal.spent == pytest.approx(0.011)
    assert two.budget_checks(token, NOW) == [
        ("budget:tok_1:usd:2027-03", 10_000_000, window("month", NOW).resets_at),
        ("budget:tok_1:tokens:2027-03", 10_000, window("month", NOW).resets_at),
    ]


def test_answers_from_the_cache_count_towards_no_budget(world: World) -> None:
    secret, token = make(world, max_tokens=150)
    record_usage = {"input_tokens": 90, "output_tokens": 10}
    for _ in range(3):
        assert world.access.spend is not None
        world.access.spend.charge(
            token.id, token.project, "gpt-4o", record_usage, {"total": 0.0, "source": "cache"}, NOW
        )
    assert isinstance(world.bearer(secret), Allow)
    assert world.access.spend.spent(token.id, "total", NOW) == (0.0, 0)
    (row,) = world.access.spend.rows()
    assert row.requests == 3
