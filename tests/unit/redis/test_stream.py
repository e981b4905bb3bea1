"""The Redis bus on a Clock with a fake connection: batching, outages, the spool,
order, the drain and the accounting.  The bus is the one delivery engine
(llmproxy/export/exporter.py) with an XADD sink, so these are the exporter's
promises tried again through Redis; the fake speaks both forms of the delivery
(one EVAL of the XADD script per batch, or pipelined XADDs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from llmproxy.config.loader import load_settings
from llmproxy.config.model import RedisSettings
from llmproxy.events.envelope import StoredEvent
from llmproxy.export.spool import Spool
from llmproxy.redis.connection import RedisUnavailable
from llmproxy.redis.stream import SEND_AT, XADD_SCRIPT, RedisBus, build_redis_bus


class Refused(Exception):
    """Stands for txredisapi's ResponseError (Redis answered with an error)."""


@attrs.define(eq=False)
class FakeRedis:
    """A connection whose replies the test controls; ``stream`` is what Redis holds."""

    usable: bool = True
    auto: bool = True  # answer each command at once
    scripts: bool = True  # EVAL allowed
    started: bool = False
    stopped: bool = False
    stream: list[dict[str, Any]] = attrs.field(factory=list)
    pending: list[tuple[tuple[Any, ...], Deferred[Any]]] = attrs.field(factory=list)
    commands: list[tuple[Any, ...]] = attrs.field(factory=list)
    callbacks: list[Callable[[], object]] = attrs.field(factory=list)

    def when_ready(self, callback: Callable[[], object]) -> None:
        self.callbacks.append(callback)

    def start(self) -> None:
        self.started = True

    def stop(self) -> Deferred[None]:
        self.stopped = True
        return succeed(None)

    def abort(self) -> None:
        self.go_down()

    def execute(self, *args: Any, timeout: float | None = None) -> Deferred[Any]:
        if not self.usable:
            return fail(RedisUnavailable("down"))
        self.commands.append(args)
        if args[0] == "EVAL" and not self.scripts:
            return fail(_response_error("NOPERM this user has no permissions to run 'eval'"))
        d: Deferred[Any] = Deferred()
        self.pending.append((args, d))
        if self.auto:
            self.answer()
        return d

    def answer(self, n: int | None = None) -> None:
        if n is None:
            todo, self.pending = self.pending, []
        else:
            todo, self.pending = self.pending[:n], self.pending[n:]
        for args, d in todo:
            if args[0] == "EVAL":
                assert args[1:5] == (XADD_SCRIPT, 1, "s", 1000) and len(args) == 6
                lines = args[5].split(b"\n")
                self.stream.extend(orjson.loads(line) for line in lines)
                d.callback(len(lines))
            else:
                assert args[0] == "XADD" and args[2:6] == ("MAXLEN", "~", 1000, "*")
                self.stream.append(orjson.loads(args[7]))
                d.callback(f"{len(self.stream)}-0".encode())

    def refuse_all(self) -> None:
        todo, self.pending = self.pending, []
        for _, d in todo:
            d.errback(_response_error("OOM command not allowed when used memory > 'maxmemory'"))

    def go_down(self) -> None:
        self.usable = False
        todo, self.pending = self.pending, []
        for _, d in todo:
            d.errback(RedisUnavailable("lost"))

    def come_back(self) -> None:
        self.usable = True
        for callback in self.callbacks:
            callback()


def _response_error(text: str) -> Exception:
    import txredisapi

    error: Exception = txredisapi.ResponseError(text)
    return error


def settings(**kw: Any) -> RedisSettings:
    base: dict[str, Any] = {
        "stream": "s",
        "maxlen": 1000,
        "batch_size": 3,
        "publish_buffer": 10,
        "flush_interval": 0.1,
        "spool_interval": 0.5,
    }
    base.update(kw)
    return RedisSettings(**base)


def event(n: int) -> StoredEvent:
    return StoredEvent({"type": "request", "n": n})


def make(
    tmp_path: Path, *, spool: bool = True, redis: FakeRedis | None = None, **kw: Any
) -> tuple[RedisBus, FakeRedis, Clock, Spool | None]:
    clock = Clock()
    redis = redis or FakeRedis()
    the_spool = Spool(tmp_path / "spool", 1 << 20) if spool else None
    bus = RedisBus(settings(**kw), redis, clock, the_spool, random=lambda: 0.0)
    bus.start()
    return bus, redis, clock, the_spool


