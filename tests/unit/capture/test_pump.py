"""The capture pump: records queued on the request path become events a turn later."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from llmproxy.capture.pump import CapturePump
from llmproxy.capture.record import ExchangeRecord
from llmproxy.capture.sessions import SessionTracker
from llmproxy.config.model import CaptureSettings

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
REPLY = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


def record(rid: str, body: dict[str, Any] = CHAT) -> ExchangeRecord:
    raw = json.dumps(body).encode()
    return ExchangeRecord(
        request_id=rid,
        started_at=1_700_000_000.0,
        method="POST",
        path="/openai/v1/chat/completions",
        query="",
        route="openai",
        provider="openai",
        upstream_url="https://api.openai.com/v1/chat/completions",
        upstream_host="api.openai.com",
        client_addr="127.0.0.1:5000",
        request_headers=[(b"Content-Type", b"application/json")],
        request_body=raw,
        request_body_size=len(raw),
        environment="test",
        machine="m",
    )


def finish(rec: ExchangeRecord) -> None:
    reply = json.dumps(REPLY).encode()
    rec.status = 200
    rec.outcome = "ok"
    rec.first_byte_at = 0.01
    rec.ended_at = 0.02
    rec.response_headers = [(b"Content-Type", b"application/json")]
    rec.response_chunks = [(0.01, reply)]
    rec.response_body_size = len(reply)


class Bus:
    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    def publish(self, envelope: Any) -> None:
        self.envelopes.append(envelope)

    def kinds(self) -> list[tuple[str, str]]:
        return [(e.payload()["type"], e.payload()["request_id"]) for e in self.envelopes]


class Calls:
    """A tracker that records the order it is called in (and may fail)."""

    max_body_bytes = 1000

    def __init__(self, fail_for: str = "") -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_for = fail_for

    def assign(self, record: ExchangeRecord, body: bytes) -> Deferred[None] | None:
        if record.request_id == self.fail_for:
            raise RuntimeError("tracker bug")
        self.calls.append(("assign", record.request_id))
        record.session_id = "s-" + record.request_id
        record.seq = 1
        return None

    def finished(self, record: ExchangeRecord) -> None:
        self.calls.append(("finished", record.request_id))


def make(tracker: Any = None) -> tuple[CapturePump, Bus, Clock]:
    clock, bus = Clock(), Bus()
    pump = CapturePump(bus, CaptureSettings(), clock, enabled=True, sessions=tracker)
    return pump, bus, clock


def test_nothing_happens_on_the_request_path() -> None:
    calls = Calls()
    pump, bus, clock = make(calls)
    a = record("a")
    pump.request_started(a, a.request_body)
    finish(a)
    pump.request_finished(a)
    assert bus.envelopes == [] and calls.calls == [] and pump.pending() == 2
    assert len(clock.getDelayedCalls()) == 1  # one turn scheduled for both
    clock.advance(0)
    assert calls.calls == [("assign", "a"), ("finished", "a")]
    assert bus.kinds() == [("request", "a"), ("response", "a")]
    assert pump.pending() == 0 and clock.getDelayedCalls() == []


def test_order_is_kept_across_exchanges_and_turns() -> None:
    calls = Calls()
    pump, bus, clock = make(calls)
    a, b, c = record("a"), record("b"), record("c")
    pump.request_started(a, b"{}")
    pump.request_started(b, b"{}")
    pump.request_finished(a)
    clock.advance(0)
    pump.request_started(c, b"{}")
    pump.request_finished(b)
    pump.request_finished(c)
    clock.advance(0)
    expected = [("request", "a"), ("request", "b"), ("response", "a")]
    expected += [("request", "c"), ("response", "b"), ("response", "c")]
    assert bus.kinds() == expected
    assert [kind for kind, _ in calls.calls] == [
        "assign", "assign", "finished", "assign", "finished", "finished",
    ]  # fmt: skip


def test_events_carry_the_session_and_are_encoded_once() -> None:
    pump, bus, clock = make(Calls())
    a = record("a")
    pump.request_started(a, a.request_body)
    finish(a)
    pump.request_finished(a)
    clock.advance(0)
    request, response = bus.envelopes
    # The JSON is ready before any exporter asks, and it is the payload's.
    assert request._encoded is not None and response._encoded is not None
    assert orjson.loads(request.json()) == request.payload()
    assert request.payload()["session_id"] == "s-a" and request.payload()["seq"] == 1
    assert response.payload()["usage"]["total_tokens"] == 4


def first_turn_through_a_real_tracker() -> tuple[Clock, Bus, CapturePump, ExchangeRecord]:
    """A pump with a real session tracker that has handled one whole first turn."""
    clock, bus = Clock(), Bus()
    tracker = SessionTracker(bus.publish, None, 1000, clock)
    pump = CapturePump(bus, CaptureSettings(), clock, enabled=True, sessions=tracker)
    first = record("first")
    pump.request_started(first, first.request_body)
    finish(first)
    pump.request_finished(first)
    clock.advance(0)
    return clock, bus, pump, first


def test_a_real_tracker_starts_and_continues_a_conversation() -> None:
    clock, bus, pump, first = first_turn_through_a_real_tracker()
    turn2 = {
        "model": "gpt-4o-mini",
        "messages": [
            *CHAT["messages"],
            REPLY["choices"][0]["message"],
            {"role": "user", "content": "and?"},
        ],  # type: ignore[index]
    }
    second = record("second", turn2)
    pump.request_started(second, second.request_body)
    clock.advance(0)
    assert first.session_id is not None
    assert second.session_id == first.session_id and second.seq == 2
    kinds = [e.payload()["type"] for e in bus.envelopes]
    assert kinds == ["session_start", "request", "response", "request"]


@pytest.mark.allow_logged_errors
def test_a_failing_tracker_costs_one_event_not_the_rest(
    _fail_on_logged_errors: list[dict[str, Any]],
) -> None:
    pump, bus, clock = make(Calls(fail_for="b"))
    for rid in ("a", "b", "c"):
        r = record(rid)
        pump.request_started(r, r.request_body)
    clock.advance(0)
    assert bus.kinds() == [("request", "a"), ("request", "c")]
    assert pump.errors == 1 and pump.flushed == 3
    assert [e.get("rid") for e in _fail_on_logged_errors] == ["b"]  # logged, with the id


def test_close_handles_what_is_queued_and_leaves_no_timer() -> None:
    pump, bus, clock = make()
    a = record("a")
    pump.request_started(a, b"")
    pump.request_finished(a)
    pump.stop(0)
    assert bus.kinds() == [("request", "a"), ("response", "a")]
    assert clock.getDelayedCalls() == []


def test_the_response_event_is_the_same_whether_the_tracker_read_the_reply_or_not() -> None:
    clock, bus = Clock(), Bus()
    tracker = SessionTracker(bus.publish, None, 1000, clock)
    tracked = CapturePump(bus, CaptureSettings(), clock, enabled=True, sessions=tracker)
    plain_bus = Bus()
    plain = CapturePump(plain_bus, CaptureSettings(), clock, enabled=True)
    a, b = record("a"), record("a")
    for pump, rec in ((tracked, a), (plain, b)):
        pump.request_started(rec, rec.request_body)
        finish(rec)
        pump.request_finished(rec)
    clock.advance(0)
    assert a.reply_summary is not None and b.reply_summary is None  # only one parsed twice
    tracked_event = dict(bus.envelopes[-1].payload())
    assert (tracked_event.pop("session_id"), tracked_event.pop("seq")) == (a.session_id, 1)
    plain_event = dict(plain_bus.envelopes[-1].payload())
    del plain_event["session_id"], plain_event["seq"]
    assert tracked_event == plain_event
    assert bus.envelopes[-1].payload()["model"] == "gpt-4o-mini-2024-07-18"


def test_only_a_session_tracker_needs_the_whole_request_body_up_to_its_bound() -> None:
    assert make()[0].whole_body_bytes == 0
    assert make(Calls())[0].whole_body_bytes == Calls.max_body_bytes


def finish_streamed(rec: ExchangeRecord) -> None:
    """A streamed reply: three chat chunks, a usage chunk and [DONE], one chunk each."""
    header = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini-2024-07-18"}
    frames: list[dict[str, Any]] = [
        {**header, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {**header, "choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {**header, "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {**header, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
    ]
    chunks = [b"data: " + orjson.dumps(frame) + b"\n\n" for frame in frames]
    chunks.append(b"data: [DONE]\n\n")
    rec.status = 200
    rec.outcome = "ok"
    rec.first_byte_at = 0.01
    rec.ended_at = 0.02
    rec.response_headers = [(b"Content-Type", b"text/event-stream; charset=utf-8")]
    rec.response_chunks = [(0.01 + i / 1000, chunk) for i, chunk in enumerate(chunks)]
    rec.response_body_size = sum(len(chunk) for chunk in chunks)


def test_a_streamed_reply_is_read_once_and_its_event_is_the_same() -> None:
    clock, bus = Clock(), Bus()
    tracker = SessionTracker(bus.publish, None, 1000, clock)
    tracked = CapturePump(bus, CaptureSettings(), clock, enabled=True, sessions=tracker)
    plain_bus = Bus()
    plain = CapturePump(plain_bus, CaptureSettings(), clock, enabled=True)
    a, b = record("a", {**CHAT, "stream": True}), record("a", {**CHAT, "stream": True})
    for pump, rec in ((tracked, a), (plain, b)):
        pump.request_started(rec, rec.request_body)
        finish_streamed(rec)
        pump.request_finished(rec)
    clock.advance(0)
    # The tracker's reading of the stream is left for the event (not parsed twice).
    assert a.reply_summary is not None and b.reply_summary is None
    assert tracker.stats()["states_recorded"] == 1  # it read the reply: "Hello"
    tracked_event = dict(bus.envelopes[-1].payload())
    assert (tracked_event.pop("session_id"), tracked_event.pop("seq")) == (a.session_id, 1)
    plain_event = dict(plain_bus.envelopes[-1].payload())
    del plain_event["session_id"], plain_event["seq"]
    assert tracked_event == plain_event
    assert tracked_event["usage"]["total_tokens"] == 5
    assert tracked_event["finish_reasons"] == ["stop"]
    assert tracked_event["model"] == "gpt-4o-mini-2024-07-18"


def test_the_tracker_takes_the_request_object_the_events_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llmproxy.capture import sessions

    parsed_by_tracker: list[Any] = []

    class CountingOrjson:
        def __getattr__(self, name: str) -> Any:
            return getattr(orjson, name)

        def loads(self, data: Any) -> Any:
            parsed_by_tracker.append(data)
            return orjson.loads(data)

    monkeypatch.setattr(sessions, "orjson", CountingOrjson())
    clock, bus, pump, first = first_turn_through_a_real_tracker()
    # The next turn: the conversation goes on in the same session, exactly as it
    # does when the tracker parses the body itself.
    follow_up = {
        **CHAT,
        "messages": [
            *CHAT["messages"],  # type: ignore[misc]
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "more"},
        ],
    }
    second = record("second", follow_up)
    pump.request_started(second, second.request_body)
    clock.advance(0)
    assert (second.session_id, second.seq) == (first.session_id, 2)
    assert parsed_by_tracker == []  # neither request body was parsed a second time
    request = bus.envelopes[-1].payload()
    assert (request["type"], request["session_id"], request["seq"]) == (
        "request",
        first.session_id,
        2,
    )


# ---------------------------------------------------------------- cache hits

CACHE_KEY = "openai/anon/POST/3be9"


def answer_from_cache(
    rec: ExchangeRecord,
    chunks: list[bytes],
    content_type: bytes,
    *,
    status: str = "hit",
    age: float = 12.3456,
) -> None:
    """What the proxy leaves in a record it answered from the cache: the served
    status and headers, the entry's chunks by reference, the cache's marks."""
    rec.status = 304 if status == "conditional-hit" else 200
    rec.outcome = "ok"
    rec.first_byte_at = 0.0003
    rec.ended_at = 0.0004
    rec.response_headers = [(b"content-type", content_type)]
    rec.replayed = tuple(chunks) if status == "hit" else None
    rec.cache_status, rec.cache_key, rec.cache_age = status, CACHE_KEY, age


def streamed_reply() -> list[bytes]:
    probe = record("probe")
    finish_streamed(probe)
    return [chunk for _, chunk in probe.response_chunks]


def test_a_json_cache_hit_becomes_both_events_marked_with_key_and_age() -> None:
    pump, bus, clock = make(Calls())
    hit = record("hit")
    pump.request_started(hit, hit.request_body)
    reply = json.dumps(REPLY).encode()
    answer_from_cache(hit, [reply], b"application/json")
    pump.request_finished(hit)
    assert hit.response_chunks == []  # nothing copied on the request path
    clock.advance(0)
    request, response = (e.payload() for e in bus.envelopes)
    assert (request["type"], request["session_id"]) == ("request", "s-hit")
    assert "cache_status" not in request  # the request side is the same as a miss's
    assert response["type"] == "response"
    assert (response["cache_status"], response["cache_key"]) == ("hit", CACHE_KEY)
    assert response["cache_age_s"] == 12.346
    assert (response["status"], response["outcome"], response["error"]) == (200, "ok", None)
    assert response["response_body"]["text"] == reply.decode()
    assert response["response_body"]["size"] == len(reply)
    assert response["usage"]["total_tokens"] == 4
    assert response["model"] == response["response_model"] == "gpt-4o-mini-2024-07-18"
    assert response["finish_reasons"] == ["stop"]
    assert response["ttfb_ms"] == 0.3 and response["duration_ms"] == 0.4
    assert hit.replayed is None and bus.envelopes[1].json() == orjson.dumps(response)


def test_a_streamed_cache_hit_keeps_its_chunks_and_usage() -> None:
    clock, bus = Clock(), Bus()
    tracker = SessionTracker(bus.publish, None, 1000, clock)
    pump = CapturePump(bus, CaptureSettings(), clock, enabled=True, sessions=tracker)
    hit = record("hit", {**CHAT, "stream": True})
    pump.request_started(hit, hit.request_body)
    chunks = streamed_reply()
    answer_from_cache(hit, chunks, b"text/event-stream")
    pump.request_finished(hit)
    clock.advance(0)
    response = bus.envelopes[-1].payload()
    assert response["is_stream"] is True and response["cache_status"] == "hit"
    # Replayed at once: every chunk went out at the first byte.
    assert response["response_chunk_offsets_ms"] == [0.3] * len(chunks)
    assert "".join(response["response_chunks"]) == b"".join(chunks).decode()
    assert response["usage"]["total_tokens"] == 5
    assert response["finish_reasons"] == ["stop"]
    assert tracker.stats()["states_recorded"] == 1  # the tracker read the replayed reply


def test_a_conditional_hit_is_an_answer_without_a_body() -> None:
    pump, bus, clock = make()
    hit = record("revalidated")
    hit.method = "GET"
    pump.request_started(hit, b"")
    answer_from_cache(hit, [], b"application/json", status="conditional-hit", age=3.0)
    pump.request_finished(hit)
    clock.advance(0)
    response = bus.envelopes[-1].payload()
    assert (response["status"], response["outcome"]) == (304, "ok")
    assert (response["cache_status"], response["cache_age_s"]) == ("conditional-hit", 3.0)
    assert response["response_body"]["size"] == 0 and response["usage"] is None


def test_a_conversation_served_partly_from_the_cache_stays_one_session() -> None:
    # A conversation run once (turn 1 from the upstream), then run again: its
    # first turn now comes from the cache, its second is new.
    clock, _, pump, first_run = first_turn_through_a_real_tracker()
    again = record("again")
    pump.request_started(again, again.request_body)
    answer_from_cache(again, [json.dumps(REPLY).encode()], b"application/json")
    pump.request_finished(again)
    clock.advance(0)
    assert again.session_id not in (None, first_run.session_id) and again.seq == 1
    turn2 = {
        **CHAT,
        "messages": [
            *CHAT["messages"],  # type: ignore[misc]
            REPLY["choices"][0]["message"],  # type: ignore[index]
            {"role": "user", "content": "and?"},
        ],
    }
    second = record("second", turn2)
    pump.request_started(second, second.request_body)
    clock.advance(0)
    # The tracker read the cached reply: turn 2 continues the run it belongs to
    # (had the hit gone unseen, it would continue the first run's session).
    assert (second.session_id, second.seq) == (again.session_id, 2)


class Deciding(Calls):
    """A tracker deciding elsewhere (a shared state): each assign answers later."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: dict[str, Deferred[None]] = {}

    def assign(self, record: ExchangeRecord, body: bytes) -> Deferred[None] | None:
        self.calls.append(("assign", record.request_id))
        d: Deferred[None] = Deferred()
        d.addCallback(lambda _: setattr(record, "session_id", "s-" + record.request_id))
        self.waiting[record.request_id] = d
        return d

    def decide(self, rid: str) -> None:
        self.waiting.pop(rid).callback(None)


