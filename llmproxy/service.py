"""The root service: ordered start, ordered drain within the deadline
(tests: tests/integration/test_daemon.py).

Start: bind the proxy and admin listeners (a bind error fails start-up), start
the exporters, tell systemd READY=1.  Stop (SIGTERM): /ready turns 503 and
systemd hears STOPPING=1, the proxy listener closes, in-flight exchanges may
finish until the request deadline, the rest are aborted, then the exporters
flush (spooling what they cannot deliver) with the time left, then the upstream
pool closes.  The whole stop fires by ``drain_timeout``.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from llmproxy.access.audit import AuditLog
from llmproxy.admin.resource import AdminResource
from llmproxy.capture.machine import machine_id
from llmproxy.capture.record import ExchangeRecord
from llmproxy.metrics import MetricsCollector, ProxyMetrics, make_registry
from llmproxy.proxy.forward import ProxyResource
from llmproxy.proxy.headers import install_connection_token_filter
from llmproxy.proxy.router import Router
from llmproxy.proxy.site import ProxySite
from llmproxy.proxy.upstream import make_agent
from llmproxy.settings import CaptureSettings, Settings

log = Logger()


def sd_notify(state: str) -> None:
    """Tell systemd (or a test) about our state; a no-op without NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warn("sd_notify failed: {err}", err=str(e))


class BusEvents:
    """The proxy's view of the event bus: records in, envelopes out."""

    def __init__(self, bus: Any, capture: CaptureSettings, enabled: bool) -> None:
        from llmproxy.capture.events import RecordEnvelope

        self._bus = bus
        self._capture = capture
        self._envelope = RecordEnvelope
        self.enabled = enabled

    def request_started(self, record: ExchangeRecord) -> None:
        self._bus.publish(self._envelope("request", record, self._capture))

    def request_finished(self, record: ExchangeRecord) -> None:
        self._bus.publish(self._envelope("response", record, self._capture))


