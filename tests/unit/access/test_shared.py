"""Token access with ``[state] store = redis``: the same answers as one process,
one count and one bucket for every process, a token set seen everywhere on the
next poll, the tokens.json of a setup switched to Redis kept, and the policy
while Redis does not answer.  A real redis-server; the policy's time is a Clock
(llmproxy/access/shared.py, llmproxy/access/policy.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from llmproxy.access.decision import Allow, Deny
from llmproxy.access.policy import TokenAccess, build_access
from llmproxy.access.shared import (
    POLL_INTERVAL,
    START_GRACE,
    SharedTokenStore,
    rate_key,
    token_to_registry,
)
from llmproxy.access.tokens import Token, TokenFile, UsageFile
from llmproxy.capture.record import ExchangeRecord
from llmproxy.config.model import (
    PassthroughSettings,
    ServerSettings,
    Settings,
    StateSettings,
)
from llmproxy.http.router import Router, Target
from llmproxy.state import SharedState
from tests.integration.redis_server import RedisServer, running_redis
from tests.unit.access.test_policy import ROUTES, FakeAudit
from tests.unit.state.conftest import connect, started

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def redis_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(Path(tmp_path_factory.mktemp("redis"))) as server:
        yield server


@pytest.fixture
def redis(redis_module: RedisServer) -> RedisServer:
    redis_module.command("FLUSHALL")
    return redis_module


@attrs.define
class Proxy:
    """One proxy process's access policy over the shared state."""

    clock: Clock
    audit: FakeAudit
    state: SharedState
    access: TokenAccess
    state_dir: Path
    router: Router = attrs.Factory(lambda: Router(ROUTES, PassthroughSettings()))

    def check(
        self, secret: str | None, path: bytes = b"/secure/v1/chat/completions"
    ) -> Allow | Deny | defer.Deferred[Allow | Deny]:
        request = DummyRequest([b""])
        request.method = b"POST"
        request.client = IPv4Address("TCP", "10.1.2.3", 5555)
        if secret is not None:
            request.requestHeaders.addRawHeader(b"authorization", f"Bearer {secret}".encode())
        target = self.router.resolve(path)
        assert isinstance(target, Target)
        record = ExchangeRecord(
            request_id="req-1",
            started_at=self.clock.seconds(),
            method="POST",
            path="/secure/v1/chat/completions",
            query="",
            route=target.route,
            provider=target.provider,
            upstream_url="",
            upstream_host="",
            client_addr="",
            request_headers=[],
        )
        return self.access.check(request, target, record)

    async def ask(
        self, secret: str | None, path: bytes = b"/secure/v1/chat/completions"
    ) -> Allow | Deny:
        return await defer.maybeDeferred(self.check, secret, path)

    async def stop(self) -> None:
        await self.access.stop(1.0)
        await self.state.stop(1.0)


class Cluster:
    """Proxies sharing one Redis, each with its own state directory."""

    def __init__(self, redis: RedisServer, tmp_path: Path) -> None:
        self.redis = redis
        self.tmp_path = tmp_path
        self.clock = Clock()
        self.clock.advance(NOW)
        self.proxies: list[Proxy] = []
        self.stores: list[SharedState] = []

    async def proxy(self, fail_open: bool = False, *, wait: bool = True) -> Proxy:
        state_dir = self.tmp_path / f"proxy-{len(self.proxies)}"
        settings = Settings(
            server=ServerSettings(state_dir=state_dir),
            routes=ROUTES,
            state=StateSettings(
                store="redis", on_unavailable="fail_open" if fail_open else "fail_closed"
            ),
        )
        state = connect(self.redis)
        if wait:
            await started(state)
        else:
            state.start()
        audit = FakeAudit()
        access = build_access(settings, audit, self.clock, shared=state)
        access.start()
        if wait:
            await access.reload()
        proxy = Proxy(self.clock, audit, state, access, state_dir)
        self.proxies.append(proxy)
        return proxy

    async def store(self) -> SharedTokenStore:
        state = connect(self.redis)
        await started(state)
        self.stores.append(state)
        return SharedTokenStore(state, TokenFile.in_state_dir(self.tmp_path / "cli"))

    async def create(self, **kw: Any) -> tuple[str, Token]:
        store = await self.store()
        return await store.create("proj-x", self.clock.seconds(), **kw)

    async def refresh(self) -> None:
        """Every proxy's next poll (the clock moves one poll interval)."""
        self.clock.advance(POLL_INTERVAL)
        for proxy in self.proxies:
            await proxy.access.reload()

    async def close(self) -> None:
        for proxy in self.proxies:
            await proxy.stop()
        for state in self.stores:
            await state.stop(1.0)
        self.stores.clear()


