"""Redis URLs, the [redis] checks, and a connection that fails fast when down."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import txredisapi
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from llmproxy.config.model import RedisSettings
from llmproxy.redis.connection import (
    RedisConnection,
    RedisUnavailable,
    RedisURL,
    is_refusal,
    parse_redis_url,
    redis_problems,
)
from tests.integration.redis_server import running_redis


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://127.0.0.1:6379/0", RedisURL("redis", "127.0.0.1", 6379, "", 0)),
        ("redis://cache.internal", RedisURL("redis", "cache.internal", 6379, "", 0)),
        ("redis://:s3cret@h:7000/3", RedisURL("redis", "h", 7000, "", 3, "", "s3cret")),
        ("rediss://app:p%40ss@h/1", RedisURL("rediss", "h", 6379, "", 1, "app", "p@ss")),
        ("redis://[::1]:6380/2", RedisURL("redis", "::1", 6380, "", 2)),
        ("unix:///run/redis.sock?db=4", RedisURL("unix", "", 0, "/run/redis.sock", 4)),
    ],
)
def test_urls_are_parsed(text: str, expected: RedisURL) -> None:
    assert parse_redis_url(text) == expected


def test_the_safe_form_carries_no_credentials() -> None:
    url = parse_redis_url("rediss://app:hunter2@h:7000/1")
    assert url.safe == "rediss://h:7000/1"
    assert "hunter2" not in repr(url)
    assert parse_redis_url("redis://[::1]:6380/2").safe == "redis://[::1]:6380/2"
    assert parse_redis_url("unix:///run/r.sock").safe == "unix:///run/r.sock?db=0"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("http://h", "must start with redis://"),
        ("redis://", "has no host"),
        ("redis://h:99999", "has a bad port"),
        ("redis://h/zero", "the database must be a number"),
        ("unix://", "needs the socket's path"),
    ],
)
def test_bad_urls_say_why_without_the_password(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_redis_url(text)
    with pytest.raises(ValueError) as e:
        parse_redis_url("redis://:topsecret@h:99999/0")
    assert "topsecret" not in str(e.value)


def test_redis_settings_problems_name_each_key() -> None:
    bad = RedisSettings(
        url="ftp://x", stream="", group="a b", consumer="c d", maxlen=0, claim_idle=0
    )
    problems = redis_problems(bad)
    for key in ("url", "stream", "group", "consumer", "maxlen", "claim_idle"):
        assert any(p.startswith(f"{key}:") for p in problems), key
    assert redis_problems(RedisSettings()) == []


def test_commands_fail_at_once_without_a_connection() -> None:
    connection = RedisConnection(Clock(), parse_redis_url("redis://127.0.0.1:1/0"), 1.0)
    failures: list[object] = []
    connection.execute("PING").addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(RedisUnavailable)  # type: ignore[attr-defined]
    assert not connection.usable
    stopped = connection.stop()
    assert stopped.called


@pytest.mark.parametrize(
    ("error", "refused"),
    [
        (txredisapi.ResponseError("WRONGTYPE Operation against a key"), True),
        (txredisapi.ResponseError("NOPERM this user has no permissions"), True),
        (txredisapi.ResponseError("NOGROUP No such key 's' or consumer group 'g'"), True),
        (txredisapi.ResponseError("Invalid stream ID specified"), True),  # ERR, stripped
        (txredisapi.ResponseError("LOADING Redis is loading the dataset in memory"), False),
        (txredisapi.ResponseError("BUSY Redis is busy running a script"), False),
        (txredisapi.ResponseError("READONLY You can't write against a read only replica"), False),
        (txredisapi.ResponseError("MISCONF Redis is configured to save RDB snapshots"), False),
        (txredisapi.ResponseError("MASTERDOWN Link with MASTER is down"), False),
        (RedisUnavailable("connection lost"), False),
        (txredisapi.ConnectionError("Lost connection"), False),
        (CancelledError(), False),
    ],
)
def test_only_a_definitive_answer_of_redis_is_a_refusal(error: Exception, refused: bool) -> None:
    assert is_refusal(Failure(error)) is refused


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class _Protocol:
    """Stands in for txredisapi's protocol: replies are given by the test."""

    connected = 1

    def __init__(self) -> None:
        self.transport = _Transport()
        self.pending: list[Deferred[Any]] = []

    def execute_command(self, *args: Any, apply_timeout: bool = True) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d


class _TurnClock(Clock):
    """Runs timers as the reactor does: a call made while timers run (a
    ``callLater(0)``) waits for the next turn, after the sockets were read."""

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        self._sortCalls()
        due = [c for c in self.calls if c.getTime() <= self.seconds()]
        for call in due:
            if call in self.calls:
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)


def _connected(clock: Clock) -> tuple[RedisConnection, _Protocol]:
    connection = RedisConnection(clock, parse_redis_url("redis://127.0.0.1:1/0"), 0.5)
    protocol = _Protocol()
    connection._ready(protocol)  # as when the connection setup is done
    return connection, protocol


def test_a_reply_read_in_the_turn_after_the_deadline_still_counts() -> None:
    clock = _TurnClock()
    connection, protocol = _connected(clock)
    answers: list[object] = []
    connection.execute("PING").addBoth(answers.append)
    clock.advance(0.5)  # the deadline's timer runs first in its turn...
    assert answers == [] and not protocol.transport.aborted
    protocol.pending[0].callback(b"PONG")  # ...then the socket is read: the reply was there
    clock.advance(0)
    assert answers == [b"PONG"] and not protocol.transport.aborted and connection.usable


def test_no_reply_by_the_deadline_aborts_the_connection() -> None:
    clock = _TurnClock()
    connection, protocol = _connected(clock)
    answers: list[Failure] = []
    connection.execute("PING").addErrback(answers.append)
    clock.advance(0.5)
    clock.advance(0)
    assert protocol.transport.aborted and not connection.usable
    assert len(answers) == 1 and answers[0].check(RedisUnavailable)
    assert "no reply within the timeout" in answers[0].getErrorMessage()


@pytest_twisted.ensureDeferred
async def test_the_connection_sends_without_nagle_delay(tmp_path: Path) -> None:
    """A script run asked while the one before is unanswered goes out at once
    (TCP_NODELAY), against a real redis-server."""
    from twisted.internet import reactor

    with running_redis(tmp_path) as server:
        connection = RedisConnection(reactor, parse_redis_url(server.url), 2.0, "llmproxy-test")
        ready: Deferred[None] = Deferred()
        connection.when_ready(lambda: None if ready.called else ready.callback(None))
        connection.start()
        try:
            await ready.addTimeout(10, reactor)
            sock = connection._protocol.transport.getHandle()
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert await connection.execute("PING") == b"PONG"
        finally:
            await connection.stop()
