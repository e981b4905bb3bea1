"""Dispatchers against a real redis-server: load sharing in one group, fan-out to
groups, a dispatcher killed mid-batch, the drain on SIGTERM, Redis restarted
under a serving proxy, an XACK lost in flight (connection killed, Redis restarted,
no reply in time; also during the drain), and trimming detected and counted."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor

from llmproxy.config.loader import load_settings
from llmproxy.config.model import ExporterSettings, RedisSettings
from llmproxy.events.envelope import StoredEvent
from llmproxy.redis.dispatcher import Dispatcher, build_dispatcher
from llmproxy.redis.stream import RedisBus, build_redis_bus
from tests.fakes.loki import FakeLoki, Hang, listen_fake_loki
from tests.integration.daemon import BIN, DaemonProtocol, kill
from tests.integration.harness import Running, running_fixture, wait_until
from tests.integration.redis_server import RedisServer, info_pairs, running_redis

pytestmark = pytest.mark.integration

STREAM = "events"


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


def event(n: int) -> StoredEvent:
    return StoredEvent(
        {
            "schema": 1,
            "type": "request",
            "ts_ns": time.time_ns(),
            "request_id": f"req-{n}",
            "n": n,
            "provider": "openai",
            "environment": "test",
            "machine": "tester@host",
        }
    )


def make_bus(tmp_path: Path, server: RedisServer, extra: str = "") -> RedisBus:
    settings = load_settings(
        text=f"[server]\nstate_dir = {tmp_path / 'bus-state'}\n[events]\nbus = redis\n"
        f"[redis]\nurl = {server.url}\nstream = {STREAM}\nbatch_size = 50\n{extra}",
        env={},
    )
    bus = build_redis_bus(settings, reactor)
    bus.start()
    return bus


def dispatcher(
    tmp_path: Path,
    server: RedisServer,
    *,
    consumer: str,
    group: str = "g",
    file: Path | None = None,
    loki: str | None = None,
    buffer: int = 1000,
    batch_size: int = 100,
    claim_idle: float = 1.0,
    timeout: float = 2.0,
) -> Dispatcher:
    redis = RedisSettings(
        url=server.url,
        stream=STREAM,
        group=group,
        claim_idle=claim_idle,
        block=0.2,
        timeout=timeout,
    )
    common: dict[str, Any] = {
        "buffer": buffer,
        "batch_size": batch_size,
        "flush_interval": 0.05,
        "backoff_min": 0.05,
        "backoff_max": 0.2,
    }
    if loki is not None:
        sink = ExporterSettings(name=f"loki-{consumer}", type="loki", url=loki, **common)
    else:
        assert file is not None
        sink = ExporterSettings(name=f"file-{consumer}", type="file", path=file, **common)
    d = build_dispatcher(
        redis, sink, reactor=reactor, state_dir=tmp_path / f"state-{consumer}", consumer=consumer
    )
    d.start()
    return d


def numbers_in(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [orjson.loads(line)["n"] for line in path.read_bytes().splitlines() if line]


def pending(server: RedisServer, group: str = "g") -> int:
    summary = server.command("XPENDING", STREAM, group)
    return int(summary[0])


@pytest_twisted.ensureDeferred
async def test_dispatchers_of_one_group_share_the_entries(
    tmp_path: Path, redis: RedisServer
) -> None:
    running = listen_fake_loki(fake := FakeLoki())
    bus = make_bus(tmp_path, redis)
    fake.fail_next(Hang())  # A's first batch waits in its sink
    a = dispatcher(tmp_path, redis, consumer="a", loki=running.push_url, buffer=10, batch_size=10)
    b: Dispatcher | None = None
    try:
        await wait_until(lambda: a.stats()["connected"] and redis.command("EXISTS", STREAM) == 1)
        for n in range(10):
            bus.publish(event(n))
        await wait_until(lambda: a.stats()["held"] == 10 and fake.hung == 1)
        b = dispatcher(tmp_path, redis, consumer="b", file=tmp_path / "b.jsonl")
        for n in range(10, 50):
            bus.publish(event(n))
        await wait_until(lambda: len(numbers_in(tmp_path / "b.jsonl")) == 40)
        # A is slow, not dead: past 2 x claim_idle, B has not taken its entries.
        deadline = reactor.seconds() + 2.5  # type: ignore[attr-defined]
        await wait_until(lambda: reactor.seconds() > deadline)  # type: ignore[attr-defined]
        assert sorted(numbers_in(tmp_path / "b.jsonl")) == list(range(10, 50))
        assert a.stats()["held"] == 10 and b.stats()["claimed"] == 0
        fake.release_hung(503)  # A retries, and delivers
        # Redis empties the pending list before A reads XACK's reply and counts it.
        await wait_until(
            lambda: len(fake.entries()) == 10 and pending(redis) == 0 and a.stats()["acked"] == 10
        )
        assert sorted(e.json()["n"] for e in fake.entries()) == list(range(10))
        assert b.stats()["acked"] == 40
    finally:
        await a.stop(5.0)
        if b is not None:
            await b.stop(5.0)
        await bus.stop(5.0)
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_every_group_gets_every_entry(tmp_path: Path, redis: RedisServer) -> None:
    bus = make_bus(tmp_path, redis)
    one = dispatcher(tmp_path, redis, consumer="x", group="one", file=tmp_path / "one.jsonl")
    two = dispatcher(tmp_path, redis, consumer="y", group="two", file=tmp_path / "two.jsonl")
    try:
        for n in range(200):
            bus.publish(event(n))
        await wait_until(
            lambda: (
                len(numbers_in(tmp_path / "one.jsonl")) == 200
                and len(numbers_in(tmp_path / "two.jsonl")) == 200
            )
        )
        # One dispatcher with one batch in flight keeps the order.
        assert numbers_in(tmp_path / "one.jsonl") == list(range(200))
        assert numbers_in(tmp_path / "two.jsonl") == list(range(200))
        await wait_until(lambda: pending(redis, "one") == 0 and pending(redis, "two") == 0)
    finally:
        await one.stop(5.0)
        await two.stop(5.0)
        await bus.stop(5.0)


def spawn_dispatcher(
    tmp_path: Path, server: RedisServer, *args: str, consumer: str
) -> tuple[DaemonProtocol, Any]:
    proto = DaemonProtocol()
    proto.ready.addErrback(lambda _: None)  # it listens on no port: "ready" never fires
    argv = [
        str(BIN / "llmproxy"), "dispatcher",
        "--redis-url", server.url, "--stream", STREAM, "--group", "g",
        "--consumer", consumer, "--claim-idle", "1", *args,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMPROXY_", "LLM_PROXY_"))}
    env["LLMPROXY_SERVER_STATE_DIR"] = str(tmp_path / f"state-{consumer}")
    transport = reactor.spawnProcess(  # type: ignore[attr-defined]
        proto, argv[0], argv, env=env, path=str(tmp_path)
    )
    return proto, transport


@pytest_twisted.ensureDeferred
async def test_a_killed_dispatchers_pending_entries_are_claimed_and_delivered(
    tmp_path: Path, redis: RedisServer
) -> None:
    running = listen_fake_loki(fake := FakeLoki())
    fake.fail_next(Hang())
    bus = make_bus(tmp_path, redis)
    proto, transport = spawn_dispatcher(
        tmp_path, redis, "--service", "loki", "--endpoint", running.push_url,
        "--batch-size", "10", "--buffer", "20", consumer="doomed",
    )  # fmt: skip
    b: Dispatcher | None = None
    try:
        await proto.wait_for(b"dispatcher ready")
        for n in range(30):
            bus.publish(event(n))
        # It read entries and its first batch is on its way to the (hanging) sink.
        await wait_until(lambda: fake.hung == 1 and pending(redis) == 20)
        kill(transport)
        await proto.ended
        assert proto.signal == signal.SIGKILL
        b = dispatcher(tmp_path, redis, consumer="b", file=tmp_path / "b.jsonl")
        await wait_until(lambda: sorted(set(numbers_in(tmp_path / "b.jsonl"))) == list(range(30)))
        await wait_until(lambda: pending(redis) == 0)
        assert b.stats()["claimed"] == 20 and b.stats()["read"] == 10
        assert fake.entries() == []  # the dead one delivered nothing
    finally:
        kill(transport)
        if b is not None:
            await b.stop(5.0)
        await bus.stop(5.0)
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_and_what_was_not_delivered_stays_pending(
    tmp_path: Path, redis: RedisServer
) -> None:
    running = listen_fake_loki(fake := FakeLoki())
    bus = make_bus(tmp_path, redis)
    out = tmp_path / "out.jsonl"
    proto, transport = spawn_dispatcher(
        tmp_path, redis, "--service", "file", "--endpoint", str(out), consumer="calm"
    )
    stuck: Any = None
    try:
        await proto.wait_for(b"dispatcher ready")
        for n in range(20):
            bus.publish(event(n))
        await wait_until(lambda: len(numbers_in(out)) == 20 and pending(redis) == 0)
        transport.signalProcess(signal.SIGTERM)
        await proto.ended
        assert proto.exit_code == 0, proto.output.decode(errors="replace")
        assert b"stopped (read 20" in proto.output
        # A dispatcher whose sink hangs: the drain ends by its deadline and its
        # entries stay pending for another consumer.
        stuck_proto, stuck = spawn_dispatcher(
            tmp_path, redis, "--service", "loki", "--endpoint", running.push_url,
            "--buffer", "5", "--batch-size", "5", "--drain-timeout", "1", consumer="stuck",
        )  # fmt: skip
        await stuck_proto.wait_for(b"dispatcher ready")
        fake.fail_next(*[Hang()] * 5)
        for n in range(20, 25):
            bus.publish(event(n))
        await wait_until(lambda: fake.hung == 1)
        started = reactor.seconds()  # type: ignore[attr-defined]
        stuck.signalProcess(signal.SIGTERM)
        await stuck_proto.ended
        assert stuck_proto.exit_code == 0, stuck_proto.output.decode(errors="replace")
        assert reactor.seconds() - started < 5  # type: ignore[attr-defined]
        assert pending(redis) == 5
        assert b"draining (5 entries held" in stuck_proto.output
    finally:
        kill(transport)
        if stuck is not None:
            kill(stuck)
        await bus.stop(5.0)
        await running.stop()


def control_connection(server: RedisServer, consumer: str) -> dict[str, str] | None:
    """The dispatcher's control connection (ACKs, claims) as ``CLIENT LIST`` shows it."""
    for line in server.command("CLIENT", "LIST").decode().splitlines():
        fields = dict(field.split("=", 1) for field in line.split())
        if fields.get("name") == f"llmproxy-dispatcher:{consumer}":
            return fields
    return None


