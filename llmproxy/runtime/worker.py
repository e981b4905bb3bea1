"""One worker process of ``[server] workers = N``: ``python -m llmproxy.runtime.worker``,
started by the master in llmproxy/runtime/supervisor.py (tests:
tests/integration/test_workers.py, tests/unit/runtime/test_aggregate.py).

A worker is a whole ProxyService with three differences:

- it serves the listening socket the master passes as fd 3
  (``adoptStreamPort``), and its admin on ``<state_dir>/run/worker-I.sock``;
- its state lives in ``<state_dir>/worker-I/`` (:func:`worker_settings`):
  spools, dead letters, the session journal, file sinks and token usage
  counts.  ``tokens.json`` and the audit log stay shared;
- it logs one ``LEVEL<TAB>text`` line per event on stdout for the master to
  relay, says ``ready`` on fd 4 once it serves, and drains and exits when its
  stdin (a pipe from the master) closes, so a master killed with -9 leaves no
  orphans.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from llmproxy.config.loader import map_paths
from llmproxy.config.model import Settings
from llmproxy.runtime.exits import EX_CONFIG, EX_SOFTWARE
from llmproxy.runtime.service import ProxyService
from llmproxy.runtime.system import CONTROL_FD, FAMILIES, LISTEN_FD, admin_socket_path

__all__ = [
    "Lifeline",
    "LineLog",
    "WorkerSeat",
    "WorkerService",
    "main",
    "worker_settings",
]


def worker_settings(settings: Settings, index: int) -> Settings:
    """``settings`` (paths already absolute) for worker ``index``: what lived
    under ``state_dir`` moves to ``state_dir/worker-I``; a file elsewhere gets
    ``.worker-I`` before its suffix, a directory elsewhere a ``worker-I``
    subdirectory.  The audit log (one fsynced append per line) stays shared."""
    shared = settings.server.state_dir
    own = shared / f"worker-{index}"

    def moved(p: Path) -> Path | None:
        try:
            return own / p.relative_to(shared)
        except ValueError:
            return None

    def file(p: Path | None) -> Path | None:
        if p is None:
            return None
        return moved(p) or p.with_name(f"{p.stem}.worker-{index}{p.suffix}")

    def directory(p: Path | None) -> Path | None:
        if p is None or not p.is_absolute():
            return p  # relative: under state_dir, which moves
        return moved(p) or p / f"worker-{index}"

    return map_paths(settings, state_dir=own, file=file, directory=directory)


@attrs.frozen
class WorkerSeat:
    """Where one worker sits: its number, the master's state directory (its
    tokens live there), the config snapshot the master validated, and the
    listening socket it inherits."""

    index: int
    shared_state_dir: Path
    snapshot: str
    listen_fd: int
    family: int


class WorkerService(ProxyService):
    """A ProxyService on an inherited socket, with its admin on a unix socket."""

    def __init__(
        self, settings: Settings, reactor: Any, seat: WorkerSeat, *, config_path: str | None
    ) -> None:
        self.seat = seat
        # The tokens are the master's (``llmproxy token`` writes them there);
        # the usage counts are this worker's own.
        super().__init__(
            settings, reactor, config_path=config_path, tokens_dir=seat.shared_state_dir
        )

    def load_settings(self) -> Settings:
        from llmproxy.runtime.checks import load_checked

        return worker_settings(load_checked(self.seat.snapshot), self.seat.index)

    def privilegedStartService(self) -> None:
        seat = self.seat
        self.port = self.reactor.adoptStreamPort(seat.listen_fd, seat.family, self.site)
        os.close(seat.listen_fd)  # adoptStreamPort took a copy
        path = admin_socket_path(seat.shared_state_dir, seat.index)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.is_socket():
            path.unlink()  # left by this worker's previous run
        self.admin_port = self.reactor.listenUNIX(str(path), self.admin_site, mode=0o600)
        self.settings.server.state_dir.mkdir(parents=True, exist_ok=True)
        Service.privilegedStartService(self)


@implementer(ILogObserver)
class LineLog:
    """A log observer writing ``LEVEL<TAB>text`` lines to a file descriptor."""

    def __init__(self, fd: int, minimum: LogLevel = LogLevel.info) -> None:
        self._fd = fd
        self._minimum = minimum

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        if level < self._minimum:
            return
        text = formatEvent(event)
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            text += "\n" + failure.getTraceback()
        data = "".join(f"{level.name}\t{line}\n" for line in text.splitlines() or [""])
        _write_all(self._fd, data.encode("utf-8", "replace"))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except OSError:
            return  # the master is gone; stdin's EOF stops us
        view = view[n:]


@implementer(IReadDescriptor)
class Lifeline:
    """Watches stdin, a pipe from the master: EOF means the master is gone."""

    def __init__(self, reactor: Any, on_eof: Any, fd: int = 0) -> None:
        self._reactor = reactor
        self._on_eof = on_eof
        self._fd = fd
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "lifeline"

    def doRead(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._reactor.removeReader(self)
            self._on_eof()

    def connectionLost(self, reason: Failure) -> None:
        self._on_eof()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmproxy.runtime.worker")
    parser.add_argument("--config", required=True, help="the config the master validated")
    parser.add_argument("--source", default="", help="the config file, for messages")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True)
    args = parser.parse_args(argv)

    from twisted.logger import Logger

    log = Logger(namespace="llmproxy.runtime.worker")
    globalLogBeginner.beginLoggingTo([LineLog(1)], redirectStandardIO=False)
    from llmproxy.config.loader import ConfigError
    from llmproxy.runtime.checks import load_checked

    try:
        base = load_checked(args.config)
    except ConfigError as e:
        for problem in e.problems:
            log.error("bad configuration: {problem}", problem=problem)
        return EX_CONFIG
    settings = worker_settings(base, args.index)

    from twisted.internet import reactor

    r: Any = reactor
    seat = WorkerSeat(
        index=args.index,
        shared_state_dir=base.server.state_dir,
        snapshot=args.config,
        listen_fd=LISTEN_FD,
        family=FAMILIES[args.family],
    )
    service = WorkerService(settings, r, seat, config_path=args.source or None)
    try:
        service.privilegedStartService()
    except Exception:
        log.failure("worker {i} could not start", i=args.index)
        return EX_SOFTWARE
    outcome = {"code": 0}
    stopping: list[bool] = []

    def stop() -> None:
        if not stopping:
            stopping.append(True)
            r.stop()

    def on_signal(signum: int, frame: Any) -> None:
        r.callFromThread(stop)

    def master_gone() -> None:
        if not stopping:
            log.warn("the master process is gone: stopping")
        stop()

    def start() -> None:
        # A second SIGTERM (systemd's and the master's) must not stop twice.
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            service.startService()
        except Exception:
            log.failure("worker {i} could not start", i=args.index)
            outcome["code"] = EX_SOFTWARE
            stop()
            return
        r.addReader(Lifeline(r, master_gone))
        _write_all(CONTROL_FD, b"ready\n")

    r.addSystemEventTrigger("before", "shutdown", service.stopService)
    r.callWhenRunning(start)
    r.run()
    return outcome["code"]


if __name__ == "__main__":
    sys.exit(main())
