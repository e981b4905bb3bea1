"""The daemon as users run it: twistd/twist, the plugin, check-config, SIGTERM drain."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, error, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool

from llmproxy.runtime.exits import EX_CANNOT_LISTEN
from tests.fakes.upstream import FakeUpstream
from tests.integration.daemon import BIN, kill, spawn, terminate, write_config
from tests.integration.harness import Collect, raw_request

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

_LIST_PLUGINS = (
    "from twisted.plugin import getPlugins\n"
    "from twisted.application.service import IServiceMaker\n"
    "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))\n"
)


def test_plugin_is_discoverable_from_the_installed_package(tmp_path: Path) -> None:
    # Run outside the source tree so only the installed package can provide it.
    out = subprocess.run(
        [sys.executable, "-c", _LIST_PLUGINS],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "'llmproxy'" in out.stdout


def test_plugin_is_discoverable_from_a_non_editable_install(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
         "--target", str(target), str(ROOT)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    assert (target / "twisted" / "plugins" / "llmproxy_plugin.py").exists()
    assert not (target / "twisted" / "plugins" / "__init__.py").exists()
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    script = (
        f"import sys; sys.path.insert(0, {str(target)!r})\n"
        f"import llmproxy; assert llmproxy.__file__.startswith({str(target)!r})\n"
        + _LIST_PLUGINS
        + "print(sys.modules['twisted.plugins.llmproxy_plugin'].__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", script],
        cwd=tmp_path, capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert "'llmproxy'" in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith(str(target))


@pytest.mark.parametrize("runner", ["twistd", "twist"])
def test_bad_config_fails_before_listening_with_one_line_per_problem(
    tmp_path: Path, runner: str
) -> None:
    cfg = tmp_path / "bad.ini"
    cfg.write_text(
        "[server]\nlisten = tcp:notaport\nsurprise = 1\n"
        "[route:x]\nprefix = /x\nupstream = ftp://example.com\nprovider = openai\n"
    )
    argv = [str(BIN / runner)] + (["-n", "--pidfile=", "-l", "-"] if runner == "twistd" else [])
    proc = subprocess.run(
        [*argv, "llmproxy", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 64
    assert "server.listen: not a valid endpoint" in proc.stderr
    assert "server.surprise: unknown key" in proc.stderr
    assert "route:x.upstream: must be an http:// or https:// URL" in proc.stderr
    assert "listening" not in proc.stdout


@pytest.mark.parametrize(
    ("runner", "which", "workers"),
    [
        ("twistd", "listen", 1),
        ("twist", "listen", 1),
        ("twistd", "admin_listen", 1),
        ("twist", "admin_listen", 1),
        ("twistd", "listen", 2),  # the workers' master binds SO_REUSEPORT sockets itself
        ("twistd", "admin_listen", 2),
    ],
)
def test_a_port_in_use_fails_start_up_with_one_line_and_exit_code_69(
    tmp_path: Path, runner: str, which: str, workers: int
) -> None:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    cfg = tmp_path / "busy.ini"
    listen = {"listen": "tcp:0:interface=127.0.0.1", "admin_listen": "tcp:0:interface=127.0.0.1"}
    listen[which] = f"tcp:{port}:interface=127.0.0.1"
    lines = "".join(f"{key} = {value}\n" for key, value in listen.items())
    cfg.write_text(f"[server]\n{lines}workers = {workers}\nstate_dir = {tmp_path / 'state'}\n")
    argv = [str(BIN / runner)] + (["-n", "--pidfile=", "-l", "-"] if runner == "twistd" else [])
    try:
        proc = subprocess.run(
            [*argv, "llmproxy", "--config", str(cfg)], capture_output=True, text=True, timeout=60
        )
    finally:
        held.close()
    assert proc.returncode == EX_CANNOT_LISTEN == 69
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    (line,) = [x for x in output.splitlines() if "cannot listen" in x]
    assert line.endswith(
        f"llmproxy: cannot listen on tcp:{port}:interface=127.0.0.1 (server.{which}): "
        "Address already in use; not starting (exit code 69)"
    ), line


def test_check_config_accepts_a_good_file_and_names_every_bad_key(tmp_path: Path) -> None:
    good = tmp_path / "good.ini"
    good.write_text(
        "[server]\nlisten = tcp:8081\n[route:openai]\nprefix = /openai\n"
        "upstream = https://api.openai.com\nprovider = openai\n"
    )
    ok = subprocess.run(
        [str(BIN / "llmproxy"), "check-config", str(good)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    bad = tmp_path / "bad.ini"
    bad.write_text(
        "[server]\ndrain_timeout = soon\nadmin_listen = carrier-pigeon:1\n"
        "[route:a]\nprefix = /a\nupstream = https://\nprovider = mistral\n"
        "[exporter:l]\ntype = loki\n"
    )
    res = subprocess.run(
        [str(BIN / "llmproxy"), "check-config", str(bad)], capture_output=True, text=True
    )
    assert res.returncode == 64  # as the daemon exits on the same file
    lines = res.stderr.strip().splitlines()
    assert any(x.startswith("server.drain_timeout: not a duration") for x in lines), lines
    assert any(x.startswith("server.admin_listen: not a valid endpoint") for x in lines), lines
    assert any(x.startswith("route:a.upstream: has no host") for x in lines), lines
    assert any(x.startswith("route:a.provider: must be one of") for x in lines), lines
    assert any(x.startswith("exporter:l.url: required") for x in lines), lines


@pytest_twisted.ensureDeferred
async def test_twist_runs_the_plugin_and_stops_on_sigterm(tmp_path: Path) -> None:
    upstream = FakeUpstream(reactor)
    port = upstream.listen()
    cfg = write_config(tmp_path, port)
    proc, transport = _spawn_twist(cfg)
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        proxy_port, _admin = await proc.ready.addTimeout(30, reactor)
        client = treq.client.HTTPClient(Agent(reactor, pool=pool))  # type: ignore[attr-defined]
        resp = await client.post(f"http://127.0.0.1:{proxy_port}/v1/chat/completions", json={})
        assert resp.code == 200
        await resp.content()
    finally:
        terminate(transport)
        await proc.ended.addTimeout(30, reactor)
        await upstream.stop()
    assert proc.clean_stop, proc.output.decode(errors="replace")


def _spawn_twist(cfg: Path) -> tuple[Any, Any]:
    import os

    from tests.integration.daemon import DaemonProtocol

    proto = DaemonProtocol()
    argv = [str(BIN / "twist"), "--log-format=text", "llmproxy", "--config", str(cfg)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")}
    transport = reactor.spawnProcess(proto, argv[0], argv, env=env, path=str(cfg.parent))  # type: ignore[attr-defined]
    return proto, transport


async def _ready_status(client: Any, admin: int) -> int:
    resp = await client.get(f"http://127.0.0.1:{admin}/ready")
    await resp.content()
    return int(resp.code)


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_in_flight_streams_and_exits_by_the_deadline(tmp_path: Path) -> None:
    upstream = FakeUpstream(reactor)
    port = upstream.listen()
    drain = 3.0
    cfg = write_config(tmp_path, port, drain=drain)
    proc, transport = spawn(cfg)
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, pool=pool)
    client = treq.client.HTTPClient(agent)  # type: ignore[attr-defined]
    try:
        proxy_port, admin_port = await proc.ready.addTimeout(30, reactor)
        base = f"http://127.0.0.1:{proxy_port}"
        assert await _ready_status(client, admin_port) == 200
        short_resp = await raw_request(agent, b"GET", base + "/sse?n=8&gap=0.1")
        long_resp = await raw_request(agent, b"GET", base + "/sse?n=10000&gap=0.05")
        short, long = Collect(), Collect()
        short_resp.deliverBody(short)
        long_resp.deliverBody(long)
        terminate(transport)
        t_term = reactor.seconds()  # type: ignore[attr-defined]
        # /ready turns 503 while draining.
        for _ in range(100):
            if await _ready_status(client, admin_port) == 503:
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        else:
            pytest.fail("/ready never turned 503 during the drain")
        # The listener no longer accepts new connections.
        with pytest.raises(error.ConnectionRefusedError):
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy_port), Protocol())
        # The short stream finishes cleanly; the long one is cut at the deadline.
        await short.done.addTimeout(10, reactor)
        assert short.complete
        assert short.body.count(b"data:") == 8
        await long.done.addTimeout(10, reactor)
        assert not long.complete
        await proc.ended.addTimeout(drain + 10, reactor)
        assert proc.clean_stop, proc.output.decode(errors="replace")
        assert proc.ended_at is not None
        assert proc.ended_at - t_term < drain + 1.5, proc.ended_at - t_term
        assert b"drained in" in proc.output
    finally:
        if not proc.ended.called:
            kill(transport)
            await proc.ended
        await pool.closeCachedConnections()
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_environment_overrides_the_file(tmp_path: Path) -> None:
    upstream = FakeUpstream(reactor)
    port = upstream.listen()
    cfg = write_config(tmp_path, port)
    # The route in the file points at the upstream; the environment moves it.
    dead = FakeUpstream(reactor)
    other = dead.listen()
    proc, transport = spawn(cfg, env={"LLMPROXY_ROUTE_ROOT_UPSTREAM": f"http://127.0.0.1:{other}"})
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))  # type: ignore[attr-defined]
    try:
        proxy_port, _ = await proc.ready.addTimeout(30, reactor)
        resp = await client.post(f"http://127.0.0.1:{proxy_port}/v1/chat/completions", json={})
        await resp.content()
        assert resp.code == 200
        assert len(dead.requests) == 1 and upstream.requests == []
    finally:
        terminate(transport)
        await proc.ended.addTimeout(30, reactor)
        await defer.gatherResults([upstream.stop(), dead.stop()])
