"""The root service: ordered start, ordered drain within the deadline
(tests: tests/integration/test_daemon.py, tests/unit/runtime/test_service.py).

Start: bind the proxy and admin listeners (a bind error fails start-up), start
the exporters, tell systemd READY=1.  Stop (SIGTERM): /ready turns 503 and
systemd hears STOPPING=1, the proxy listener closes, in-flight exchanges may
finish until the request deadline, the rest are aborted, then the exporters
flush (spooling what they cannot deliver) with the time left, then the upstream
pool closes.  The whole stop fires by ``drain_timeout``.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent

from llmproxy.access.audit import AuditLog
from llmproxy.access.policy import build_access
from llmproxy.admin.resource import AdminResource
from llmproxy.admin.site import AdminSite
from llmproxy.cache import build_cache
from llmproxy.capture.pump import CapturePump
from llmproxy.capture.sessions import SessionTracker
from llmproxy.config.model import ExporterSettings, Settings
from llmproxy.events.machine import machine_id
from llmproxy.export.bus import MemoryBus
from llmproxy.export.http import quiet_pool
from llmproxy.http.router import Router
from llmproxy.pricing import build_pricer
from llmproxy.proxy.client import UpstreamPool
from llmproxy.proxy.forward import ProxyResource
from llmproxy.proxy.metrics import MetricsCollector, ProxyMetrics, make_registry
from llmproxy.proxy.site import ProxySite
from llmproxy.runtime.lifecycle import RootService, StopStage
from llmproxy.runtime.system import install_sighup, listen_now, sd_notify
from llmproxy.state import build_shared_state
from llmproxy.state.health import StateHealth

if TYPE_CHECKING:
    from llmproxy.capture.record import ExchangeRecord
    from llmproxy.export.exporter import BatchingExporter
    from llmproxy.interfaces import HTTPClient, Lifecycle
    from llmproxy.redis.stream import RedisBus

__all__ = ["ProxyService", "counted", "ready_summary", "refuse_reload"]

log = Logger()


def _events_wanted(settings: Settings) -> bool:
    """Capture and events cost CPU on the request path: only when someone reads
    them -- exporters, the Redis bus, or the spend of proxy tokens (budgets and
    spend need each answer's usage)."""
    return (
        bool(settings.exporters)
        or settings.events.bus == "redis"
        or any(r.auth == "token" for r in settings.routes)
    )


def counted(n: int, noun: str) -> str:
    """``1 route``, ``2 routes``, ``0 routes``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def ready_summary(settings: Settings, exporters: int) -> str:
    """What the start-up line says is serving: routes and exporters, counted and named."""
    routes = counted(len(settings.routes), "route")
    if settings.routes:
        routes += " (" + ", ".join(r.name for r in settings.routes) + ")"
    return f"{routes}, {counted(exporters, 'exporter')}"


def refuse_reload(audit: AuditLog, source: str, problems: Sequence[str]) -> None:
    """A config that failed validation on reload: logged, audited, not applied."""
    for problem in problems:
        log.warn("reload refused, keeping the running config: {problem}", problem=problem)
    audit.write("config_reload", source=source, outcome="refused", problems=list(problems))


def _reopen_failed(failure: Failure, name: str) -> None:
    log.warn(
        "exporter {name}: reopening its files failed: {why}",
        name=name,
        why=failure.getErrorMessage(),
    )


class _Holding:
    """Stands in for an exporter while it is being replaced on reload."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    def publish(self, envelope: Any) -> None:
        self.envelopes.append(envelope)


class ProxyService(RootService):
    name = "llmproxy"

    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        config_path: str | None = None,
        *,
        tokens_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.reactor = reactor
        self.metrics = ProxyMetrics(max_projects=settings.server.metrics_projects)
        self.ready = False
        self.draining = False
        server = settings.server
        self.upstream = UpstreamPool(
            reactor,
            server.connect_timeout,
            max_idle=server.pool_size,
            idle_timeout=server.pool_idle_timeout,
        )
        self.audit = AuditLog(settings.audit_path)
        # [state] store = redis: quotas, rate limits, tokens and sessions shared
        # by every process and host; what happens while Redis does not answer.
        self.state_health = StateHealth(reactor, settings.state.on_unavailable)
        self.shared = build_shared_state(settings, reactor, self.state_health)
        self.access = build_access(
            settings, self.audit, reactor, tokens_dir=tokens_dir, shared=self.shared
        )
        self.bus: MemoryBus | RedisBus
        if settings.events.bus == "redis":
            from llmproxy.redis.stream import build_redis_bus

            self.bus = build_redis_bus(settings, reactor, self._in_thread)
        else:
            self.bus = MemoryBus()
        self.sessions = self._build_sessions(settings)
        # Records from the proxy become events once the reactor has sent what the
        # request path wrote (capture/pump.py).
        self.capture = CapturePump(
            self.bus,
            settings.capture,
            reactor,
            enabled=_events_wanted(settings),
            sessions=self.sessions,
            usage=self.metrics.usage,
            pricer=build_pricer(settings),
            spent=(self.metrics.spent, self._charge),
        )
        # The response cache, when [cache] enabled or a route says cache = on.
        self.cache = build_cache(settings, reactor, health=self.state_health)
        self.exporters: list[BatchingExporter] = []
        self._export_pool = quiet_pool(reactor, persistent=True)
        self._http_client: HTTPClient | None = None
        self.proxy = ProxyResource(
            router=Router(settings.routes, settings.passthrough),
            upstream=self.upstream,
            clock=reactor,
            server=server,
            capture=settings.capture,
            events=self.capture,
            metrics=self.metrics,
            auditor=self.audit,
            machine=machine_id(),
            access=self.access,
            cache=self.cache,
        )
        self.site = ProxySite(
            self.proxy, clock=reactor, server_settings=server, access_log=server.access_log
        )
        collector = MetricsCollector(self.metrics.families, self._exporter_families)
        if self.cache is not None:
            collector.add(self.cache.families)
        collector.add(self._bus_families)
        collector.add(self.state_health.families)
        self.registry = make_registry(collector)
        admin = AdminResource(
            is_ready=lambda: self.ready,
            stats=self.stats,
            registry=self.registry,
            token=server.admin_token,
            probes_public=server.probes_public,
            audit=self.audit,
            cache=self.cache,
        )
        self.admin_site = AdminSite(
            admin,
            clock=reactor,
            header_timeout=server.header_timeout,
            on_limit=lambda limit: self.metrics.limit_hit("admin." + limit),
        )
        self.port: IListeningPort | None = None
        self.admin_port: IListeningPort | None = None
        self._reloading: defer.Deferred[bool] | None = None

    def _charge(self, record: ExchangeRecord, event: Mapping[str, Any]) -> None:
        """An answer's spend, charged to its token by the access policy in use now."""
        self.access.charge(record, event)

    def _in_thread(self, work: Callable[[], Any]) -> defer.Deferred[Any]:
        """Blocking work (disk writes) off the reactor thread, in its thread pool."""
        reactor = self.reactor
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), work)

    def _build_sessions(self, settings: Settings) -> SessionTracker | None:
        cfg = settings.sessions
        if not cfg.enabled:
            return None
        state = cfg.state_file
        if state is not None and not state.is_absolute():
            state = settings.server.state_dir / state
        return SessionTracker(
            self.bus.publish,
            state,
            cfg.max_states,
            self.reactor,
            flush_interval=cfg.flush_interval,
            run_in_thread=self._in_thread,
            shared=self.shared.sessions if self.shared is not None else None,
            health=self.state_health,
            continuation_wait=settings.state.continuation_wait,
            max_body_bytes=cfg.max_body_bytes,
        )

    # -- start --------------------------------------------------------------

    def open_listeners(self) -> None:
        server = self.settings.server
        self.port = listen_now(self.reactor, server.listen, self.site, "server.listen")
        if server.admin_listen not in ("", "off", "none"):
            self.admin_port = listen_now(
                self.reactor, server.admin_listen, self.admin_site, "server.admin_listen"
            )

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self.privilegedStartService()
        for component in self._components():
            component.start()
        self._start_exporters()
        # A config reload re-reads the token file too (TokenAccess.set_routes).
        self._previous_sighup = install_sighup(self.reactor, self.reload)
        # Everything start-up built (modules, classes, settings, routes) lives as long
        # as the process: out of the cyclic collector's way, every full collection
        # scans what the requests left alive instead of the whole program again.
        gc.collect()
        gc.freeze()
        self.ready = True
        sd_notify("READY=1")
        log.info("llmproxy ready: {what}", what=ready_summary(self.settings, len(self.exporters)))

    def _components(self) -> list[Lifecycle]:
        """What runs for the service's life, in start order (the drain stops them
        in the order of ``stop_stages``)."""
        components: list[Lifecycle] = []
        if self.shared is not None:
            components.append(self.shared)  # Redis: connects in the background
        components += [self.access, self.upstream, self.capture]
        if self.cache is not None:
            components.append(self.cache)  # Redis: connects in the background
        components.append(self.bus)  # Redis: connects, replays its spool when Redis answers
        if self.sessions is not None:
            components.append(self.sessions)
        return components

    def _start_exporters(self) -> None:
        if not self.settings.exporters:
            return
        if self.settings.events.bus == "redis":
            # The [exporter:NAME] sections are for `llmproxy dispatcher --exporter NAME`;
            # running them here too would deliver every event twice.
            log.info("events.bus = redis: exporters run in `llmproxy dispatcher`")
            return

        for es in self.settings.exporters:
            exporter = self._build_exporter(es)
            self.exporters.append(exporter)
            self.bus.subscribe(exporter)
            exporter.start()

    def _build_exporter(self, es: ExporterSettings) -> BatchingExporter:
        from llmproxy.export.http import sink_http_client
        from llmproxy.export.registry import build_exporter

        if self._http_client is None:
            self._http_client = sink_http_client(Agent(self.reactor, pool=self._export_pool))
        return build_exporter(
            es,
            clock=self.reactor,
            http_client=self._http_client,
            state_dir=self.settings.server.state_dir,
            random=random.random,
            run_blocking=self._in_thread,
        )

    # -- reload (SIGHUP) ----------------------------------------------------

    def reload(self) -> defer.Deferred[bool]:
        """Re-read the config file and apply what can change without a restart:
        routes, the passthrough allowlist, capture caps, timeouts and limits, and
        exporters (a changed exporter is closed — spooling what it holds — and
        rebuilt).  A bad file is refused, logged and audited; the old config stays.
        Either way the file-writing sinks reopen their files (logrotate's
        ``postrotate kill -HUP``).  Fires with whether the new config was applied."""
        if self.draining:
            return defer.succeed(False)
        # Every SIGHUP, whatever becomes of the config: logrotate's postrotate.
        self.reopen_files()
        if self._reloading is not None:
            return self._reloading
        d = self._reloading = defer.ensureDeferred(self._reload())

        def done(result: bool) -> bool:
            self._reloading = None
            return result

        return d.addBoth(done)

    def reopen_files(self) -> None:
        """Have every running exporter's sink reopen the files it keeps open (the
        file and sessions sinks; the others have none), once the batches they
        are writing are done."""
        for exporter in self.exporters:
            exporter.reopen().addErrback(_reopen_failed, exporter.name)

    def load_settings(self) -> Settings:
        """The settings a reload applies (a worker process maps its own paths:
        llmproxy/runtime/worker.py).  Raises ConfigError."""
        from llmproxy.runtime.checks import load_checked

        return load_checked(self.config_path)

    async def _reload(self) -> bool:
        from llmproxy.config.loader import ConfigError

        source = self.config_path or "<embedded default>"
        try:
            new = self.load_settings()
        except ConfigError as e:
            refuse_reload(self.audit, source, e.problems)
            return False
        old = self.settings
        fixed = [
            key
            for key in ("listen", "admin_listen", "workers", "state_dir", "pool_size")
            if getattr(old.server, key) != getattr(new.server, key)
        ]
        for section in ("events", "redis", "cache", "sessions", "state"):
            if getattr(old, section) != getattr(new, section):
                log.warn(
                    "[{section}] changed: it takes effect at the next restart", section=section
                )
                new = attrs.evolve(new, **{section: getattr(old, section)})
        for key in fixed:
            log.warn("server.{key} changed: it takes effect at the next restart", key=key)
        new_server = attrs.evolve(new.server, **{key: getattr(old.server, key) for key in fixed})
        new = attrs.evolve(new, server=new_server)
        self.settings = new
        proxy = self.proxy
        proxy.router = Router(new.routes, new.passthrough)
        self.access.set_routes(new.routes)
        proxy.capture = new.capture
        proxy.limits = new.server
        self.site.apply(new.server)
        self.upstream.set_connect_timeout(new.server.connect_timeout)
        self.capture.capture = new.capture
        self.capture.pricer = build_pricer(new)
        self.capture.enabled = _events_wanted(new)
        changed: list[str] = []
        if new.events.bus == "memory":
            changed = await self._reload_exporters(old.exporters, new.exporters)
        self.audit.write(
            "config_reload",
            source=source,
            outcome="applied",
            routes=[r.name for r in new.routes],
            exporters_changed=changed,
            restart_needed=fixed,
        )
        log.info("config reloaded from {source}", source=source)
        return True

    async def _reload_exporters(
        self, old: tuple[ExporterSettings, ...], new: tuple[ExporterSettings, ...]
    ) -> list[str]:
        before = {e.name: e for e in old}
        after = {e.name: e for e in new}
        running = {e.name: e for e in self.exporters}
        changed = sorted(
            name for name in before.keys() | after.keys() if before.get(name) != after.get(name)
        )
        if not changed:
            return []
        # Events published while an exporter is swapped wait here, then go to the new one.
        holding: dict[str, _Holding] = {}
        closing = []
        for name in changed:
            current = running.get(name)
            if current is not None:
                self.bus.unsubscribe(current)
                self.exporters.remove(current)
                closing.append(current.stop(min(10.0, self.settings.server.drain_timeout)))
            if name in after:
                holding[name] = _Holding()
                self.bus.subscribe(holding[name])
        if closing:
            await defer.DeferredList(closing, consumeErrors=True)
        for name, held in holding.items():
            exporter = self._build_exporter(after[name])
            exporter.start()
            self.bus.unsubscribe(held)
            for envelope in held.envelopes:
                exporter.publish(envelope)
            self.exporters.append(exporter)
            self.bus.subscribe(exporter)
        return changed

    # -- stats --------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "draining": self.draining,
            "proxy": self.metrics.snapshot(),
            "exporters": {e.name: e.stats() for e in self.exporters},
            "access": self.access.stats(),
            "sessions": self.sessions.stats() if self.sessions is not None else None,
            "capture": {
                "queued": self.capture.pending(),
                "handled": self.capture.flushed,
                "turns_yielded": self.capture.yielded,
                "errors": self.capture.errors,
            },
            "cache": self.cache.stats() if self.cache is not None else None,
            "state": {
                "store": self.settings.state.store,
                **self.state_health.stats(),
            },
            "bus": self.bus.stats(),
            "audit": {"lines": self.audit.lines, "errors": self.audit.errors},
        }

    def _bus_families(self) -> Iterator[Any]:
        from llmproxy.export.metrics import bus_families

        yield from bus_families(self.bus.stats())

    def _exporter_families(self) -> Iterator[Any]:
        from llmproxy.export.metrics import exporter_families

        yield from exporter_families({e.name: e.stats() for e in self.exporters})

    # -- stop ---------------------------------------------------------------

    def stop_stages(self) -> list[StopStage]:
        """The drain, in order; each stage gets what is left of ``drain_timeout``."""
        stages = [
            StopStage("listener closed", self._stop_listening),
            StopStage("exchanges finished or aborted", self._finish_exchanges),
            StopStage("token usage written", self.access.stop),
            # What the last exchanges queued: through the tracker and onto the bus.
            StopStage("records handed to the bus", self.capture.stop),
            # Their spend, charged to their tokens as they were handed over.
            StopStage("token spend written", self.access.write_spend),
        ]
        if self.sessions is not None:
            # After the last exchange: its state is journaled; before the
            # exporters stop: its session_start/fork entries are exported.
            stages.append(StopStage("session state journaled", self.sessions.stop))
        stages.append(StopStage("events delivered or spooled", self._stop_delivery))
        if self.cache is not None:
            stages.append(StopStage("response cache closed", self.cache.stop))
        if self.shared is not None:
            # Last of its users: access counts, the tracker's operations.
            stages.append(StopStage("shared state closed", self.shared.stop))
        stages += [
            StopStage("connection pools closed", self._stop_pools),
            StopStage("admin listener closed", self._stop_admin),
        ]
        return stages

    async def before_drain(self) -> None:
        if self._reloading is not None:
            await self._reloading
        log.info("draining: {n} exchanges in flight", n=len(self.proxy.open))

    def _stop_listening(self, left: float) -> defer.Deferred[None] | None:
        return _stop_port(self.port)

    async def _finish_exchanges(self, left: float) -> None:
        """In-flight exchanges may finish until a slice of the deadline is left for
        the exporters' final flush; the rest are aborted and recorded as such."""
        reserve = min(5.0, self.settings.server.drain_timeout * 0.25)
        await self._wait_for_exchanges(left - reserve)
        aborted = list(self.proxy.open)
        for exchange in aborted:
            if exchange.record is not None:
                exchange.record.error = "aborted at the drain deadline"
            exchange.abort()
        # Aborted connections report their loss a reactor turn later; only then do
        # those exchanges end and queue their events, which must reach the
        # exporters before they stop (else each would be spooled on its own).
        turns = 0
        while self.proxy.open and turns < 100:
            await task.deferLater(self.reactor, 0, lambda: None)
            turns += 1
        if aborted:
            log.info("drain: {n} exchanges aborted at the deadline", n=len(aborted))

    def _stop_delivery(self, left: float) -> defer.Deferred[Any]:
        stops = [e.stop(left) for e in self.exporters]
        stops.append(self.bus.stop(left))
        return defer.DeferredList(stops, consumeErrors=True)

    def _stop_pools(self, left: float) -> defer.Deferred[Any]:
        return defer.DeferredList(
            [self.upstream.stop(left), self._export_pool.closeCachedConnections()],
            consumeErrors=True,
        )

    def _stop_admin(self, left: float) -> defer.Deferred[None] | None:
        return _stop_port(self.admin_port)

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


def _stop_port(port: IListeningPort | None) -> defer.Deferred[None] | None:
    """Stop listening on ``port`` if it is open (a stop stage)."""
    if port is None:
        return None
    stopped: defer.Deferred[None] | None = port.stopListening()
    return stopped
