"""SIGHUP reload: routes, allowlist and exporters change live; a bad file is refused;
the event files are reopened either way (logrotate's postrotate)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool

from llmproxy.config.loader import load_settings
from llmproxy.runtime.service import ProxyService
from tests.fakes.upstream import FakeUpstream
from tests.integration.daemon import spawn, terminate
from tests.integration.harness import Collect, raw_request, wait_until

pytestmark = pytest.mark.integration


def config(state: Path, upstream_port: int, extra: str = "") -> str:
    return f"""
[server]
listen = tcp:0:interface=127.0.0.1
admin_listen = tcp:0:interface=127.0.0.1
state_dir = {state}
drain_timeout = 3

[route:main]
prefix = /
upstream = http://127.0.0.1:{upstream_port}
provider = openai
{extra}
"""


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.a = FakeUpstream(reactor)
        self.b = FakeUpstream(reactor)
        self.a_port = self.a.listen()
        self.b_port = self.b.listen()
        self.state = tmp_path / "state"
        self.path = tmp_path / "llmproxy.ini"
        self.path.write_text(config(self.state, self.a_port))
        settings = load_settings(self.path, env={})
        self.service = ProxyService(settings, reactor, config_path=str(self.path))
        self.service.startService()
        assert self.service.port is not None
        self.base = f"http://127.0.0.1:{self.service.port.getHost().port}"  # type: ignore[attr-defined]
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)
        self.client = treq.client.HTTPClient(self.agent)  # type: ignore[attr-defined]

    def close(self) -> None:
        pytest_twisted.blockon(self.pool.closeCachedConnections())
        if self.service.running:
            pytest_twisted.blockon(self.service.stopService())
        pytest_twisted.blockon(self.a.stop())
        pytest_twisted.blockon(self.b.stop())


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.close()


async def _get(env: Env, path: str) -> int:
    resp = await env.client.get(env.base + path)
    await resp.content()
    return int(resp.code)


@pytest_twisted.ensureDeferred
async def test_reload_moves_a_route_without_dropping_an_open_stream(env: Env) -> None:
    resp = await raw_request(env.agent, b"GET", env.base + "/sse?n=6&gap=0.1")
    stream = Collect()
    resp.deliverBody(stream)
    env.path.write_text(config(env.state, env.b_port))
    assert await env.service.reload() is True
    assert await _get(env, "/status/200") == 200
    assert len(env.b.requests) == 1
    await stream.done.addTimeout(10, reactor)
    assert stream.complete and stream.body.count(b"data:") == 6
    assert len(env.a.requests) == 1  # only the stream that was already open
    audit = [json.loads(x) for x in (env.state / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["action"] == "config_reload" and audit[-1]["outcome"] == "applied"


@pytest_twisted.ensureDeferred
async def test_bad_config_on_reload_is_refused_and_the_old_one_kept(env: Env) -> None:
    bad = "\n[route:x]\nprefix = nope\nupstream = https://x.example\n"
    env.path.write_text(config(env.state, env.b_port) + bad)
    assert await env.service.reload() is False
    assert await _get(env, "/status/200") == 200
    assert len(env.a.requests) == 1 and env.b.requests == []
    audit = [json.loads(x) for x in (env.state / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["outcome"] == "refused"
    assert any(p.startswith("route:x.prefix") for p in audit[-1]["problems"])


@pytest_twisted.ensureDeferred
async def test_reload_adds_an_exporter_and_the_allowlist_changes(env: Env) -> None:
    assert await _get(env, f"/openai/127.0.0.1:{env.b_port}/status/200") == 403
    extra = (
        f"[passthrough]\nallowed_http_hosts = 127.0.0.1:{env.b_port}\n"
        "[exporter:events]\ntype = file\nflush_interval = 0.05\n"
    )
    env.path.write_text(config(env.state, env.a_port, extra))
    assert await env.service.reload() is True
    assert await _get(env, f"/openai/127.0.0.1:{env.b_port}/status/200") == 200
    events = env.state / "events.jsonl"
    await wait_until(lambda: events.exists() and len(events.read_text().splitlines()) >= 2)
    types = [json.loads(x)["type"] for x in events.read_text().splitlines()]
    assert types == ["request", "response"]


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_the_running_daemon(tmp_path: Path) -> None:
    a, b = FakeUpstream(reactor), FakeUpstream(reactor)
    a_port, b_port = a.listen(), b.listen()
    path = tmp_path / "llmproxy.ini"
    path.write_text(config(tmp_path / "state", a_port))
    proc, transport = spawn(path)
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))  # type: ignore[attr-defined]
    try:
        port, _admin = await proc.ready.addTimeout(30, reactor)
        path.write_text(config(tmp_path / "state", b_port))
        transport.signalProcess(signal.SIGHUP)
        await proc.wait_for(b"config reloaded").addTimeout(20, reactor)
        resp = await client.get(f"http://127.0.0.1:{port}/status/200")
        await resp.content()
        assert len(b.requests) == 1 and a.requests == []
    finally:
        terminate(transport)
        await proc.ended.addTimeout(30, reactor)
        await pool.closeCachedConnections()
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_reload_reopens_the_event_file_even_when_the_config_is_refused(
    tmp_path: Path,
) -> None:
    upstream = FakeUpstream(reactor)
    port = upstream.listen()
    state = tmp_path / "state"
    path = tmp_path / "llmproxy.ini"
    sink = "[exporter:events]\ntype = file\nflush_interval = 0.05\n"
    path.write_text(config(state, port, sink))
    service = ProxyService(load_settings(path, env={}), reactor, config_path=str(path))
    service.startService()
    assert service.port is not None
    base = f"http://127.0.0.1:{service.port.getHost().port}"  # type: ignore[attr-defined]
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))  # type: ignore[attr-defined]
    reopened: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if "reopening" in (event.get("log_format") or ""):
            reopened.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    events, rotated = state / "events.jsonl", state / "events.jsonl.1"
    try:
        for _ in range(2):
            await (await client.get(base + "/status/200")).content()
        await wait_until(lambda: events.exists() and len(events.read_bytes().splitlines()) == 4)
        events.rename(rotated)
        path.write_text(config(state, port, sink) + "\n[route:x]\nprefix = nope\n")
        assert await service.reload() is False  # refused: the files are reopened all the same
        await wait_until(lambda: reopened != [], what="reopen")  # after an fsync in flight
        assert reopened == [f"file sink events: reopening {events} (SIGHUP)"]
        await (await client.get(base + "/status/200")).content()
        await wait_until(lambda: events.exists() and len(events.read_bytes().splitlines()) == 2)
        assert len(rotated.read_bytes().splitlines()) == 4
        assert len(reopened) == 1  # the SIGHUP closed it: nothing left to notice as moved
    finally:
        globalLogPublisher.removeObserver(observer)
        await pool.closeCachedConnections()
        await service.stopService()
        await upstream.stop()