def numbers(redis: FakeRedis) -> list[int]:
    return [e["n"] for e in redis.stream]


def on_disk(tmp_path: Path) -> list[int]:
    """Event numbers in the spool directory, as a restarted proxy would find them."""
    spool = Spool(tmp_path / "spool", 1 << 20)
    return sorted(e["n"] for seg in spool.segments() for e in spool.read(seg).events)


def balanced(bus: RedisBus) -> bool:
    s = bus.stats()
    return s["accepted"] == (
        s["published"] + s["in_flight"] + s["queued"] + s["spooled"] + s["dropped"]
    )


def test_publish_queues_without_touching_redis_and_a_full_batch_goes_next_turn(
    tmp_path: Path,
) -> None:
    bus, redis, clock, _ = make(tmp_path)
    for n in range(3):
        bus.publish(event(n))
    assert redis.commands == []  # nothing on the request path
    clock.advance(0)
    assert numbers(redis) == [0, 1, 2]
    assert len(redis.commands) == 1  # one EVAL (one round trip) per batch
    assert bus.stats()["published"] == 3 and bus.stats()["batches"] == 1
    assert balanced(bus)


def test_the_bus_sends_once_send_at_events_wait_and_batches_grow_to_batch_size(
    tmp_path: Path,
) -> None:
    bus, redis, clock, _ = make(tmp_path, batch_size=100, publish_buffer=1000)
    redis.auto = False
    for n in range(SEND_AT - 1):
        bus.publish(event(n))
    clock.advance(0)
    assert redis.pending == []  # fewer than SEND_AT: the flush interval sends them
    bus.publish(event(SEND_AT - 1))
    clock.advance(0)
    assert len(redis.pending) == 1 and bus.stats()["in_flight"] == SEND_AT
    total = SEND_AT + 230
    for n in range(SEND_AT, total):  # Redis is slow: a backlog builds up
        bus.publish(event(n))
    redis.answer()
    assert bus.stats()["in_flight"] == 100  # the next batch takes batch_size of it
    redis.answer()
    redis.answer()
    assert bus.stats()["in_flight"] == 30
    redis.answer()
    assert numbers(redis) == list(range(total))
    assert bus.stats()["batches"] == 4
    assert balanced(bus)


def test_a_partial_batch_waits_for_the_flush_interval(tmp_path: Path) -> None:
    bus, redis, clock, _ = make(tmp_path)
    bus.publish(event(0))
    clock.advance(0.05)
    assert redis.stream == []
    clock.advance(0.06)
    assert numbers(redis) == [0]


def test_one_batch_in_flight_at_a_time_in_publish_order(tmp_path: Path) -> None:
    bus, redis, clock, _ = make(tmp_path)
    redis.auto = False
    for n in range(7):
        bus.publish(event(n))
    clock.advance(0)
    assert len(redis.pending) == 1
    assert bus.stats()["in_flight"] == 3 and bus.stats()["queued"] == 4
    assert balanced(bus)
    redis.answer()  # the next full batch goes out at once
    assert len(redis.pending) == 1
    redis.answer()
    clock.advance(0.1)
    redis.answer()
    assert numbers(redis) == list(range(7))
    assert balanced(bus)


def test_while_redis_is_down_events_go_to_disk_and_come_back_in_order(tmp_path: Path) -> None:
    bus, redis, clock, _spool = make(tmp_path)
    bus.publish(event(0))
    clock.advance(0.1)
    redis.go_down()
    for n in range(1, 12):
        bus.publish(event(n))
        clock.advance(0.1)
    # On disk but for what the last spool_interval (0.5 s) brought.
    assert set(range(1, 12)) - set(on_disk(tmp_path)) <= set(range(7, 12))
    assert bus.stats()["connected"] is False
    assert balanced(bus)
    redis.come_back()
    clock.pump([0.1] * 30)
    assert numbers(redis) == list(range(12))
    assert on_disk(tmp_path) == []
    assert bus.stats()["replayed"] > 0
    assert balanced(bus)


def test_the_connection_coming_back_sends_at_once(tmp_path: Path) -> None:
    bus, redis, clock, _ = make(tmp_path)
    redis.go_down()
    bus.publish(event(0))
    clock.advance(0.1)  # sent, failed: waits out a backoff
    redis.come_back()  # the ready callback retries without waiting
    assert numbers(redis) == [0]


