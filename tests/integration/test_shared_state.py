"""``[state] store = redis`` end to end: two independent daemons (twistd, each
``workers = 2``, each its own state_dir and ports) on one real redis-server behave
as one proxy: a quota is exact over all four workers, one rate bucket per token, a
token revoked with the CLI is refused by both, a conversation whose turns
alternate between the daemons is one session (and an edit sent to the other one
forks it), and Redis killed and restarted under load leaves them answering by
the configured policy and recovering on their own
(llmproxy/state/, llmproxy/access/shared.py, llmproxy/capture/sessions.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task, threads
from twisted.web.client import Agent, HTTPConnectionPool

from tests.fakes.upstream import FakeUpstream
from tests.integration.daemon import BIN, DaemonProtocol, kill, spawn, terminate
from tests.integration.harness import wait_until
from tests.integration.redis_server import RedisServer, running_redis

pytestmark = pytest.mark.integration

UPSTREAM_KEY = "sk-proj-SHAREDstate0123456789abcdefWXYZ"


def config(directory: Path, upstream_port: int, redis_url: str, extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "llmproxy.ini"
    path.write_text(
        f"""
[server]
listen = tcp:0:interface=127.0.0.1
admin_listen = tcp:0:interface=127.0.0.1
state_dir = {directory / "state"}
drain_timeout = 3
workers = 2

[route:secure]
prefix = /secure
upstream = http://127.0.0.1:{upstream_port}
provider = openai
auth = token
api_key = {UPSTREAM_KEY}

[route:open]
prefix = /open
upstream = http://127.0.0.1:{upstream_port}
provider = openai

[state]
store = redis

[redis]
url = {redis_url}

