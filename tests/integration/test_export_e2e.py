"""Events end to end through the real daemon (twistd subprocess) to a fake Loki and
the JSONL file: outages, restarts, kill -9, drain with a stuck sink, and secrets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool

from tests.fakes.loki import FakeLoki, Hang, listen_fake_loki
from tests.fakes.upstream import FakeUpstream
from tests.integration.daemon import DaemonProtocol, kill, spawn, terminate
from tests.integration.harness import wait_until

pytestmark = pytest.mark.integration

CANARY_KEY = "sk-proj-CANARYcanary0123456789abcdefXYZW"
CANARY_ANTHROPIC = "sk-ant-api03-CANARYanthropic9876543210zyxwQRST"
CANARY_COOKIE = "session=CANARYcookievalue0123456789"


def write_config(
    tmp_path: Path,
    upstream_port: int,
    loki_url: str,
    *,
    drain: float = 5.0,
    loki: str = "",
) -> Path:
    keys = {
        "flush_interval": "0.1",
        "batch_size": "20",
        "backoff_min": "0.05",
        "backoff_max": "0.2",
        "timeout": "2",
    }
    for line in loki.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            keys[k.strip()] = v.strip()
    loki_keys = "\n".join(f"{k} = {v}" for k, v in keys.items())
    cfg = tmp_path / "llmproxy.ini"
    cfg.write_text(
        f"""
[server]
listen = tcp:0:interface=127.0.0.1
admin_listen = tcp:0:interface=127.0.0.1
state_dir = {tmp_path / "state"}
drain_timeout = {drain}
environment = test

[route:openai]
prefix = /openai
upstream = http://127.0.0.1:{upstream_port}
provider = openai

[exporter:events]
type = file
flush_interval = 0.1