@pytest_twisted.async_yield_fixture
async def cluster(redis: RedisServer, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(redis, tmp_path)
    yield c
    await c.close()


def denied(decision: Allow | Deny, status: int) -> Deny:
    assert isinstance(decision, Deny), decision
    assert decision.status == status, decision
    return decision


# -- the same answers as one process -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_new_token_is_usable_at_once_everywhere(cluster: Cluster) -> None:
    a, b = await cluster.proxy(), await cluster.proxy()
    secret, _ = await cluster.create()
    # Not polled yet: an unknown token reads the shared set again before a 401.
    pending = a.check(secret)
    assert isinstance(pending, defer.Deferred)
    assert isinstance(await pending, Allow)
    assert isinstance(await b.ask(secret), Allow)
    assert a.access.stats()["tokens"] == 1
    assert isinstance(a.check(secret), Allow)  # known now: no round trip


@pytest_twisted.ensureDeferred
async def test_an_unknown_token_is_401_after_one_more_read(cluster: Cluster) -> None:
    a = await cluster.proxy()
    reloads = a.access.stats()["reloads"]
    d = denied(await a.ask("llmp_" + "B" * 43), 401)
    assert d.message == "invalid proxy token"
    assert a.audit.lines[-1]["reason"] == "unknown"
    assert a.access.stats()["reloads"] == reloads  # nothing changed: nothing reloaded


@pytest_twisted.ensureDeferred
async def test_a_revoked_token_is_refused_everywhere_on_the_next_poll(cluster: Cluster) -> None:
    a, b = await cluster.proxy(), await cluster.proxy()
    secret, token = await cluster.create()
    await cluster.refresh()
    assert isinstance(await b.ask(secret), Allow)
    store = await cluster.store()
    revoked, changed = await store.revoke(token.id, cluster.clock.seconds())
    assert changed and revoked.revoked is not None
    assert (await store.revoke(token.id, cluster.clock.seconds()))[1] is False
    # Every process polls every POLL_INTERVAL (0.5 s): refused within a second.
    await cluster.refresh()
    for proxy in (a, b):
        assert denied(await proxy.ask(secret), 401).message == "proxy token revoked"
        assert proxy.audit.actions()[-2:] == ["tokens_reloaded", "auth_failed"]


@pytest_twisted.ensureDeferred
async def test_a_revocation_reaches_every_process_within_a_second_by_its_own_polls(
    cluster: Cluster,
) -> None:
    a, b = await cluster.proxy(), await cluster.proxy()
    secret, token = await cluster.create()
    await cluster.refresh()
    assert all([isinstance(await p.ask(secret), Allow) for p in (a, b)])
    before = [p.access.stats()["reloads"] for p in (a, b)]
    store = await cluster.store()
    await store.revoke(token.id, cluster.clock.seconds())
    # Nobody asks for a reload: each process's poll, on its clock, half a second on.
    assert POLL_INTERVAL <= 0.5
    cluster.clock.advance(POLL_INTERVAL)
    await until(
        lambda: all(p.access.stats()["reloads"] > n for p, n in zip((a, b), before, strict=True))
    )
    for proxy in (a, b):
        assert denied(await proxy.ask(secret), 401).message == "proxy token revoked"


async def until(predicate: Any, bound: float = 10.0) -> None:
    """Wait (on the real reactor: Redis answers there) for what the clock set off."""
    deadline = reactor.seconds() + bound  # type: ignore[attr-defined]
    while not predicate():
        assert reactor.seconds() < deadline, "not within the bound"  # type: ignore[attr-defined]
        await task.deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_the_poll_runs_on_the_clock(cluster: Cluster) -> None:
    a = await cluster.proxy()
    secret, _ = await cluster.create()
    before = a.access.stats()["reloads"]
    cluster.clock.advance(POLL_INTERVAL)  # the LoopingCall polls on its own
    while a.access.stats()["reloads"] == before:
        await a.access.reload()
    assert isinstance(await a.ask(secret), Allow)


@pytest_twisted.ensureDeferred
async def test_a_tokens_allowlists_travel_through_redis_and_hold_everywhere(
    cluster: Cluster,
) -> None:
    a, b = await cluster.proxy(), await cluster.proxy()
    secret, token = await cluster.create(
        max_requests=5, allowed_paths=("/v1/chat/completions",), allowed_methods=("POST",)
    )
    await cluster.refresh()
    store = await cluster.store()
    (listed,), _ = await store.list(cluster.clock.seconds())
    assert (listed.allowed_paths, listed.allowed_methods) == (
        ("/v1/chat/completions",),
        ("POST",),
    )
    for proxy in (a, b):
        assert isinstance(await proxy.ask(secret), Allow)
        refused = denied(await proxy.ask(secret, b"/secure/v1/embeddings"), 403)
        assert "may not use the path" in refused.message
    # A refusal by the allowlist spends nothing of the quota.
    _, used = await store.list(cluster.clock.seconds())
    assert used == {token.id: 2}


@pytest_twisted.ensureDeferred
async def test_a_quota_is_exact_across_processes(cluster: Cluster) -> None:
    a, b = await cluster.proxy(), await cluster.proxy()
    secret, token = await cluster.create(max_requests=5)
    await cluster.refresh()
    answers = await defer.gatherResults([defer.ensureDeferred(p.ask(secret)) for p in (a, b) * 10])
    assert sum(isinstance(d, Allow) for d in answers) == 5
    refused = [d for d in answers if isinstance(d, Deny)]
    assert {d.status for d in refused} == {403}
    assert "5 requests" in refused[0].message
    store = await cluster.store()
    _, used = await store.list(cluster.clock.seconds())
    assert used == {token.id: 5}


@pytest_twisted.ensureDeferred
async def test_one_rate_bucket_for_every_process(cluster: Cluster) -> None:
    a, b = await cluster.proxy(), await cluster.proxy()
    secret, _ = await cluster.create(rpm=2)
    await cluster.refresh()
    assert isinstance(await a.ask(secret), Allow)
    assert isinstance(await b.ask(secret), Allow)
    d = denied(await a.ask(secret), 429)
    assert d.headers == ((b"retry-after", b"30"),)  # as one process says it
    assert "rate_limited" not in b.audit.actions() and a.audit.actions()[-1] == "rate_limited"
    cluster.clock.advance(30)
    await cluster.refresh()
    assert isinstance(await b.ask(secret), Allow)
    denied(await a.ask(secret), 429)


@pytest_twisted.ensureDeferred
async def test_an_earlier_versions_bucket_hash_is_not_met(
    cluster: Cluster, redis: RedisServer
) -> None:
    a = await cluster.proxy()
    secret, token = await cluster.create(rpm=2)
    await cluster.refresh()
    # An empty bucket as an earlier version kept it (a hash under rate:<id>).
    old = "t:rate:" + token.id
    stamp = f"{cluster.clock.seconds():.6f}"
    redis.command("HSET", old, "level", "0.0", "stamp", stamp, "rpm", 2)
    redis.command("PEXPIRE", old, 61_000)
    assert isinstance(await a.ask(secret), Allow)  # a bucket of its own, full
    assert isinstance(await a.ask(secret), Allow)
    denied(await a.ask(secret), 429)
    assert redis.command("TYPE", "t:" + rate_key(token.id)) == b"string"
    assert redis.command("HGET", old, "level") == b"0.0"  # left to expire


@pytest_twisted.ensureDeferred
async def test_rate_limited_requests_do_not_spend_the_quota(cluster: Cluster) -> None:
    a = await cluster.proxy()
    secret, token = await cluster.create(rpm=1, max_requests=10)
    await cluster.refresh()
    assert isinstance(await a.ask(secret), Allow)
    for _ in range(3):
        denied(await a.ask(secret), 429)
    _, used = await (await cluster.store()).list(cluster.clock.seconds())
    assert used[token.id] == 1


@pytest_twisted.ensureDeferred
async def test_tokens_without_limits_cost_no_round_trip_and_are_counted_later(
    cluster: Cluster,
) -> None:
    a = await cluster.proxy()
    secret, token = await cluster.create()
    await cluster.refresh()
    batches = a.state.counters.batches
    for _ in range(3):
        decision = a.check(secret)
        assert isinstance(decision, Allow)  # answered now, not a Deferred
    assert a.state.counters.batches == batches
    assert a.access.stats()["uncounted"] == 3
    await a.access.stop(1.0)  # the drain adds them
    _, used = await (await cluster.store()).list(cluster.clock.seconds())
    assert used[token.id] == 3


# -- a setup switched from local files to Redis ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_token_file_and_counts_are_imported_once(
    cluster: Cluster, redis: RedisServer
) -> None:
    state_dir = cluster.tmp_path / "proxy-0"  # the next proxy's
    secret, token = TokenFile.in_state_dir(state_dir).create("proj-old", NOW, max_requests=10)
    _, gone = TokenFile.in_state_dir(state_dir).create("proj-old", NOW)
    TokenFile.in_state_dir(state_dir).revoke(gone.id, NOW)
    UsageFile.in_state_dir(state_dir).write({token.id: 7})
    a = await cluster.proxy()
    assert a.access.stats()["tokens"] == 2
    assert isinstance(await a.ask(secret), Allow)
    # Restarting must not count the file's 7 again; the revocation came along.
    await a.stop()
    cluster.proxies.clear()
    again = await cluster.proxy()
    assert isinstance(await again.ask(secret), Allow)
    assert isinstance(await again.ask(secret), Allow)
    denied(await again.ask(secret), 403)
    _, used = await (await cluster.store()).list(NOW)
    assert used[token.id] == 10
    tokens, _ = await (await cluster.store()).list(NOW)
    assert {t.id: t.state(NOW) for t in tokens} == {token.id: "active", gone.id: "revoked"}