def test_a_batch_lost_with_the_connection_is_sent_again(tmp_path: Path) -> None:
    bus, redis, clock, _ = make(tmp_path)
    redis.auto = False
    for n in range(3):
        bus.publish(event(n))
    clock.advance(0)
    redis.go_down()  # the EVAL's answer is lost (Redis may have run it)
    assert on_disk(tmp_path) == [0, 1, 2]  # durable while it is retried
    assert bus.stats()["batches_failed"] == 1
    redis.auto = True
    redis.come_back()
    clock.pump([0.1] * 5)
    assert numbers(redis) == [0, 1, 2]
    assert on_disk(tmp_path) == []
    assert balanced(bus)


def test_a_refused_batch_is_sent_again_after_a_pause(tmp_path: Path) -> None:
    bus, redis, clock, _ = make(tmp_path)
    redis.auto = False
    for n in range(3):
        bus.publish(event(n))
    clock.advance(0)
    redis.refuse_all()
    assert "OOM" in bus.stats()["last_error"]
    bus.publish(event(3))
    clock.advance(0.5)  # paused (ERROR_PAUSE = 1 s): nothing goes to Redis
    assert redis.pending == []
    redis.auto = True
    clock.pump([0.1] * 15)
    assert numbers(redis) == [0, 1, 2, 3]
    assert balanced(bus)


def test_where_eval_is_refused_the_batch_goes_as_pipelined_xadds(tmp_path: Path) -> None:
    redis = FakeRedis(scripts=False)
    bus, redis, clock, _ = make(tmp_path, redis=redis)
    for n in range(3):
        bus.publish(event(n))
    clock.pump([0.1] * 3)
    assert numbers(redis) == [0, 1, 2]
    assert [c[0] for c in redis.commands] == ["EVAL", "XADD", "XADD", "XADD"]
    assert balanced(bus)


def test_a_full_buffer_spills_its_oldest_batch_to_the_spool(tmp_path: Path) -> None:
    bus, redis, clock, _ = make(tmp_path, publish_buffer=4, batch_size=100)
    redis.auto = False
    for n in range(6):
        bus.publish(event(n))
    assert on_disk(tmp_path) == [0, 1, 2, 3]  # one spill of batch_size (all 4)
    assert bus.stats()["queued"] == 2
    redis.auto = True
    clock.pump([0.1] * 5)
    assert numbers(redis) == list(range(6))
    assert balanced(bus)


def test_without_a_spool_a_full_buffer_drops_new_events_and_counts_them(tmp_path: Path) -> None:
    bus, redis, clock, _ = make(tmp_path, spool=False, publish_buffer=4, batch_size=100)
    redis.go_down()
    for n in range(6):
        bus.publish(event(n))
        clock.advance(0.1)
    stats = bus.stats()
    # The batch being retried ([0]) is not in the buffer; 4 more fill it.
    assert (stats["retrying"], stats["queued"]) == (1, 5)
    assert stats["dropped_by_reason"] == {"buffer_full": 1}
    assert balanced(bus)
    redis.come_back()
    clock.pump([0.1] * 3)
    assert numbers(redis) == [0, 1, 2, 3, 4]


def test_without_a_spool_a_failed_batch_is_kept_and_sent_again(tmp_path: Path) -> None:
    bus, redis, clock, _ = make(tmp_path, spool=False)
    redis.auto = False
    for n in range(4):
        bus.publish(event(n))
    clock.advance(0)
    redis.go_down()
    assert bus.stats()["queued"] + bus.stats()["in_flight"] == 4
    redis.auto = True
    redis.come_back()
    clock.pump([0.1] * 3)
    assert numbers(redis) == [0, 1, 2, 3]
    assert balanced(bus)


def test_the_spool_left_by_a_previous_run_is_replayed_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 20)
    spool.append([orjson.dumps({"type": "request", "n": n}) for n in (0, 1)], 0, 1)
    clock = Clock()
    redis = FakeRedis()
    bus = RedisBus(settings(), redis, clock, Spool(tmp_path / "spool", 1 << 20))
    assert bus.stats()["recovered"] == 2 and bus.stats()["accepted"] == 2
    bus.publish(event(2))
    bus.start()
    clock.pump([0.1] * 3)
    assert numbers(redis) == [0, 1, 2]
    assert balanced(bus)


