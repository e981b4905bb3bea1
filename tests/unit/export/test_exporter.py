"""The batching exporter core and the HTTP sink base: one behaviour per test.

Time is a ``Clock``; the sink is a fake whose Deferreds the test fires by hand, or
an ``HTTPSink`` over ``StubTreq``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
from treq.testing import StringStubbingResource, StubTreq
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llmproxy.config.model import ExporterSettings
from llmproxy.events.envelope import Envelope, StoredEvent
from llmproxy.export.deadletter import DeadLetter
from llmproxy.export.exporter import BatchingExporter
from llmproxy.export.sink import EncodedBatch, HTTPSink, Sink, parse_retry_after
from llmproxy.export.spool import Spool
from llmproxy.export.verdict import Delivered, Rejected, Retry

# -- helpers ------------------------------------------------------------------------


def ev(i: int, **extra: Any) -> StoredEvent:
    return StoredEvent({"type": "request", "i": i, **extra})


def ids(events: Sequence[dict[str, Any]]) -> list[int]:
    return [e["i"] for e in events]


@attrs.define
class FakeSink:
    """deliver() returns a Deferred per batch; the test answers them."""

    name: str = "fake"
    calls: list[tuple[list[dict[str, Any]], Deferred[Any]]] = attrs.Factory(list)
    closed: int = 0
    close_result: Deferred[None] | None = None

    def deliver(self, events: Sequence[dict[str, Any]]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((list(events), d))
        return d

    def close(self) -> Deferred[None]:
        self.closed += 1
        return self.close_result if self.close_result is not None else succeed(None)

    @property
    def pending(self) -> list[tuple[list[dict[str, Any]], Deferred[Any]]]:
        return [(e, d) for e, d in self.calls if not d.called]

    def answer(self, verdict: object) -> list[int]:
        """Answer the oldest pending batch; return the ids it held."""
        events, d = self.pending[0]
        d.callback(verdict)
        return ids(events)

    def batches(self) -> list[list[int]]:
        return [ids(e) for e, _ in self.calls]


@attrs.define
class Harness:
    clock: Clock
    sink: Any
    exporter: BatchingExporter
    tmp: Path
    spool: Spool | None

    def publish(self, *numbers: int) -> None:
        for i in numbers:
            self.exporter.publish(ev(i))

    def stats(self) -> dict[str, Any]:
        s = self.exporter.stats()
        parts = ("sent", "in_flight", "queued", "spooled", "dead_lettered", "dropped")
        assert s["accepted"] == sum(s[k] for k in parts), s
        return s

    def dead_letters(self) -> list[dict[str, Any]]:
        path = self.tmp / "dead.jsonl"
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines()]

    def spooled_ids(self) -> list[int]:
        spool = Spool(self.tmp / "spool", 10**9)
        return [i for seg in spool.segments() for i in ids(spool.read(seg).events)]


def make(
    tmp: Path,
    *,
    sink: Any = None,
    spool: bool = True,
    random: Callable[[], float] = lambda: 0.0,
    clock: Clock | None = None,
    start: bool = True,
    spool_max_bytes: int = 10**9,
    send_at: int = 0,
    **settings: Any,
) -> Harness:
    clock = clock or Clock()
    sink = sink if sink is not None else FakeSink()
    defaults: dict[str, Any] = {"flush_interval": 1.0, "backoff_min": 1.0, "backoff_max": 60.0}
    defaults.update(settings)
    the_spool = Spool(tmp / "spool", spool_max_bytes) if spool else None
    exporter = BatchingExporter(
        ExporterSettings(name="t", type="fake", **defaults),
        sink,
        clock,
        the_spool,
        DeadLetter(tmp / "dead.jsonl", "t"),
        random,
        send_at=send_at,
    )
    if start:
        exporter.start()
    return Harness(clock, sink, exporter, tmp, the_spool)


@pytest.fixture
def warnings() -> Any:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


class JsonSink(HTTPSink):
    def encode(self, events: Sequence[dict[str, Any]]) -> EncodedBatch:
        return EncodedBatch(
            orjson.dumps(list(events)),
            {"Content-Type": "application/json", "Authorization": "Bearer sk-secret-token-1234"},
        )


@attrs.define
class Server:
    """Scripted HTTP answers for StubTreq: (status, headers, body) per request."""

    answers: list[tuple[int, dict[str, str], bytes]]
    received: list[tuple[str, dict[bytes, list[bytes]], bytes]] = attrs.Factory(list)

    def __call__(
        self, method: bytes, url: str, params: Any, headers: Any, data: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        self.received.append((url, headers, data))
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def batches(self) -> list[list[int]]:
        return [ids(orjson.loads(body)) for _, _, body in self.received]


def http_sink(clock: Clock, server: Any, url: str = "http://sink.test/push") -> JsonSink:
    client = StubTreq(StringStubbingResource(server))
    return JsonSink(name="t", url=url, client=client, clock=clock, timeout=5.0)


def judge(status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> Any:
    clock = Clock()
    clock.advance(1_000_000)
    sink = JsonSink(name="t", url="http://x/", client=None, clock=clock)  # type: ignore[arg-type]
    return sink.judge(status, headers or {}, body)


# -- envelope and verdict types ---------------------------------------------------------


def test_stored_event_is_an_envelope_with_kind_from_type_and_exact_size() -> None:
    event = StoredEvent({"type": "response", "status": 200})
    assert isinstance(event, Envelope)
    assert event.kind == "response"
    assert event.json() == orjson.dumps({"type": "response", "status": 200})
    assert event.size_hint == len(event.json())
    assert event.json() is event.json()  # memoised


def test_fake_and_http_sinks_satisfy_the_sink_protocol() -> None:
    assert isinstance(FakeSink(), Sink)
    assert isinstance(http_sink(Clock(), Server([(204, {}, b"")])), Sink)


def test_verdicts_are_frozen() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Retry("x").after = 3  # type: ignore[misc]
    assert Delivered().rejected == {}


# -- HTTPSink: judging answers --------------------------------------------------------


def test_2xx_is_delivered() -> None:
    assert judge(200) == Delivered()
    assert judge(204) == Delivered()


def test_408_429_and_5xx_are_retried() -> None:
    for status in (408, 429, 500, 502, 503, 504):
        assert judge(status) == Retry(f"HTTP {status}")


def test_retry_after_seconds_are_passed_on() -> None:
    assert judge(429, {"retry-after": "7"}) == Retry("HTTP 429", 7.0)


def test_retry_after_http_date_counts_from_the_injected_clock() -> None:
    # Sun, 06 Nov 1994 08:49:37 GMT = 784111777
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784111770.0) == 7.0
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784111800.0) == 0.0


def test_unparseable_retry_after_is_ignored() -> None:
    for value in (None, "", "soon", "nan", "Sun, 99 Nov 1994 08:49:37 GMT"):
        assert parse_retry_after(value, 0.0) is None
    assert parse_retry_after("-5", 0.0) == 0.0


def test_other_4xx_is_rejected_with_the_start_of_the_body() -> None:
    verdict = judge(400, body=b"bad entry " + b"x" * 1000)
    assert isinstance(verdict, Rejected)
    assert verdict.reason.startswith("HTTP 400: bad entry x")
    assert len(verdict.reason) == len("HTTP 400: ") + 500


# -- HTTPSink: delivering -------------------------------------------------------------------


def test_http_sink_posts_the_encoded_batch_with_its_headers() -> None:
    server = Server([(204, {}, b"")])
    d = http_sink(Clock(), server).deliver([{"i": 1}, {"i": 2}])
    assert d.result == Delivered()
    url, headers, body = server.received[0]
    assert url == "http://sink.test/push"
    assert headers[b"Content-Type"] == [b"application/json"]
    assert orjson.loads(body) == [{"i": 1}, {"i": 2}]


def test_http_sink_posts_to_the_batch_url_when_the_encoder_gives_one() -> None:
    class Elsewhere(JsonSink):
        def encode(self, events: Sequence[dict[str, Any]]) -> EncodedBatch:
            return EncodedBatch(b"[]", {}, url="http://other.test/v1/logs")

    server = Server([(200, {}, b"")])
    sink = Elsewhere(
        name="t",
        url="http://sink.test/",
        client=StubTreq(StringStubbingResource(server)),
        clock=Clock(),
    )
    sink.deliver([{"i": 1}])
    assert server.received[0][0] == "http://other.test/v1/logs"


def test_http_sink_judges_status_headers_and_body() -> None:
    server = Server([(429, {"Retry-After": "3"}, b"slow down")])
    d = http_sink(Clock(), server).deliver([{"i": 1}])
    assert d.result == Retry("HTTP 429", 3.0)


def test_connection_refused_is_retried_and_the_reason_has_no_secrets() -> None:
    @attrs.define
    class Refusing:
        def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
            return fail(net_error.ConnectionRefusedError(url, kwargs["headers"]))

    sink = JsonSink(
        name="t", url="http://user:hunter2@sink.test/push", client=Refusing(), clock=Clock()
    )
    verdict = sink.deliver([{"i": 1}]).result
    assert verdict == Retry("connection refused")


def test_dns_failure_is_retried() -> None:
    @attrs.define
    class NoDNS:
        def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
            return fail(net_error.DNSLookupError("sink.test"))

    sink = JsonSink(name="t", url="http://sink.test/", client=NoDNS(), clock=Clock())
    assert sink.deliver([{"i": 1}]).result == Retry("DNS lookup failed")


class Hanging(Resource):
    isLeaf = True

    def render(self, request: Any) -> Any:
        return NOT_DONE_YET


def test_no_answer_within_timeout_is_retried_on_the_injected_clock() -> None:
    clock = Clock()
    sink = JsonSink(
        name="t", url="http://sink.test/", client=StubTreq(Hanging()), clock=clock, timeout=5.0
    )
    verdicts: list[Any] = []
    sink.deliver([{"i": 1}]).addCallback(verdicts.append)
    clock.advance(4.9)
    assert verdicts == []
    clock.advance(0.1)
    assert verdicts == [Retry("timed out after 5s")]
    assert clock.getDelayedCalls() == []


def test_cancelled_delivery_is_a_retry() -> None:
    clock = Clock()
    sink = JsonSink(name="t", url="http://sink.test/", client=StubTreq(Hanging()), clock=clock)
    verdicts: list[Any] = []
    d = sink.deliver([{"i": 1}])
    d.addCallback(verdicts.append)
    d.cancel()
    assert verdicts == [Retry("cancelled")]
    assert clock.getDelayedCalls() == []


def test_encoder_error_fails_the_delivery_deferred() -> None:
    class Broken(JsonSink):
        def encode(self, events: Sequence[dict[str, Any]]) -> EncodedBatch:
            raise KeyError("boom")

    sink = Broken(name="t", url="http://x/", client=None, clock=Clock())  # type: ignore[arg-type]
    d = sink.deliver([{"i": 1}])
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(KeyError)


# -- batching -----------------------------------------------------------------------------


def test_publish_does_not_send_before_flush_interval(tmp_path: Path) -> None:
    h = make(tmp_path, batch_size=10)
    h.publish(1, 2)
    h.clock.advance(0.99)
    assert h.sink.calls == []


def test_partial_batch_is_sent_at_flush_interval(tmp_path: Path) -> None:
    h = make(tmp_path, batch_size=10)
    h.publish(1, 2)
    h.clock.advance(1.0)
    assert h.sink.batches() == [[1, 2]]


def test_full_batch_is_sent_in_the_next_reactor_turn_without_waiting(tmp_path: Path) -> None:
    h = make(tmp_path, batch_size=3)
    h.publish(1, 2, 3)
    assert h.sink.calls == []  # publish itself never encodes nor sends
    h.clock.advance(0)
    assert h.sink.batches() == [[1, 2, 3]]


def test_send_at_sends_a_small_batch_early_and_batches_grow_with_the_backlog(
    tmp_path: Path,
) -> None:
    h = make(tmp_path, batch_size=10, send_at=3)
    h.publish(1, 2)
    h.clock.advance(0)
    assert h.sink.calls == []  # fewer than send_at wait: the flush timer sends them
    h.publish(3)
    h.clock.advance(0)
    assert h.sink.batches() == [[1, 2, 3]]
    # While a batch is in flight the backlog grows; the next batch takes up to
    # batch_size of it as soon as the slot is free, the rest follows at once.
    h.publish(*range(4, 17))
    h.clock.advance(0)
    assert h.sink.batches() == [[1, 2, 3]]
    h.sink.answer(Delivered())
    assert h.sink.batches()[1:] == [list(range(4, 14))]
    h.sink.answer(Delivered())
    assert h.sink.batches()[2:] == [[14, 15, 16]]
    h.sink.answer(Delivered())
    h.publish(17)
    h.clock.advance(0.99)
    assert len(h.sink.calls) == 3
    h.clock.advance(0.01)
    assert h.sink.batches()[3:] == [[17]]
    assert h.stats()["sent"] == 16


def test_the_spool_takes_batch_size_segments_whatever_send_at_is(tmp_path: Path) -> None:
    h = make(tmp_path, batch_size=4, send_at=2, buffer=8, max_retries=0)
    h.publish(1, 2)
    h.clock.advance(0)
    h.sink.answer(Retry("down"))  # failing: what waits goes to the spool every interval
    h.publish(*range(3, 12))
    h.clock.advance(1.0)
    assert h.spool is not None
    counts = sorted(seg.count for seg in h.spool.segments())
    assert max(counts) == 4 and sum(counts) >= 9, counts


def test_batches_are_cut_at_batch_size(tmp_path: Path) -> None:
    h = make(tmp_path, batch_size=2, max_in_flight=5)
    h.publish(1, 2, 3, 4, 5)
    h.clock.advance(1.0)
    assert h.sink.batches() == [[1, 2], [3, 4], [5]]


def test_batches_are_cut_at_batch_bytes(tmp_path: Path) -> None:
    size = len(ev(1).json())
    h = make(tmp_path, batch_bytes=2 * size + 1, max_in_flight=5)
    h.publish(1, 2, 3, 4, 5)
    h.clock.advance(1.0)
    assert h.sink.batches() == [[1, 2], [3, 4], [5]]


def test_event_bigger_than_batch_bytes_is_sent_alone(tmp_path: Path) -> None:
    h = make(tmp_path, batch_bytes=10, max_in_flight=5)
    h.publish(1, 2)
    h.clock.advance(1.0)
    assert h.sink.batches() == [[1], [2]]


def test_one_batch_in_flight_by_default(tmp_path: Path) -> None:
    h = make(tmp_path, batch_size=2)
    h.publish(1, 2, 3, 4)
    h.clock.advance(1.0)
    assert h.sink.batches() == [[1, 2]]
    h.sink.answer(Delivered())
    assert h.sink.batches() == [[1, 2], [3, 4]]


def test_max_in_flight_batches_are_sent_at_once(tmp_path: Path) -> None:
    h = make(tmp_path, batch_size=1, max_in_flight=3)
    h.publish(1, 2, 3, 4)
    h.clock.advance(1.0)
    assert h.sink.batches() == [[1], [2], [3]]
    assert h.stats()["in_flight"] == 3


def test_delivered_events_count_as_sent(tmp_path: Path) -> None:
    h = make(tmp_path)
    h.publish(1, 2, 3)
    h.clock.advance(1.0)
    h.sink.answer(Delivered())
    s = h.stats()
    assert (s["sent"], s["batches_sent"], s["last_success"]) == (3, 1, 1.0)


def test_exporter_sends_nothing_before_start(tmp_path: Path) -> None:
    h = make(tmp_path, start=False, batch_size=1)
    h.publish(1)
    h.clock.advance(5.0)
    assert h.sink.calls == []
    h.exporter.start()
    assert h.sink.batches() == [[1]]


# -- permanent failures --------------------------------------------------------------------


def test_events_rejected_inside_a_delivered_batch_go_to_dead_letter(tmp_path: Path) -> None:
    h = make(tmp_path)
    h.publish(1, 2, 3)
    h.clock.advance(1.0)
    h.sink.answer(Delivered({1: "entry too old", 7: "no such index"}))
    s = h.stats()
    assert (s["sent"], s["dead_lettered"]) == (2, 1)
    [line] = h.dead_letters()
    assert line["event"] == {"type": "request", "i": 2}
    assert (line["reason"], line["sink"]) == ("entry too old", "t")
    assert line["ts"].startswith("1970-01-01T00:00:01")


def test_rejected_batch_goes_to_dead_letter_and_is_never_retried(tmp_path: Path) -> None:
    h = make(tmp_path)
    h.publish(1, 2)
    h.clock.advance(1.0)
    h.sink.answer(Rejected("HTTP 400: bad"))
    h.clock.pump([1.0] * 120)
    assert len(h.sink.calls) == 1
    assert [(d["event"]["i"], d["reason"]) for d in h.dead_letters()] == [
        (1, "HTTP 400: bad"),
        (2, "HTTP 400: bad"),
    ]
    s = h.stats()
    assert (s["dead_lettered"], s["batches_failed"], s["retries"]) == (2, 1, 0)
    assert s["last_error"] == "rejected: HTTP 400: bad"


def test_400_goes_to_dead_letter_and_is_never_retried(tmp_path: Path) -> None:
    clock = Clock()
    server = Server([(400, {}, b"entry out of order")])
    h = make(tmp_path, clock=clock, sink=http_sink(clock, server))
    h.publish(1)
    clock.pump([1.0] * 100)
    assert len(server.received) == 1
    assert h.dead_letters()[0]["reason"] == "HTTP 400: entry out of order"
    assert h.stats()["dead_lettered"] == 1


# -- retries --------------------------------------------------------------------------------


def test_429_is_retried_after_retry_after_seconds(tmp_path: Path) -> None:
    clock = Clock()
    server = Server([(429, {"Retry-After": "30"}, b""), (204, {}, b"")])
    h = make(tmp_path, clock=clock, sink=http_sink(clock, server), backoff_min=0.5)
    h.publish(1)
    clock.advance(1.0)
    assert len(server.received) == 1
    clock.advance(29.9)
    assert len(server.received) == 1
    clock.advance(0.1)
    assert server.batches() == [[1], [1]]
    assert h.stats()["sent"] == 1


def test_503_is_retried_with_backoff(tmp_path: Path) -> None:
    clock = Clock()
    server = Server([(503, {}, b""), (204, {}, b"")])
    h = make(tmp_path, clock=clock, sink=http_sink(clock, server))
    h.publish(1)
    clock.advance(1.0)
    clock.advance(1.0)  # backoff_min with random() == 0
    assert server.batches() == [[1], [1]]
    assert h.stats()["retries"] == 1


def test_after_recovery_failing_clears_and_the_last_error_stays_with_its_time(
    tmp_path: Path,
) -> None:
    clock = Clock()
    clock.advance(1000.0)
    server = Server([(503, {}, b""), (204, {}, b"")])
    h = make(tmp_path, clock=clock, sink=http_sink(clock, server))
    h.publish(1)
    clock.advance(1.0)
    failed = h.stats()
    assert failed["failing"] is True
    assert failed["last_error"] is not None and "503" in failed["last_error"]
    assert failed["last_error_at"] == 1001.0
    clock.advance(1.0)
    recovered = h.stats()
    # The record of the last failure is kept (when did it last go wrong?); failing
    # says whether it is failing now, and last_success is after last_error_at.
    assert recovered["failing"] is False
    assert (recovered["last_error"], recovered["last_error_at"]) == (
        failed["last_error"],
        failed["last_error_at"],
    )
    assert recovered["last_success"] > recovered["last_error_at"]


def test_backoff_doubles_its_ceiling_with_full_jitter(tmp_path: Path) -> None:
    draws = iter([1.0, 1.0, 1.0, 0.5])
    h = make(tmp_path, random=lambda: next(draws), backoff_min=1.0, backoff_max=60.0)
    h.publish(1)
    h.clock.advance(1.0)
    waits = []
    for _ in range(4):
        h.sink.answer(Retry("HTTP 503"))
        [timer] = [c for c in h.clock.getDelayedCalls() if "_retry" in repr(c)]
        waits.append(timer.getTime() - h.clock.seconds())
        h.clock.advance(waits[-1])
    # ceilings 2, 4, 8, 16; the last draw 0.5 lands half-way between 1 and 16
    assert waits == [2.0, 4.0, 8.0, 8.5]


def test_backoff_never_exceeds_backoff_max(tmp_path: Path) -> None:
    h = make(tmp_path, random=lambda: 1.0, backoff_min=1.0, backoff_max=3.0, max_retries=10)
    h.publish(1)
    h.clock.advance(1.0)
    for _ in range(6):
        h.sink.answer(Retry("HTTP 503"))
        [timer] = [c for c in h.clock.getDelayedCalls() if "_retry" in repr(c)]
        assert timer.getTime() - h.clock.seconds() <= 3.0
        h.clock.advance(3.0)


def test_retry_after_is_capped_at_backoff_max(tmp_path: Path) -> None:
    h = make(tmp_path, backoff_max=10.0)
    h.publish(1)
    h.clock.advance(1.0)
    h.sink.answer(Retry("HTTP 429", after=3600.0))
    h.clock.advance(9.9)
    assert len(h.sink.calls) == 1
    h.clock.advance(0.1)
    assert len(h.sink.calls) == 2


def test_publish_keeps_accepting_while_a_batch_waits_in_backoff(tmp_path: Path) -> None:
    h = make(tmp_path, batch_size=2)
    h.publish(1, 2)
    h.clock.advance(0)
    h.sink.answer(Retry("HTTP 503"))
    h.publish(3, 4, 5)
    s = h.stats()
    assert (s["accepted"], s["queued"], s["retrying"], s["queue_depth"]) == (5, 5, 2, 3)
    assert s["dropped"] == 0


def test_a_retrying_batch_keeps_its_slot_so_nothing_overtakes_it(tmp_path: Path) -> None:
    h = make(tmp_path, batch_size=1)
    h.publish(1, 2)
    h.clock.advance(0)
    h.sink.answer(Retry("HTTP 503"))
    h.clock.advance(0.5)
    assert h.sink.batches() == [[1]]
    h.clock.advance(0.5)
    assert h.sink.batches() == [[1], [1]]
    h.sink.answer(Delivered())
    assert h.sink.batches() == [[1], [1], [2]]


def test_retries_exhausted_batch_goes_to_the_spool(tmp_path: Path) -> None:
    h = make(tmp_path, max_retries=2)
    h.publish(1, 2)
    h.clock.advance(1.0)
    h.sink.answer(Retry("HTTP 503"))
    h.clock.advance(1.0)
    h.sink.answer(Retry("HTTP 503"))
    h.clock.advance(1.0)
    h.sink.answer(Retry("HTTP 503"))
    s = h.stats()
    assert (s["spooled"], s["retries"], s["batches_failed"]) == (2, 2, 3)
    assert h.spooled_ids() == [1, 2]


def test_retries_exhausted_without_spool_are_dropped_with_a_reason(tmp_path: Path) -> None:
    h = make(tmp_path, spool=False, max_retries=1)
    h.publish(1, 2)
    h.clock.advance(1.0)
    h.sink.answer(Retry("HTTP 503"))
    h.clock.advance(1.0)
    h.sink.answer(Retry("HTTP 503"))
    assert h.stats()["dropped_by_reason"] == {"retries_exhausted": 2}


def test_exporter_pauses_after_exhausted_retries_then_resends_the_oldest(tmp_path: Path) -> None:
    h = make(tmp_path, max_retries=0, batch_size=1, backoff_min=2.0)
    h.publish(1, 2)
    h.clock.advance(0)
    h.sink.answer(Retry("HTTP 503"))
    h.clock.advance(1.9)
    assert h.sink.batches() == [[1]]
    h.clock.advance(0.1)
    assert h.sink.batches() == [[1], [1]]  # the spooled batch is the oldest: it goes first
    h.sink.answer(Delivered())
    assert h.sink.batches() == [[1], [1], [2]]
    assert h.spooled_ids() == [2]  # made durable while the sink failed: replayed
    h.sink.answer(Delivered())
    assert h.spooled_ids() == []


def test_unexpected_deliver_errback_is_retried_and_warned_once(
    tmp_path: Path, warnings: list[dict[str, Any]]
) -> None:
    h = make(tmp_path)
    h.publish(1)
    h.clock.advance(1.0)
    h.sink.pending[0][1].errback(ZeroDivisionError("boom"))
    h.clock.advance(1.0)
    h.sink.pending[0][1].errback(ZeroDivisionError("boom"))
    h.clock.advance(2.0)
    assert h.sink.batches() == [[1], [1], [1]]
    assert h.stats()["last_error"] == "deliver() failed: ZeroDivisionError"
    notes = [w for w in warnings if "unexpectedly" in str(w.get("message", ""))]
    assert len(notes) == 1
    assert notes[0]["log_level"].name == "warn"


def test_deliver_raising_synchronously_is_retried(tmp_path: Path) -> None:
    @attrs.define
    class Raising(FakeSink):
        raised: int = 0

        def deliver(self, events: Sequence[dict[str, Any]]) -> Deferred[Any]:
            if not self.raised:
                self.raised += 1
                raise RuntimeError("no")
            return super().deliver(events)

    h = make(tmp_path, sink=Raising())
    h.publish(1)
    h.clock.advance(1.0)
    h.clock.advance(1.0)
    assert h.sink.batches() == [[1]]
    assert h.stats()["retries"] == 1


def test_last_error_never_contains_a_secret(tmp_path: Path) -> None:
    @attrs.define
    class Refusing:
        def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
            return fail(net_error.ConnectionRefusedError(f"{url} {kwargs['headers']}"))

    clock = Clock()
    sink = JsonSink(name="t", url="http://u:hunter2@sink.test/", client=Refusing(), clock=clock)
    h = make(tmp_path, clock=clock, sink=sink)
    h.publish(1)
    clock.advance(1.0)
    error = h.stats()["last_error"]
    assert error == "connection refused"
    assert "hunter2" not in error and "sk-secret" not in error


# -- buffer bounds --------------------------------------------------------------------------


def test_full_buffer_spills_the_oldest_events_to_the_spool(tmp_path: Path) -> None:
    h = make(tmp_path, buffer=4, batch_size=2)
    h.publish(1, 2, 3, 4, 5)
    assert h.spooled_ids() == [1, 2]
    s = h.stats()
    assert (s["queue_depth"], s["spooled"], s["dropped"]) == (3, 2, 0)


def test_full_buffer_without_spool_drops_the_new_event(tmp_path: Path) -> None:
    h = make(tmp_path, spool=False, buffer=2)
    h.publish(1, 2, 3)
    s = h.stats()
    assert s["dropped_by_reason"] == {"buffer_full": 1}
    h.clock.advance(1.0)
    assert h.sink.batches() == [[1, 2]]


def test_buffer_bytes_bound_counts_size_hints(tmp_path: Path) -> None:
    size = ev(1).size_hint
    h = make(tmp_path, spool=False, buffer_bytes=2 * size)
    h.publish(1, 2, 3)
    s = h.stats()
    assert (s["queue_bytes"], s["dropped"]) == (2 * size, 1)


def test_an_event_alone_bigger_than_buffer_bytes_is_accepted(tmp_path: Path) -> None:
    h = make(tmp_path, spool=False, buffer_bytes=5)
    h.publish(1)
    assert h.stats()["queue_depth"] == 1


def test_publish_never_raises_on_a_broken_envelope(tmp_path: Path) -> None:
    class Broken:
        kind = "request"

        @property
        def size_hint(self) -> int:
            raise ValueError("no size")

    h = make(tmp_path)
    h.exporter.publish(Broken())  # type: ignore[arg-type]
    assert h.stats()["dropped_by_reason"] == {"bad_envelope": 1}


class Unencodable:
    """An envelope whose event cannot be encoded (a set is not JSON)."""

    kind = "request"
    size_hint = 10

    def payload(self) -> dict[str, Any]:
        return {"bad": {1, 2}}

    def json(self) -> bytes:
        return orjson.dumps(self.payload())


def test_event_that_cannot_be_encoded_is_dropped_with_a_reason(tmp_path: Path) -> None:
    h = make(tmp_path)
    h.exporter.publish(Unencodable())
    h.publish(2)
    h.clock.advance(1.0)
    assert h.sink.batches() == [[2]]
    assert h.stats()["dropped_by_reason"] == {"encode_failed": 1}


# -- spool replay ---------------------------------------------------------------------------


def test_spool_is_replayed_first_once_the_sink_delivers(tmp_path: Path) -> None:
    h = make(tmp_path, buffer=2, batch_size=2)
    h.publish(1, 2, 3, 4, 5)  # 1, 2 spilled; 3 then 4, 5 spilled...
    h.clock.advance(0)
    while h.sink.pending:
        h.sink.answer(Delivered())
        h.clock.advance(1.0)
    assert [i for batch in h.sink.batches() for i in batch] == [1, 2, 3, 4, 5]
    assert h.stats()["sent"] == 5


def test_spool_replayed_oldest_first_after_restart(tmp_path: Path) -> None:
    first = make(tmp_path, batch_size=2)
    first.publish(1, 2, 3, 4, 5)
    first.clock.advance(0)
    first.exporter.stop(1.0)
    first.clock.advance(1.0)
    assert first.spooled_ids() == [1, 2, 3, 4, 5]

    second = make(tmp_path, batch_size=2)
    assert second.sink.batches() == [[1, 2]]
    second.publish(6)
    while second.sink.pending:
        second.sink.answer(Delivered())
        second.clock.advance(1.0)
    assert second.sink.batches() == [[1, 2], [3, 4], [5], [6]]


def test_events_recovered_at_start_count_as_accepted_and_recovered(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 10**9)
    spool.append([ev(1).json(), ev(2).json()], 0, 1)
    h = make(tmp_path, start=False)
    s = h.stats()
    assert (s["accepted"], s["recovered"], s["spooled"]) == (2, 2, 2)


def test_replay_waits_while_a_batch_is_in_backoff(tmp_path: Path) -> None:
    h = make(tmp_path, max_in_flight=2, batch_size=1, buffer=1)
    h.publish(1)
    h.clock.advance(0)
    h.sink.answer(Retry("HTTP 503"))  # 1 waits in backoff: the sink is failing
    h.publish(2, 3)  # the full buffer spills 2 to the spool
    assert h.spooled_ids() == [1, 2]  # 1 was made durable as it failed
    h.clock.advance(0)
    assert h.sink.batches() == [[1], [3]]  # the free slot sends new events, no replay


def test_replayed_segment_is_deleted_only_after_delivery(tmp_path: Path) -> None:
    Spool(tmp_path / "spool", 10**9).append([ev(1).json()], 0, 0)
    h = make(tmp_path)
    assert h.sink.batches() == [[1]]
    assert len(list((tmp_path / "spool").glob("*.jsonl"))) == 1
    assert h.stats()["in_flight"] == 1
    h.sink.answer(Delivered())
    assert list((tmp_path / "spool").glob("*.jsonl")) == []


def test_failed_replay_stays_in_the_spool_at_its_place(tmp_path: Path) -> None:
    Spool(tmp_path / "spool", 10**9).append([ev(1).json()], 0, 0)
    h = make(tmp_path, max_retries=0)
    h.sink.answer(Retry("HTTP 503"))
    assert h.spooled_ids() == [1]
    s = h.stats()
    assert (s["spooled"], s["in_flight"], s["dropped"]) == (1, 0, 0)


def test_corrupt_spool_lines_go_to_the_dead_letter_file(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "0-2-3.jsonl").write_bytes(
        ev(1).json() + b"\n{not json\n" + ev(3).json() + b"\n"
    )
    h = make(tmp_path)
    assert h.sink.batches() == [[1, 3]]
    [line] = h.dead_letters()
    assert (line["reason"], line["raw"]) == ("spool_corrupt", "{not json")
    s = h.stats()
    assert (s["accepted"], s["in_flight"], s["dead_lettered"]) == (3, 2, 1)


def test_spool_segment_shorter_than_its_name_counts_the_missing_as_dropped(
    tmp_path: Path,
) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "0-4-5.jsonl").write_bytes(ev(1).json() + b"\n")
    h = make(tmp_path)
    assert h.sink.batches() == [[1]]
    assert h.stats()["dropped_by_reason"] == {"spool_corrupt": 4}


def test_spool_full_discards_the_oldest_and_counts_them(tmp_path: Path) -> None:
    line = len(ev(1).json()) + 1
    h = make(tmp_path, buffer=1, batch_size=1, spool_max_bytes=2 * line)
    h.publish(1, 2, 3, 4)  # 1, 2, 3 spilled; the third spill discards 1
    assert h.spooled_ids() == [2, 3]
    assert h.stats()["dropped_by_reason"] == {"spool_full": 1}


# -- shutdown ----------------------------------------------------------------------------


def test_close_flushes_what_is_queued_and_waits_for_deliveries(tmp_path: Path) -> None:
    h = make(tmp_path, batch_size=2)
    h.publish(1, 2, 3)
    done = h.exporter.stop(10.0)
    assert h.sink.batches() == [[1, 2]]
    assert not done.called
    h.sink.answer(Delivered())
    assert h.sink.batches() == [[1, 2], [3]]
    h.sink.answer(Delivered())
    assert done.called
    s = h.stats()
    assert (s["sent"], s["state"]) == (3, "closed")
    assert h.sink.closed == 1


def test_close_spools_undelivered_at_deadline(tmp_path: Path) -> None:
    h = make(tmp_path, batch_size=2, max_in_flight=2)
    h.publish(1, 2, 3, 4)
    h.clock.advance(0)
    h.sink.answer(Retry("HTTP 503"))  # 1, 2 wait in backoff; 3, 4 in flight
    h.publish(5)
    done = h.exporter.stop(0.5)
    h.clock.advance(0.5)
    assert done.called
    assert h.spooled_ids() == [1, 2, 3, 4, 5]
    s = h.stats()
    assert (s["spooled"], s["in_flight"], s["queued"], s["state"]) == (5, 0, 0, "closed")


def test_close_fires_by_the_deadline_even_if_the_sink_never_answers(tmp_path: Path) -> None:
    h = make(tmp_path)
    h.publish(1)
    h.clock.advance(1.0)
    done = h.exporter.stop(3.0)
    h.clock.advance(2.9)
    assert not done.called
    h.clock.advance(0.1)
    assert done.called
    assert h.sink.calls[0][1].called  # cancelled


def test_close_fires_by_the_deadline_even_if_sink_close_never_answers(tmp_path: Path) -> None:
    sink = FakeSink(close_result=Deferred())
    h = make(tmp_path, sink=sink)
    done = h.exporter.stop(2.0)
    assert not done.called
    h.clock.advance(2.0)
    assert done.called
    assert h.clock.getDelayedCalls() == []


def test_close_leaves_no_delayed_call_behind(tmp_path: Path) -> None:
    h = make(tmp_path, batch_size=1, max_in_flight=2)
    h.publish(1, 2, 3)
    h.clock.advance(0)
    h.sink.answer(Retry("HTTP 503"))
    h.exporter.stop(5.0)
    h.clock.advance(5.0)
    assert h.clock.getDelayedCalls() == []


def test_close_is_idempotent(tmp_path: Path) -> None:
    h = make(tmp_path)
    h.publish(1)
    h.clock.advance(1.0)
    first = h.exporter.stop(5.0)
    second = h.exporter.stop(100.0)
    assert not first.called and not second.called
    h.sink.answer(Delivered())
    assert first.called and second.called
    assert h.exporter.stop(1.0).called
    assert h.sink.closed == 1


def test_close_without_spool_drops_the_undelivered_with_a_reason(tmp_path: Path) -> None:
    h = make(tmp_path, spool=False)
    h.publish(1, 2)
    h.clock.advance(1.0)
    h.publish(3)
    h.exporter.stop(1.0)
    h.clock.advance(1.0)
    assert h.stats()["dropped_by_reason"] == {"shutdown_no_spool": 3}


def test_close_before_start_spools_the_queue_at_once(tmp_path: Path) -> None:
    h = make(tmp_path, start=False)
    h.publish(1)
    assert h.exporter.stop(5.0).called
    assert h.spooled_ids() == [1]


def test_publish_after_close_goes_to_the_spool_and_is_counted(tmp_path: Path) -> None:
    h = make(tmp_path)
    h.exporter.stop(1.0)
    h.publish(1)
    assert h.spooled_ids() == [1]
    s = h.stats()
    assert (s["after_close"], s["spooled"], s["dropped"]) == (1, 1, 0)


def test_publish_after_close_without_spool_is_dropped_as_closed(tmp_path: Path) -> None:
    h = make(tmp_path, spool=False)
    h.exporter.stop(1.0)
    h.publish(1)
    assert h.stats()["dropped_by_reason"] == {"closed": 1}


def test_publish_during_the_drain_is_spooled_when_it_ends(tmp_path: Path) -> None:
    h = make(tmp_path)
    h.publish(1)
    h.clock.advance(1.0)
    done = h.exporter.stop(5.0)
    h.publish(2)
    assert h.stats()["queued"] == 1
    h.sink.answer(Delivered())
    assert done.called
    assert h.sink.batches() == [[1]]
    assert h.spooled_ids() == [2]


def test_close_replays_older_spool_segments_before_the_queue(tmp_path: Path) -> None:
    h = make(tmp_path, max_retries=0, backoff_min=1.0)
    h.publish(1)
    h.clock.advance(1.0)
    h.sink.answer(Retry("HTTP 503"))  # 1 is spooled, the exporter pauses
    h.publish(2)
    done = h.exporter.stop(10.0)
    h.clock.advance(1.0)  # the pause ends: the oldest goes first
    assert h.sink.answer(Delivered()) == [1]
    assert h.sink.answer(Delivered()) == [2]
    assert done.called


# -- stats ---------------------------------------------------------------------------------


def test_stats_report_queue_depth_bytes_and_oldest_age(tmp_path: Path) -> None:
    h = make(tmp_path, batch_size=100, flush_interval=10.0)
    h.publish(1)
    h.clock.advance(4.0)
    h.publish(2)
    s = h.stats()
    assert (s["queue_depth"], s["queue_bytes"]) == (2, 2 * ev(1).size_hint)
    assert s["oldest_queued_age_s"] == 4.0
    assert (s["state"], s["last_success"], s["last_error"]) == ("running", None, None)


def test_stats_count_every_exit_reason_in_the_identity(tmp_path: Path) -> None:
    h = make(tmp_path, batch_size=1, max_in_flight=4, buffer=3, max_retries=0)
    h.publish(1, 2, 3, 4, 5, 6)
    h.clock.advance(0)
    h.stats()
    h.sink.answer(Delivered())
    h.sink.answer(Rejected("HTTP 400"))
    h.sink.answer(Retry("HTTP 503"))
    s = h.stats()
    assert s["sent"] == 1 and s["dead_lettered"] == 1 and s["spooled"] >= 1


@attrs.define
class LinesSink(FakeSink):
    """A sink that takes each event's JSON as the exporter already holds it."""

    lines: list[list[bytes]] = attrs.Factory(list)

    def deliver_lines(self, events: Sequence[dict[str, Any]], lines: Sequence[bytes]) -> Any:
        self.lines.append(list(lines))
        return self.deliver(events)


