"""``[state] store = redis`` end to end: two independent daemons (twistd, each
``workers = 2``, each its own state_dir and ports) on one real redis-server behave
as one proxy: a quota is exact over all four workers (also when two of them are
killed with requests in flight), one rate bucket per token, a token revoked with
the CLI is refused by both (within a second: the poll's timing is proven on a
Clock in tests/unit/access/test_shared.py), a conversation whose turns alternate
between the daemons, each sent as soon as the previous reply is read (before the
proxy has recorded it), is one session (and an edit sent to the other one forks
it), identical misses of every worker make one upstream call with the Redis
cache store, and Redis killed and restarted under load leaves them answering by
the configured policy (fail_closed: 503; fail_open: let through and counted once
Redis is back), logging one line per worker and part when it goes and one when
it is back, and recovering on their own
(llmproxy/state/, llmproxy/access/shared.py, llmproxy/capture/sessions.py,
llmproxy/cache/cache.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections import defaultdict
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


def config(
    directory: Path, upstream_port: int, redis_url: str, extra: str = "", state: str = ""
) -> Path:
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
# Five turns sent back to back, each before the reply it continues from is
# recorded, chain their waits (a turn's reply is recorded once the turn is
# decided): more than the default 1 s on a loaded machine.
continuation_wait = 5
{state}

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

    def __init__(
        self, tmp_path: Path, redis: RedisServer, extra: str = "", state: str = ""
    ) -> None:
        self.tmp_path = tmp_path
        self.redis = redis
        self.upstream = FakeUpstream(reactor)
        self.port = self.upstream.listen()
        self.daemons = [
            Daemon(
                config(tmp_path / name, self.port, redis.url, extra.format(port=self.port), state)
            )
            for name in ("a", "b")
        ]
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = treq.client.HTTPClient(Agent(reactor, pool=self.pool))  # type: ignore[attr-defined]

    async def burst(self, n: int, secret: str) -> list[Any]:
        """``n`` concurrent chats with ``secret``, alternating between the daemons."""
        a, b = self.daemons
        return await defer.gatherResults(  # type: ignore[no-any-return]
            [
                defer.ensureDeferred(
                    self.post(a if i % 2 else b, "/secure/v1/chat/completions", CHAT, secret)
                )
                for i in range(n)
            ]
        )

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


@pytest_twisted.async_yield_fixture
async def fail_open(tmp_path: Path) -> AsyncIterator[Setup]:
    """As ``setup``, with ``[state] on_unavailable = fail_open``."""
    with running_redis(tmp_path / "redis", persistent=True) as redis:
        s = Setup(tmp_path, redis, state="on_unavailable = fail_open")
        try:
            await s.start()
            yield s
        finally:
            await s.close()


CACHED_ROUTE = """
[cache]
enabled = true
store = redis
lock_timeout = 30