class ProxyService(Service):
    name = "llmproxy"

    def __init__(self, settings: Settings, reactor: Any) -> None:
        from llmproxy.bus.memory import MemoryBus

        install_connection_token_filter()
        self.settings = settings
        self.reactor = reactor
        self.metrics = ProxyMetrics()
        self.ready = False
        self.draining = False
        server = settings.server
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = server.pool_size
        self.pool.cachedConnectionTimeout = server.pool_idle_timeout  # type: ignore[assignment]
        self.pool._factory.noisy = False  # type: ignore[attr-defined]
        self.agent = make_agent(reactor, self.pool, server.connect_timeout)
        self.audit = AuditLog(settings.audit_path)
        self.bus = MemoryBus()
        self.exporters: list[Any] = []
        self._export_pool = HTTPConnectionPool(reactor, persistent=True)
        self._export_pool._factory.noisy = False  # type: ignore[attr-defined]
        self.proxy = ProxyResource(
            router=Router(settings.routes, settings.passthrough),
            agent=self.agent,
            clock=reactor,
            server=server,
            capture=settings.capture,
            events=BusEvents(self.bus, settings.capture, enabled=bool(settings.exporters)),
            metrics=self.metrics,
            auditor=self.audit,
            machine=machine_id(),
        )
        self.site = ProxySite(
            self.proxy,
            max_body_bytes=server.max_body_bytes,
            max_connections=server.max_connections,
            idle_timeout=server.idle_timeout,
            access_log=server.access_log,
        )
        collector = MetricsCollector(self.metrics.families, self._exporter_families)
        self.registry = make_registry(collector)
        admin = AdminResource(
            is_ready=lambda: self.ready,
            stats=self.stats,
            registry=self.registry,
            token=server.admin_token,
        )
        self.admin_site = Site(admin)
        self.admin_site.noisy = False
        self.admin_site.log = lambda request: None  # type: ignore[method-assign]
        self.port: IListeningPort | None = None
        self.admin_port: IListeningPort | None = None
        self._stopping: defer.Deferred[None] | None = None

    # -- start --------------------------------------------------------------

    def privilegedStartService(self) -> None:
        server = self.settings.server
        self.port = self._listen(server.listen, self.site)
        if server.admin_listen not in ("", "off", "none"):
            self.admin_port = self._listen(server.admin_listen, self.admin_site)
        super().privilegedStartService()

    def _listen(self, description: str, factory: Any) -> IListeningPort:
        endpoint = endpoints.serverFromString(self.reactor, description)
        result: list[Any] = []
        endpoint.listen(factory).addBoth(result.append)
        if not result:
            raise RuntimeError(f"listening on {description} did not complete at start")
        if isinstance(result[0], Failure):
            raise RuntimeError(f"cannot listen on {description}: {result[0].value}")
        port: IListeningPort = result[0]
        log.info(
            "listening on {desc} (port {port})",
            desc=description,
            port=getattr(port.getHost(), "port", "-"),
        )
        return port

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self.privilegedStartService()
        self._start_exporters()
        self.ready = True
        sd_notify("READY=1")

    def _start_exporters(self) -> None:
        if not self.settings.exporters:
            return
        from treq.client import HTTPClient

        from llmproxy.export.registry import build_exporter

        http_client = HTTPClient(Agent(self.reactor, pool=self._export_pool))
        for es in self.settings.exporters:
            exporter = build_exporter(
                es,
                clock=self.reactor,
                http_client=cast(Any, http_client),
                state_dir=self.settings.server.state_dir,
                random=random.random,
            )
            self.exporters.append(exporter)
            self.bus.subscribe(exporter)
            exporter.start()

    # -- stats --------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "draining": self.draining,
            "proxy": self.metrics.snapshot(),
            "exporters": {e.name: e.stats() for e in self.exporters},
            "audit": {"lines": self.audit.lines, "errors": self.audit.errors},
        }

    def _exporter_families(self) -> Iterator[Any]:
        from llmproxy.export.metrics import exporter_families

        yield from exporter_families({e.name: e.stats() for e in self.exporters})

    # -- stop ---------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        if self._stopping is None:
            self._stopping = defer.ensureDeferred(self._drain())
            super().stopService()
        return self._stopping

    async def _drain(self) -> None:
        clock = self.reactor
        total = self.settings.server.drain_timeout
        start = clock.seconds()
        # Keep a slice of the deadline for the exporters' final flush.
        reserve = min(5.0, total * 0.25)
        self.ready = False
        self.draining = True
        sd_notify("STOPPING=1")
        log.info(
            "draining: {n} exchanges in flight, deadline {t:g}s", n=len(self.proxy.open), t=total
        )
        if self.port is not None:
            await defer.maybeDeferred(self.port.stopListening)
        await self._wait_for_exchanges(total - reserve)
        for exchange in list(self.proxy.open):
            if exchange.record is not None:
                exchange.record.error = "aborted at the drain deadline"
            exchange.abort()
        left = max(0.1, total - (clock.seconds() - start))
        closes = [e.close(left) for e in self.exporters]
        if closes:
            await defer.DeferredList(closes, consumeErrors=True)
        for pool in (self.pool, self._export_pool):
            d = pool.closeCachedConnections()
            d.addTimeout(max(0.1, total - (clock.seconds() - start)), clock)
            try:
                await d
            except defer.TimeoutError:
                log.warn("upstream connections did not close in time")
        if self.admin_port is not None:
            await defer.maybeDeferred(self.admin_port.stopListening)
        self.audit.close()
        log.info("drained in {t:.3f}s", t=clock.seconds() - start)

    async def _wait_for_exchanges(self, budget: float) -> None:
        if not self.proxy.open or budget <= 0:
            return
        clock = self.reactor
        deadline = clock.seconds() + budget
        done: defer.Deferred[None] = defer.Deferred()

        def check() -> None:
            finished = not self.proxy.open or clock.seconds() >= deadline
            if finished and not done.called:
                done.callback(None)

        poll = LoopingCall(check)
        poll.clock = clock
        poll.start(0.05, now=False)
        try:
            await done
        finally:
            poll.stop()