def xack_waits_in_redis(server: RedisServer, d: Dispatcher, consumer: str) -> str | None:
    """The id of the control connection while an XACK of ``d`` waits on it in a
    paused Redis (``flags=b``: blocked by ``CLIENT PAUSE WRITE``), else ``None``."""
    fields = control_connection(server, consumer)
    if fields is None or "b" not in fields["flags"] or d.stats()["acks_in_flight"] == 0:
        return None
    return fields["id"]


def dispatcher_with_a_hung_batch(
    tmp_path: Path, redis: RedisServer, fake: FakeLoki, push_url: str, *, timeout: float
) -> Dispatcher:
    """A dispatcher whose first push of entries 0..9 (one batch) hangs in Loki."""
    for n in range(10):
        redis.command("XADD", STREAM, "*", "event", orjson.dumps(event(n).payload()))
    fake.fail_next(Hang())
    return dispatcher(
        tmp_path, redis, consumer="a", loki=push_url, batch_size=10, claim_idle=1.0,
        timeout=timeout,
    )  # fmt: skip


async def put_an_xack_on_the_wire(redis: RedisServer, fake: FakeLoki, d: Dispatcher) -> str:
    """Pause Redis for writes, let the hung batch be delivered, and wait until its
    XACK waits in Redis; the id of the control connection it waits on."""
    await wait_until(lambda: fake.hung == 1 and pending(redis) == 10)
    redis.command("CLIENT", "PAUSE", 60_000, "WRITE")
    fake.release_hung(503)  # retried at once, and stored
    await wait_until(
        lambda: xack_waits_in_redis(redis, d, "a") is not None, what="the XACK waiting in Redis"
    )
    assert len(fake.entries()) == 10 and pending(redis) == 10
    first = xack_waits_in_redis(redis, d, "a")
    assert first is not None
    return first