@pytest_twisted.ensureDeferred
async def test_an_import_never_lifts_a_revocation(cluster: Cluster) -> None:
    state_dir = cluster.tmp_path / "proxy-0"
    secret, token = TokenFile.in_state_dir(state_dir).create("proj-old", NOW)
    # Another host revoked the token in Redis; this host's file still has it active.
    store = await cluster.store()
    await store.state.tokens.add([token_to_registry(token)])
    await store.revoke(token.id, NOW)
    a = await cluster.proxy()
    denied(await a.ask(secret), 401)


# -- Redis does not answer -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fail_closed_answers_503_and_recovers(cluster: Cluster) -> None:
    a = await cluster.proxy()
    limited, _ = await cluster.create(max_requests=100)
    free, _ = await cluster.create()
    await cluster.refresh()
    a.state.redis.abort()  # the connection is lost (it reconnects with backoff)
    for secret in (limited, free):
        d = denied(await a.ask(secret), 503)
        assert d.headers == ((b"retry-after", b"1"),)
        assert "shared state" in d.message
    denied(await a.ask(None), 401)  # no credential needs no state
    assert a.access.stats()["unavailable"] == 2
    assert a.state.health.stats()["access"]["connected"] == 0
    # An outage does not flood the audit log: only the missing credential is there.
    assert [line.get("status") for line in a.audit.lines if "status" in line] == [401]
    await _usable(a.state)
    await cluster.refresh()
    assert isinstance(await a.ask(limited), Allow)
    assert a.state.health.stats()["access"]["connected"] == 1