def test_events_wait_only_for_their_own_exchanges_session_decision() -> None:
    tracker = Deciding()
    pump, bus, clock = make(tracker)
    a, b = record("a"), record("b", {"model": "m"})
    for rec in (a, b):
        pump.request_started(rec, rec.request_body)
        finish(rec)
        pump.request_finished(rec)
    clock.advance(0)
    # The tracker saw everything in queue order; nothing is published before a decision.
    assert tracker.calls == [("assign", "a"), ("finished", "a"), ("assign", "b"), ("finished", "b")]
    assert bus.envelopes == [] and pump.pending() == 4
    # b's session is known first (a's may wait for its history to be recorded):
    # b's events go out, in their order, without waiting for a's.
    tracker.decide("b")
    assert bus.kinds() == [("request", "b"), ("response", "b")]
    assert pump.pending() == 2
    tracker.decide("a")
    assert bus.kinds() == [("request", "b"), ("response", "b"), ("request", "a"), ("response", "a")]
    # The request event carries the session decided after it was queued.
    assert bus.envelopes[2].payload()["session_id"] == "s-a"
    assert pump.pending() == 0


def test_a_response_ending_after_its_undecided_request_waits_behind_it() -> None:
    tracker = Deciding()
    pump, bus, clock = make(tracker)
    a, other = record("a"), record("other")
    pump.request_started(a, a.request_body)
    clock.advance(0)
    finish(a)
    pump.request_finished(a)  # a later turn: its request event still waits
    pump.request_started(other, other.request_body)
    clock.advance(0)
    tracker.decide("other")
    assert bus.kinds() == [("request", "other")]
    tracker.decide("a")
    assert bus.kinds() == [("request", "other"), ("request", "a"), ("response", "a")]