[exporter:sessions]
type = sessions
flush_interval = 0.05
{extra}
"""
    )
    return path


class Daemon:
    def __init__(self, cfg: Path) -> None:
        self.cfg = cfg
        self.proc: DaemonProtocol
        self.transport: Any = None
        self.base = self.admin = ""

    async def start(self) -> None:
        self.proc, self.transport = spawn(self.cfg)
        proxy_port, admin_port = await self.proc.ready.addTimeout(60, reactor)
        await self.proc.wait_for(b"llmproxy ready: 2 workers serving").addTimeout(60, reactor)
        self.base = f"http://127.0.0.1:{proxy_port}"
        self.admin = f"http://127.0.0.1:{admin_port}"

    @property
    def state_dir(self) -> Path:
        return self.cfg.parent / "state"

    async def stop(self) -> None:
        if self.transport is not None and not self.proc.ended.called:
            terminate(self.transport)
            try:
                await self.proc.ended.addTimeout(30, reactor)
            except defer.TimeoutError:
                kill(self.transport)
                await self.proc.ended


class Setup:
    """A redis-server, an upstream, two daemons, a client opening a connection
    per request (so the kernel spreads them over each daemon's workers)."""

    def __init__(self, tmp_path: Path, redis: RedisServer) -> None:
        self.tmp_path = tmp_path
        self.redis = redis
        self.upstream = FakeUpstream(reactor)
        self.port = self.upstream.listen()
        self.daemons = [
            Daemon(config(tmp_path / name, self.port, redis.url)) for name in ("a", "b")
        ]
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = treq.client.HTTPClient(Agent(reactor, pool=self.pool))  # type: ignore[attr-defined]

    async def start(self) -> None:
        await defer.gatherResults([defer.ensureDeferred(d.start()) for d in self.daemons])

    async def close(self) -> None:
        for d in self.daemons:
            await d.stop()
        await self.pool.closeCachedConnections()
        await self.upstream.stop()

    async def cli(self, *args: str) -> str:
        """``llmproxy token ...`` against daemon a's config; its stdout."""
        argv = [str(BIN / "llmproxy"), "token", *args, "--config", str(self.daemons[0].cfg)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")}
        done = await threads.deferToThread(
            subprocess.run, argv, capture_output=True, text=True, env=env, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return str(done.stdout)

    async def post(
        self, daemon: Daemon, path: str, body: dict[str, Any], secret: str | None = None
    ) -> tuple[int, bytes, Any]:
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers["Authorization"] = f"Bearer {secret}"
        response = await self.client.post(
            daemon.base + path, data=json.dumps(body).encode(), headers=headers
        )
        return response.code, await response.content(), response.headers

    def upstream_calls(self, path: bytes) -> int:
        return sum(1 for r in self.upstream.requests if r["uri"] == path)


@pytest_twisted.async_yield_fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    with running_redis(tmp_path / "redis", persistent=True) as redis:
        s = Setup(tmp_path, redis)
        try:
            await s.start()
            yield s
        finally:
            await s.close()


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


# -- tokens ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_quota_is_exact_over_two_daemons_of_two_workers(setup: Setup) -> None:
    secret = (await setup.cli("create", "--project", "p", "--max-requests", "50")).strip()
    a, b = setup.daemons
    answers = await defer.gatherResults(
        [
            defer.ensureDeferred(
                setup.post(a if n % 2 else b, "/secure/v1/chat/completions", CHAT, secret)
            )
            for n in range(200)
        ]
    )
    codes = [code for code, _, _ in answers]
    assert codes.count(200) == 50 and codes.count(403) == 150, sorted(set(codes))
    assert setup.upstream_calls(b"/v1/chat/completions") == 50
    # Each daemon's two workers took part (requests spread over four processes).
    for daemon in setup.daemons:
        stats = json.loads(await (await setup.client.get(daemon.admin + "/stats")).content())
        served = [w["proxy"]["requests_total"] for w in stats["workers"].values()]
        assert all(n > 0 for n in served), served
    listed = await setup.cli("list", "--json")
    (row,) = json.loads(listed)
    assert row["used"] == 50 and row["max_requests"] == 50


@pytest_twisted.ensureDeferred
async def test_one_rate_bucket_per_token_over_every_worker(setup: Setup) -> None:
    # 2 a minute: a burst of 2, then one every 30 s (longer than this test).
    secret = (await setup.cli("create", "--project", "p", "--rpm", "2")).strip()
    a, b = setup.daemons
    answers = await defer.gatherResults(
        [
            defer.ensureDeferred(
                setup.post(a if n % 2 else b, "/secure/v1/chat/completions", CHAT, secret)
            )
            for n in range(16)
        ]
    )
    codes = [code for code, _, _ in answers]
    assert codes.count(200) == 2 and codes.count(429) == 14, codes
    retry_after = {h.getRawHeaders(b"retry-after")[0] for code, _, h in answers if code == 429}
    assert retry_after <= {b"30", b"29"}


@pytest_twisted.ensureDeferred
async def test_a_token_revoked_with_the_cli_is_refused_by_both(setup: Setup) -> None:
    secret = (await setup.cli("create", "--project", "p")).strip()
    token_id = json.loads(await setup.cli("list", "--json"))[0]["id"]

    async def codes(daemon: Daemon, n: int = 6) -> set[int]:
        asked = [setup.post(daemon, "/secure/v1/chat/completions", CHAT, secret) for _ in range(n)]
        return {
            code
            for code, _, _ in await defer.gatherResults([defer.ensureDeferred(x) for x in asked])
        }

    for daemon in setup.daemons:
        await wait_until_async(lambda d=daemon: codes(d), {200}, "the new token is served")
    await setup.cli("revoke", token_id)
    for daemon in setup.daemons:
        await wait_until_async(lambda d=daemon: codes(d), {401}, "the revoked token is refused")


async def wait_until_async(ask: Any, want: set[int], what: str, timeout: float = 10.0) -> None:
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while (got := await ask()) != want:
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"{what}: got {got}")
        await task.deferLater(reactor, 0.05, lambda: None)


# -- sessions --------------------------------------------------------------------------


def session_entries(daemons: list[Daemon]) -> list[dict[str, Any]]:
    entries = []
    for daemon in daemons:
        for path in daemon.state_dir.glob("worker-*/sessions/**/*.jsonl"):
            entries += [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(entries, key=lambda e: (e["ts_ns"], e["type"] != "session_start"))


@pytest_twisted.ensureDeferred
async def test_a_conversation_alternating_between_daemons_is_one_session(setup: Setup) -> None:
    a, b = setup.daemons
    messages: list[dict[str, Any]] = []
    history_after: list[list[dict[str, Any]]] = []
    for turn in range(5):
        messages.append({"role": "user", "content": f"question {turn + 1}"})
        body = {"model": "gpt-4o-mini", "messages": messages}
        code, raw, _ = await setup.post((a, b)[turn % 2], "/open/v1/chat/completions", body)
        assert code == 200
        messages.append(json.loads(raw)["choices"][0]["message"])
        history_after.append(list(messages))
    # An edit of the third question, sent to the daemon that did not serve turn 5 (a).
    edited = history_after[1] + [{"role": "user", "content": "question 3, asked differently"}]
    code, _, _ = await setup.post(
        b, "/open/v1/chat/completions", {"model": "m", "messages": edited}
    )
    assert code == 200
    for daemon in setup.daemons:
        await daemon.stop()  # drained: every session entry written
    entries = session_entries(setup.daemons)
    sessions = {e["session_id"] for e in entries}
    assert len(sessions) == 2, sessions
    starts = [e for e in entries if e["type"] == "session_start"]
    (start,) = starts
    main = start["session_id"]
    turns = [e for e in entries if e["session_id"] == main and e["type"] == "request"]
    assert [e["seq"] for e in turns] == [1, 2, 3, 4, 5]
    responses = [e for e in entries if e["session_id"] == main and e["type"] == "response"]
    assert sorted(e["seq"] for e in responses) == [1, 2, 3, 4, 5]
    (fork,) = [e for e in entries if e["type"] == "fork"]
    assert fork["parent_session"] == main and fork["from_seq"] == 2 and fork["seq"] == 3
    (forked,) = [
        e for e in entries if e["session_id"] == fork["session_id"] and e["type"] == "request"
    ]
    assert forked["seq"] == 3


# -- Redis goes away under load ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_killed_and_restarted_under_load(setup: Setup) -> None:
    secret = (await setup.cli("create", "--project", "p", "--max-requests", "100000")).strip()
    a, b = setup.daemons
    codes: list[int] = []
    running = [True]

    async def load(daemon: Daemon) -> None:
        while running[0]:
            code, _, _ = await setup.post(daemon, "/secure/v1/chat/completions", CHAT, secret)
            codes.append(code)

    loaders = [defer.ensureDeferred(load(d)) for d in (a, b) for _ in range(4)]
    await wait_until(lambda: codes.count(200) >= 50, what="load under way")
    process = setup.redis.process
    assert process is not None
    process.send_signal(signal.SIGKILL)
    process.wait()
    setup.redis.process = None
    await wait_until(lambda: codes.count(503) >= 20, what="503 while Redis is down")
    served_while_down = codes.count(200)
    setup.redis.start()  # same port, its append-only file: the counts are back
    await wait_until(lambda: codes.count(200) >= served_while_down + 50, what="recovered")
    running[0] = False
    await defer.gatherResults(loaders)
    # fail_closed: refused, never let through uncounted; nothing else went wrong.
    assert set(codes) == {200, 503}, sorted(set(codes))
    assert setup.upstream_calls(b"/v1/chat/completions") == codes.count(200)
    # Counted in Redis: every request let through, plus those whose admission
    # Redis made (and wrote to its append-only file) but whose answer the kill
    # lost: refused with 503, at most one per loader. Never fewer.
    (row,) = json.loads(await setup.cli("list", "--json"))
    assert codes.count(200) <= row["used"] <= codes.count(200) + len(loaders)
    for daemon in (a, b):
        stats = json.loads(await (await setup.client.get(daemon.admin + "/stats")).content())
        assert stats["worker_restarts"] == 0 and stats["workers_up"] == 2
        output = daemon.proc.output
        assert b"shared state (access): Redis unavailable" in output
        assert b"shared state (access): Redis answers again" in output


# -- the token commands against Redis --------------------------------------------------


def _token_command(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "llmproxy"), "token", *args, "--config", str(cfg)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)


@pytest_twisted.ensureDeferred
async def test_token_commands_import_the_file_and_say_what_went_wrong(tmp_path: Path) -> None:
    with running_redis(tmp_path / "redis") as redis:
        cfg = config(tmp_path / "p", 1, redis.url)
        # A token created with store = local, before the switch to Redis.
        local = cfg.parent / "local.ini"
        local.write_text(cfg.read_text().replace("store = redis", "store = local"))
        created = await threads.deferToThread(
            _token_command, local, "create", "--project", "old", "--max-requests", "5"
        )
        assert created.returncode == 0, created.stderr
        listed = await threads.deferToThread(_token_command, cfg, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        (row,) = json.loads(listed.stdout)
        assert (row["project"], row["state"], row["max_requests"]) == ("old", "active", 5)
        assert redis.command("HLEN", "llmproxy:state:tokens") == 1
        unknown = await threads.deferToThread(_token_command, cfg, "revoke", "tok_000000000000")
        assert unknown.returncode == 1 and "no token with id tok_000000000000" in unknown.stderr
        revoked = await threads.deferToThread(_token_command, cfg, "revoke", row["id"])
        assert revoked.returncode == 0 and "revoked" in revoked.stdout
        again = await threads.deferToThread(_token_command, cfg, "revoke", row["id"])
        assert again.returncode == 0 and "already revoked" in again.stdout
        # The file still says active: the import never lifts a revocation.
        (row,) = json.loads(
            (await threads.deferToThread(_token_command, cfg, "list", "--json")).stdout
        )
        assert row["state"] == "revoked"
        audit = [
            json.loads(line)
            for line in (cfg.parent / "state" / "audit.jsonl").read_text().splitlines()
        ]
        assert [a["action"] for a in audit] == ["token_created", "token_revoked"]
    # Redis gone: one clear line, exit 1, no traceback.
    down = await threads.deferToThread(_token_command, cfg, "list")
    assert down.returncode == 1
    assert "does not answer" in down.stderr and "Traceback" not in down.stderr