@pytest_twisted.ensureDeferred
async def test_fail_open_passes_and_counts_once_redis_is_back(cluster: Cluster) -> None:
    a = await cluster.proxy(fail_open=True)
    secret, token = await cluster.create(max_requests=100)
    await cluster.refresh()
    a.state.redis.abort()
    for _ in range(3):
        assert isinstance(await a.ask(secret), Allow)
    assert a.state.health.stats()["access"]["unavailable_admitted"] == 3
    await _usable(a.state)
    await a.access.stop(1.0)
    _, used = await (await cluster.store()).list(NOW)
    assert used[token.id] == 3


@pytest_twisted.ensureDeferred
async def test_requests_before_the_first_read_wait_for_it(
    cluster: Cluster, redis: RedisServer
) -> None:
    secret, _ = await cluster.create()
    a = await cluster.proxy(wait=False)
    pending = a.check(secret)
    assert isinstance(pending, defer.Deferred)  # waits for the token set, not 503
    assert isinstance(await pending, Allow)


@pytest_twisted.ensureDeferred
async def test_without_redis_at_start_requests_wait_the_grace_then_503(
    redis: RedisServer, tmp_path: Path
) -> None:
    redis_port = redis.port
    cluster = Cluster(redis, tmp_path)
    redis.port = 1  # nothing listens there
    try:
        a = await cluster.proxy(wait=False)
    finally:
        redis.port = redis_port
    try:
        pending = a.check("llmp_x")
        assert isinstance(pending, defer.Deferred) and not pending.called
        cluster.clock.advance(START_GRACE)
        denied(await pending, 503)
    finally:
        await cluster.close()


