"""The counting primitive: LocalCounters as the reference, RedisCounters against a
real redis-server giving the same answers, atomic across concurrent callers, and
batched per reactor turn (llmproxy/state/counters.py)."""

from __future__ import annotations

import math

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from llmproxy.redis.connection import RedisUnavailable
from llmproxy.state import SharedState
from llmproxy.state.counters import (
    Admission,
    BucketTake,
    CounterCheck,
    LocalCounters,
    TableAdd,
    bucket_take,
)
from tests.integration.redis_server import RedisServer
from tests.unit.state.conftest import connect, started

NOW = 1_800_000_000.0


# -- the reference ---------------------------------------------------------------------


def test_a_limit_admits_exactly_up_to_it_then_names_the_refusing_check() -> None:
    c = LocalCounters()
    checks = (CounterCheck("free"), CounterCheck("quota", limit=3))
    answers = [c.admit_now(checks, None, NOW) for _ in range(5)]
    assert [a.admitted for a in answers] == [True, True, True, False, False]
    assert answers[2].counts == (3, 3)
    assert answers[3] == Admission(False, (3, 3), refused_by=1)


def test_add_zero_passes_while_something_is_left() -> None:
    c = LocalCounters()
    c.add("budget", 99, NOW)
    assert c.admit_now((CounterCheck("budget", limit=100, add=0),), None, NOW).admitted
    c.add("budget", 1, NOW)
    refused = c.admit_now((CounterCheck("budget", limit=100, add=0),), None, NOW)
    assert refused == Admission(False, (100,), refused_by=0)


def test_an_amount_that_would_pass_the_limit_is_refused_whole() -> None:
    c = LocalCounters()
    assert c.admit_now((CounterCheck("k", limit=10, add=7),), None, NOW).admitted
    assert not c.admit_now((CounterCheck("k", limit=10, add=4),), None, NOW).admitted
    assert c.admit_now((CounterCheck("k", limit=10, add=3),), None, NOW).counts == (10,)


def test_a_counter_vanishes_at_the_end_of_its_period() -> None:
    c = LocalCounters()
    check = CounterCheck("month", limit=1, expire_at=NOW + 10)
    assert c.admit_now((check,), None, NOW).admitted
    assert not c.admit_now((check,), None, NOW + 9.9).admitted
    assert c.admit_now((check,), None, NOW + 10).admitted


def test_a_refused_admission_changes_nothing() -> None:
    c = LocalCounters()
    checks = (CounterCheck("a"), CounterCheck("b", limit=0))
    assert not c.admit_now(checks, BucketTake("r", 1), NOW).admitted
    # The bucket of one was not taken from, "a" was not counted.
    assert c.admit_now((CounterCheck("a"),), BucketTake("r", 1), NOW).counts == (1,)


def test_the_bucket_allows_a_burst_then_refills_and_says_how_long_to_wait() -> None:
    c = LocalCounters()
    bucket = BucketTake("r", 60)  # one per second
    assert all(c.admit_now((), bucket, NOW).admitted for _ in range(60))
    empty = c.admit_now((), bucket, NOW)
    assert not empty.admitted and empty.retry_after == pytest.approx(1.0)
    assert not c.admit_now((), bucket, NOW + 0.5).admitted
    assert c.admit_now((), bucket, NOW + 1.0).admitted


def test_a_changed_rate_starts_a_full_bucket() -> None:
    c = LocalCounters()
    assert c.admit_now((), BucketTake("r", 1), NOW).admitted
    assert not c.admit_now((), BucketTake("r", 1), NOW).admitted
    assert c.admit_now((), BucketTake("r", 2), NOW).admitted


def test_bucket_take_never_drains_on_a_clock_stepping_back() -> None:
    level, stamp, wait = bucket_take(5.0, NOW, 10, NOW - 100)
    assert wait == 0.0 and level == 4.0 and stamp == NOW - 100


# -- Redis gives the same answers ------------------------------------------------------

