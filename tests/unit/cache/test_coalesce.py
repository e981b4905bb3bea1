"""Concurrent identical misses: one leader goes upstream, followers wait for it."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock

from llmproxy.cache.coalesce import InFlight


def _table(clock: Clock | None = None) -> InFlight[str]:
    return InFlight(clock=clock or Clock(), lock_timeout=10.0)


def _results(ds: list[defer.Deferred[Any]]) -> list[Any]:
    out: list[Any] = []
    for d in ds:
        d.addBoth(out.append)
    return out


def test_the_first_leads_and_the_rest_follow() -> None:
    table = _table()
    assert table.join("k") is None
    waiters = [table.join("k") for _ in range(3)]
    assert all(isinstance(w, defer.Deferred) for w in waiters)
    assert table.join("other") is None
    assert table.waiting == 3 and len(table) == 2


def test_a_value_answers_every_follower() -> None:
    clock = Clock()
    table = _table(clock)
    table.join("k")
    waiters = [table.join("k") for _ in range(3)]
    table.complete("k", "entry")
    assert _results(waiters) == ["entry"] * 3  # type: ignore[arg-type]
    assert (table.followers, table.released, table.waiting) == (3, 0, 0)
    assert clock.getDelayedCalls() == []


def test_none_releases_followers_and_forgets_the_key() -> None:
    table = _table()
    table.join("k")
    waiters = [table.join("k") for _ in range(2)]
    table.complete("k", None)
    assert _results(waiters) == [None, None]  # type: ignore[arg-type]
    assert table.released == 2 and len(table) == 0
    assert table.join("k") is None  # the next miss leads again


def test_after_a_value_and_before_settle_a_newcomer_gets_it_at_once() -> None:
    table = _table()
    table.join("k")
    table.complete("k", "entry")
    late = table.join("k")
    assert late is not None and _results([late]) == ["entry"]
    table.settle("k")
    assert table.join("k") is None


def test_a_follower_goes_its_own_way_after_lock_timeout() -> None:
    clock = Clock()
    table = _table(clock)
    table.join("k")
    first = table.join("k")
    clock.advance(5)
    second = table.join("k")
    assert first is not None and second is not None
    got = _results([first, second])
    clock.advance(5)
    assert got == [None] and table.waiting == 1
    table.complete("k", "entry")
    assert got == [None, "entry"]
    assert (table.released, table.followers) == (1, 1)


def test_a_cancelled_follower_leaves_no_timer_and_no_waiter() -> None:
    clock = Clock()
    table = _table(clock)
    table.join("k")
    waiter = table.join("k")
    assert waiter is not None
    waiter.addErrback(lambda f: f.trap(defer.CancelledError))
    waiter.cancel()
    assert table.waiting == 0 and clock.getDelayedCalls() == []
    table.complete("k", "entry")
    assert table.followers == 0


def test_completing_twice_or_an_unknown_key_does_nothing() -> None:
    table = _table()
    table.complete("nobody", "x")
    table.join("k")
    table.complete("k", "first")
    table.complete("k", None)
    late = table.join("k")
    assert late is not None and _results([late]) == ["first"]