async def _usable(state: SharedState) -> None:
    if not state.usable:
        ready: defer.Deferred[None] = defer.Deferred()
        state.redis.when_ready(lambda: None if ready.called else ready.callback(None))
        await ready


@pytest_twisted.ensureDeferred
async def test_a_failing_poll_makes_the_token_set_not_current(
    cluster: Cluster, redis: RedisServer
) -> None:
    a = await cluster.proxy()
    secret, _ = await cluster.create()
    await cluster.refresh()
    version = redis.command("GET", "t:tokens:version")
    redis.command("DEL", "t:tokens:version")
    redis.command("HSET", "t:tokens:version", "x", "y")  # a poll now gets WRONGTYPE
    await cluster.refresh()
    denied(await a.ask(secret), 503)
    assert a.access.stats()["polls_failed"] >= 1
    redis.command("DEL", "t:tokens:version")
    redis.command("SET", "t:tokens:version", version)
    await cluster.refresh()
    assert isinstance(await a.ask(secret), Allow)


@pytest_twisted.ensureDeferred
async def test_fail_open_without_redis_from_the_start_serves_the_token_file(
    redis: RedisServer, tmp_path: Path
) -> None:
    cluster = Cluster(redis, tmp_path)
    secret, _ = TokenFile.in_state_dir(tmp_path / "proxy-0").create("proj-file", NOW)
    redis_port = redis.port
    redis.port = 1  # nothing listens there
    try:
        a = await cluster.proxy(fail_open=True, wait=False)
    finally:
        redis.port = redis_port
    try:
        pending = a.check(secret)
        assert isinstance(pending, defer.Deferred)
        cluster.clock.advance(START_GRACE)
        assert isinstance(await pending, Allow)
        assert a.access.stats()["uncounted"] == 1
        denied(await a.ask("llmp_" + "C" * 43), 401)
    finally:
        await cluster.close()