def test_restarts_during_an_outage_never_overwrite_earlier_segments(tmp_path: Path) -> None:
    """Each restart numbers its events after what the spool holds: new segments
    never replace old ones (a restart that numbered from 0 again would lose them)."""
    n = 0
    for _ in range(3):  # three runs while Redis is down, each killed
        redis = FakeRedis(usable=False)
        bus, redis, clock, _ = make(tmp_path, redis=redis)
        for _ in range(5):
            bus.publish(event(n))
            n += 1
        clock.pump([0.1] * 12)  # longer than spool_interval: all of it on disk
        assert on_disk(tmp_path) == list(range(n))
    bus, redis, clock, _ = make(tmp_path)  # Redis is back
    clock.pump([0.1] * 20)
    assert numbers(redis) == list(range(n))
    assert on_disk(tmp_path) == []


def test_kill_during_an_outage_loses_at_most_the_last_spool_interval(tmp_path: Path) -> None:
    redis = FakeRedis(usable=False)
    bus, redis, clock, _ = make(tmp_path, redis=redis, spool_interval=1.0)
    for n in range(100):  # 10 s of outage, 10 events a second
        bus.publish(event(n))
        clock.advance(0.1)
    missing = set(range(100)) - set(on_disk(tmp_path))
    assert missing <= set(range(90, 100))
    # kill -9 (the bus is forgotten), restart with Redis up
    _again, redis2, clock2, _ = make(tmp_path)
    clock2.pump([0.1] * 40)
    assert numbers(redis2) == sorted(set(range(100)) - missing)


def test_close_flushes_what_is_queued_then_closes_the_connection(tmp_path: Path) -> None:
    bus, redis, _clock, _ = make(tmp_path)
    bus.publish(event(0))
    done: list[object] = []
    bus.stop(5.0).addCallback(done.append)
    assert numbers(redis) == [0]
    assert done == [None] and redis.stopped
    assert bus.stats()["state"] == "closed"
    assert bus.stop(5.0).called  # idempotent


def test_close_spools_the_batch_in_flight_at_the_deadline(tmp_path: Path) -> None:
    bus, redis, clock, spool = make(tmp_path)
    redis.auto = False
    for n in range(4):
        bus.publish(event(n))
    done: list[object] = []
    bus.stop(2.0).addCallback(done.append)
    second = bus.stop(2.0)
    assert not done and not second.called
    clock.advance(2.0)
    assert done == [None] and second.called
    assert spool is not None and spool.event_count == 4
    assert bus.stats()["in_flight"] == 0
    assert balanced(bus)
    redis.answer()  # a late answer changes nothing
    assert spool.event_count == 4 and bus.stats()["published"] == 0


def test_close_spools_the_queue_behind_older_spooled_events(tmp_path: Path) -> None:
    bus, redis, clock, spool = make(tmp_path)
    redis.go_down()
    bus.publish(event(0))
    clock.advance(0.1)
    redis.usable = True  # back, but nobody told the bus yet
    bus.publish(event(1))
    bus.stop(0.05)
    clock.advance(0.05)
    assert spool is not None and spool.event_count + bus.stats()["published"] == 2
    assert on_disk(tmp_path) == sorted(set(range(2)) - set(numbers(redis)))
    first_seen = list(dict.fromkeys(numbers(redis)))
    assert first_seen == sorted(first_seen)


def test_publish_after_close_is_spooled_or_counted(tmp_path: Path) -> None:
    bus, _redis, _clock, spool = make(tmp_path)
    bus.stop(1.0)
    bus.publish(event(0))
    assert spool is not None and spool.event_count == 1
    assert bus.stats()["after_close"] == 1
    bare, _, _, _ = make(tmp_path / "bare", spool=False)
    bare.stop(1.0)
    bare.publish(event(0))
    assert bare.stats()["dropped_by_reason"] == {"closed": 1}
    assert balanced(bus) and balanced(bare)


def test_local_subscribers_get_every_envelope_and_a_raising_one_is_counted(
    tmp_path: Path,
) -> None:
    bus, redis, clock, _ = make(tmp_path)
    got: list[Any] = []

    class Good:
        def publish(self, envelope: Any) -> None:
            got.append(envelope)

    class Bad:
        def publish(self, envelope: Any) -> None:
            raise RuntimeError("boom")

    good, bad = Good(), Bad()
    bus.subscribe(good)
    bus.subscribe(bad)
    bus.subscribe(good)
    bus.publish(event(0))
    assert len(got) == 1
    assert bus.stats()["subscriber_errors"] == 1 and bus.stats()["subscribers"] == 2
    bus.unsubscribe(bad)
    bus.publish(event(1))
    clock.advance(0.1)
    assert numbers(redis) == [0, 1] and len(got) == 2