def test_a_sink_with_deliver_lines_gets_the_encoded_events(tmp_path: Path) -> None:
    h = make(tmp_path, sink=LinesSink(), batch_size=3)
    h.publish(1, 2, 3)
    h.clock.advance(1.0)
    assert h.sink.batches() == [[1, 2, 3]]
    assert [[orjson.loads(x) for x in batch] for batch in h.sink.lines] == [
        [{"type": "request", "i": i} for i in (1, 2, 3)]
    ]
    assert h.sink.answer(Delivered()) == [1, 2, 3]
    assert h.stats()["sent"] == 3


@attrs.define
class PreparingSink(FakeSink):
    """A sink that does its per-event work when the exporter publishes an event."""

    prepared_at_publish: list[int] = attrs.Factory(list)
    received: list[list[Any]] = attrs.Factory(list)
    refuse: frozenset[int] = frozenset()

    def prepare(self, event: dict[str, Any], line: bytes) -> Any:
        if event["i"] in self.refuse:
            raise ValueError("cannot prepare this one")
        self.prepared_at_publish.append(event["i"])
        return ("prepared", event["i"], line)

    def deliver_prepared(
        self, events: Sequence[dict[str, Any]], lines: Sequence[bytes], prepared: Sequence[Any]
    ) -> Any:
        self.received.append(list(prepared))
        return self.deliver(events)


