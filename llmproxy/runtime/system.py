"""The process's dealings with the operating system and systemd: listening at
start-up, the file descriptors a master passes its workers and where their admin
sockets live, ``sd_notify``, and SIGHUP (tests: tests/integration/test_daemon.py,
test_workers.py, test_socket_activation.py)."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.runtime.exits import ListenError

log = Logger()

__all__ = [
    "CONTROL_FD",
    "FAMILIES",
    "LISTEN_FD",
    "admin_socket_path",
    "install_sighup",
    "listen_now",
    "restore_sighup",
    "run_dir",
    "sd_notify",
    "snapshot_path",
]

CONTROL_FD = 4  # worker -> master: "ready\n"
LISTEN_FD = 3  # master -> worker: the listening socket
FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}


def run_dir(state_dir: Path) -> Path:
    return state_dir / "run"


def admin_socket_path(state_dir: Path, index: int) -> Path:
    """Where worker ``index`` serves its admin (``state_dir``: the master's)."""
    return run_dir(state_dir) / f"worker-{index}.sock"


def snapshot_path(state_dir: Path) -> Path:
    """The config the workers load: the file the master last validated."""
    return run_dir(state_dir) / "config.ini"


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


def listen_now(reactor: Any, description: str, factory: Any, setting: str = "") -> IListeningPort:
    """Listen on an endpoint string at start-up, synchronously: a bind error (or an
    endpoint that cannot listen at once) raises :class:`ListenError` with the
    reason (``setting``: the config key that named the endpoint)."""
    try:
        endpoint = endpoints.serverFromString(reactor, description)
    except (KeyError, IndexError) as e:  # a systemd: endpoint whose descriptor is missing
        which = f"named {e.args[0]!r}" if isinstance(e, KeyError) else "at that index"
        reason = (
            f"systemd passed no listening socket {which} (LISTEN_FDS, LISTEN_FDNAMES: is the "
            ".socket unit running, with that FileDescriptorName=?)"
        )
        raise ListenError(description, reason, setting) from None
    except Exception as e:
        raise ListenError(description, _reason(e), setting) from None
    result: list[Any] = []
    endpoint.listen(factory).addBoth(result.append)
    if not result:
        raise ListenError(description, "listening did not complete at start", setting)
    if isinstance(result[0], Failure):
        failure: Failure = result[0]
        raise ListenError(description, _reason(failure.value or Exception()), setting)
    port: IListeningPort = result[0]
    log.info(
        "listening on {desc} (port {port})",
        desc=description,
        port=getattr(port.getHost(), "port", "-"),
    )
    return port


def _reason(error: BaseException) -> str:
    """Twisted's CannotListenError says ``Couldn't listen on ADDR: [Errno 98] Address
    already in use.``: the errno's words are the reason (the address is said already)."""
    socket_error = getattr(error, "socketError", None)
    if isinstance(socket_error, OSError) and socket_error.strerror:
        return socket_error.strerror
    return (str(error) or type(error).__name__).rstrip(".")


def install_sighup(reactor: Any, reload: Callable[[], object]) -> Any:
    """Run ``reload`` in the reactor thread on each SIGHUP; return the handler it
    replaced, for :func:`restore_sighup` (None where there is no SIGHUP)."""
    if not hasattr(signal, "SIGHUP"):
        return None

    def on_hup(signum: int, frame: Any) -> None:
        reactor.callFromThread(reload)

    return signal.signal(signal.SIGHUP, on_hup)


def restore_sighup(previous: Any) -> None:
    """Put back the handler :func:`install_sighup` replaced (at the drain)."""
    if previous is not None:
        signal.signal(signal.SIGHUP, previous)