def test_stop_waits_for_the_decisions_outstanding() -> None:
    tracker = Deciding()
    pump, bus, _ = make(tracker)
    a = record("a")
    pump.request_started(a, a.request_body)
    stopped = pump.stop(5)
    assert not stopped.called and bus.envelopes == []
    tracker.decide("a")
    assert stopped.called and bus.kinds() == [("request", "a")]


def test_stop_waits_for_every_decision_whatever_order_they_come_in() -> None:
    tracker = Deciding()
    pump, bus, _ = make(tracker)
    a, b = record("a"), record("b")
    for rec in (a, b):
        pump.request_started(rec, rec.request_body)
    stopped = pump.stop(5)
    tracker.decide("a")
    assert not stopped.called and bus.kinds() == [("request", "a")]
    tracker.decide("b")
    assert stopped.called and pump.pending() == 0


def test_a_turn_over_its_budget_leaves_the_rest_to_the_next_turn_in_order() -> None:
    calls = Calls()
    pump, bus, clock = make(calls)
    records = [record(f"r{i}") for i in range(3)]
    for rec in records:
        pump.request_started(rec, rec.request_body)
    pump.flush(budget=0.0)  # each entry is over a budget of nothing: one per turn
    assert calls.calls == [("assign", "r0")] and pump.pending() == 2 and pump.yielded == 1
    clock.advance(0)  # the next turn, at the default budget, handles the rest
    assert calls.calls == [("assign", "r0"), ("assign", "r1"), ("assign", "r2")]
    assert pump.pending() == 0 and len(bus.envelopes) == 3


