"""``[server] workers = N``: the master process that runs N worker processes on
one listening port (tests: tests/integration/test_workers.py,
tests/unit/runtime/test_aggregate.py; the worker side is llmproxy/runtime/worker.py;
docs/workers.md).

The master (the twistd process) binds the proxy's ``listen`` endpoint and never
accepts on it: a TCP address becomes N ``SO_REUSEPORT`` sockets, one per worker
(the kernel spreads new connections over them); any other endpoint (unix:,
systemd: socket activation, ...) is bound once and the one socket is shared by
every worker.  Each worker is ``python -m llmproxy.runtime.worker``: it adopts its socket
(fd 3) with ``adoptStreamPort`` and runs a whole ProxyService of its own --
exporters, spools, session tracker -- under ``<state_dir>/worker-I/``, with its
admin on ``<state_dir>/run/worker-I.sock``.  Its stdin is a pipe from the master:
if the master dies, the worker drains and exits.

The master serves ``admin_listen``: /health, /ready, and /stats and /metrics
summed over the workers (each asked over its unix socket; one that does not
answer within a second is reported down).  It restarts a worker that exits
(backoff 0.5 s doubling to 30 s, reset once a worker has run a minute) and logs
it; SIGHUP validates the config and forwards the signal; SIGTERM drains every
worker within ``drain_timeout``, SIGKILLs stragglers, then exits.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import attrs
import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet import abstract, defer, endpoints
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.protocol import ProcessProtocol as _ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from llmproxy.access.audit import AuditLog
from llmproxy.admin.resource import AdminResource
from llmproxy.admin.site import AdminSite
from llmproxy.config.model import Settings
from llmproxy.deferreds import within
from llmproxy.export.http import quiet_pool
from llmproxy.proxy.metrics import MetricsCollector, make_registry
from llmproxy.runtime.aggregate import monotonic_families, parse_families, sum_families, sum_stats
from llmproxy.runtime.exits import ListenError
from llmproxy.runtime.lifecycle import RootService, StopStage
from llmproxy.runtime.service import refuse_reload
from llmproxy.runtime.system import (
    CONTROL_FD,
    FAMILIES,
    LISTEN_FD,
    admin_socket_path,
    install_sighup,
    listen_now,
    sd_notify,
    snapshot_path,
)

__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_MIN",
    "BACKOFF_RESET_AFTER",
    "FETCH_TIMEOUT",
    "KILL_WAIT",
    "STOP_GRACE",
    "Supervisor",
    "SupervisorAdmin",
    "WorkerHandle",
]

log = Logger()

FETCH_TIMEOUT = 1.0  # a worker that does not answer /stats or /metrics by then is "down"
STOP_GRACE = 1.0  # past drain_timeout, before stragglers are killed
KILL_WAIT = 2.0  # for the killed stragglers to be reaped
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
BACKOFF_RESET_AFTER = 60.0  # a worker that ran this long restarts after BACKOFF_MIN again
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path, less its NUL
# Environment a worker must not see: systemd talks to the master only.
_MASTER_ONLY_ENV = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC")


# -- the workers ----------------------------------------------------------------


@attrs.define(eq=False)
class WorkerHandle:
    """The master's view of one worker process."""

    index: int
    log: Logger
    process: Any = None  # the IProcessTransport while it runs
    protocol: Any = None
    pid: int | None = None
    ready: bool = False
    answering: bool = False  # answered the last /stats or /metrics
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = 0.0
    restart_call: IDelayedCall | None = None
    ended: defer.Deferred[None] | None = None
    stats: dict[str, Any] | None = None
    families: list[Metric] = attrs.Factory(list)


class _WorkerProcess(_ProcessProtocol):
    def __init__(self, supervisor: Supervisor, handle: WorkerHandle) -> None:
        self.supervisor = supervisor
        self.handle = handle
        self._buffers: dict[int, bytes] = {}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._buffers.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > 65536:  # a runaway line: pass it on in pieces
            lines.append(rest)
            rest = b""
        self._buffers[childFD] = rest
        for line in lines:
            self.supervisor._child_line(self.handle, childFD, line)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._buffers.items():
            if rest:
                self.supervisor._child_line(self.handle, fd, rest)
        self._buffers.clear()
        self.supervisor._ended(self.handle, self, reason)