CHECKS = st.lists(
    st.builds(
        CounterCheck,
        key=st.sampled_from(["a", "b", "c"]),
        limit=st.one_of(st.none(), st.integers(0, 6)),
        add=st.integers(0, 3),
        expire_at=st.one_of(st.none(), st.sampled_from([NOW + 5, NOW + 50])),
    ),
    max_size=3,
    unique_by=lambda c: c.key,
)
STEPS = st.lists(
    st.tuples(
        CHECKS,
        st.one_of(st.none(), st.builds(BucketTake, st.just("r"), st.sampled_from([1, 2, 120]))),
        st.integers(0, 4000).map(lambda ms: ms / 1000),  # seconds since the start
    ),
    min_size=1,
    max_size=25,
)


def same(local: Admission, shared: Admission) -> bool:
    return (
        local.admitted == shared.admitted
        and local.counts == shared.counts
        and local.refused_by == shared.refused_by
        and math.isclose(local.retry_after, shared.retry_after, abs_tol=1e-5)
    )


# Redis answers as the reference does, admission after admission: asked one at a
# time, or as whole batches (the script reads each counter and bucket of a batch
# once and writes it once at the batch's end, deciding each admission as if alone).
# The fixtures are reset by the test itself (FLUSHALL), per example.
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=STEPS, later=STEPS, batched=st.booleans())
@pytest_twisted.ensureDeferred
async def test_redis_answers_as_the_reference_does(
    steps: list[tuple[list[CounterCheck], BucketTake | None, float]],
    later: list[tuple[list[CounterCheck], BucketTake | None, float]],
    batched: bool,
    shared: SharedState,
    redis: RedisServer,
) -> None:
    redis.command("FLUSHALL")
    local = LocalCounters()
    at = NOW
    for batch in (steps, later):  # the second batch reads what the first one wrote
        expected, asked, got = [], [], []
        before = shared.counters.batches
        for checks, bucket, step_at in batch:
            at = max(at, NOW + step_at)  # the clock only goes on (Redis expires on its own)
            expected.append(local.admit_now(checks, bucket, at))
            if batched:
                asked.append(shared.counters.admit(checks, bucket, at))
            else:
                got.append(await shared.counters.admit(checks, bucket, at))
        got += await defer.gatherResults(asked)
        assert shared.counters.batches == before + (1 if batched else len(batch))
        for one, want in zip(got, expected, strict=True):
            assert same(want, one), (batch, want, one)
    keys = ["a", "b", "c"]
    assert await shared.counters.read(keys, at) == [local.value(k, at) for k in keys]


@pytest_twisted.ensureDeferred
async def test_concurrent_admissions_never_pass_the_limit(shared: SharedState) -> None:
    checks = (CounterCheck("quota:t", limit=50),)
    asked = [shared.counters.admit(checks, None, NOW) for _ in range(200)]
    answers = await defer.gatherResults(asked)
    assert sum(a.admitted for a in answers) == 50
    assert max(a.counts[0] for a in answers if a.admitted) == 50
    assert (await shared.counters.read(["quota:t"], NOW)) == [50]


@pytest_twisted.ensureDeferred
async def test_the_admissions_of_one_turn_share_one_round_trip(shared: SharedState) -> None:
    before = shared.counters.batches
    asked = [shared.counters.admit((CounterCheck(f"k{i}"),), None, NOW) for i in range(100)]
    await defer.gatherResults(asked)
    assert shared.counters.batches == before + 1
    assert shared.counters.admissions >= 100


@pytest_twisted.ensureDeferred
async def test_the_adds_of_one_turn_are_summed_into_one_script_run(
    redis: RedisServer, shared: SharedState
) -> None:
    before = shared.counters.add_batches
    expire = NOW + 3600
    charges = [[("usd", 7, expire), ("tokens", i, expire), ("total", 1, None)] for i in range(50)]
    added = [shared.counters.add_many(charge, NOW) for charge in charges]
    await defer.gatherResults(added)
    assert shared.counters.add_batches == before + 1
    assert await shared.counters.read(["usd", "tokens", "total"], NOW) == [350, sum(range(50)), 50]
    assert redis.command("PEXPIRETIME", "t:usd") == int(expire * 1000)
    assert redis.command("TTL", "t:total") == -1  # no expiry asked: none set


