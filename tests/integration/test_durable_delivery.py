"""The delivery engine's promises at the edges, through the real daemon (twistd
subprocess): ``kill -9`` in the middle of an outage of Loki or of Redis loses at
most the last ``spool_interval``; a full disk loses nothing while memory has room.

Load is sent at a steady rate, one exchange at a time; each exchange's end is
noted on the test's clock.  After the kill, only exchanges that ended within the
last ``spool_interval`` (plus a slack for the reactor turn that publishes them
and the write's thread) may be missing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.web.client import Agent, HTTPConnectionPool

from tests.fakes.loki import FakeLoki, listen_fake_loki
from tests.fakes.upstream import FakeUpstream
from tests.integration.daemon import BIN, DaemonProtocol, kill
from tests.integration.harness import wait_until
from tests.integration.redis_server import RedisServer, running_redis, stream_events

pytestmark = pytest.mark.integration

SPOOL_INTERVAL = 1.0
SLACK = 1.0  # the publishing turn, the write in its thread, a loaded machine


def config(tmp_path: Path, upstream_port: int, sink: str, server: str = "") -> Path:
    cfg = tmp_path / "llmproxy.ini"
    cfg.write_text(
        f"""
[server]
listen = tcp:0:interface=127.0.0.1
admin_listen = tcp:0:interface=127.0.0.1
state_dir = {tmp_path / "state"}
drain_timeout = 5
{server}

[sessions]
enabled = false

[route:openai]
prefix = /openai
upstream = http://127.0.0.1:{upstream_port}
provider = openai

{sink}
"""
    )
    return cfg


def loki_sink(url: str) -> str:
    # Default retries and backoff: during a long outage a batch sits in its
    # backoff in memory, which is what the durable writes must cover.
    return f"""
