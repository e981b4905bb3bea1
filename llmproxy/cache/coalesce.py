"""Concurrent identical misses share one upstream call (tests: tests/unit/cache/test_coalesce.py).

The first miss for a key leads: :meth:`InFlight.join` returns None and the
caller goes upstream.  Later misses for the same key follow: they get a
Deferred that fires with the leader's outcome.  :meth:`InFlight.complete`
with a value answers every follower with it; with None (the leader failed, or
its response cannot be stored) it releases them to go upstream themselves.  A
follower waits at most ``lock_timeout`` on the clock, then goes on its own, so
a leader streaming for minutes never holds others hostage.

After a successful completion the slot stays until :meth:`InFlight.settle`
(the store has the entry): a request whose store lookup raced the write is
answered from the slot instead of becoming a second leader.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["InFlight", "T"]

T = TypeVar("T")


class _Slot(Generic[T]):
    __slots__ = ("done", "result", "waiters")

    def __init__(self) -> None:
        self.waiters: list[tuple[defer.Deferred[T | None], IDelayedCall]] = []
        self.result: T | None = None
        self.done = False


class InFlight(Generic[T]):
    def __init__(self, *, clock: IReactorTime, lock_timeout: float) -> None:
        self._clock = clock
        self._lock_timeout = lock_timeout
        self._slots: dict[str, _Slot[T]] = {}
        self.followers = 0  # followers that got a value without going upstream
        self.released = 0  # followers sent upstream (leader failed or timed out)

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def waiting(self) -> int:
        """Followers waiting for a leader right now."""
        return sum(len(slot.waiters) for slot in self._slots.values())

    def join(self, key: str) -> defer.Deferred[T | None] | None:
        """None: lead (go upstream, then :meth:`complete`).  Else: wait for the leader."""
        slot = self._slots.get(key)
        if slot is None:
            self._slots[key] = _Slot()
            return None
        if slot.done:
            self.followers += 1
            return defer.succeed(slot.result)
        return self._wait(key, slot)

    def _wait(self, key: str, slot: _Slot[T]) -> defer.Deferred[T | None]:
        def cancel(d: defer.Deferred[T | None]) -> None:
            for i, (waiter, timer) in enumerate(slot.waiters):
                if waiter is d:
                    del slot.waiters[i]
                    if timer.active():
                        timer.cancel()
                    return

        d: defer.Deferred[T | None] = defer.Deferred(cancel)

        def timed_out() -> None:
            for i, (waiter, _) in enumerate(slot.waiters):
                if waiter is d:
                    del slot.waiters[i]
                    break
            self.released += 1
            d.callback(None)

        timer = self._clock.callLater(self._lock_timeout, timed_out)
        slot.waiters.append((d, timer))
        return d

    def complete(self, key: str, value: T | None) -> None:
        """The leader's outcome: a value for every follower, or None to release them."""
        slot = self._slots.get(key)
        if slot is None or slot.done:
            return
        waiters, slot.waiters = slot.waiters, []
        if value is None:
            del self._slots[key]
        else:
            slot.done = True
            slot.result = value
        for d, timer in waiters:
            if timer.active():
                timer.cancel()
            if value is None:
                self.released += 1
            else:
                self.followers += 1
            d.callback(value)

    def settle(self, key: str) -> None:
        """Forget a completed slot (its value is in the store now)."""
        slot = self._slots.get(key)
        if slot is not None and slot.done:
            del self._slots[key]
