"""The session operations in Redis decide as the tracker's own maps do, atomically
for every process, and survive a forgotten script (llmproxy/state/sessions.py)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock

from llmproxy.capture.record import ExchangeRecord
from llmproxy.capture.sessions import SessionTracker
from llmproxy.events.envelope import Envelope
from llmproxy.state import SharedState
from llmproxy.state.sessions import AssignOp, RecordOp, StateKey
from tests.integration.harness import wait_until
from tests.integration.redis_server import RedisServer
from tests.unit.capture.test_sessions import answered, chat_record
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
            # A continuation may be asked to wait for its history (a miss, no decision).
            wait = bool(lookups) and draw(st.booleans())
            steps.append(("assign", (lookups, client, wait)))
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
            lookups, client, wait = value
            op = AssignOp(lookups, client, next(ids), wait=wait)
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
    # A record naming an assignment that missed is not sent (the tracker parks
    # it until that assignment is decided); applied with it, it is not applied.
    rest = [
        op
        for op in shared_ops[split:]
        if not (isinstance(op, RecordOp) and op.assign is not None and op.assign.missed)
    ]
    if rest:
        await shared.sessions.apply(rest)
    got = [(op.result, op.missed) for op in shared_ops if isinstance(op, AssignOp)]
    expected = [
        (op.result, op.missed)
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
async def test_a_fresh_record_makes_the_head_with_the_ttl_and_sent_again_moves_nothing_back(
    redis: RedisServer, shared: SharedState
) -> None:
    fresh = RecordOp([KEYS[0]], "sess-f", 1, fresh=True)
    await shared.sessions.apply([fresh])
    assert redis.command("GET", "t:sessions:h:sess-f") == b"1 1"
    assert 0 < redis.command("PTTL", "t:sessions:h:sess-f") <= 3_600_000
    second = AssignOp([KEYS[0]], None, "unused")
    await shared.sessions.apply([second, RecordOp([KEYS[1]], assign=second)])
    assert second.result == ("sess-f", 2, "continue", 0, "", 1)
    # The first turn's record again (a reply lost after Redis applied it): the
    # head that moved on stays where it is, the next turn is the third.
    await shared.sessions.apply([RecordOp([KEYS[0]], "sess-f", 1, fresh=True)])
    assert redis.command("GET", "t:sessions:h:sess-f") == b"2 2"
    third = AssignOp([KEYS[1]], None, "unused")
    await shared.sessions.apply([third])
    assert third.result == ("sess-f", 3, "continue", 0, "", 2)


@pytest_twisted.ensureDeferred
async def test_ids_and_keys_with_spaces_quotes_and_tabs_are_one_word_each(
    shared: SharedState,
) -> None:
    odd = 'cli "a" b\tc\n'
    first = AssignOp([], odd, "n 1")
    await shared.sessions.apply([first, RecordOp(["r:resp x y"], assign=first)])
    assert first.result == (odd, 1, "start", 0, "", 0)
    second = AssignOp(["r:resp x y"], odd, "n 2", wait=True)
    await shared.sessions.apply([second])
    assert second.result == (odd, 2, "continue", 0, "", 1)


@pytest_twisted.ensureDeferred
async def test_a_forgotten_script_is_sent_again(redis: RedisServer, shared: SharedState) -> None:
    redis.command("SCRIPT", "FLUSH")
    op = AssignOp([], "c", "n")
    await shared.sessions.apply([op])
    assert op.result == ("c", 1, "start", 0, "", 0)


@pytest_twisted.ensureDeferred
async def test_a_continuation_asked_to_wait_finds_nothing_and_writes_nothing(
    redis: RedisServer, shared: SharedState
) -> None:
    waiting = AssignOp([KEYS[0]], None, "sess-new", wait=True)
    # Its reply's record in the same batch is not applied either.
    await shared.sessions.apply([waiting, RecordOp([KEYS[1]], assign=waiting)])
    assert waiting.result is None and waiting.missed
    assert redis.command("KEYS", "t:sessions:*") == []
    # Recorded meanwhile (by another process): asked again, it continues.
    first = AssignOp([], None, "sess-1")
    await shared.sessions.apply([first, RecordOp([KEYS[0]], assign=first)])
    await shared.sessions.apply([waiting, RecordOp([KEYS[1]], assign=waiting)])
    assert waiting.result == ("sess-1", 2, "continue", 0, "", 1) and not waiting.missed
    assert redis.command("GET", "t:sessions:s:" + KEYS[1].hex()) == b"2 sess-1"


# -- the tracker waiting for a history another process records late -------------------


@attrs.define
class Process:
    """A tracker as one proxy process runs it, on its own connection and Clock."""

    tracker: SessionTracker
    clock: Clock
    state: SharedState
    published: list[Envelope]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e.payload() for e in self.published if e.payload()["type"] == kind]

    async def send(self) -> None:
        """Its queued batch goes out (next turn) and Redis answers it."""
        await self.ask_again_after(0)

    async def reply_recorded(self, record: ExchangeRecord, reply: str) -> None:
        """``record`` answered with ``reply``, and its history sent to Redis."""
        answered(record, reply)
        self.tracker.finished(record)
        await self.send()

    async def answered(self) -> None:
        await wait_until(
            lambda: not self.tracker.stats()["shared_in_flight"], what="the batch answered"
        )

    async def second_turn_sent(self) -> tuple[ExchangeRecord, defer.Deferred[None]]:
        """Turn 2 (``TURN_2``) asked here and sent to Redis: its record and decision."""
        second, raw = chat_record(2, TURN_2)
        decided = self.tracker.assign(second, raw)
        assert decided is not None
        await self.send()
        return second, decided

    async def ask_again_after(self, seconds: float) -> None:
        """The clock moves ``seconds`` (the next ask) and Redis answers that ask."""
        before = self.tracker.stats()["shared_batches"]
        self.clock.advance(seconds)
        assert self.tracker.stats()["shared_batches"] == before + 1
        await self.answered()


async def process(redis: RedisServer, name: str, wait: float = 1.0) -> Process:
    state = connect(redis)
    await started(state)
    published: list[Envelope] = []
    clock = Clock()
    ids = (f"{name}-{n}" for n in itertools.count(1))
    tracker = SessionTracker(
        published.append,
        None,
        1000,
        clock,
        new_id=lambda: next(ids),
        shared=state.sessions,
        continuation_wait=wait,
    )
    tracker.start()
    return Process(tracker, clock, state, published)


@pytest_twisted.async_yield_fixture
async def two(redis: RedisServer) -> AsyncIterator[tuple[Process, Process]]:
    a, b = await process(redis, "a"), await process(redis, "b")
    yield a, b
    for p in (a, b):
        await p.tracker.stop(1.0)
        await p.state.stop(1.0)


TURN_1 = [{"role": "user", "content": "hi"}]
TURN_2 = [*TURN_1, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]


@pytest_twisted.ensureDeferred
async def test_a_continuation_whose_history_is_recorded_a_little_later_continues_it(
    two: tuple[Process, Process],
) -> None:
    a, b = two
    first, raw = chat_record(1, TURN_1)
    assert a.tracker.assign(first, raw) is None  # a first turn: decided by a at once
    answered(first, "hello")
    a.tracker.finished(first)  # its record is queued on a, not sent yet
    # The next turn reaches b first: Redis knows no history of it yet.
    second, decided = await b.second_turn_sent()
    assert not decided.called and b.tracker.stats()["continuations_waited"] == 1
    await a.send()  # a's record reaches Redis
    await b.ask_again_after(0.05)
    assert decided.called
    assert (second.session_id, second.seq) == (first.session_id, 2)
    assert b.events("session_start") == [] and b.events("fork") == []
    assert b.tracker.stats()["continuations_not_found"] == 0


@pytest_twisted.ensureDeferred
async def test_a_continuation_whose_history_never_comes_starts_a_session_after_the_wait(
    two: tuple[Process, Process],
) -> None:
    _, b = two
    second, decided = await b.second_turn_sent()
    # Asked again 50 ms later, then after twice as long each time up to 200 ms,
    # and at 1 s (the wait) without waiting: 0.05, 0.15, 0.35, 0.55, 0.75, 0.95, 1.0.
    for step in (0.05, 0.1, 0.2, 0.2, 0.2, 0.2):
        await b.ask_again_after(step)
        assert not decided.called
    b.clock.advance(0.04)
    assert not decided.called  # not before the wait is over
    await b.ask_again_after(0.01)
    assert decided.called
    assert (second.session_id, second.seq) == ("b-1", 1)
    (start,) = b.events("session_start")
    assert start["session_id"] == "b-1"
    assert b.tracker.stats()["continuations_not_found"] == 1
    # Its reply is recorded at the session it started: the next turn continues it.
    await b.reply_recorded(second, "sure")
    third, raw = chat_record(
        3, [*TURN_2, {"role": "assistant", "content": "sure"}, {"role": "user", "content": "ok"}]
    )
    b.tracker.assign(third, raw)
    await b.send()
    assert (third.session_id, third.seq) == ("b-1", 2)


@pytest_twisted.ensureDeferred
async def test_an_edit_sent_to_the_other_process_is_still_a_fork(
    two: tuple[Process, Process],
) -> None:
    a, b = two
    first, raw = chat_record(1, TURN_1)
    a.tracker.assign(first, raw)
    await a.reply_recorded(first, "hello")
    second, raw = chat_record(2, TURN_2)
    a.tracker.assign(second, raw)
    await a.reply_recorded(second, "sure")  # turn 2 continues turn 1
    assert (second.session_id, second.seq) == (first.session_id, 2)
    # Turn 2 edited, on b: its history is turn 1's state, older than the head's.
    edited, raw = chat_record(3, [*TURN_2[:2], {"role": "user", "content": "other"}])
    decided = b.tracker.assign(edited, raw)
    assert decided is not None
    await b.send()
    assert decided.called  # found at once: no wait
    (fork,) = b.events("fork")
    assert (fork["parent_session"], fork["from_seq"], fork["seq"]) == (first.session_id, 1, 2)
    assert (edited.session_id, edited.seq) == ("b-1", 2)
    assert b.tracker.stats()["continuations_waited"] == 0


@pytest_twisted.ensureDeferred
async def test_stopping_asks_a_waiting_continuation_at_once_without_waiting(
    two: tuple[Process, Process],
) -> None:
    _, b = two
    second, decided = await b.second_turn_sent()
    assert not decided.called
    await b.tracker.stop(1.0)  # no clock advanced: the wait is cut short
    assert decided.called and (second.session_id, second.seq) == ("b-1", 1)