def assert_each_delivered_once_and_acknowledged(
    fake: FakeLoki, redis: RedisServer, d: Dispatcher
) -> None:
    assert sorted(e.json()["n"] for e in fake.entries()) == list(range(10))
    # Loki stores a duplicate once: count the pushes it accepted, the hung one aside.
    assert [r.status for r in fake.requests] == [None, 204]
    assert pending(redis) == 0
    stats = d.stats()
    assert (stats["acked"], stats["acks_lost"], stats["ack_queue"]) == (10, 0, 0)
    assert stats["acks_resent"] >= 1


@pytest.mark.parametrize("failure", ["client-kill", "no-reply-in-time", "redis-restart"])
@pytest_twisted.ensureDeferred
async def test_an_xack_lost_in_flight_is_sent_again_and_nothing_stays_pending(
    tmp_path: Path, failure: str
) -> None:
    # Persistent, so a restarted Redis still has the stream, the group and its
    # pending entries.
    with running_redis(tmp_path / "redis", persistent=True) as redis:
        running = listen_fake_loki(fake := FakeLoki())
        # "no-reply-in-time": the XACK waits in the paused Redis past ``timeout``.
        timeout = 0.5 if failure == "no-reply-in-time" else 10.0
        d = dispatcher_with_a_hung_batch(tmp_path, redis, fake, running.push_url, timeout=timeout)
        try:
            first = await put_an_xack_on_the_wire(redis, fake, d)
            if failure == "redis-restart":
                redis.restart()  # the XACK was never applied: the pause held it
            else:
                if failure == "client-kill":
                    redis.command("CLIENT", "KILL", "ID", first)
                await wait_until(
                    lambda: xack_waits_in_redis(redis, d, "a") not in (None, first),
                    what="the XACK sent again on a new connection",
                )
                redis.command("CLIENT", "UNPAUSE")
            await wait_until(lambda: pending(redis) == 0 and d.stats()["acked"] == 10)
            assert_each_delivered_once_and_acknowledged(fake, redis, d)
            # Past claim_idle nothing comes back: none of it was left pending.
            deadline = reactor.seconds() + 1.5  # type: ignore[attr-defined]
            await wait_until(lambda: reactor.seconds() > deadline)  # type: ignore[attr-defined]
            assert_each_delivered_once_and_acknowledged(fake, redis, d)
        finally:
            redis.command("CLIENT", "UNPAUSE")
            await d.stop(5.0)
            await running.stop()