[exporter:loki]
type = loki
url = {loki_url}
{loki_keys}
"""
    )
    return cfg


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.upstream = FakeUpstream(reactor)
        self.upstream_port = self.upstream.listen()
        self.loki = FakeLoki()
        self.running_loki: Any = None
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = treq.client.HTTPClient(Agent(reactor, pool=self.pool))  # type: ignore[attr-defined]
        self.procs: list[tuple[DaemonProtocol, Any]] = []

    def start_loki(self) -> str:
        self.running_loki = listen_fake_loki(self.loki)
        return str(self.running_loki.url)

    async def stop_loki(self) -> None:
        if self.running_loki is not None:
            await self.running_loki.stop()
            self.running_loki = None

    async def start_daemon(self, cfg: Path) -> int:
        proc, transport = spawn(cfg)
        self.procs.append((proc, transport))
        proxy_port, _admin = await proc.ready.addTimeout(30, reactor)
        return int(proxy_port)

    async def chat(self, port: int, n: int, headers: dict[str, str] | None = None) -> list[str]:
        ids = []
        for i in range(n):
            resp = await self.client.post(
                f"http://127.0.0.1:{port}/openai/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i}"}]},
                headers=headers or {},
            )
            await resp.content()
            assert resp.code == 200
            ids.append(resp.headers.getRawHeaders(b"x-llmproxy-request-id")[0].decode())
        return ids

    def loki_ids(self, log_type: str) -> list[str]:
        return [e.json()["request_id"] for e in self.loki.entries({"log_type": log_type})]

    async def close(self) -> None:
        for proc, transport in self.procs:
            if not proc.ended.called:
                kill(transport)
                await proc.ended
        await self.pool.closeCachedConnections()
        await self.stop_loki()
        await self.upstream.stop()


@pytest.fixture
def env(tmp_path: Path) -> Any:
    e = Env(tmp_path)
    yield e
    pytest_twisted.blockon(defer.ensureDeferred(e.close()))


def spooled_events(state: Path, name: str) -> list[dict[str, Any]]:
    out = []
    # Finished segments only: a ".tmp-" file is a write in progress, not yet spooled.
    for seg in sorted((state / "spool" / name).glob("[0-9]*.jsonl")):
        out.extend(json.loads(line) for line in seg.read_text().splitlines() if line.strip())
    return out


@pytest_twisted.ensureDeferred
async def test_sink_outage_then_recovery_delivers_every_event(env: Env) -> None:
    url = env.start_loki()
    env.loki.fail_next(*([503] * 6))
    port = await env.start_daemon(write_config(env.tmp_path, env.upstream_port, url))
    ids = await env.chat(port, 40)
    await wait_until(lambda: len(env.loki_ids("response")) >= 40)
    assert sorted(set(env.loki_ids("request"))) == sorted(ids)
    assert sorted(set(env.loki_ids("response"))) == sorted(ids)
    assert env.loki.pending_script == 0  # the outage really happened
    # The file sink, unaffected by Loki's outage, has them all too.
    events = env.tmp_path / "state" / "events.jsonl"
    await wait_until(lambda: events.exists() and len(events.read_text().splitlines()) >= 80)
    lines = [json.loads(x) for x in events.read_text().splitlines()]
    assert sorted({x["request_id"] for x in lines if x["type"] == "response"}) == sorted(ids)


@pytest_twisted.ensureDeferred
async def test_restart_while_sink_is_down_replays_the_spool(env: Env) -> None:
    # Loki is not even listening: connections are refused.
    url = "http://127.0.0.1:1"
    cfg = write_config(env.tmp_path, env.upstream_port, url, loki="max_retries = 1\n")
    port = await env.start_daemon(cfg)
    ids = await env.chat(port, 15)
    proc, transport = env.procs[-1]
    terminate(transport)
    await proc.ended.addTimeout(30, reactor)
    assert proc.clean_stop
    spooled = spooled_events(env.tmp_path / "state", "loki")
    assert sorted({e["request_id"] for e in spooled if e["type"] == "response"}) == sorted(ids)
    # Loki comes back on a real port; the daemon restarts pointing at it.
    url = env.start_loki()
    cfg = write_config(env.tmp_path, env.upstream_port, url, loki="max_retries = 1\n")
    await env.start_daemon(cfg)
    # The start-up log says what it found, before anything is replayed.
    restarted, _ = env.procs[-1]
    assert b"exporter loki: %d events recovered from the spool" % len(spooled) in restarted.output
    await wait_until(lambda: len(set(env.loki_ids("response"))) >= 15)
    assert sorted(set(env.loki_ids("response"))) == sorted(ids)
    assert sorted(set(env.loki_ids("request"))) == sorted(ids)
    await wait_until(lambda: spooled_events(env.tmp_path / "state", "loki") == [])


@pytest_twisted.ensureDeferred
async def test_kill_9_while_sink_is_down_keeps_what_was_spooled(env: Env) -> None:
    cfg = write_config(
        env.tmp_path, env.upstream_port, "http://127.0.0.1:1", loki="max_retries = 0\n"
    )
    port = await env.start_daemon(cfg)
    await env.chat(port, 10)
    state = env.tmp_path / "state"
    await wait_until(lambda: len(spooled_events(state, "loki")) >= 20)
    before = {(e["type"], e["request_id"]) for e in spooled_events(state, "loki")}
    proc, transport = env.procs[-1]
    kill(transport)
    await proc.ended.addTimeout(30, reactor)
    url = env.start_loki()
    await env.start_daemon(
        write_config(env.tmp_path, env.upstream_port, url, loki="max_retries = 0\n")
    )
    await wait_until(
        lambda: before <= {(e.json()["type"], e.json()["request_id"]) for e in env.loki.entries()}
    )


@pytest_twisted.ensureDeferred
async def test_sigterm_with_a_stuck_sink_spools_everything_by_the_deadline(env: Env) -> None:
    url = env.start_loki()
    env.loki.fail_next(*([Hang()] * 50))
    drain = 2.0
    cfg = write_config(
        env.tmp_path, env.upstream_port, url, drain=drain, loki="timeout = 30\nbatch_size = 5\n"
    )
    port = await env.start_daemon(cfg)
    ids = await env.chat(port, 12)
    await wait_until(lambda: env.loki.hung >= 1)
    proc, transport = env.procs[-1]
    terminate(transport)
    t0 = reactor.seconds()  # type: ignore[attr-defined]
    await proc.ended.addTimeout(30, reactor)
    assert proc.clean_stop, proc.output.decode(errors="replace")
    assert proc.ended_at is not None and proc.ended_at - t0 < drain + 1.5
    spooled = spooled_events(env.tmp_path / "state", "loki")
    assert sorted(e["request_id"] for e in spooled if e["type"] == "response") == sorted(ids)
    assert sorted(e["request_id"] for e in spooled if e["type"] == "request") == sorted(ids)
    assert env.loki.entries() == []


@pytest_twisted.ensureDeferred
async def test_canary_secrets_never_reach_a_sink_or_the_log(env: Env) -> None:
    url = env.start_loki()
    port = await env.start_daemon(write_config(env.tmp_path, env.upstream_port, url))
    headers = {
        "Authorization": f"Bearer {CANARY_KEY}",
        "x-api-key": CANARY_ANTHROPIC,
        "Cookie": CANARY_COOKIE,
    }
    await env.chat(port, 3, headers=headers)
    # The upstream did get the credentials (passthrough auth forwards them).
    assert env.upstream.requests[-1]["headers"]["authorization"] == [f"Bearer {CANARY_KEY}"]
    await wait_until(lambda: len(env.loki_ids("response")) >= 3)
    events = env.tmp_path / "state" / "events.jsonl"
    await wait_until(lambda: events.exists() and len(events.read_text().splitlines()) >= 6)
    proc, transport = env.procs[-1]
    terminate(transport)
    await proc.ended.addTimeout(30, reactor)
    loki_text = "\n".join(e.line for e in env.loki.entries())
    file_text = events.read_text()
    outputs = {"loki": loki_text, "file": file_text, "log": proc.output.decode(errors="replace")}
    for state_file in (env.tmp_path / "state").rglob("*"):
        if state_file.is_file():
            outputs[str(state_file)] = state_file.read_text(errors="replace")
    for secret in (CANARY_KEY, CANARY_ANTHROPIC, CANARY_COOKIE):
        core = secret.split("CANARY", 1)[1][:12]
        for where, text in outputs.items():
            assert "CANARY" + core not in text, (secret, where)
    # The headers are there, masked.
    first = next(e for e in map(json.loads, file_text.splitlines()) if e["type"] == "request")
    assert first["request_headers"]["authorization"].startswith("Bearer sk-proj-")
    assert first["request_headers"]["authorization"].endswith("XYZW")
