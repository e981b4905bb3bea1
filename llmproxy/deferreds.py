"""Waiting on a Deferred for a bounded time without touching it (tests:
tests/unit/test_deferreds.py).

``Deferred.addTimeout`` cancels what it waits on; a drain must not: a flush or
a read that outlives its slice of the deadline goes on while the process moves
to the next stage. The stop stages (runtime/lifecycle.py), the workers' master
and the dispatcher's drain all wait this way.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

__all__ = ["within"]


def within(d: Deferred[Any], seconds: float, clock: IReactorTime) -> Deferred[bool]:
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