def test_an_event_that_cannot_be_encoded_is_dropped_and_counted(tmp_path: Path) -> None:
    bus, redis, clock, _ = make(tmp_path)

    class Broken(StoredEvent):
        def json(self) -> bytes:
            raise TypeError("not JSON")

        @property
        def size_hint(self) -> int:
            return 10

    bus.publish(Broken({"type": "request"}))
    bus.publish(event(1))
    clock.advance(0.1)
    assert numbers(redis) == [1]
    assert bus.stats()["dropped_by_reason"] == {"encode_failed": 1}
    assert balanced(bus)


def test_build_redis_bus_puts_the_spool_under_the_state_dir(tmp_path: Path) -> None:
    settings = load_settings(
        text=f"[server]\nstate_dir = {tmp_path}\n[events]\nbus = redis\n"
        "[redis]\nurl = redis://:secret@127.0.0.1:6390/2\n",
        env={},
    )
    bus = build_redis_bus(settings, Clock())
    assert (tmp_path / "spool" / "redis-bus").is_dir()
    assert "secret" not in repr(bus) and "secret" not in str(bus.stats())


Step = tuple[str, int]


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("publish"), st.integers(1, 5)),
            st.tuples(st.sampled_from(["tick", "down", "up", "answer", "refuse"]), st.just(0)),
        ),
        max_size=40,
    )
)
def test_accounting_holds_and_every_event_reaches_the_stream_in_order(
    steps: list[Step],
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        bus, redis, clock, _spool = make(Path(tmp))
        redis.auto = False
        published = 0
        for action, count in steps:
            if action == "publish":
                for _ in range(count):
                    bus.publish(event(published))
                    published += 1
            elif action == "tick":
                clock.advance(0.1)
            elif action == "down":
                redis.go_down()
            elif action == "up" and not redis.usable:
                redis.come_back()
            elif action == "answer":
                redis.answer()
            elif action == "refuse":
                redis.refuse_all()
            assert balanced(bus)
        redis.auto = True
        if not redis.usable:
            redis.come_back()
        redis.answer()
        clock.pump([0.1] * (published + 40))
        assert balanced(bus)
        stats = bus.stats()
        assert stats["dropped"] == 0 and stats["queued"] == 0 and stats["spooled"] == 0
        seen = numbers(redis)
        # Every event at least once, and their first appearances in publish order.
        first_seen = list(dict.fromkeys(seen))
        assert first_seen == list(range(published))


@pytest.mark.parametrize("bad", ["http://x", "redis://", "redis://h:99999/0", "redis://h/x"])
def test_bad_redis_urls_are_config_problems(bad: str) -> None:
    from llmproxy.config.loader import ConfigError
    from llmproxy.runtime.checks import load_checked

    with pytest.raises(ConfigError) as e:
        load_checked(text=f"[redis]\nurl = {bad}\n", env={})
    assert any(p.startswith("redis.url:") for p in e.value.problems)


def test_bus_stats_become_prometheus_families(tmp_path: Path) -> None:
    from prometheus_client.core import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    from llmproxy.export.bus import MemoryBus
    from llmproxy.export.metrics import bus_families

    bus, redis, clock, _ = make(tmp_path)
    bus.publish(event(0))
    clock.advance(0.1)
    redis.go_down()
    bus.publish(event(1))
    clock.advance(0.1)

    class Collector:
        def __init__(self, stats: dict[str, Any]) -> None:
            self.stats = stats

        def collect(self) -> Any:
            return bus_families(self.stats)

    registry = CollectorRegistry()
    registry.register(Collector(bus.stats()))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert 'llmproxy_bus_published_total{bus="redis"} 1.0' in text
    assert 'llmproxy_bus_queued{bus="redis"} 1.0' in text  # retried, durable on disk
    assert 'llmproxy_bus_spooled{bus="redis"} 0.0' in text
    assert 'llmproxy_bus_connected{bus="redis"} 0.0' in text
    memory = CollectorRegistry()
    memory.register(Collector(MemoryBus().stats()))  # type: ignore[arg-type]
    assert 'llmproxy_bus_published_total{bus="memory"} 0.0' in generate_latest(memory).decode()
