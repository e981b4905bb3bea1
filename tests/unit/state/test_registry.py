"""The versioned registry in Redis: records written once, first note wins, and
one short answer when nothing changed (llmproxy/state/registry.py)."""

from __future__ import annotations

import pytest_twisted

from llmproxy.state import SharedState
from tests.integration.redis_server import RedisServer


@pytest_twisted.ensureDeferred
async def test_a_reader_gets_everything_once_then_only_news(shared: SharedState) -> None:
    registry = shared.tokens
    empty = await registry.changed_since(None)
    assert empty is not None and empty.records == {} and empty.version == b"0"
    assert await registry.changed_since(empty.version) is None
    assert await registry.add([("a", b"A", None), ("b", b"B", b"gone")]) == 2
    snap = await registry.changed_since(empty.version)
    assert snap is not None
    assert snap.records == {"a": b"A", "b": b"B"} and snap.notes == {"b": b"gone"}
    assert await registry.changed_since(snap.version) is None


@pytest_twisted.ensureDeferred
async def test_records_are_never_replaced_and_the_first_note_wins(shared: SharedState) -> None:
    registry = shared.tokens
    await registry.add([("a", b"first", None)])
    version = (await registry.snapshot()).version
    assert await registry.add([("a", b"second", None)]) == 0
    assert await registry.changed_since(version) is None  # nothing changed: no new version
    assert await registry.note("a", b"t1") == 1
    assert await registry.note("a", b"t2") == 0
    assert await registry.note("nobody", b"t") == -1
    # An import carrying a note adds it only where there is none.
    assert await registry.add([("a", b"third", b"t3")]) == 0
    snap = await registry.snapshot()
    assert snap.records == {"a": b"first"} and snap.notes == {"a": b"t1"}


@pytest_twisted.ensureDeferred
async def test_keys_live_under_the_prefix(redis: RedisServer, shared: SharedState) -> None:
    await shared.tokens.add([("a", b"A", b"n")])
    assert sorted(redis.command("KEYS", "*")) == [
        b"t:tokens",
        b"t:tokens:notes",
        b"t:tokens:version",
    ]
