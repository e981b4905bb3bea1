"""Start the real daemon (`twistd -n llmproxy`) as a subprocess, the way a user does."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.python.failure import Failure

BIN = Path(sys.executable).parent
_LISTEN_RE = re.compile(rb"listening on (\S+) \(port (\d+)\)")


def write_config(
    tmp_path: Path, upstream_port: int, *, drain: float = 3.0, server: str = "", extra: str = ""
) -> Path:
    """An ini for a daemon on free loopback ports: one route to the upstream,
    ``server`` lines added to ``[server]``, ``extra`` sections after it."""
    cfg = tmp_path / "llmproxy.ini"
    cfg.write_text(
        f"""
[server]
listen = tcp:0:interface=127.0.0.1
admin_listen = tcp:0:interface=127.0.0.1
state_dir = {tmp_path / "state"}
drain_timeout = {drain}
{server}

[route:root]
prefix = /
upstream = http://127.0.0.1:{upstream_port}
provider = openai
{extra}
"""
    )
    return cfg


class DaemonProtocol(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ports: list[int] = []
        self.ready: defer.Deferred[list[int]] = defer.Deferred()
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.waiters: list[tuple[bytes, defer.Deferred[None]]] = []
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.ended_at: float | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self.ports = [int(m.group(2)) for m in _LISTEN_RE.finditer(self.output)]
        if len(self.ports) >= 2 and b"llmproxy ready" in self.output and not self.ready.called:
            self.ready.callback(self.ports)
        for needle, d in list(self.waiters):
            if needle in self.output:
                self.waiters.remove((needle, d))
                d.callback(None)

    errReceived = outReceived

    def wait_for(self, needle: bytes) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if needle in self.output:
            d.callback(None)
        else:
            self.waiters.append((needle, d))
        return d

    @property
    def clean_stop(self) -> bool:
        """Exit 0, or death by the SIGTERM it was sent: twistd re-raises the
        signal that stopped it after a clean shutdown, as Unix daemons do."""
        return self.exit_code == 0 or self.signal == signal.SIGTERM

    def processEnded(self, reason: Failure) -> None:
        self.ended_at = reactor.seconds()  # type: ignore[attr-defined]
        self.exit_code = getattr(reason.value, "exitCode", None)
        self.signal = getattr(reason.value, "signal", None)
        if not self.ready.called:
            self.ready.errback(
                RuntimeError(
                    f"daemon exited before listening:\n{self.output.decode(errors='replace')}"
                )
            )
        self.ended.callback(self.exit_code)


def spawn(
    config: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[DaemonProtocol, Any]:
    proto = DaemonProtocol()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")}
    full_env.update(env or {})
    argv = [str(BIN / "twistd"), "-n", "--pidfile=", "-l", "-", "llmproxy", "--config", str(config)]
    transport = reactor.spawnProcess(  # type: ignore[attr-defined]
        proto, argv[0], argv, env=full_env, path=str(cwd or config.parent)
    )
    return proto, transport


def terminate(transport: Any) -> None:
    with contextlib.suppress(Exception):  # already gone
        transport.signalProcess(signal.SIGTERM)


def kill(transport: Any) -> None:
    with contextlib.suppress(Exception):  # already gone
        transport.signalProcess(signal.SIGKILL)


class Notifications(protocol.DatagramProtocol):
    """A test NOTIFY_SOCKET: what the daemon tells systemd."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.waiters: list[tuple[bytes, defer.Deferred[None]]] = []

    def datagramReceived(self, data: bytes, addr: object) -> None:
        self.messages.append(data)
        for want, d in list(self.waiters):
            if want in data:
                self.waiters.remove((want, d))
                d.callback(None)

    def wait_for(self, want: bytes) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if any(want in m for m in self.messages):
            d.callback(None)
        else:
            self.waiters.append((want, d))
        return d


class SocketActivated:
    """The daemon started the way systemd starts a socket-activated unit: a
    listening socket on fd 3 (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID) and a
    NOTIFY_SOCKET, with ``server_lines`` added to its [server] section."""

    def __init__(self, tmp_path: Path, upstream_port: int, server_lines: str = "") -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(50)
        self.port: int = listener.getsockname()[1]
        notify_path = str(tmp_path / "notify.sock")
        self.notes = Notifications()
        self.notify_port = reactor.listenUNIXDatagram(notify_path, self.notes)  # type: ignore[attr-defined]
        cfg = tmp_path / "llmproxy.ini"
        cfg.write_text(
            "[server]\nlisten = systemd:domain=INET:name=http\n"
            "admin_listen = tcp:0:interface=127.0.0.1\n"
            f"state_dir = {tmp_path / 'state'}\ndrain_timeout = 2\n{server_lines}\n\n"
            f"[route:main]\nprefix = /\nupstream = http://127.0.0.1:{upstream_port}\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")}
        env.update({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http", "NOTIFY_SOCKET": notify_path})
        twistd = f"{BIN / 'twistd'} -n --pidfile= -l - llmproxy --config {cfg}"
        # systemd sets LISTEN_PID to the service's own pid: exec keeps the shell's.
        argv = ["/bin/sh", "-c", f"LISTEN_PID=$$; export LISTEN_PID; exec {twistd}"]
        self.proc = DaemonProtocol()
        self.transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            self.proc, argv[0], argv, env=env, path=str(tmp_path),
            childFDs={0: "w", 1: "r", 2: "r", 3: listener.fileno()},
        )  # fmt: skip
        listener.close()  # the daemon holds its own copy now

    async def close(self) -> None:
        if not self.proc.ended.called:
            self.transport.signalProcess("KILL")
            await self.proc.ended
        await defer.maybeDeferred(self.notify_port.stopListening)
