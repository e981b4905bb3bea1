"""A real redis-server for the shared-state tests (one per module, emptied before
each test), and a connected ``SharedState`` on the real reactor."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from llmproxy.redis.connection import RedisConnection, parse_redis_url
from llmproxy.state import SharedState
from llmproxy.state.health import StateHealth
from tests.integration.redis_server import RedisServer, running_redis


@pytest.fixture(scope="module")
def redis_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(Path(tmp_path_factory.mktemp("redis"))) as server:
        yield server


@pytest.fixture
def redis(redis_module: RedisServer) -> RedisServer:
    redis_module.command("FLUSHALL")
    redis_module.command("SCRIPT", "FLUSH")
    return redis_module


def connect(server: RedisServer, prefix: str = "t:", timeout: float = 2.0) -> SharedState:
    connection = RedisConnection(reactor, parse_redis_url(server.url), timeout, "llmproxy-test")
    state = SharedState(
        connection, reactor, prefix=prefix, session_ttl=3600.0, health=StateHealth(reactor)
    )
    return state


def started(state: SharedState) -> defer.Deferred[None]:
    """Start ``state``; fires once its connection is usable."""
    ready: defer.Deferred[None] = defer.Deferred()
    state.redis.when_ready(lambda: None if ready.called else ready.callback(None))
    state.start()
    return ready.addTimeout(10, reactor)


@pytest.fixture
def shared(redis: RedisServer) -> Iterator[SharedState]:
    state = connect(redis)
    pytest_twisted.blockon(started(state))
    yield state
    pytest_twisted.blockon(state.stop(1.0))