def test_a_sink_prepares_each_event_when_it_is_published(tmp_path: Path) -> None:
    sink = PreparingSink(refuse=frozenset({2}))
    h = make(tmp_path, sink=sink, batch_size=3)
    h.publish(1, 2, 3)
    # Prepared as published, before any batch was made.
    assert sink.prepared_at_publish == [1, 3] and sink.calls == []
    h.clock.advance(1.0)
    (got,) = sink.received
    assert got[0] == ("prepared", 1, orjson.dumps({"type": "request", "i": 1}))
    assert got[1] is None  # its prepare failed: the sink does it again when sending
    assert got[2][:2] == ("prepared", 3)
    # A retry sends the same prepared values; nothing is kept once batched.
    h.sink.answer(Retry("HTTP 503"))
    h.clock.advance(60.0)
    assert sink.received[1] == got
    assert h.exporter._prepared == {}


def test_events_replayed_from_the_spool_arrive_unprepared(tmp_path: Path) -> None:
    first = make(tmp_path, sink=PreparingSink(), batch_size=2, max_retries=0)
    first.publish(1, 2)
    first.clock.advance(1.0)
    first.sink.answer(Retry("HTTP 503"))  # no retries left: spooled
    assert first.spooled_ids() == [1, 2]
    again = make(tmp_path, sink=PreparingSink(), batch_size=2)
    again.clock.advance(1.0)
    assert again.sink.received == [[None, None]]
    assert again.sink.answer(Delivered()) == [1, 2]