def test_the_tokens_of_an_answer_are_counted_for_its_project_from_the_built_event() -> None:
    clock = Clock()
    bus = Bus()
    counted: list[tuple[str, dict[str, Any]]] = []
    pump = CapturePump(
        bus,
        CaptureSettings(),
        clock,
        enabled=True,
        usage=lambda project, tokens: counted.append((project, tokens)),
    )
    with_token, without = record("a"), record("b")
    with_token.token_id, with_token.project = "tok_0123456789ab", "team-a"
    for rec in (with_token, without):
        pump.request_started(rec, rec.request_body)
        finish(rec)
        pump.request_finished(rec)
    clock.advance(0)
    assert counted == [
        (
            "team-a",
            {
                "input_tokens": 3,
                "output_tokens": 1,
                "total_tokens": 4,
                "cache_read_tokens": None,
                "cache_creation_tokens": None,
                "service_tier": None,
            },
        )
    ]


# -- pricing: the response event's cost, and who is told of it ----------------------


def _responses_stream() -> bytes:
    """An OpenAI Responses API stream whose completed event carries the usage."""
    events = [
        (
            "response.created",
            {
                "type": "response.created",
                "response": {"id": "resp_1", "model": "gpt-4o-2024-08-06", "status": "in_progress"},
            },
        ),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}),
        (
            "response.completed",
            {
                "type": "response.completed",
                "response": {
                    "id": "resp_1",
                    "object": "response",
                    "model": "gpt-4o-2024-08-06",
                    "status": "completed",
                    "usage": {
                        "input_tokens": 2_400,
                        "input_tokens_details": {"cached_tokens": 1_024},
                        "output_tokens": 300,
                        "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": 2_700,
                    },
                },
            },
        ),
    ]
    return b"".join(
        b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(data).encode())
        for name, data in events
    )


