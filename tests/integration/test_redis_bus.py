"""The Redis bus against a real redis-server: pipelined XADDs, retention, and an
outage (server stopped, events spooled, server back, events published in order)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from llmproxy.config.loader import load_settings
from llmproxy.events.envelope import StoredEvent
from llmproxy.redis.stream import RedisBus, build_redis_bus
from tests.integration.harness import wait_until
from tests.integration.redis_server import RedisServer, running_redis, stream_events

pytestmark = pytest.mark.integration


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


def make_bus(tmp_path: Path, server: RedisServer, extra: str = "") -> RedisBus:
    settings = load_settings(
        text=f"[server]\nstate_dir = {tmp_path / 'state'}\n[events]\nbus = redis\n"
        f"[redis]\nurl = {server.url}\nstream = events\nbatch_size = 50\n{extra}",
        env={},
    )
    bus = build_redis_bus(settings, reactor)
    bus.start()
    return bus


def balanced(bus: RedisBus) -> bool:
    s = bus.stats()
    return s["accepted"] == (
        s["published"] + s["in_flight"] + s["queued"] + s["spooled"] + s["dropped"]
    )


@pytest_twisted.ensureDeferred
async def test_events_reach_the_stream_in_order(tmp_path: Path, redis: RedisServer) -> None:
    bus = make_bus(tmp_path, redis)
    try:
        await wait_until(lambda: bus.stats()["connected"])
        for n in range(1000):
            bus.publish(StoredEvent({"type": "request", "n": n}))
        await wait_until(lambda: bus.stats()["published"] == 1000)
        assert [e["n"] for e in stream_events(redis, "events")] == list(range(1000))
        assert bus.stats()["batches"] >= 20  # pipelined batches of batch_size
        assert balanced(bus)
    finally:
        await bus.stop(5.0)
    assert bus.stats()["state"] == "closed"


@pytest_twisted.ensureDeferred
async def test_maxlen_bounds_the_stream(tmp_path: Path, redis: RedisServer) -> None:
    bus = make_bus(tmp_path, redis, "maxlen = 100\n")
    try:
        for n in range(2000):
            bus.publish(StoredEvent({"type": "request", "n": n}))
        await wait_until(lambda: bus.stats()["published"] == 2000)
    finally:
        await bus.stop(5.0)
    length = redis.command("XLEN", "events")
    assert 100 <= length < 400  # MAXLEN ~ trims whole nodes (100 entries each)
    assert stream_events(redis, "events")[-1]["n"] == 1999


@pytest_twisted.ensureDeferred
async def test_an_outage_spools_and_the_events_follow_when_redis_returns(
    tmp_path: Path, redis: RedisServer
) -> None:
    bus = make_bus(tmp_path, redis)
    try:
        await wait_until(lambda: bus.stats()["connected"])
        for n in range(100):
            bus.publish(StoredEvent({"type": "request", "n": n}))
        await wait_until(lambda: bus.stats()["published"] == 100)
        redis.stop()
        await wait_until(lambda: not bus.stats()["connected"])
        for n in range(100, 250):
            bus.publish(StoredEvent({"type": "request", "n": n}))
        await wait_until(lambda: bus.stats()["spooled"] == 150)
        assert balanced(bus)
        redis.start()  # same port, empty (no persistence): only the outage's events
        await wait_until(lambda: bus.stats()["published"] == 250)
        assert [e["n"] for e in stream_events(redis, "events")] == list(range(100, 250))
        assert bus.stats()["spooled"] == 0 and bus.stats()["dropped"] == 0
        assert balanced(bus)
    finally:
        await bus.stop(5.0)


@pytest_twisted.ensureDeferred
async def test_redis_down_at_start_and_close_spools_for_the_next_run(
    tmp_path: Path, redis: RedisServer
) -> None:
    redis.stop()
    bus = make_bus(tmp_path, redis)
    for n in range(10):
        bus.publish(StoredEvent({"type": "request", "n": n}))
    await bus.stop(2.0)
    assert bus.stats()["spooled"] == 10
    redis.start()
    again = make_bus(tmp_path, redis)
    try:
        assert again.stats()["recovered"] == 10
        again.publish(StoredEvent({"type": "request", "n": 10}))
        await wait_until(lambda: again.stats()["published"] == 11)
        assert [e["n"] for e in stream_events(redis, "events")] == list(range(11))
    finally:
        await again.stop(5.0)


@pytest_twisted.ensureDeferred
async def test_a_password_in_the_url_logs_in_and_a_wrong_one_is_retried(
    tmp_path: Path, redis: RedisServer
) -> None:
    from llmproxy.redis.connection import RedisConnection, parse_redis_url

    redis.command("CONFIG", "SET", "requirepass", "s3cret")
    good = RedisConnection(reactor, parse_redis_url(f"redis://:s3cret@127.0.0.1:{redis.port}/2"), 2)
    bad = RedisConnection(reactor, parse_redis_url(f"redis://:wrong@127.0.0.1:{redis.port}/0"), 2)
    try:
        good.start()
        bad.start()
        await wait_until(lambda: good.usable and bad.last_error is not None)
        assert await good.execute("PING") == b"PONG"
        await good.execute("SET", "k", "v")
        assert redis.command("AUTH", "s3cret") == b"OK"
        assert not bad.usable and "WRONGPASS" in (bad.last_error or "")
        assert "wrong" not in (bad.last_error or "").replace("WRONGPASS", "")
    finally:
        await good.stop()
        await bad.stop()


@pytest_twisted.ensureDeferred
async def test_a_command_without_a_reply_in_time_drops_the_connection(
    tmp_path: Path, redis: RedisServer
) -> None:
    from llmproxy.redis.connection import RedisConnection, RedisUnavailable, parse_redis_url

    connection = RedisConnection(reactor, parse_redis_url(redis.url), 0.3)
    try:
        connection.start()
        await wait_until(lambda: connection.usable)
        redis.command("CLIENT", "PAUSE", 600)
        with pytest.raises(RedisUnavailable, match="no reply"):
            await connection.execute("PING")
        assert not connection.usable
        await wait_until(lambda: connection.usable)  # reconnected after the pause
        assert await connection.execute("PING") == b"PONG"
        assert connection.connects >= 2
    finally:
        await connection.stop()
