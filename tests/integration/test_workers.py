"""`[server] workers = 2` against the real daemon (twistd): one port served by two
processes, stats and metrics summed, a killed worker restarted, SIGTERM drains
every worker, no orphans, per-worker sink files reopened on SIGHUP
(llmproxy/runtime/supervisor.py, llmproxy/runtime/worker.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool

from tests.fakes.upstream import FakeUpstream
from tests.integration.daemon import (
    BIN,
    DaemonProtocol,
    SocketActivated,
    kill,
    spawn,
    terminate,
    write_config,
)
from tests.integration.harness import Collect, raw_request, wait_until
from tests.integration.stats_jq import run_documented_jq

pytestmark = pytest.mark.integration


def _config(
    tmp_path: Path, upstream_port: int, *, drain: float = 3.0, server: str = "", extra: str = ""
) -> Path:
    exporter = f"""
[exporter:events]
type = file
path = {tmp_path / "out" / "events.jsonl"}
flush_interval = 0.1
"""
    return write_config(
        tmp_path,
        upstream_port,
        drain=drain,
        server=f"workers = 2\n{server}",
        extra=exporter + extra,
    )


class Daemon:
    """The daemon with two workers, an upstream and an HTTP client."""

    def __init__(
        self, tmp_path: Path, drain: float = 3.0, server: str = "", extra: str = ""
    ) -> None:
        self.upstream = FakeUpstream(reactor)
        port = self.upstream.listen()
        self.cfg = _config(tmp_path, port, drain=drain, server=server, extra=extra)
        self.proc: DaemonProtocol
        self.transport: Any = None
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)
        self.client = treq.client.HTTPClient(self.agent)  # type: ignore[attr-defined]
        self.base = self.admin = ""

    async def start(self) -> None:
        self.proc, self.transport = spawn(self.cfg)
        proxy_port, admin_port = await self.proc.ready.addTimeout(60, reactor)
        await self.proc.wait_for(b"llmproxy ready: 2 workers serving").addTimeout(60, reactor)
        self.base = f"http://127.0.0.1:{proxy_port}"
        self.admin = f"http://127.0.0.1:{admin_port}"

    async def chat(self, n: int, concurrency: int = 10) -> list[str]:
        """``n`` chat completions, each on a new connection; their request ids."""
        ids: list[str] = []
        for start in range(0, n, concurrency):
            batch = [
                self.client.post(self.base + "/v1/chat/completions", json={"n": i})
                for i in range(start, min(n, start + concurrency))
            ]
            for resp in await defer.gatherResults(batch):
                assert resp.code == 200
                await resp.content()
                ids.append(resp.headers.getRawHeaders(b"x-llmproxy-request-id")[0].decode())
        return ids

    async def stats(self) -> dict[str, Any]:
        resp = await self.client.get(self.admin + "/stats")
        assert resp.code == 200
        return dict(await resp.json())

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        resp = await self.client.get(self.admin + "/metrics")
        assert resp.code == 200
        text = (await resp.content()).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    async def stop(self) -> None:
        if self.transport is not None and not self.proc.ended.called:
            kill(self.transport)
            await self.proc.ended
        await self.pool.closeCachedConnections()
        await self.upstream.stop()


def _requests_total(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return sum(v for (name, _), v in metrics.items() if name == "llmproxy_requests_total")


def _gone(pid: int) -> bool:
    """The process has exited (a zombie no one reaped yet counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return "\nState:\tZ" in status


@pytest_twisted.ensureDeferred
async def test_two_workers_serve_one_port_and_the_admin_sums_them(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    try:
        await d.start()
        ids = await d.chat(64)
        stats = await d.stats()
        workers = stats["workers"]
        assert set(workers) == {"0", "1"}
        pids = {w["pid"] for w in workers.values()}
        assert len(pids) == 2 and d.transport.pid not in pids
        served = [w["proxy"]["requests_total"] for w in workers.values()]
        # SO_REUSEPORT spreads new connections over both workers.
        assert all(n > 0 for n in served), served
        assert sum(served) == 64
        assert stats["total"]["proxy"]["requests_total"] == 64
        assert stats["total"]["proxy"]["routes"]["root"]["requests"] == 64
        assert stats["workers_up"] == 2 and stats["ready"] is True
        # The documented jq reads the sums (it broke on the master's document).
        summary = run_documented_jq(stats)
        assert set(summary) == {"events"}
        assert set(summary["events"]) == {
            "sent", "spooled", "dropped", "failing", "last_error", "last_error_at"
        }  # fmt: skip
        metrics = await d.metrics()
        assert _requests_total(metrics) == 64
        key = ("llmproxy_request_duration_seconds_count", (("route", "root"),))
        assert metrics[key] == 64
        for i in ("0", "1"):
            assert metrics[("llmproxy_worker_up", (("worker", i),))] == 1
            assert metrics[("llmproxy_worker_restarts_total", (("worker", i),))] == 0
        # Each worker has its own state directory and admin socket.
        state = tmp_path / "state"
        assert (state / "worker-0").is_dir() and (state / "worker-1").is_dir()
        assert (state / "run" / "worker-0.sock").is_socket()

        terminate(d.transport)
        await d.proc.ended.addTimeout(30, reactor)
        assert d.proc.clean_stop, d.proc.output.decode(errors="replace")
        assert all(_gone(pid) for pid in pids)
        # The file sink's absolute path became one file per worker; together
        # they hold every exchange once.
        files = sorted((tmp_path / "out").glob("events*.jsonl"))
        assert [f.name for f in files] == ["events.worker-0.jsonl", "events.worker-1.jsonl"]
        seen: list[str] = []
        for f in files:
            lines = [json.loads(x) for x in f.read_text().splitlines()]
            mine = [x["request_id"] for x in lines if x["type"] == "response"]
            assert mine, f"{f.name} holds no exchange"
            seen += mine
        assert sorted(seen) == sorted(ids)
    finally:
        await d.stop()


@pytest_twisted.ensureDeferred
async def test_a_killed_worker_is_restarted_and_its_counts_are_kept(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    try:
        await d.start()
        await d.chat(20)
        before = await d.metrics()
        assert _requests_total(before) == 20
        victim = (await d.stats())["workers"]["0"]["pid"]
        os.kill(victim, signal.SIGKILL)
        needle = f"worker 0 (pid {victim}) exited (signal 9), restarting".encode()
        await d.proc.wait_for(needle).addTimeout(30, reactor)
        await wait_until(lambda: d.proc.output.count(b"worker 0 ready (pid") == 2, what="restart")
        assert _gone(victim)
        stats = await d.stats()
        assert stats["workers"]["0"]["pid"] not in (None, victim)
        assert stats["workers"]["0"]["restarts"] == 1
        assert stats["workers"]["1"]["restarts"] == 0
        assert stats["workers_up"] == 2
        await d.chat(20)
        after = await d.metrics()
        assert after[("llmproxy_worker_restarts_total", (("worker", "0"),))] == 1
        assert after[("llmproxy_worker_restarts_total", (("worker", "1"),))] == 0
        # The dead worker's requests stay counted: the sum never goes backwards.
        assert _requests_total(after) == 40
        # A worker that does not answer is reported down, not as an error, and
        # counts with its last answer.
        frozen = (await d.stats())["workers"]["1"]
        os.kill(frozen["pid"], signal.SIGSTOP)
        try:
            stats = await d.stats()
            metrics = await d.metrics()
        finally:
            os.kill(frozen["pid"], signal.SIGCONT)
        assert stats["workers"]["1"]["up"] is False and "proxy" not in stats["workers"]["1"]
        assert stats["workers"]["0"]["up"] is True and stats["workers_up"] == 1
        assert stats["total"]["proxy"] == stats["workers"]["0"]["proxy"]
        assert metrics[("llmproxy_worker_up", (("worker", "1"),))] == 0
        assert metrics[("llmproxy_worker_up", (("worker", "0"),))] == 1
        assert _requests_total(metrics) == 40
        needle = b"worker 1 (pid %d) did not answer /stats" % frozen["pid"]
        await d.proc.wait_for(needle).addTimeout(10, reactor)
    finally:
        terminate(d.transport)
        await d.proc.ended.addTimeout(30, reactor)
        await d.stop()


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_every_worker_by_the_deadline(tmp_path: Path) -> None:
    drain = 3.0
    d = Daemon(tmp_path, drain=drain)
    try:
        await d.start()
        pids = [w["pid"] for w in (await d.stats())["workers"].values()]
        shorts, longs = [], []
        # Several streams of each kind, on their own connections: both workers get some.
        for _ in range(4):
            short, long = Collect(), Collect()
            (await raw_request(d.agent, b"GET", d.base + "/sse?n=8&gap=0.1")).deliverBody(short)
            (await raw_request(d.agent, b"GET", d.base + "/sse?n=10000&gap=0.05")).deliverBody(long)
            shorts.append(short)
            longs.append(long)
        stats = await d.stats()
        assert stats["total"]["proxy"]["open_streams"] == 8
        terminate(d.transport)
        t_term = reactor.seconds()  # type: ignore[attr-defined]
        for c in shorts:
            await c.done.addTimeout(10, reactor)
            assert c.complete and c.body.count(b"data:") == 8
        for c in longs:
            await c.done.addTimeout(10, reactor)
            assert not c.complete
        await d.proc.ended.addTimeout(drain + 10, reactor)
        assert d.proc.clean_stop, d.proc.output.decode(errors="replace")
        assert d.proc.ended_at is not None
        assert d.proc.ended_at - t_term < drain + 1.5, d.proc.ended_at - t_term
        assert d.proc.output.count(b"drained in") == 3  # two workers and the master
        assert all(_gone(pid) for pid in pids)
    finally:
        await d.stop()


@pytest_twisted.ensureDeferred
async def test_a_worker_that_does_not_stop_by_the_deadline_is_killed(tmp_path: Path) -> None:
    drain = 2.0
    d = Daemon(tmp_path, drain=drain)
    try:
        await d.start()
        workers = (await d.stats())["workers"]
        stuck, other = workers["0"]["pid"], workers["1"]["pid"]
        os.kill(stuck, signal.SIGSTOP)  # it will not hear SIGTERM, let alone drain
        terminate(d.transport)
        t_term = reactor.seconds()  # type: ignore[attr-defined]
        await d.proc.ended.addTimeout(drain + 10, reactor)
        assert d.proc.ended_at is not None
        assert d.proc.ended_at - t_term < drain + 3.5, d.proc.ended_at - t_term
        needle = b"worker 0 (pid %d) did not stop by the deadline: killed" % stuck
        assert needle in d.proc.output, d.proc.output.decode(errors="replace")
        await wait_until(lambda: _gone(stuck) and _gone(other), what="both workers gone")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck, signal.SIGCONT)
        await d.stop()


@pytest_twisted.ensureDeferred
async def test_workers_stop_when_the_master_is_killed(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    try:
        await d.start()
        pids = [w["pid"] for w in (await d.stats())["workers"].values()]
        assert all(not _gone(pid) for pid in pids)
        kill(d.transport)
        await d.proc.ended.addTimeout(30, reactor)
        await wait_until(lambda: all(_gone(pid) for pid in pids), what="workers exit")
    finally:
        await d.stop()


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_every_worker_and_refuses_a_bad_file(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    try:
        await d.start()
        good = d.cfg.read_text()
        d.cfg.write_text(good + "\n[route:broken]\nprefix = nope\nupstream = ftp://x\n")
        d.transport.signalProcess("HUP")
        await d.proc.wait_for(b"reload refused").addTimeout(30, reactor)
        assert b"route:broken.prefix: must start with '/'" in d.proc.output
        # A good change reaches both workers.
        d.cfg.write_text(good.replace("drain_timeout = 3.0", "drain_timeout = 4.0"))
        d.transport.signalProcess("HUP")
        await wait_until(lambda: d.proc.output.count(b"config reloaded from") == 2, what="reloads")
        assert b"[worker-0#info] config reloaded from" in d.proc.output
        assert b"[worker-1#info] config reloaded from" in d.proc.output
        audit = (tmp_path / "state" / "audit.jsonl").read_text().splitlines()
        outcomes = [json.loads(x)["outcome"] for x in audit if "config_reload" in x]
        assert sorted(outcomes) == ["applied", "applied", "refused"]
        assert len(await d.chat(4)) == 4
    finally:
        if d.transport is not None:
            terminate(d.transport)
            await d.proc.ended.addTimeout(30, reactor)
        await d.stop()


@pytest_twisted.ensureDeferred
async def test_sighup_has_every_worker_reopen_its_moved_event_file(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    out = tmp_path / "out"

    def responses() -> list[str]:
        return [
            json.loads(x)["request_id"]
            for f in out.glob("events.worker-*.jsonl*")
            for x in f.read_text().splitlines()
            if json.loads(x)["type"] == "response"
        ]

    try:
        await d.start()
        before = await d.chat(32)
        await wait_until(lambda: sorted(responses()) == sorted(before), what="first events")
        files = sorted(out.glob("events.worker-*.jsonl"))
        assert len(files) == 2  # both workers served some
        for f in files:
            f.rename(f.with_name(f.name + ".1"))  # logrotate
        d.transport.signalProcess("HUP")  # postrotate
        await wait_until(lambda: d.proc.output.count(b"(SIGHUP)") == 2, what="both reopened")
        for i in ("0", "1"):
            assert f"[worker-{i}#info] file sink events: reopening".encode() in d.proc.output
        after = await d.chat(32)
        await wait_until(lambda: len(responses()) == 64, what="every event")
        assert sorted(responses()) == sorted(before + after)  # each exactly once
        rotated = sorted(out.glob("events.worker-*.jsonl.1"))
        assert [f.name for f in rotated] == [f.name + ".1" for f in files]
    finally:
        if d.transport is not None:
            terminate(d.transport)
            await d.proc.ended.addTimeout(30, reactor)
        await d.stop()


@pytest_twisted.ensureDeferred
async def test_cache_purge_reaches_every_worker(tmp_path: Path) -> None:
    d = Daemon(tmp_path, server="admin_token = s3cret-admin", extra="[cache]\nenabled = true\n")
    auth = {"Authorization": "Bearer s3cret-admin"}
    try:
        await d.start()
        for i in range(16):  # distinct keys, new connections: both workers cache some
            resp = await d.client.get(d.base + f"/cacheable?cc=max-age%3D60&i={i}")
            assert resp.code == 200
            await resp.content()
        resp = await d.client.get(d.admin + "/stats", headers=auth)
        stats = await resp.json()
        per_worker = [w["cache"]["stores"] for w in stats["workers"].values()]
        assert sum(per_worker) == 16 and stats["total"]["cache"]["stores"] == 16
        denied = await d.client.post(d.admin + "/cache/purge?all=1")
        assert denied.code == 401
        await denied.content()
        resp = await d.client.post(d.admin + "/cache/purge?all=1", headers=auth)
        assert resp.code == 200
        assert await resp.json() == {"purged": 16}
    finally:
        if d.transport is not None:
            terminate(d.transport)
            await d.proc.ended.addTimeout(30, reactor)
        await d.stop()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("auto", None),
        ("3", None),
        ("0", "server.workers: must be at least 1"),
        ("many", "server.workers: not a number of processes or auto: 'many'"),
    ],
)
def test_check_config_on_workers(tmp_path: Path, value: str, problem: str | None) -> None:
    cfg = tmp_path / "w.ini"
    cfg.write_text(f"[server]\nworkers = {value}\nstate_dir = {tmp_path}\n")
    res = subprocess.run(
        [str(BIN / "llmproxy"), "check-config", str(cfg)], capture_output=True, text=True
    )
    if problem is None:
        assert res.returncode == 0, res.stderr
    else:
        assert res.returncode == 64
        assert any(line.startswith(problem) for line in res.stderr.splitlines()), res.stderr


@pytest_twisted.ensureDeferred
async def test_socket_activation_shares_one_socket_and_only_the_master_notifies(
    tmp_path: Path,
) -> None:
    upstream = FakeUpstream(reactor)
    upstream_port = upstream.listen()
    daemon = SocketActivated(tmp_path, upstream_port, "workers = 2")
    port, notes, proc, transport = daemon.port, daemon.notes, daemon.proc, daemon.transport
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))  # type: ignore[attr-defined]
    try:
        ports = await proc.ready.addTimeout(60, reactor)
        assert ports[0] == port
        await notes.wait_for(b"READY=1").addTimeout(60, reactor)
        await proc.wait_for(b"llmproxy ready: 2 workers serving").addTimeout(60, reactor)
        for _ in range(20):
            resp = await client.get(f"http://127.0.0.1:{port}/status/200")
            await resp.content()
            assert resp.code == 200
        assert len(upstream.requests) == 20
        resp = await client.get(f"http://127.0.0.1:{ports[1]}/stats")
        stats = await resp.json()
        assert stats["total"]["proxy"]["requests_total"] == 20
        assert stats["workers_up"] == 2
        terminate(transport)
        await notes.wait_for(b"STOPPING=1").addTimeout(10, reactor)
        await proc.ended.addTimeout(30, reactor)
        assert proc.clean_stop, proc.output.decode(errors="replace")
        # Only the master talks to systemd.
        assert [m for m in notes.messages if b"READY=1" in m] == [b"READY=1"]
        assert [m for m in notes.messages if b"STOPPING=1" in m] == [b"STOPPING=1"]
    finally:
        await daemon.close()
        await pool.closeCachedConnections()
        await upstream.stop()
