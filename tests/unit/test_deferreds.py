"""Bounded waits that leave what they wait on alone (llmproxy/deferreds.py) on a Clock."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from llmproxy.deferreds import within


def test_within_says_whether_it_fired_in_time_and_leaves_it_alone() -> None:
    clock = Clock()
    quick = within(succeed(None), 1.0, clock)
    assert quick.result is True
    slow: Deferred[object] = Deferred()
    late = within(slow, 1.0, clock)
    clock.advance(1.0)
    assert late.result is False
    slow.callback("still mine")
    assert slow.result == "still mine"
    assert clock.getDelayedCalls() == []


def test_within_a_failure_in_time_counts_as_fired_and_stays_the_callers() -> None:
    clock = Clock()
    failing: Deferred[object] = Deferred()
    waited = within(failing, 1.0, clock)
    failing.errback(ValueError("mine"))
    assert waited.result is True
    assert clock.getDelayedCalls() == []
    failing.addErrback(lambda f: f.trap(ValueError))