[exporter:loki]
type = loki
url = {url}
flush_interval = 0.1
batch_size = 20
spool_interval = {SPOOL_INTERVAL}
timeout = 2
"""


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.upstream = FakeUpstream(reactor)
        self.upstream_port = self.upstream.listen()
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = treq.client.HTTPClient(Agent(reactor, pool=self.pool))  # type: ignore[attr-defined]
        self.procs: list[tuple[DaemonProtocol, Any]] = []
        self.ended: list[tuple[str, float]] = []  # (request id, when its exchange ended)
        self.running_loki: Any = None

    def spawn(self, cfg: Path, wrapper: list[str] | None = None) -> tuple[DaemonProtocol, Any]:
        proc = DaemonProtocol()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")}
        twistd = [str(BIN / "twistd"), "-n", "--pidfile=", "-l", "-", "llmproxy"]
        argv = [*(wrapper or []), *twistd, "--config", str(cfg)]
        transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            proc, argv[0], argv, env=env, path=str(cfg.parent)
        )
        self.procs.append((proc, transport))
        return proc, transport

    async def start(self, cfg: Path, wrapper: list[str] | None = None) -> tuple[int, int]:
        proc, _ = self.spawn(cfg, wrapper)
        ports = await proc.ready.addTimeout(30, reactor)
        return int(ports[0]), int(ports[1])

    async def exchange(self, port: int) -> str:
        resp = await self.client.post(
            f"http://127.0.0.1:{port}/openai/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        )
        await resp.content()
        assert resp.code == 200
        request_id: str = resp.headers.getRawHeaders(b"x-llmproxy-request-id")[0].decode()
        self.ended.append((request_id, reactor.seconds()))  # type: ignore[attr-defined]
        return request_id

    async def steady(self, port: int, seconds: float, rate: float) -> None:
        """One exchange every 1/rate seconds for ``seconds`` (sequential)."""
        deadline = reactor.seconds() + seconds  # type: ignore[attr-defined]
        while reactor.seconds() < deadline:  # type: ignore[attr-defined]
            await self.exchange(port)
            await task.deferLater(reactor, 1.0 / rate, lambda: None)

    def must_have_survived(self, killed_at: float) -> set[str]:
        return {rid for rid, t in self.ended if t < killed_at - SPOOL_INTERVAL - SLACK}

    async def stats(self, admin_port: int) -> dict[str, Any]:
        resp = await self.client.get(f"http://127.0.0.1:{admin_port}/stats")
        stats: dict[str, Any] = json.loads(await resp.content())
        return stats

    async def kill_last(self) -> float:
        proc, transport = self.procs[-1]
        kill(transport)
        killed_at: float = reactor.seconds()  # type: ignore[attr-defined]
        await proc.ended.addTimeout(30, reactor)
        return killed_at

    async def close(self) -> None:
        for proc, transport in self.procs:
            if not proc.ended.called:
                kill(transport)
                await proc.ended
        await self.pool.closeCachedConnections()
        if self.running_loki is not None:
            await self.running_loki.stop()
        await self.upstream.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    pytest_twisted.blockon(defer.ensureDeferred(r.close()))


def loki_events(loki: FakeLoki) -> list[tuple[str, str]]:
    return [(e.json()["type"], e.json()["request_id"]) for e in loki.entries()]


@pytest_twisted.ensureDeferred
async def test_kill_9_during_a_30_second_loki_outage_loses_at_most_the_last_interval(
    rig: Rig,
) -> None:
    loki = FakeLoki()
    rig.running_loki = listen_fake_loki(loki)
    loki.outage(503)
    cfg = config(rig.tmp_path, rig.upstream_port, loki_sink(rig.running_loki.url))
    port, admin = await rig.start(cfg)
    await rig.steady(port, seconds=30.0, rate=20)
    stats = (await rig.stats(admin))["exporters"]["loki"]
    assert stats["sent"] == 0 and stats["failing"]  # the outage held throughout
    assert stats["retries"] >= 1  # a batch waited out backoffs in memory meanwhile
    killed_at = await rig.kill_last()
    survivors = rig.must_have_survived(killed_at)
    assert len(survivors) > 400  # 30 s at 20/s, less the last interval
    loki.outage(None)
    await rig.start(cfg)
    want = {(kind, rid) for rid in survivors for kind in ("request", "response")}
    await wait_until(
        lambda: want <= set(loki_events(loki)), timeout=60, what="every durable event delivered"
    )
    delivered = loki_events(loki)
    # Nothing was delivered before the kill: nothing is delivered twice.
    assert len(delivered) == len(set(delivered))
    assert loki.duplicates_dropped == 0


@pytest_twisted.ensureDeferred
async def test_a_full_disk_keeps_events_in_memory_and_loses_none(rig: Rig) -> None:
    """The Loki spool sits on a 256 KiB tmpfs that a filler file makes full (the
    daemon runs in a mount namespace of its own, ``unshare --mount``)."""
    loki = FakeLoki()
    rig.running_loki = listen_fake_loki(loki)
    loki.outage(503)
    spool = rig.tmp_path / "state" / "spool" / "loki"
    spool.mkdir(parents=True)
    cfg = config(rig.tmp_path, rig.upstream_port, loki_sink(rig.running_loki.url))
    filler = spool / ".filler"
    script = (
        f"mount -t tmpfs -o size=256k tmpfs {spool} && "
        f'(head -c 400000 /dev/zero > {filler} 2>/dev/null; true) && exec "$@"'
    )
    userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    wrapper = ["/usr/bin/unshare", *userns, "--mount", "/bin/sh", "-c", script, "sh"]
    port, admin = await rig.start(cfg, wrapper)
    pid = rig.procs[-1][1].pid
    for _ in range(30):
        await rig.exchange(port)

    async def loki_stats() -> dict[str, Any]:
        stats: dict[str, Any] = (await rig.stats(admin))["exporters"]["loki"]
        return stats

    seen: dict[str, Any] = {}

    async def refused() -> bool:
        seen.update(await loki_stats())
        return bool(seen["spool_write_errors"] >= 2 and seen["accepted"] == 60)

    await _wait_async(refused, "the full disk refused spool writes")
    assert seen["dropped"] == 0, seen
    assert seen["spooled"] == 0 and seen["queued"] + seen["in_flight"] == 60
    # Room again (seen from inside the daemon's mount namespace).
    Path(f"/proc/{pid}/root{filler}").unlink()

    async def on_disk() -> bool:
        seen.update(await loki_stats())
        return bool(seen["spooled"] > 0)

    await _wait_async(on_disk, "the spool written once the disk had room")
    loki.outage(None)
    await wait_until(lambda: len(set(loki_events(loki))) == 60, timeout=60, what="all delivered")
    final = await loki_stats()
    assert final["dropped"] == 0 and final["sent"] == 60


@pytest_twisted.ensureDeferred
async def test_kill_9_while_redis_is_down_loses_at_most_the_last_interval(rig: Rig) -> None:
    with running_redis(rig.tmp_path / "redis") as redis:
        sink = (
            f"[events]\nbus = redis\n[redis]\nurl = {redis.url}\nstream = events\n"
            f"spool_interval = {SPOOL_INTERVAL}\nflush_interval = 0.1\n"
        )
        cfg = config(rig.tmp_path, rig.upstream_port, sink)
        port, admin = await rig.start(cfg)
        before = [await rig.exchange(port) for _ in range(5)]
        await wait_until(lambda: _stream_ids(redis) >= set(before), what="events in the stream")
        redis.stop()
        await rig.steady(port, seconds=10.0, rate=20)
        bus = (await rig.stats(admin))["bus"]
        assert bus["connected"] is False and bus["dropped"] == 0
        killed_at = await rig.kill_last()
        survivors = rig.must_have_survived(killed_at)
        assert len(survivors) > 100
        redis.start()  # same port, empty: the stream is rebuilt from the spools
        await rig.start(cfg)
        await wait_until(
            lambda: _stream_ids(redis) >= survivors - set(before),
            timeout=60,
            what="every durable event in the stream",
        )
        kinds = _stream_kinds(redis)
        for rid in survivors - set(before):
            assert kinds[rid] == {"request", "response"}


def _stream_ids(redis: RedisServer) -> set[str]:
    return {e["request_id"] for e in stream_events(redis, "events") if "request_id" in e}


def _stream_kinds(redis: RedisServer) -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = {}
    for e in stream_events(redis, "events"):
        if "request_id" in e:
            kinds.setdefault(e["request_id"], set()).add(e["type"])
    return kinds


async def _wait_async(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while not await check():
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"{what} not met within {timeout}s")
        await task.deferLater(reactor, 0.1, lambda: None)
