"""The drain as a declared list of stop stages, run in order within one deadline
(tests: tests/unit/test_lifecycle.py, tests/integration/test_daemon.py).

A root service (``runtime.service.ProxyService``) declares its ``StopStage``s;
``run_stages`` runs them one after the other, giving each what is left of the
deadline, logs when each is done, and never waits past the deadline: a stage
that has not finished by then is left behind (its Deferred is not cancelled;
whatever it was doing goes on while the process exits) and named in a warning.
Components are ``Lifecycle``s (llmproxy.interfaces): a stage is usually one
component's ``stop`` or several of them at once.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

__all__ = ["StopStage", "run_stages", "within"]


@attrs.frozen
class StopStage:
    """One step of the drain: ``run(seconds_left)``, by then at the latest."""

    name: str
    run: Callable[[float], Deferred[Any] | Coroutine[Any, Any, None] | None]


def within(d: Deferred[object], seconds: float, clock: IReactorTime) -> Deferred[bool]:
    """Fires with True when ``d`` fires within ``seconds``, else with False at
    ``seconds`` (``d`` itself is left alone: not cancelled, its result untouched)."""
    waiter: Deferred[bool] = Deferred()

    def fired(result: object) -> object:
        if not waiter.called:
            waiter.callback(True)
        return result

    def late() -> None:
        if not waiter.called:
            waiter.callback(False)

    timer = clock.callLater(max(0.0, seconds), late)  # type: ignore[misc, arg-type]
    d.addBoth(fired)

    def stop_timer(result: bool) -> bool:
        if timer.active():  # type: ignore[misc]
            timer.cancel()  # type: ignore[misc]
        return result

    return waiter.addCallback(stop_timer)


def _stage_failed(failure: Failure, name: str) -> None:
    log.failure("drain: {stage} failed", failure, stage=name)


async def run_stages(stages: Sequence[StopStage], timeout: float, clock: IReactorTime) -> None:
    """Run ``stages`` in order; fires by ``timeout`` seconds from now."""
    start: float = clock.seconds()  # type: ignore[misc]
    deadline = start + timeout
    for stage in stages:
        now: float = clock.seconds()  # type: ignore[misc]
        left = max(0.0, deadline - now)
        d: Deferred[object] = maybeDeferred(stage.run, left)
        d.addErrback(_stage_failed, stage.name)
        if not await within(d, left, clock):
            log.warn("drain: {stage} did not finish by the deadline", stage=stage.name)
        done: float = clock.seconds()  # type: ignore[misc]
        log.info("drain: {stage} done at {t:.3f}s", stage=stage.name, t=done - start)