@pytest_twisted.ensureDeferred
async def test_the_drain_sends_again_an_xack_lost_in_flight(
    tmp_path: Path, redis: RedisServer
) -> None:
    running = listen_fake_loki(fake := FakeLoki())
    d = dispatcher_with_a_hung_batch(tmp_path, redis, fake, running.push_url, timeout=10.0)
    try:
        first = await put_an_xack_on_the_wire(redis, fake, d)
        stopped = d.stop(15.0)  # SIGTERM with the XACK on the wire
        redis.command("CLIENT", "KILL", "ID", first)
        await wait_until(
            lambda: xack_waits_in_redis(redis, d, "a") not in (None, first),
            what="the XACK sent again on a new connection",
        )
        assert not stopped.called  # the drain waits for it
        redis.command("CLIENT", "UNPAUSE")
        await stopped
        assert_each_delivered_once_and_acknowledged(fake, redis, d)
    finally:
        redis.command("CLIENT", "UNPAUSE")
        await d.stop(5.0)
        await running.stop()


@pytest.fixture
def proxy(tmp_path: Path, redis: RedisServer) -> Iterator[Running]:
    # The service builds its own Redis bus from [events] bus = redis.
    extra = (
        f"[events]\nbus = redis\n[redis]\nurl = {redis.url}\nstream = {STREAM}\nbatch_size = 50\n"
    )
    yield from running_fixture(tmp_path / "proxy", extra=extra)


