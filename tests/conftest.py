"""Suite-wide guards: a test fails on any error logged through Twisted's logger, on
DelayedCalls it leaves behind on the global reactor (pytest-twisted checks
neither, trial does both), and after pytest-timeout's per-test limit (pyproject.toml),
also while it waits on a Deferred that never fires (tests:
tests/integration/test_suite_timeout.py)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import greenlet
import pytest
import pytest_timeout
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


# -- the per-test timeout, with the reactor in a greenlet ------------------------------
#
# pytest-twisted runs the reactor, and the test bodies, in a greenlet of the main
# thread, while the test's own greenlet waits in ``blockon_default`` for the test's
# Deferred.  pytest-timeout's "thread" method ends a hung run with os._exit: no
# later test runs.  Its "signal" method raises in whatever runs when SIGALRM comes:
# in hung test code that fails the test, but for a test waiting on a Deferred that
# never fires it raises in the reactor's poll, whose main loop logs the exception
# and polls on (and an error in a reactor callback is logged too): the test hangs
# for good.  So the alarm is ours: it also ends the test's wait.


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None  # pytest-timeout's own
    from twisted.internet import reactor

    test_greenlet = greenlet.getcurrent()
    polling = type(reactor).doIteration.__code__  # type: ignore[attr-defined]

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        if not settings.disable_debugger_detection and pytest_timeout.is_debugging():
            return
        message = f"Timeout (>{settings.timeout:g}s) from pytest-timeout"
        waiting = (
            _blockon_wait(test_greenlet) if greenlet.getcurrent() is not test_greenlet else None
        )
        if waiting is None:  # pytest's own greenlet: a fixture, or pytest
            pytest.fail(message)
        if frame is not None and frame.f_code is polling:
            _end_the_wait(*waiting, f"{message}: a Deferred the test waits on never fired")
            return  # back here when the reactor runs again: it polls on
        # Test code (or a reactor callback) runs too long: unwind it.  Should that not
        # end the test (a callback's error is only logged), its wait ends next turn.
        reactor.callFromThread(_end_the_wait, *waiting, message)  # type: ignore[attr-defined]
        pytest.fail(message)

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # for pytest-timeout's cancel hook
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True


def _blockon_wait(test_greenlet: Any) -> tuple[Any, list[Any]] | None:
    """The Deferred and the result list of pytest-twisted's ``blockon_default``
    that ``test_greenlet`` waits in, if it does."""
    frame = test_greenlet.gr_frame  # where it switched to the reactor's greenlet
    while frame is not None and frame.f_code.co_name != "blockon_default":
        frame = frame.f_back
    if frame is None or not {"d", "result"} <= frame.f_locals.keys():
        return None
    return frame.f_locals["d"], frame.f_locals["result"]


def _end_the_wait(waited: Any, result: list[Any], message: str) -> None:
    """Fail the test waiting on ``waited`` with ``message`` (unless it ended)."""
    from twisted.python.failure import Failure

    if waited.called:
        return
    result.append(Failure(pytest.fail.Exception(message, pytrace=False)))
    # Cancelled, the Deferred fires blockon's callback, which switches to the test
    # with ``result``, the failure above first.  A later result is ignored.
    waited.cancel()
