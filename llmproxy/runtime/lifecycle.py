"""The drain as a declared list of stop stages, run in order within one deadline
(tests: tests/unit/runtime/test_lifecycle.py, tests/integration/test_daemon.py).

A process's root service (``RootService``: the proxy, ``runtime.service.ProxyService``,
or the workers' master, ``runtime.supervisor.Supervisor``) declares its ``StopStage``s;
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
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.access.audit import AuditLog
from llmproxy.config.model import Settings
from llmproxy.deferreds import within
from llmproxy.runtime.exits import ListenError, exit_cannot_listen
from llmproxy.runtime.system import restore_sighup, sd_notify

log = Logger()

__all__ = ["RootService", "StopStage", "run_stages"]


@attrs.frozen
class StopStage:
    """One step of the drain: ``run(seconds_left)``, by then at the latest."""

    name: str
    run: Callable[[float], Deferred[Any] | Coroutine[Any, Any, None] | None]


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


class RootService(Service):
    """The root of a process: ready or draining, and on SIGTERM a drain through
    ``stop_stages()`` within ``drain_timeout`` (plus ``extra_drain_time``), with
    systemd told ``STOPPING=1`` and the audit log closed last.  Subclasses set
    ``settings``, ``reactor``, ``audit`` and ``_previous_sighup`` (what
    ``install_sighup`` replaced) and declare their stages."""

    settings: Settings
    reactor: Any
    audit: AuditLog
    ready: bool = False
    draining: bool = False
    extra_drain_time: float = 0.0  # past drain_timeout, for what the stages do after it
    _stopping: Deferred[None] | None = None
    _previous_sighup: Any = None

    def stop_stages(self) -> list[StopStage]:
        raise NotImplementedError

    def open_listeners(self) -> None:
        """Bind what the process serves, before privileges are dropped; raises
        :class:`~llmproxy.runtime.exits.ListenError`."""

    def privilegedStartService(self) -> None:
        try:
            self.open_listeners()
        except ListenError as e:
            # One line and EX_CANNOT_LISTEN, which the units do not restart on
            # (was: a 25-line traceback, exit 1, restarted every 2 s).
            exit_cannot_listen(e)
        super().privilegedStartService()

    async def before_drain(self) -> None:
        """What must end before the stages run (a reload in progress)."""

    def stopService(self) -> Deferred[None]:
        if self._stopping is None:
            self._stopping = ensureDeferred(self._drain())
            super().stopService()
        return self._stopping

    async def _drain(self) -> None:
        clock = self.reactor
        total = self.settings.server.drain_timeout + self.extra_drain_time
        start: float = clock.seconds()
        self.ready = False
        self.draining = True
        restore_sighup(self._previous_sighup)
        self._previous_sighup = None
        await self.before_drain()
        sd_notify("STOPPING=1")
        log.info("draining: deadline {t:g}s", t=total)
        await run_stages(self.stop_stages(), total - (clock.seconds() - start), clock)
        self.audit.close()
        log.info("drained in {t:.3f}s", t=clock.seconds() - start)
