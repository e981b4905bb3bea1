"""Suite-wide guards: a test fails on any error logged through Twisted's logger and
on DelayedCalls it leaves behind on the global reactor (pytest-twisted checks
neither, trial does both)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from twisted.logger import globalLogPublisher

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _fail_on_logged_errors(request: pytest.FixtureRequest) -> Iterator[list[dict[str, Any]]]:
    errors: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("isError") or event.get("log_failure") is not None:
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield errors
    finally:
        globalLogPublisher.removeObserver(observer)
    if errors and not request.node.get_closest_marker("allow_logged_errors"):
        from twisted.logger import formatEvent

        texts = []
        for e in errors:
            f = e.get("log_failure")
            texts.append(formatEvent(e) + ("\n" + f.getTraceback() if f else ""))
        pytest.fail("errors were logged:\n" + "\n".join(texts))


@pytest.fixture(autouse=True)
def _fail_on_leaked_delayed_calls(request: pytest.FixtureRequest) -> Iterator[None]:
    from twisted.internet import reactor

    before = set(reactor.getDelayedCalls())  # type: ignore[attr-defined]
    yield
    leaked = [
        c
        for c in reactor.getDelayedCalls()  # type: ignore[attr-defined]
        if c not in before and c.active()
    ]
    if leaked and not request.node.get_closest_marker("allow_delayed_calls"):
        for c in leaked:
            c.cancel()
        pytest.fail(f"test left DelayedCalls behind: {leaked!r}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_logged_errors: the test expects logged errors")
    config.addinivalue_line("markers", "allow_delayed_calls: the test leaves timers on purpose")