@pytest_twisted.ensureDeferred
async def test_redis_restarted_under_a_serving_proxy_loses_no_event(
    tmp_path: Path, redis: RedisServer, proxy: Running
) -> None:
    env = proxy
    bus = env.service.bus
    assert isinstance(bus, RedisBus)
    assert env.service.proxy.events.enabled
    out = tmp_path / "delivered.jsonl"
    d = dispatcher(tmp_path, redis, consumer="d", file=out)

    async def requests(first: int, count: int) -> None:
        for n in range(first, first + count):
            resp = await env.client.post(
                env.url("/mock/v1/chat/completions"),
                json={"model": "m", "messages": [{"role": "user", "content": f"q{n}"}]},
            )
            assert resp.code == 200
            await resp.content()

    def delivered_ids() -> set[str]:
        if not out.exists():
            return set()
        return {orjson.loads(line)["request_id"] for line in out.read_bytes().splitlines()}

    try:
        await requests(0, 10)
        await wait_until(lambda: len(delivered_ids()) == 10 and pending(redis) == 0)
        redis.stop()
        await wait_until(lambda: not bus.stats()["connected"])
        await requests(10, 20)  # the proxy keeps serving; events go to its spool
        # 2 events per exchange (plus the tracker's session_start entries).
        await wait_until(lambda: bus.stats()["spooled"] >= 40)
        redis.start()  # an empty Redis: the group is created again
        await wait_until(lambda: len(delivered_ids()) == 30, timeout=30)
        lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
        assert sorted(e["type"] for e in lines).count("response") >= 30
        stats = bus.stats()
        assert stats["dropped"] == 0 and stats["spooled"] == 0
        assert stats["published"] == stats["accepted"] >= 60
    finally:
        await d.stop(5.0)


@pytest_twisted.ensureDeferred
async def test_trimming_before_the_group_read_is_detected_and_counted(
    tmp_path: Path, redis: RedisServer
) -> None:
    redis.command("XGROUP", "CREATE", STREAM, "g", "0", "MKSTREAM")
    bus = make_bus(tmp_path, redis, "maxlen = 100\n")
    for n in range(1000):
        bus.publish(event(n))
    await wait_until(lambda: bus.stats()["published"] == 1000)
    await bus.stop(5.0)
    info = info_pairs(redis.command("XINFO", "STREAM", STREAM))
    kept, first = info["length"], orjson.loads(info["first-entry"][1][1])["n"]
    assert kept < 1000 and first == 1000 - kept
    out = tmp_path / "kept.jsonl"
    d = dispatcher(tmp_path, redis, consumer="late", file=out)
    try:
        await wait_until(lambda: len(numbers_in(out)) == kept)
        assert numbers_in(out) == list(range(first, 1000))
        assert d.stats()["missed_trimmed"] == 1000 - kept
        # Counted once: more reads find no new gap.
        bus2 = make_bus(tmp_path / "2", redis)
        bus2.publish(event(1000))
        await wait_until(lambda: len(numbers_in(out)) == kept + 1)
        assert d.stats()["missed_trimmed"] == 1000 - kept
        await bus2.stop(5.0)
    finally:
        await d.stop(5.0)