@pytest_twisted.ensureDeferred
async def test_the_charges_of_one_turn_add_their_table_rows_in_the_same_script_run(
    redis: RedisServer, shared: SharedState
) -> None:
    day_end, month_end = NOW + 3600, NOW + 86400
    tables = (("day", day_end), ("month", month_end), ("all", None))
    later = (("day2", day_end + 86400), ("all", None))  # a new day began in the turn
    columns = ("usd", "n")
    before = shared.counters.add_batches
    charged = []
    for i in range(30):
        row = f"p\tm{i % 4}"
        table = TableAdd(row, "p\tother", columns, (i, 1), tables if i < 20 else later, 3)
        charged.append(shared.counters.charge([("usd", i, day_end)], table, NOW))
    await defer.gatherResults(charged)
    assert shared.counters.add_batches == before + 1
    assert await shared.counters.read(["usd"], NOW) == [sum(range(30))]
    day = await shared.counters.read_table("day")
    # Three rows fit; the fourth model's answers went to "other", nothing lost.
    assert set(day) == {"p\tm0", "p\tm1", "p\tm2", "p\tother"}
    assert sum(r["usd"] for r in day.values()) == sum(range(20))
    assert day["p\tother"]["n"] == sum(1 for i in range(20) if i % 4 == 3)
    assert sum(r["n"] for r in (await shared.counters.read_table("all")).values()) == 30
    assert sum(r["n"] for r in (await shared.counters.read_table("day2")).values()) == 10
    assert redis.command("PEXPIRETIME", "t:day") == int(day_end * 1000)
    assert redis.command("PEXPIRETIME", "t:month") == int(month_end * 1000)
    assert redis.command("TTL", "t:all") == -1
    assert await shared.counters.read_table("absent") == {}


@pytest_twisted.ensureDeferred
async def test_a_counters_expiry_is_set_when_it_is_made_and_kept_after(
    redis: RedisServer, shared: SharedState
) -> None:
    end, other_end = NOW + 3600, NOW + 7200
    counters = shared.counters
    await counters.add_many([("charged", 5, end)], NOW)
    await counters.add("added", 5, NOW, expire_at=end)
    await counters.admit((CounterCheck("admitted", expire_at=end),), None, NOW)
    # Nothing added (0) makes the counter too, with its expiry.
    await counters.add_many([("zero", 0, end)], NOW)
    for key in ("charged", "added", "admitted", "zero"):
        assert redis.command("PEXPIRETIME", "t:" + key) == int(end * 1000), key
    # Later adds keep it (a period's counter always names the same end).
    await counters.add_many([("charged", 1, other_end)], NOW)
    await counters.add("added", 1, NOW, expire_at=other_end)
    await counters.admit((CounterCheck("admitted", expire_at=other_end),), None, NOW)
    for key in ("charged", "added", "admitted"):
        assert redis.command("PEXPIRETIME", "t:" + key) == int(end * 1000), key
    assert await counters.read(["charged", "added", "admitted", "zero"], NOW) == [6, 6, 2, 0]
    # A counter only checked (add 0) is not made.
    await counters.admit((CounterCheck("checked", limit=5, add=0, expire_at=end),), None, NOW)
    assert redis.command("EXISTS", "t:checked") == 0


def test_the_reference_keeps_a_counters_expiry_as_redis_does() -> None:
    c = LocalCounters()
    c.add_now("k", 1, NOW, NOW + 10)
    c.add_now("k", 1, NOW, NOW + 100)
    assert c.value("k", NOW + 9) == 2 and c.value("k", NOW + 10) == 0
    c.add_now("k", 1, NOW + 10, NOW + 100)  # made again: the new period's end
    assert c.value("k", NOW + 99) == 1


