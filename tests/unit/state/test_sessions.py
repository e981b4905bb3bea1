"""The session operations in Redis decide as the tracker's own maps do, atomically
for every process, and survive a forgotten script (llmproxy/state/sessions.py)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock

from llmproxy.capture.sessions import SessionTracker
from llmproxy.state import SharedState
from llmproxy.state.sessions import AssignOp, RecordOp, StateKey
from tests.integration.redis_server import RedisServer
from tests.unit.state.conftest import connect, started

KEYS: list[StateKey] = [bytes([n]) * 32 for n in range(4)] + ["r:resp_a", "r:resp_b"]


def tracker() -> SessionTracker:
    return SessionTracker(lambda _: None, None, 10_000, Clock())


@st.composite
def operations(draw: Any) -> list[tuple[str, Any]]:
    """Assign and record steps; a record names an earlier assignment by index."""
    steps: list[tuple[str, Any]] = []
    assigned = 0
    for _ in range(draw(st.integers(1, 30))):
        if assigned and draw(st.booleans()):
            which = draw(st.integers(0, assigned - 1))
            keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=2, unique=True))
            steps.append(("record", (which, keys)))
        else:
            lookups = draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True))
            client = draw(st.one_of(st.none(), st.sampled_from(["cli-a", "cli-b"])))
            steps.append(("assign", (lookups, client)))
            assigned += 1
    return steps


def build(steps: list[tuple[str, Any]], ids: Any, shared: bool) -> list[AssignOp | RecordOp]:
    """The operations of ``steps``.  A first turn (no lookups, no client id) is
    decided by its process alone: the shared state gets no assignment for it, its
    records are ``fresh`` (as llmproxy/capture/sessions.py sends them)."""
    ops: list[AssignOp | RecordOp] = []
    assigns: list[AssignOp] = []
    for kind, value in steps:
        if kind == "assign":
            lookups, client = value
            op = AssignOp(lookups, client, next(ids))
            assigns.append(op)
            if not (shared and not lookups and client is None):
                ops.append(op)
        else:
            which, keys = value
            op = assigns[which]
            if not op.lookups and op.client is None:
                ops.append(RecordOp(keys, op.new_id, 1, fresh=True))
            else:
                ops.append(RecordOp(keys, assign=op))
    return ops


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=operations(), split=st.integers(1, 30))
@pytest_twisted.ensureDeferred
async def test_redis_decides_as_the_local_maps_do(
    steps: list[tuple[str, Any]], split: int, shared: SharedState, redis: RedisServer
) -> None:
    redis.command("FLUSHALL")
    local_ops = build(steps, (f"s{n}" for n in itertools.count()), shared=False)
    here = tracker()
    here.apply_locally(local_ops)
    shared_ops = build(steps, (f"s{n}" for n in itertools.count()), shared=True)
    # In two batches: a record may name an assignment of an earlier batch.
    await shared.sessions.apply(shared_ops[:split])
    if shared_ops[split:]:
        await shared.sessions.apply(shared_ops[split:])
    got = [op.result for op in shared_ops if isinstance(op, AssignOp)]
    expected = [
        op.result
        for op in local_ops
        if isinstance(op, AssignOp) and (op.lookups or op.client is not None)
    ]
    assert got == expected


@pytest_twisted.ensureDeferred
async def test_a_conversation_continues_and_forks_across_two_connections(
    redis: RedisServer, shared: SharedState
) -> None:
    other = connect(redis)
    await started(other)
    try:
        first = AssignOp([], None, "sess-1")
        await shared.sessions.apply([first, RecordOp([KEYS[0]], assign=first)])
        assert first.result == ("sess-1", 1, "start", 0, "", 0)
        # The next turn, on the other connection: its history is the recorded state.
        second = AssignOp([KEYS[0]], None, "unused")
        await other.sessions.apply([second, RecordOp([KEYS[1]], assign=second)])
        assert second.result == ("sess-1", 2, "continue", 0, "", 1)
        # An edit of the second turn: its history is the first state again.
        edited = AssignOp([KEYS[0]], None, "sess-2")
        await shared.sessions.apply([edited])
        assert edited.result == ("sess-2", 2, "fork", 1, "sess-1", 1)
    finally:
        await other.stop(1.0)


@pytest_twisted.ensureDeferred
async def test_concurrent_turns_of_one_session_get_distinct_seqs(
    redis: RedisServer, shared: SharedState
) -> None:
    seed = AssignOp([], "client-id", "x")
    await shared.sessions.apply([seed])
    ops = [AssignOp([], "client-id", "x") for _ in range(50)]
    await defer.gatherResults([shared.sessions.apply([op]) for op in ops])
    assert sorted(op.result[1] for op in ops if op.result) == list(range(2, 52))


@pytest_twisted.ensureDeferred
async def test_states_and_heads_expire_with_the_ttl(
    redis: RedisServer, shared: SharedState
) -> None:
    op = AssignOp([], None, "sess-ttl")
    await shared.sessions.apply([op, RecordOp([KEYS[2]], assign=op)])
    for key in redis.command("KEYS", "t:sessions:*"):
        assert 0 < redis.command("PTTL", key) <= 3_600_000


@pytest_twisted.ensureDeferred
async def test_a_forgotten_script_is_sent_again(redis: RedisServer, shared: SharedState) -> None:
    redis.command("SCRIPT", "FLUSH")
    op = AssignOp([], "c", "n")
    await shared.sessions.apply([op])
    assert op.result == ("c", 1, "start", 0, "", 0)