@implementer(IAgentEndpointFactory)
class _WorkerSockets:
    """http://worker-I/... goes to worker I's admin unix socket."""

    def __init__(self, reactor: Any, state_dir: Path) -> None:
        self._reactor = reactor
        self._state_dir = state_dir

    def endpointForURI(self, uri: Any) -> Any:
        index = int(uri.host.decode("ascii").removeprefix("worker-"))
        path = admin_socket_path(self._state_dir, index)
        return endpoints.UNIXClientEndpoint(self._reactor, str(path), timeout=FETCH_TIMEOUT)


class _PurgeAll:
    """POST /cache/purge on the master: every worker purges its own cache."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def purge(self, *, key: str | None = None, prefix: str | None = None) -> defer.Deferred[int]:
        query = urlencode({"key": key} if key is not None else {"prefix": prefix or ""})
        if prefix == "":
            query = "all=1"
        return defer.ensureDeferred(self._purge(query))

    async def _purge(self, query: str) -> int:
        sup = self._supervisor
        live = [h for h in sup.workers if h.ready]
        answers = await defer.gatherResults(
            [sup.fetch(h, "/cache/purge?" + query, method=b"POST") for h in live],
            consumeErrors=True,
        )
        total = 0
        for handle, (code, body) in zip(live, answers, strict=True):
            if code != 200:
                raise RuntimeError(f"worker {handle.index} answered {code}")
            total += int(orjson.loads(body)["purged"])
        return total


class SupervisorAdmin(AdminResource):
    """The master's admin: /stats and /metrics ask the workers first."""

    def __init__(self, supervisor: Supervisor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._supervisor = supervisor

    def render(self, request: Request) -> bytes | int:
        path = request.path.rstrip(b"/") or b"/"
        wanted = {b"/stats": "/stats", b"/metrics": "/metrics"}.get(path)
        if wanted is None or (self._token and not self._authorized(request)):
            return super().render(request)
        d = self._supervisor.refresh(wanted)

        def answer(_: object) -> None:
            if request._disconnected:
                return
            body = AdminResource.render(self, request)
            assert isinstance(body, bytes)
            request.write(body)
            request.finish()

        d.addCallback(answer)
        d.addErrback(lambda f: log.failure("admin {path} failed", f, path=wanted))
        return NOT_DONE_YET


class Supervisor(RootService):
    """The twistd service when ``workers > 1`` (see the module docstring)."""

    name = "llmproxy"

    def __init__(self, settings: Settings, reactor: Any, config_path: str | None = None) -> None:
        from llmproxy.cache import cache_wanted

        self.settings = settings
        self.reactor = reactor
        self.config_path = config_path
        self.count = settings.server.workers
        self.state_dir = settings.server.state_dir
        self.extra_drain_time = STOP_GRACE + KILL_WAIT
        self.audit = AuditLog(settings.audit_path)
        self.workers = [
            WorkerHandle(index=i, log=Logger(namespace=f"worker-{i}")) for i in range(self.count)
        ]
        self.listen_fds: list[int] = []
        self.family = "INET"
        self._sockets: list[socket.socket] = []
        self._shared_port: IListeningPort | None = None
        self.admin_port: IListeningPort | None = None
        self._retired: list[Metric] = []  # counters of workers that exited
        self._announced = False
        self._pool = quiet_pool(reactor, persistent=False)
        self._agent = Agent.usingEndpointFactory(
            reactor, _WorkerSockets(reactor, self.state_dir), pool=self._pool
        )
        token = settings.server.admin_token
        self._auth = Headers({b"authorization": [b"Bearer " + token.encode()]} if token else {})
        collector = MetricsCollector(self._families)
        self.registry = make_registry(collector)
        self.admin_site = AdminSite(
            SupervisorAdmin(
                self,
                is_ready=self.is_ready,
                stats=self.stats,
                registry=self.registry,
                token=token,
                probes_public=settings.server.probes_public,
                audit=self.audit,
                cache=_PurgeAll(self) if cache_wanted(settings) else None,
            ),
            clock=reactor,
            header_timeout=settings.server.header_timeout,
        )

    # -- start --------------------------------------------------------------

    def open_listeners(self) -> None:
        server = self.settings.server
        longest = str(admin_socket_path(self.state_dir, self.count - 1))
        if len(longest.encode()) > _SUN_PATH_MAX:
            raise RuntimeError(
                f"server.state_dir is too long for the workers' admin sockets ({longest}: "
                f"{len(longest.encode())} bytes, at most {_SUN_PATH_MAX})"
            )
        self._bind_proxy(server.listen)
        if server.admin_listen not in ("", "off", "none"):
            self.admin_port = listen_now(
                self.reactor, server.admin_listen, self.admin_site, "server.admin_listen"
            )

    def _bind_proxy(self, description: str) -> None:
        endpoint = endpoints.serverFromString(self.reactor, description)
        if isinstance(endpoint, endpoints._TCPServerEndpoint) and hasattr(socket, "SO_REUSEPORT"):
            self._bind_reuseport(description, endpoint)
            return
        port = listen_now(self.reactor, description, Factory.forProtocol(Protocol), "server.listen")
        port.stopReading()  # type: ignore[attr-defined]
        self._shared_port = port
        sock = port.socket  # type: ignore[attr-defined]
        self.family = {v: k for k, v in FAMILIES.items()}[sock.family]
        self.listen_fds = [port.fileno()] * self.count  # type: ignore[attr-defined]

    def _bind_reuseport(self, description: str, endpoint: Any) -> None:
        interface: str = endpoint._interface
        number: int = endpoint._port
        v6 = abstract.isIPv6Address(interface)
        family = socket.AF_INET6 if v6 else socket.AF_INET
        self.family = "INET6" if v6 else "INET"
        try:
            for _ in range(self.count):
                s = socket.socket(family, socket.SOCK_STREAM)
                self._sockets.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind((interface, number))
                number = s.getsockname()[1]  # port 0: the others join the first one's
                s.listen(endpoint._backlog)
                s.setblocking(False)
        except OSError as e:
            for s in self._sockets:
                s.close()
            self._sockets = []
            raise ListenError(description, e.strerror or str(e), "server.listen") from None
        self.listen_fds = [s.fileno() for s in self._sockets]
        log.info(
            "listening on {desc} (port {port}): {n} SO_REUSEPORT sockets",
            desc=description,
            port=number,
            n=self.count,
        )

    def startService(self) -> None:
        super().startService()
        if not self.listen_fds:
            self.privilegedStartService()
        self._write_snapshot(self._config_text())
        for handle in self.workers:
            self._spawn(handle)
        self._previous_sighup = install_sighup(self.reactor, self.reload)
        log.info("started {n} workers", n=self.count)

    def _config_text(self) -> str:
        from llmproxy.config.loader import default_config_text

        if self.config_path is None:
            return default_config_text()
        return Path(self.config_path).read_text("utf-8")

    def _write_snapshot(self, text: str) -> None:
        path = snapshot_path(self.state_dir)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)

    def _spawn(self, handle: WorkerHandle) -> None:
        handle.restart_call = None
        if self.draining:
            return
        argv = [
            sys.executable, "-m", "llmproxy.runtime.worker",
            "--config", str(snapshot_path(self.state_dir)),
            "--source", self.config_path or "",
            "--index", str(handle.index),
            "--family", self.family,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in _MASTER_ONLY_ENV}
        fds = {0: "w", 1: "r", 2: "r", LISTEN_FD: self.listen_fds[handle.index], CONTROL_FD: "r"}
        proto = _WorkerProcess(self, handle)
        try:
            process = self.reactor.spawnProcess(
                proto, argv[0], argv, env=env, path=os.getcwd(), childFDs=fds
            )
        except OSError as e:
            log.error("worker {i} could not be started: {err}", i=handle.index, err=str(e))
            self._schedule_restart(handle)
            return
        handle.process = process
        handle.protocol = proto
        handle.pid = process.pid
        handle.ready = False
        handle.answering = False
        handle.started_at = self.reactor.seconds()
        handle.ended = defer.Deferred()

    def _child_line(self, handle: WorkerHandle, fd: int, line: bytes) -> None:
        if fd == CONTROL_FD:
            if line.strip() == b"ready":
                self._worker_ready(handle)
            return
        text = line.decode("utf-8", "replace").rstrip("\r")
        level = LogLevel.error  # stderr: what Python printed before logging started
        if fd == 1:
            name, sep, message = text.partition("\t")
            if sep:
                with contextlib.suppress(Exception):
                    level = LogLevel.levelWithName(name)
                text = message
            else:
                level = LogLevel.info
        handle.log.emit(level, "{line}", line=text)

    def _worker_ready(self, handle: WorkerHandle) -> None:
        handle.ready = True
        handle.answering = True
        log.info("worker {i} ready (pid {pid})", i=handle.index, pid=handle.pid)
        if not self._announced and not self.draining and all(h.ready for h in self.workers):
            self._announced = True
            self.ready = True
            sd_notify("READY=1")
            log.info(
                "llmproxy ready: {n} workers serving {listen}",
                n=self.count,
                listen=self.settings.server.listen,
            )

    def _ended(self, handle: WorkerHandle, proto: _WorkerProcess, reason: Failure) -> None:
        if handle.protocol is not proto:
            return
        value = reason.value
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        how = f"signal {sig}" if sig else f"code {code}"
        pid = handle.pid
        handle.process = handle.protocol = handle.pid = None
        handle.ready = handle.answering = False
        # Its counters so far stay in the sums (from its last scrape).
        self._retired = sum_families([self._retired, monotonic_families(handle.families)])
        handle.families = []
        handle.stats = None
        ended, handle.ended = handle.ended, None
        if self.draining:
            log.info("worker {i} (pid {pid}) exited ({how})", i=handle.index, pid=pid, how=how)
        else:
            handle.restarts += 1
            ran = self.reactor.seconds() - handle.started_at
            if handle.backoff == 0 or ran >= BACKOFF_RESET_AFTER:
                handle.backoff = BACKOFF_MIN
            else:
                handle.backoff = min(BACKOFF_MAX, handle.backoff * 2)
            clean = isinstance(value, ProcessDone) or (
                isinstance(value, ProcessTerminated) and code == 0
            )
            emit = log.info if clean else log.warn
            emit(
                "worker {i} (pid {pid}) exited ({how}), restarting in {delay:g}s",
                i=handle.index,
                pid=pid,
                how=how,
                delay=handle.backoff,
            )
            self._schedule_restart(handle)
        if ended is not None:
            ended.callback(None)

    def _schedule_restart(self, handle: WorkerHandle) -> None:
        if self.draining:
            return
        delay = handle.backoff or BACKOFF_MIN
        handle.restart_call = self.reactor.callLater(delay, self._spawn, handle)

    # -- asking the workers ---------------------------------------------------

    async def _fetch(self, handle: WorkerHandle, path: str, method: bytes) -> tuple[int, bytes]:
        url = f"http://worker-{handle.index}{path}".encode()
        d = self._agent.request(method, url, self._auth)
        d.addTimeout(FETCH_TIMEOUT, self.reactor)
        response = await d
        body = readBody(response)
        body.addTimeout(FETCH_TIMEOUT, self.reactor)
        return int(response.code), await body

    def fetch(
        self, handle: WorkerHandle, path: str, method: bytes = b"GET"
    ) -> defer.Deferred[tuple[int, bytes]]:
        return defer.ensureDeferred(self._fetch(handle, path, method))

    def refresh(self, path: str) -> defer.Deferred[None]:
        """Ask every running worker for ``path`` (/stats or /metrics) and keep the answers."""
        return defer.ensureDeferred(self._refresh(path))

    async def _refresh(self, path: str) -> None:
        live = [h for h in self.workers if h.pid is not None and h.ready]
        for h in self.workers:
            if h.pid is None or not h.ready:
                h.answering = False
        results = await defer.DeferredList([self.fetch(h, path) for h in live], consumeErrors=True)
        for handle, (ok, result) in zip(live, results, strict=True):
            pid = handle.pid
            try:
                if not ok:
                    assert isinstance(result, Failure)
                    result.raiseException()
                code, body = result
                if code != 200:
                    raise RuntimeError(f"answered {code}")
                if path == "/stats":
                    handle.stats = orjson.loads(body)
                else:
                    handle.families = parse_families(body.decode("utf-8"))
                handle.answering = True
            except Exception as e:
                handle.answering = False
                log.warn(
                    "worker {i} (pid {pid}) did not answer {path}: {err}",
                    i=handle.index,
                    pid=pid,
                    path=path,
                    err=str(e) or type(e).__name__,
                )

    # -- admin ----------------------------------------------------------------

    def is_ready(self) -> bool:
        return self.ready and any(h.ready for h in self.workers)

    def stats(self) -> dict[str, Any]:
        now = self.reactor.seconds()
        workers: dict[str, Any] = {}
        answered = []
        for h in self.workers:
            doc: dict[str, Any] = {
                "pid": h.pid,
                "up": h.answering,
                "restarts": h.restarts,
                "uptime_s": round(now - h.started_at, 3) if h.pid is not None else 0.0,
            }
            if h.answering and h.stats is not None:
                doc.update(h.stats)
                answered.append(h.stats)
            workers[str(h.index)] = doc
        return {
            "ready": self.is_ready(),
            "draining": self.draining,
            "workers_configured": self.count,
            "workers_up": len(answered),
            "worker_restarts": sum(h.restarts for h in self.workers),
            "workers": workers,
            "total": sum_stats(answered),
            "audit": {"lines": self.audit.lines, "errors": self.audit.errors},
        }

    def _families(self) -> Iterator[Metric]:
        # A worker that did not answer this time counts with its last answer:
        # the sums must not drop while it is busy (llmproxy_worker_up says so).
        running = [h.families for h in self.workers if h.pid is not None]
        yield from sum_families([self._retired, *running])
        up = GaugeMetricFamily(
            "llmproxy_worker_up", "1 while the worker answers the master", labels=["worker"]
        )
        restarts = CounterMetricFamily(
            "llmproxy_worker_restarts", "Worker processes restarted", labels=["worker"]
        )
        for h in self.workers:
            up.add_metric([str(h.index)], 1.0 if h.answering else 0.0)
            restarts.add_metric([str(h.index)], float(h.restarts))
        yield up
        yield restarts

    # -- reload (SIGHUP) ------------------------------------------------------

    def reload(self) -> bool:
        """Validate the config file; a good one becomes the workers' config and
        each worker is told to reload.  A bad one is refused, logged and audited."""
        from llmproxy.config.loader import ConfigError
        from llmproxy.runtime.checks import load_checked

        if self.draining:
            return False
        source = self.config_path or "<embedded default>"
        try:
            text = self._config_text()
        except (OSError, UnicodeDecodeError) as e:
            problems = [f"{source}: cannot read ({e})"]
        else:
            try:
                new = load_checked(self.config_path, text=text)
                problems = []
            except ConfigError as e:
                problems = e.problems
        if problems:
            refuse_reload(self.audit, source, problems)
            return False
        for key in ("listen", "admin_listen", "admin_token", "workers", "state_dir"):
            if getattr(new.server, key) != getattr(self.settings.server, key):
                log.warn("server.{key} changed: it takes effect at the next restart", key=key)
        self._write_snapshot(text)
        for h in self.workers:
            if h.process is not None:
                with contextlib.suppress(Exception):  # it just exited
                    h.process.signalProcess("HUP")
        log.info("config from {source} passed on to {n} workers", source=source, n=self.count)
        return True

    # -- stop -----------------------------------------------------------------

    def stop_stages(self) -> list[StopStage]:
        """SIGTERM: no restarts, every worker drains within ``drain_timeout`` (the
        stragglers are killed ``STOP_GRACE`` later), then the admin listener and
        the pool close."""
        return [
            StopStage("restarts cancelled, the master's sockets closed", self._stop_listening),
            StopStage("workers drained", self._stop_workers),
            StopStage("admin listener closed", self._stop_admin),
            StopStage("connection pool closed", lambda left: self._pool.closeCachedConnections()),
        ]

    def _stop_listening(self, left: float) -> defer.Deferred[None] | None:
        for h in self.workers:
            if h.restart_call is not None and h.restart_call.active():
                h.restart_call.cancel()
            h.restart_call = None
        # The master's copies of the listener: closed once the workers close theirs.
        for s in self._sockets:
            s.close()
        self._sockets = []
        if self._shared_port is None:
            return None
        stopped: defer.Deferred[None] | None = self._shared_port.stopListening()
        return stopped

    async def _stop_workers(self, left: float) -> None:
        running = [h for h in self.workers if h.process is not None]
        log.info("stopping {n} workers", n=len(running))
        for h in running:
            with contextlib.suppress(Exception):
                h.process.signalProcess("TERM")
        waits = [h.ended for h in running if h.ended is not None]
        if not waits:
            return
        clock = self.reactor
        # The workers' own Deferreds are never cancelled (their processEnded
        # fires them); the deadline is a gate of our own.
        await within(defer.DeferredList(waits), left - KILL_WAIT, clock)
        late = [h for h in self.workers if h.process is not None]
        for h in late:
            log.warn(
                "worker {i} (pid {pid}) did not stop by the deadline: killed", i=h.index, pid=h.pid
            )
            with contextlib.suppress(Exception):
                h.process.signalProcess("KILL")
        if late:
            last = defer.DeferredList([h.ended for h in late if h.ended is not None])
            await within(last, KILL_WAIT, clock)

    def _stop_admin(self, left: float) -> defer.Deferred[None] | None:
        if self.admin_port is None:
            return None
        stopped: defer.Deferred[None] | None = self.admin_port.stopListening()
        return stopped
