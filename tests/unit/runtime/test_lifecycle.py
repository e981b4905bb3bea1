"""The drain's stop stages (llmproxy/runtime/lifecycle.py) on a Clock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from llmproxy.runtime.lifecycle import StopStage, run_stages


def test_stages_run_in_order_each_with_what_is_left() -> None:
    clock = Clock()
    seen: list[tuple[str, float]] = []
    first: Deferred[None] = Deferred()

    def one(left: float) -> Deferred[None]:
        seen.append(("one", left))
        return first

    def two(left: float) -> None:
        seen.append(("two", left))

    done = ensureDeferred(run_stages([StopStage("one", one), StopStage("two", two)], 10.0, clock))
    clock.advance(3.0)
    assert seen == [("one", 10.0)]
    first.callback(None)
    assert seen == [("one", 10.0), ("two", 7.0)]
    assert done.called


def test_a_stage_still_running_at_the_deadline_is_left_behind_with_a_warning() -> None:
    clock = Clock()
    warnings: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(warnings.append)
    try:
        never: Deferred[None] = Deferred()
        later: list[float] = []
        stages = [
            StopStage("stuck", lambda left: never),
            StopStage("after", lambda left: later.append(left)),
        ]
        done = ensureDeferred(run_stages(stages, 5.0, clock))
        clock.advance(5.0)
        assert done.called and later == [0.0]  # the next stages still run, with no time
        assert not never.called  # left alone, not cancelled
    finally:
        globalLogPublisher.removeObserver(warnings.append)
    late = [e["stage"] for e in warnings if "did not finish" in e.get("log_format", "")]
    assert late == ["stuck"]


@pytest.mark.allow_logged_errors
def test_a_failing_stage_is_logged_and_the_drain_goes_on() -> None:
    clock = Clock()
    ran: list[str] = []

    def boom(left: float) -> None:
        raise RuntimeError("boom")

    stages = [StopStage("boom", boom), StopStage("next", lambda left: ran.append("next"))]
    done = ensureDeferred(run_stages(stages, 5.0, clock))
    assert done.called and ran == ["next"]