@pytest_twisted.ensureDeferred
async def test_a_table_row_is_made_whole_its_expiry_set_once_and_zeros_add_nothing(
    redis: RedisServer, shared: SharedState
) -> None:
    end = NOW + 3600
    tables = (("day", end),)
    first = TableAdd("p\tm", "p\tother", ("usd", "n"), (0, 1), tables, 5)
    await shared.counters.charge([], first, NOW)
    assert redis.command("HGETALL", "t:day") == [b"p\tm\tusd", b"0", b"p\tm\tn", b"1"]
    assert redis.command("PEXPIRETIME", "t:day") == int(end * 1000)
    later = TableAdd("p\tm", "p\tother", ("usd", "n"), (7, 0), (("day", end + 99),), 5)
    await shared.counters.charge([], later, NOW)
    assert await shared.counters.read_table("day") == {"p\tm": {"usd": 7, "n": 1}}
    assert redis.command("PEXPIRETIME", "t:day") == int(end * 1000)


@pytest_twisted.ensureDeferred
async def test_a_bucket_is_one_string_with_its_ttl_and_anything_else_there_is_a_full_bucket(
    redis: RedisServer, shared: SharedState
) -> None:
    bucket = BucketTake("r", 2)
    assert (await shared.counters.admit((), bucket, NOW)).admitted
    assert redis.command("TYPE", "t:r") == b"string"
    assert len(redis.command("GET", "t:r")) == 24
    assert 0 < redis.command("PTTL", "t:r") <= 61_000
    assert (await shared.counters.admit((), bucket, NOW)).admitted
    assert not (await shared.counters.admit((), bucket, NOW)).admitted
    redis.command("SET", "t:r", "0.0 1800000000.0 2")  # not a bucket this version wrote
    assert (await shared.counters.admit((), bucket, NOW)).admitted
    assert (await shared.counters.admit((), bucket, NOW)).admitted
    assert not (await shared.counters.admit((), bucket, NOW)).admitted


@pytest_twisted.ensureDeferred
async def test_stopping_sends_the_adds_still_held_for_this_turn(redis: RedisServer) -> None:
    state = connect(redis)
    await started(state)
    state.counters.add_many([("held", 5, None)], NOW).addErrback(lambda _: None)
    await state.stop(1.0)  # in the same turn as the add
    assert redis.command("GET", "t:held") == b"5"


@pytest_twisted.ensureDeferred
async def test_a_failed_add_batch_fails_every_add_of_it(redis: RedisServer) -> None:
    state = connect(redis)  # never started: no connection
    added = [state.counters.add_many([("k", 1, None)], NOW) for _ in range(3)]
    for d in added:
        with pytest.raises(RedisUnavailable):
            await d


@pytest_twisted.ensureDeferred
async def test_two_processes_share_one_count(redis: RedisServer, shared: SharedState) -> None:
    other = connect(redis)
    await started(other)
    try:
        checks = (CounterCheck("quota:x", limit=3),)
        await defer.gatherResults([shared.counters.admit(checks, None, NOW) for _ in range(2)])
        got = await other.counters.admit(checks, None, NOW)
        refused = await other.counters.admit(checks, None, NOW)
        assert got.admitted and got.counts == (3,)
        assert not refused.admitted and refused.refused_by == 0
    finally:
        await other.stop(1.0)


@pytest_twisted.ensureDeferred
async def test_a_forgotten_script_is_sent_again(redis: RedisServer, shared: SharedState) -> None:
    assert (await shared.counters.admit((CounterCheck("a"),), None, NOW)).admitted
    redis.command("SCRIPT", "FLUSH")  # as after a Redis restart
    assert (await shared.counters.admit((CounterCheck("a"),), None, NOW)).counts == (2,)


@pytest_twisted.ensureDeferred
async def test_add_all_and_add_once(shared: SharedState) -> None:
    await shared.counters.add_all({"a": 2, "b": 5})
    assert await shared.counters.add_once("marker", {"a": 10})
    assert not await shared.counters.add_once("marker", {"a": 10})
    assert await shared.counters.add("b", 1, NOW, expire_at=NOW + 3600) == 6
    assert await shared.counters.read(["a", "b", "none"], NOW) == [12, 6, 0]


@pytest_twisted.ensureDeferred
async def test_admissions_fail_when_redis_is_not_there(redis: RedisServer) -> None:
    state = connect(redis)  # never started: no connection
    with pytest.raises(RedisUnavailable):
        await state.counters.admit((CounterCheck("a"),), None, NOW)
