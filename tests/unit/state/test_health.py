"""Up and down per part, one log line per transition, decisions counted
(llmproxy/state/health.py)."""

from __future__ import annotations

from typing import Any

from prometheus_client.core import Metric
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from llmproxy.state.health import StateHealth


def samples(families: list[Metric]) -> dict[tuple[str, tuple[str, ...]], float]:
    return {(s.name, tuple(s.labels.values())): s.value for fam in families for s in fam.samples}


def test_a_transition_is_logged_once_and_each_decision_counted() -> None:
    lines: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(lines.append)
    try:
        clock = Clock()
        health = StateHealth(clock, "fail_closed")
        health.watch("access")
        assert health.up("access")
        for _ in range(3):
            health.failed("access", "refused", "connection lost")
        health.failed("access", None, "poll failed")  # nothing decided
        assert not health.up("access")
        clock.advance(2.5)
        health.succeeded("access")
        health.succeeded("access")
    finally:
        globalLogPublisher.removeObserver(lines.append)
    texts = [
        line["log_format"] for line in lines if line.get("log_namespace", "").endswith("health")
    ]
    assert len(texts) == 2
    down = next(line for line in lines if "unavailable" in line.get("log_format", ""))
    assert "503" in down["action"] and down["why"] == "connection lost"
    up = next(line for line in lines if "answers again" in line.get("log_format", ""))
    assert up["down"] == 2.5
    assert health.stats() == {"access": {"connected": 1, "outages": 1, "unavailable_refused": 3}}


def test_metrics_say_which_part_is_down_and_what_was_done() -> None:
    health = StateHealth(Clock(), "fail_open")
    health.watch("sessions")
    health.watch("access")
    health.failed("sessions", "local", "timeout")
    got = samples(list(health.families()))
    assert got[("llmproxy_state_connected", ("sessions",))] == 0.0
    assert got[("llmproxy_state_connected", ("access",))] == 1.0
    assert got[("llmproxy_state_unavailable_total", ("sessions", "local"))] == 1.0
    assert got[("llmproxy_state_outages_total", ("sessions",))] == 1.0
