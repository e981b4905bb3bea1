"""Socket activation and sd_notify, the way systemd does them, without systemd:
the daemon adopts an inherited listening socket (LISTEN_FDS/LISTEN_PID/
LISTEN_FDNAMES) and reports READY=1 and STOPPING=1 on NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, protocol, reactor
from twisted.web.client import Agent, HTTPConnectionPool

from tests.fakes.upstream import FakeUpstream
from tests.integration.daemon import BIN, DaemonProtocol, terminate

pytestmark = pytest.mark.integration


class Notifications(protocol.DatagramProtocol):
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


@pytest_twisted.ensureDeferred
async def test_daemon_adopts_an_inherited_socket_and_notifies_systemd(tmp_path: Path) -> None:
    upstream = FakeUpstream(reactor)
    upstream_port = upstream.listen()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(50)
    port = listener.getsockname()[1]
    notify_path = str(tmp_path / "notify.sock")
    notes = Notifications()
    notify_port = reactor.listenUNIXDatagram(notify_path, notes)  # type: ignore[attr-defined]
    cfg = tmp_path / "llmproxy.ini"
    cfg.write_text(
        f"""
[server]
listen = systemd:domain=INET:name=http
admin_listen = tcp:0:interface=127.0.0.1
state_dir = {tmp_path / "state"}
drain_timeout = 2

[route:main]
prefix = /
upstream = http://127.0.0.1:{upstream_port}
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")}
    env.update({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http", "NOTIFY_SOCKET": notify_path})
    twistd = f"{BIN / 'twistd'} -n --pidfile= -l - llmproxy --config {cfg}"
    # systemd sets LISTEN_PID to the service's own pid: exec keeps the shell's.
    argv = ["/bin/sh", "-c", f"LISTEN_PID=$$; export LISTEN_PID; exec {twistd}"]
    proc = DaemonProtocol()
    transport = reactor.spawnProcess(  # type: ignore[attr-defined]
        proc, argv[0], argv, env=env, path=str(tmp_path),
        childFDs={0: "w", 1: "r", 2: "r", 3: listener.fileno()},
    )  # fmt: skip
    listener.close()  # the daemon holds its own copy now
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))  # type: ignore[attr-defined]
    try:
        ports = await proc.ready.addTimeout(30, reactor)
        assert ports[0] == port
        await notes.wait_for(b"READY=1").addTimeout(10, reactor)
        resp = await client.get(f"http://127.0.0.1:{port}/status/200")
        await resp.content()
        assert resp.code == 200
        assert len(upstream.requests) == 1
        terminate(transport)
        await notes.wait_for(b"STOPPING=1").addTimeout(10, reactor)
        await proc.ended.addTimeout(30, reactor)
        assert proc.clean_stop, proc.output.decode(errors="replace")
    finally:
        if not proc.ended.called:
            transport.signalProcess("KILL")
            await proc.ended
        await pool.closeCachedConnections()
        await defer.maybeDeferred(notify_port.stopListening)
        await upstream.stop()
