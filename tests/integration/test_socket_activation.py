"""Socket activation and sd_notify, the way systemd does them, without systemd:
the daemon adopts an inherited listening socket (LISTEN_FDS/LISTEN_PID/
LISTEN_FDNAMES) and reports READY=1 and STOPPING=1 on NOTIFY_SOCKET."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool

from tests.fakes.upstream import FakeUpstream
from tests.integration.daemon import SocketActivated, terminate

pytestmark = pytest.mark.integration


@pytest_twisted.ensureDeferred
async def test_daemon_adopts_an_inherited_socket_and_notifies_systemd(tmp_path: Path) -> None:
    upstream = FakeUpstream(reactor)
    upstream_port = upstream.listen()
    daemon = SocketActivated(tmp_path, upstream_port)
    port, notes, proc, transport = daemon.port, daemon.notes, daemon.proc, daemon.transport
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
        await daemon.close()
        await pool.closeCachedConnections()
        await upstream.stop()