def test_a_responses_stream_is_priced_as_calc_price_prices_its_usage() -> None:
    from datetime import UTC, datetime

    from genai_prices import Usage, calc_price

    from llmproxy.pricing import Pricer

    clock = Clock()
    bus = Bus()
    told: list[tuple[str, Any]] = []
    pump = CapturePump(
        bus,
        CaptureSettings(),
        clock,
        enabled=True,
        pricer=Pricer(),
        spent=[lambda rec, event: told.append((rec.request_id, event["cost"]))],
    )
    rec = record("r1", {"model": "gpt-4o", "input": "hi", "stream": True})
    rec.path = "/openai/v1/responses"
    stream = _responses_stream()
    rec.status = 200
    rec.first_byte_at = 0.01
    rec.ended_at = 0.5
    rec.response_headers = [(b"Content-Type", b"text/event-stream")]
    rec.response_chunks = [(0.01, stream[:100]), (0.4, stream[100:])]
    rec.response_body_size = len(stream)
    pump.request_finished(rec)
    clock.advance(0)
    (event,) = [orjson.loads(e.json()) for e in bus.envelopes]
    assert event["usage"]["cache_read_tokens"] == 1_024
    expected = calc_price(
        Usage(input_tokens=2_400, cache_read_tokens=1_024, output_tokens=300),
        "gpt-4o-2024-08-06",
        provider_id="openai",
        genai_request_timestamp=datetime.fromtimestamp(rec.started_at, UTC),
    )
    cost = event["cost"]
    assert cost["total"] == pytest.approx(float(expected.total_price), rel=1e-12)
    assert cost["input"] == pytest.approx(float(expected.input_price), rel=1e-12)
    assert cost["output"] == pytest.approx(float(expected.output_price), rel=1e-12)
    # The listeners saw the same cost, once, after the event was built.
    assert told == [("r1", cost)]


@pytest.mark.allow_logged_errors
def test_a_pricing_failure_costs_the_event_its_cost_never_the_event(
    _fail_on_logged_errors: list[dict[str, Any]],
) -> None:
    class Broken:
        def cost(self, **kwargs: Any) -> Any:
            raise RuntimeError("boom")

    clock = Clock()
    bus = Bus()
    pump = CapturePump(bus, CaptureSettings(), clock, enabled=True, pricer=Broken())  # type: ignore[arg-type]
    rec = record("r1")
    finish(rec)
    pump.request_finished(rec)
    clock.advance(0)
    (event,) = [orjson.loads(e.json()) for e in bus.envelopes]
    assert event["type"] == "response" and event["cost"] is None
    assert pump.pricing_errors == 1
    assert [e.get("rid") for e in _fail_on_logged_errors] == ["r1"]


def test_without_a_pricer_the_event_says_cost_null() -> None:
    clock = Clock()
    bus = Bus()
    pump = CapturePump(bus, CaptureSettings(), clock, enabled=True)
    rec = record("r1")
    finish(rec)
    pump.request_finished(rec)
    clock.advance(0)
    (event,) = [orjson.loads(e.json()) for e in bus.envelopes]
    assert "cost" in event and event["cost"] is None