[route:cached]
prefix = /cached
upstream = http://127.0.0.1:{port}
cache = on
"""


@pytest_twisted.async_yield_fixture
async def cached(tmp_path: Path) -> AsyncIterator[Setup]:
    """As ``setup``, with a route cached in Redis (``[cache] store = redis``)."""
    with running_redis(tmp_path / "redis") as redis:
        s = Setup(tmp_path, redis, extra=CACHED_ROUTE)
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
    answers = await setup.burst(200, secret)
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
async def test_requests_of_a_worker_killed_mid_request_stay_counted(setup: Setup) -> None:
    secret = (await setup.cli("create", "--project", "p", "--max-requests", "10")).strip()
    a = setup.daemons[0]
    headers = {"Authorization": f"Bearer {secret}"}
    hanging = [
        defer.ensureDeferred(setup.client.get(a.base + "/secure/hang", headers=headers))
        for _ in range(6)
    ]
    await wait_until(lambda: setup.upstream_calls(b"/hang") == 6, what="six requests upstream")
    stats = json.loads(await (await setup.client.get(a.admin + "/stats")).content())
    pids = [w["pid"] for w in stats["workers"].values()]
    for pid in pids:  # both of a's workers die with their requests in flight
        os.kill(pid, signal.SIGKILL)
    results = await defer.DeferredList(hanging, consumeErrors=True)
    assert not any(ok for ok, _ in results)  # every client saw its connection go

    async def restarted() -> bool:
        raw = await (await setup.client.get(a.admin + "/stats")).content()
        now = json.loads(raw)
        return bool(now["workers_up"] == 2 and now["worker_restarts"] == 2)

    await wait_until_async(lambda: restarted(), True, "a's workers restarted")
    # The six were counted when let through: four are left, for every process.
    answers = await setup.burst(20, secret)
    codes = [code for code, _, _ in answers]
    assert codes.count(200) == 4 and codes.count(403) == 16, codes
    assert setup.upstream_calls(b"/v1/chat/completions") == 4
    (row,) = json.loads(await setup.cli("list", "--json"))
    assert row["used"] == 10


@pytest_twisted.ensureDeferred
async def test_one_rate_bucket_per_token_over_every_worker(setup: Setup) -> None:
    # 2 a minute: a burst of 2, then one every 30 s (longer than this test).
    secret = (await setup.cli("create", "--project", "p", "--rpm", "2")).strip()
    answers = await setup.burst(16, secret)
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


async def wait_until_async(ask: Any, want: object, what: str, timeout: float = 10.0) -> None:
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while (got := await ask()) != want:
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"{what}: got {got}")
        await task.deferLater(reactor, 0.05, lambda: None)


# -- sessions --------------------------------------------------------------------------


def recorded_states(setup: Setup) -> int:
    """How many conversation states the shared session state holds."""
    return len(setup.redis.command("KEYS", "*sessions:s:*"))


def session_entries(daemons: list[Daemon]) -> list[dict[str, Any]]:
    entries = []
    for daemon in daemons:
        for path in daemon.state_dir.glob("worker-*/sessions/**/*.jsonl"):
            entries += [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(entries, key=lambda e: (e["ts_ns"], e["type"] != "session_start"))


# The upstream sends a streamed reply whole, [DONE] included, and ends the
# stream this much later: the client has its reply and sends the next turn at
# once, while the proxy records the reply's state only once the stream has
# ended (docs/workers.md, "Sessions are continuous").
END_AFTER = 0.3


async def streamed_turn(
    setup: Setup, daemon: Daemon, messages: list[dict[str, Any]]
) -> tuple[str, defer.Deferred[None]]:
    """A streamed chat turn on the open route: the reply's text as soon as its
    ``[DONE]`` is read, and a Deferred for the end of the response."""
    body = {"model": "gpt-4o-mini", "messages": messages, "stream": True}
    response = await setup.client.post(
        f"{daemon.base}/open/v1/chat/completions?end_after={END_AFTER}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert response.code == 200
    received: list[bytes] = []
    done: defer.Deferred[bytes] = defer.Deferred()

    def read(data: bytes) -> None:
        received.append(data)
        seen = b"".join(received)
        if b"data: [DONE]" in seen and not done.called:
            done.callback(seen)

    ended = treq.collect(response, read)
    seen = await done.addTimeout(30, reactor)
    text = ""
    for line in seen.splitlines():
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                text += choice["delta"].get("content") or ""
    return text, ended


@pytest_twisted.ensureDeferred
async def test_a_conversation_alternating_between_daemons_is_one_session(setup: Setup) -> None:
    a, b = setup.daemons
    messages: list[dict[str, Any]] = []
    history_after: list[list[dict[str, Any]]] = []
    streams: list[defer.Deferred[None]] = []
    for turn in range(5):
        messages.append({"role": "user", "content": f"question {turn + 1}"})
        # Each turn goes to the other daemon as soon as the previous reply is
        # read, before that reply's stream has ended: its state is not in Redis
        # yet when the turn is first looked up there.
        text, ended = await streamed_turn(setup, (a, b)[turn % 2], list(messages))
        streams.append(ended)
        messages.append({"role": "assistant", "content": text})
        history_after.append(list(messages))
    await defer.gatherResults(streams)
    # Every turn decided and its reply recorded (after the turn before it).
    await wait_until(lambda: recorded_states(setup) == 5, what="five replies recorded")
    # An edit of the third question, sent to the daemon that did not serve turn 5 (a).
    edited = history_after[1] + [{"role": "user", "content": "question 3, asked differently"}]
    _, ended = await streamed_turn(setup, b, edited)
    await ended
    await wait_until(lambda: recorded_states(setup) == 6, what="the edit's reply recorded")
    # Turns 2 to 5 each reached Redis before the turn they continue from was
    # recorded there, and waited for it.
    waited = 0
    for daemon in setup.daemons:
        stats = json.loads(await (await setup.client.get(daemon.admin + "/stats")).content())
        for worker in stats["workers"].values():
            waited += worker["sessions"]["continuations_waited"]
            assert worker["sessions"]["continuations_not_found"] == 0
    assert waited >= 4, waited
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
    refusals: list[tuple[bytes, Any]] = []
    open_codes: list[int] = []
    running = [True]

    async def load(daemon: Daemon) -> None:
        while running[0]:
            code, raw, headers = await setup.post(
                daemon, "/secure/v1/chat/completions", CHAT, secret
            )
            codes.append(code)
            if code == 503:
                refusals.append((raw, headers))

    async def converse_all_along(daemon: Daemon) -> None:
        """Conversations on the open route (no token): their sessions use the
        shared state while Redis is down too."""
        while running[0]:
            code, _, _ = await setup.post(daemon, "/open/v1/chat/completions", CHAT)
            open_codes.append(code)

    loaders = [defer.ensureDeferred(load(d)) for d in (a, b) for _ in range(4)]
    loaders += [defer.ensureDeferred(converse_all_along(d)) for d in (a, b) for _ in range(2)]
    await wait_until(lambda: codes.count(200) >= 50, what="load under way")
    process = setup.redis.process
    assert process is not None
    process.send_signal(signal.SIGKILL)
    process.wait()
    setup.redis.process = None
    await wait_until(lambda: codes.count(503) >= 20, what="503 while Redis is down")
    at_outage = len(open_codes)
    await wait_until(lambda: len(open_codes) >= at_outage + 20, what="conversations meanwhile")
    # An OpenAI-shaped JSON error that says why, and when to try again.
    raw, headers = refusals[-1]
    error = json.loads(raw)["error"]
    assert "shared state (Redis) does not answer" in error["message"]
    assert headers.getRawHeaders(b"retry-after") == [b"1"]
    assert headers.getRawHeaders(b"content-type")[0].startswith(b"application/json")
    served_while_down = codes.count(200)
    setup.redis.start()  # same port, its append-only file: the counts are back
    await wait_until(lambda: codes.count(200) >= served_while_down + 50, what="recovered")
    # A part is back with its first operation that succeeds: for sessions, the
    # first conversation a worker serves after the outage.
    await wait_until_async(lambda: parts_down(setup), [], "every part answered again")
    running[0] = False
    await defer.gatherResults(loaders)
    # fail_closed: refused, never let through uncounted; nothing else went wrong.
    assert set(codes) == {200, 503}, sorted(set(codes))
    assert set(open_codes) == {200}, sorted(set(open_codes))
    assert setup.upstream_calls(b"/v1/chat/completions") == codes.count(200) + len(open_codes)
    # Counted in Redis: every request let through, plus those whose admission
    # Redis made (and wrote to its append-only file) but whose answer the kill
    # lost: refused with 503, at most one per loader. Never fewer.
    (row,) = json.loads(await setup.cli("list", "--json"))
    assert codes.count(200) <= row["used"] <= codes.count(200) + len(loaders)
    for daemon in (a, b):
        stats = json.loads(await (await setup.client.get(daemon.admin + "/stats")).content())
        assert stats["worker_restarts"] == 0 and stats["workers_up"] == 2
    # One outage, one line when it began and one when it ended, in each worker
    # process and for each part of the shared state it used: never a line per
    # request (hundreds were refused or decided locally meanwhile).
    sessions_seen = 0
    for daemon in (a, b):
        lines = transitions(daemon.proc.output)
        for worker in ("worker-0", "worker-1"):
            assert lines[worker, "access"] == ["unavailable", "answers again"], lines
            # A worker whose conversations met the outage (most do, not all).
            sessions = lines[worker, "sessions"]
            assert sessions in ([], ["unavailable", "answers again"]), lines
            sessions_seen += bool(sessions)
        assert set(lines) <= {(w, p) for w in ("worker-0", "worker-1") for p in PARTS_USED}
    assert sessions_seen >= 1


async def parts_down(setup: Setup) -> list[tuple[str, str, str]]:
    """(daemon's admin, worker, part) of every part of the shared state a worker
    sees as not answering."""
    down = []
    for daemon in setup.daemons:
        stats = json.loads(await (await setup.client.get(daemon.admin + "/stats")).content())
        for worker, doc in stats["workers"].items():
            for part in PARTS_USED:
                if not doc["state"].get(part, {"connected": 1})["connected"]:
                    down.append((daemon.admin, worker, part))
    return down


# The parts of the shared state these daemons use (no Redis cache store: no coalescing).
PARTS_USED = ("access", "sessions")
_TRANSITION = re.compile(
    rb"\[(worker-\d+)#\w+\] shared state \((\w+)\): Redis (unavailable|answers again)"
)


def transitions(output: bytes) -> defaultdict[tuple[str, str], list[str]]:
    """(worker, part) -> the shared state's transitions it logged, in order."""
    found: defaultdict[tuple[str, str], list[str]] = defaultdict(list)
    for worker, part, what in _TRANSITION.findall(output):
        found[worker.decode(), part.decode()].append(what.decode())
    return found


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
        # A token made with store = redis keeps its allowlists there.
        made = await threads.deferToThread(
            _token_command,
            cfg,
            "create",
            "--project",
            "new",
            "--allow-path",
            "/v1/chat/completions",
            "--allow-method",
            "post",
        )
        assert made.returncode == 0, made.stderr
        rows = json.loads(
            (await threads.deferToThread(_token_command, cfg, "list", "--json")).stdout
        )
        (new,) = [r for r in rows if r["project"] == "new"]
        assert (new["allowed_paths"], new["allowed_methods"]) == (
            ["/v1/chat/completions"],
            ["POST"],
        )
        assert redis.command("HLEN", "llmproxy:state:tokens") == 2
    # Redis gone: one clear line, exit 1, no traceback.
    down = await threads.deferToThread(_token_command, cfg, "list")
    assert down.returncode == 1
    assert "does not answer" in down.stderr and "Traceback" not in down.stderr


# -- fail_open: requests pass while Redis is away, counted once it is back --------------


@pytest_twisted.ensureDeferred
async def test_fail_open_under_a_redis_outage(fail_open: Setup) -> None:
    setup = fail_open
    secret = (await setup.cli("create", "--project", "p", "--max-requests", "100000")).strip()
    a, b = setup.daemons
    codes: list[int] = []
    running = [True]

    async def load(daemon: Daemon) -> None:
        while running[0]:
            code, _, _ = await setup.post(daemon, "/secure/v1/chat/completions", CHAT, secret)
            codes.append(code)

    def logged(line: bytes) -> bool:
        return all(line in d.proc.output for d in (a, b))

    loaders = [defer.ensureDeferred(load(d)) for d in (a, b) for _ in range(4)]
    await wait_until(lambda: codes.count(200) >= 50, what="load under way")
    process = setup.redis.process
    assert process is not None
    process.send_signal(signal.SIGKILL)
    process.wait()
    setup.redis.process = None
    await wait_until(
        lambda: logged(b"shared state (access): Redis unavailable"), what="the outage seen"
    )
    at_outage = len(codes)
    # fail_open: the token routes go on (on the token set last read) ...
    await wait_until(lambda: len(codes) >= at_outage + 100, what="served while Redis is down")
    # ... and so do conversations, their sessions decided by each process meanwhile.
    conversation = await converse(setup, [a, b], "during the outage", turns=3)
    assert conversation == [200, 200, 200]
    served_while_down = len(codes)
    setup.redis.start()  # same port, its append-only file: the counts are back
    await wait_until(
        lambda: logged(b"shared state (access): Redis answers again"), what="recovered"
    )
    await wait_until(lambda: len(codes) >= served_while_down + 50, what="served after")
    running[0] = False
    await defer.gatherResults(loaders)
    assert set(codes) == {200}, sorted(set(codes))
    assert setup.upstream_calls(b"/v1/chat/completions") == len(codes) + 3

    # What passed while Redis was away is added to the shared count once it is
    # back (every second): all of it, and at most one more per loader (an
    # admission Redis made whose answer the kill lost, then let through).
    async def used() -> int:
        (row,) = json.loads(await setup.cli("list", "--json"))
        return int(row["used"])

    deadline = reactor.seconds() + 20  # type: ignore[attr-defined]
    while (counted := await used()) < len(codes):
        assert reactor.seconds() < deadline, f"counted {counted} of {len(codes)}"  # type: ignore[attr-defined]
        await task.deferLater(reactor, 0.2, lambda: None)
    assert counted <= len(codes) + len(loaders)
    # Sessions recovered too, without a restart: a conversation alternating
    # between the daemons is one session again.
    assert await converse(setup, [a, b], "after the outage", turns=5) == [200] * 5
    for daemon in (a, b):
        stats = json.loads(await (await setup.client.get(daemon.admin + "/stats")).content())
        assert stats["worker_restarts"] == 0 and stats["workers_up"] == 2
        state = stats["total"]["state"]["access"]
        assert state["connected"] == 1 and state["outages"] >= 1
        assert state.get("unavailable_admitted", 0) > 0 and "unavailable_refused" not in state
    for daemon in (a, b):
        await daemon.stop()
    after = [e for e in session_entries(setup.daemons) if e.get("model") == "after the outage"]
    assert len({e["session_id"] for e in after}) == 1
    assert sorted(e["seq"] for e in after if e["type"] == "request") == [1, 2, 3, 4, 5]


async def converse(setup: Setup, daemons: list[Daemon], model: str, turns: int) -> list[int]:
    """A conversation on the open route whose turns alternate between ``daemons``;
    each turn's status."""
    messages: list[dict[str, Any]] = []
    codes = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"{model}: question {turn + 1}"})
        code, raw, _ = await setup.post(
            daemons[turn % len(daemons)],
            "/open/v1/chat/completions",
            {"model": model, "messages": messages},
        )
        codes.append(code)
        if code == 200:
            messages.append(json.loads(raw)["choices"][0]["message"])
    return codes


# -- the response cache in Redis: one upstream call for the misses of every process -----


@pytest_twisted.ensureDeferred
async def test_identical_misses_on_four_workers_of_two_daemons_make_one_upstream_call(
    cached: Setup,
) -> None:
    setup = cached
    path = "/cached/cacheable?cc=max-age%3D60&hold=1"
    answers = [
        defer.ensureDeferred(setup.client.get(setup.daemons[n % 2].base + path)) for n in range(50)
    ]

    async def cache_stats() -> list[dict[str, Any]]:
        out = []
        for daemon in setup.daemons:
            raw = await (await setup.client.get(daemon.admin + "/stats")).content()
            out += [w["cache"] for w in json.loads(raw)["workers"].values()]
        return out

    # One request upstream; every other one waits: on its own process's leader,
    # or (a process's leader) on the lock another process holds.
    deadline = reactor.seconds() + 30  # type: ignore[attr-defined]
    while True:
        workers = await cache_stats()
        local = sum(w["waiting"] for w in workers)
        remote = sum(w["remote_waits"] for w in workers)
        if len(setup.upstream.held) == 1 and local + remote == 49:
            break
        assert reactor.seconds() < deadline, (len(setup.upstream.held), local, remote)  # type: ignore[attr-defined]
        await task.deferLater(reactor, 0.05, lambda: None)
    assert remote >= 1  # another process waited on the lock, not only the leader's own
    assert setup.upstream.release_held() == 1
    responses = await defer.gatherResults(answers)
    bodies = {await r.content() for r in responses}
    assert {r.code for r in responses} == {200} and len(bodies) == 1
    assert setup.upstream.cacheable_served == 1
    marks = sorted(r.headers.getRawHeaders(b"x-proxy-cache")[0] for r in responses)
    assert marks == [b"hit"] * 49 + [b"stored"]
    workers = await cache_stats()
    assert sum(w["remote_hits"] for w in workers) == remote
