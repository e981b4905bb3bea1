"""The Lunary sink: what it sends and how it reads Lunary's answers, against the fake
Lunary through StubTreq.

The exchange builders at the top make canonical ``response`` events the way the
proxy does (``response_event`` over an ``ExchangeRecord``); the Helicone and OTLP
sink tests use them too.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
import pytest
from treq.testing import StubTreq
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from llmproxy.capture.events import request_event, response_event
from llmproxy.capture.record import ExchangeRecord
from llmproxy.config.model import CaptureSettings, ExporterSettings
from llmproxy.export.sink import Sink
from llmproxy.export.sinks.lunary import LunarySink, ingest_url, run_id
from llmproxy.export.verdict import Delivered, Rejected, Retry, Verdict
from llmproxy.testing import older_chunk_shape
from tests.fakes.lunary import DEFAULT_KEY, FakeLunary, Hang, Respond

_F = TypeVar("_F")  # a sink's fake receiver

# -- realistic exchanges (shared with test_helicone_sink and test_otlp_sink) -------------

CAPTURE = CaptureSettings()
STARTED = 1_795_419_612.25  # 2026-11-23T07:40:12.250Z
NOW = 1_795_419_700
UPSTREAM_KEY = "sk-proj-UpstreamSecretKey0123456789abcdef"


def _sse(*events: tuple[str | None, dict[str, Any] | str]) -> list[bytes]:
    out = []
    for name, data in events:
        text = data if isinstance(data, str) else orjson.dumps(data).decode()
        out.append((f"event: {name}\n" if name else "").encode() + f"data: {text}\n\n".encode())
    return out


OPENAI_REQUEST = {
    "model": "gpt-4o-mini",
    "temperature": 0.2,
    "max_tokens": 64,
    "user": "alice",
    "metadata": {"team": "search", "ticket": "T-9"},
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi"},
    ],
}
OPENAI_RESPONSE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
}
OPENAI_STREAM = _sse(
    (
        None,
        {
            "id": "chatcmpl-2",
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Grüß"}}],
        },
    ),
    (
        None,
        {
            "id": "chatcmpl-2",
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "delta": {"content": " dich"}, "finish_reason": "stop"}],
        },
    ),
    (
        None,
        {
            "id": "chatcmpl-2",
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
        },
    ),
    (None, "[DONE]"),
)
ANTHROPIC_REQUEST = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 256,
    "system": [{"type": "text", "text": "Be brief."}],
    "metadata": {"user_id": "bob"},
    "messages": [{"role": "user", "content": "Say hi"}],
}
ANTHROPIC_RESPONSE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "Hello!"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 4},
}
ANTHROPIC_STREAM = _sse(
    (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_2",
                "type": "message",
                "role": "assistant",
                "model": "claude-sonnet-4-5-20250929",
                "content": [],
                "usage": {"input_tokens": 10, "output_tokens": 1},
            },
        },
    ),
    (
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
    ),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 4},
        },
    ),
    ("message_stop", {"type": "message_stop"}),
)
RATE_LIMITED = {
    "error": {
        "message": "Rate limit reached for gpt-4o-mini",
        "type": "requests",
        "code": "rate_limit_exceeded",
    }
}


def make_record(
    request_id: str,
    *,
    provider: str = "openai",
    body: dict[str, Any] | bytes = OPENAI_REQUEST,
    path: str = "/openai/v1/chat/completions",
    upstream: str = "https://api.openai.com/v1/chat/completions",
    headers: list[tuple[bytes, bytes]] | None = None,
    environment: str = "prod",
    machine: str = "proxy@host1",
) -> ExchangeRecord:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    auth = (b"x-api-key", UPSTREAM_KEY.encode())
    if provider == "openai":
        auth = (b"Authorization", f"Bearer {UPSTREAM_KEY}".encode())
    return ExchangeRecord(
        request_id=request_id,
        started_at=STARTED,
        method="POST",
        path=path,
        query="",
        route=provider,
        provider=provider,
        upstream_url=upstream,
        upstream_host=upstream.split("/")[2],
        client_addr="10.0.0.7",
        request_headers=[(b"Content-Type", b"application/json"), auth, *(headers or [])],
        request_body=raw,
        request_body_size=len(raw),
        session_id="sess-1",
        seq=2,
        environment=environment,
        machine=machine,
    )


def _finish(
    record: ExchangeRecord,
    status: int | None,
    content_type: bytes,
    chunks: list[bytes],
    *,
    outcome: str = "ok",
    error: str | None = None,
) -> dict[str, Any]:
    record.status = status
    record.first_byte_at = 0.1 if chunks else None
    record.response_headers = [(b"Content-Type", content_type), (b"x-request-id", b"up-1")]
    record.response_chunks = [(0.1 + 0.05 * i, c) for i, c in enumerate(chunks)]
    record.response_body_size = sum(len(c) for c in chunks)
    record.ended_at = 0.5
    record.outcome = outcome
    record.error = error
    return response_event(record, CAPTURE)


def openai_json(request_id: str = "req-oa-json", **kw: Any) -> dict[str, Any]:
    body = orjson.dumps(OPENAI_RESPONSE)
    return _finish(make_record(request_id, **kw), 200, b"application/json", [body[:30], body[30:]])


def openai_stream(
    request_id: str = "req-oa-sse", *, usage: bool = True, **kw: Any
) -> dict[str, Any]:
    request = {**OPENAI_REQUEST, "stream": True}
    chunks = OPENAI_STREAM if usage else [OPENAI_STREAM[0], OPENAI_STREAM[1], OPENAI_STREAM[3]]
    return _finish(make_record(request_id, body=request, **kw), 200, b"text/event-stream", chunks)


def anthropic_record(request_id: str, body: dict[str, Any], **kw: Any) -> ExchangeRecord:
    return make_record(
        request_id,
        provider="anthropic",
        body=body,
        path="/anthropic/v1/messages",
        upstream="https://api.anthropic.com/v1/messages",
        **kw,
    )


def anthropic_json(request_id: str = "req-an-json", **kw: Any) -> dict[str, Any]:
    body = orjson.dumps(ANTHROPIC_RESPONSE)
    record = anthropic_record(request_id, ANTHROPIC_REQUEST, **kw)
    return _finish(record, 200, b"application/json", [body])


def anthropic_stream(request_id: str = "req-an-sse", **kw: Any) -> dict[str, Any]:
    record = anthropic_record(request_id, {**ANTHROPIC_REQUEST, "stream": True}, **kw)
    return _finish(record, 200, b"text/event-stream", ANTHROPIC_STREAM)


def rate_limited(request_id: str = "req-429", **kw: Any) -> dict[str, Any]:
    body = orjson.dumps(RATE_LIMITED)
    return _finish(make_record(request_id, **kw), 429, b"application/json", [body])


def timed_out(request_id: str = "req-timeout", **kw: Any) -> dict[str, Any]:
    record = make_record(request_id, **kw)
    return _finish(
        record, None, b"text/plain", [], outcome="timeout", error="no response within 300s"
    )


def plain_text(request_id: str = "req-text", **kw: Any) -> dict[str, Any]:
    return _finish(make_record(request_id, **kw), 200, b"text/plain", [b"pong from a plain server"])


def binary_audio(request_id: str = "req-audio", **kw: Any) -> dict[str, Any]:
    record = make_record(
        request_id,
        body={"model": "tts-1", "input": "Say hi", "voice": "alloy"},
        path="/openai/v1/audio/speech",
        upstream="https://api.openai.com/v1/audio/speech",
        **kw,
    )
    return _finish(record, 200, b"audio/mpeg", [b"\xff\xfb\x90\x00\x00\x01\x02\xfe"])


CACHE_KEY = "openai/k-0123456789abcdef/POST/3be9"


def cache_hit(request_id: str = "req-hit", *, stream: bool = False, **kw: Any) -> dict[str, Any]:
    """An exchange answered from the response cache, as the proxy and the capture
    pump leave it: no upstream call, the entry's chunks replayed at once."""
    request = {**OPENAI_REQUEST, "stream": True} if stream else OPENAI_REQUEST
    record = make_record(request_id, body=request, **kw)
    record.status = 200
    record.first_byte_at = record.ended_at = 0.0004
    content_type = b"text/event-stream" if stream else b"application/json"
    record.response_headers = [(b"content-type", content_type)]
    record.replayed = tuple(OPENAI_STREAM) if stream else (orjson.dumps(OPENAI_RESPONSE),)
    record.capture_replayed(CAPTURE.response_body_bytes)
    record.cache_status, record.cache_key, record.cache_age = "hit", CACHE_KEY, 42.5
    return response_event(record, CAPTURE)


def not_modified(request_id: str = "req-304", **kw: Any) -> dict[str, Any]:
    """A conditional GET answered 304 from the cache: no body, no usage."""
    record = make_record(
        request_id,
        body=b"",
        path="/openai/v1/models/gpt-4o-mini",
        upstream="https://api.openai.com/v1/models/gpt-4o-mini",
        **kw,
    )
    record.method = "GET"
    record.status = 304
    record.first_byte_at = record.ended_at = 0.0003
    record.response_headers = [(b"etag", b'"v1"'), (b"cache-control", b"max-age=60")]
    record.cache_status, record.cache_key, record.cache_age = "conditional-hit", CACHE_KEY, 3.0
    return response_event(record, CAPTURE)


def request_only(request_id: str = "req-open", **kw: Any) -> dict[str, Any]:
    return request_event(make_record(request_id, **kw), CAPTURE)


def at_now() -> Clock:
    clock = Clock()
    clock.advance(NOW)
    return clock


def verdict_of(d: Deferred[Verdict]) -> Verdict:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "no verdict yet"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    result: Verdict = out[0]
    return result


class NoClient:
    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        raise AssertionError("no HTTP expected")


class RefusingClient:
    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        return fail(net_error.ConnectionRefusedError("127.0.0.1:443"))


def reasons_of(verdict: Verdict) -> list[str]:
    if isinstance(verdict, Delivered):
        return list(verdict.rejected.values())
    return [verdict.reason]


# -- Lunary ---------------------------------------------------------------------------------


def settings(**kw: Any) -> ExporterSettings:
    kw.setdefault("api_key", DEFAULT_KEY)
    return ExporterSettings(name="lunary", type="lunary", **kw)


def against_fake(**kw: Any) -> tuple[LunarySink, FakeLunary, Clock]:
    clock = at_now()
    fake = FakeLunary(clock=clock)
    sink = LunarySink.from_settings(settings(**kw), client=StubTreq(fake), clock=clock)
    return sink, fake, clock


def events_sent(fake: FakeLunary) -> list[dict[str, Any]]:
    body = fake.bodies[-1]
    assert isinstance(body, dict)
    events: list[dict[str, Any]] = body["events"]
    return events


def test_it_is_a_sink() -> None:
    sink = LunarySink.from_settings(settings(), client=NoClient(), clock=at_now())
    assert isinstance(sink, Sink)
    assert sink.url == "https://api.lunary.ai/v1/runs/ingest"


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("https://lunary.internal", "https://lunary.internal/v1/runs/ingest"),
        ("https://lunary.internal/api/", "https://lunary.internal/api/v1/runs/ingest"),
        ("https://custom.lunary.ai/v1/runs/ingest", "https://custom.lunary.ai/v1/runs/ingest"),
    ],
)
def test_the_ingest_path_is_appended_unless_present(endpoint: str, url: str) -> None:
    assert ingest_url(endpoint) == url
    sink = LunarySink.from_settings(settings(endpoint=endpoint), client=NoClient(), clock=at_now())
    assert sink.url == url


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"endpoint": "lunary.ai"}, "endpoint must be an http"),
        ({"endpoint": "https://u:p@api.lunary.ai"}, "endpoint must not carry credentials"),
        ({"api_key": ""}, "api_key .* is required"),
        ({"api_key": "lunary-secret-key"}, "api_key must be .*a UUID"),
    ],
)
def test_bad_settings_are_config_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"exporter:lunary: {message}"):
        LunarySink.from_settings(settings(**kw), client=NoClient(), clock=at_now())


def test_the_run_id_is_a_uuid_derived_from_the_request_id() -> None:
    assert run_id("req-1") == run_id("req-1") != run_id("req-2")
    assert uuid.UUID(run_id("req-1")).version == 5


def test_the_body_is_an_object_of_events_with_bearer_auth() -> None:
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([openai_json()]))

    request = fake.requests[-1]
    assert request.authorization == f"Bearer {DEFAULT_KEY}"
    assert request.content_type == "application/json"
    body = fake.bodies[-1]
    assert isinstance(body, dict) and list(body) == ["events"]
    assert [(e["event"], e["runId"]) for e in body["events"]] == [
        ("start", run_id("req-oa-json")),
        ("end", run_id("req-oa-json")),
    ]


def test_an_openai_exchange_becomes_a_complete_run() -> None:
    sink, fake, _ = against_fake()
    assert verdict_of(sink.deliver([openai_json()])) == Delivered()

    run = fake.runs[run_id("req-oa-json")]
    assert (run.type, run.status, run.name) == ("llm", "success", "gpt-4o-mini-2024-07-18")
    assert run.input == OPENAI_REQUEST["messages"]
    assert run.output == {"role": "assistant", "content": "Hi!"}
    assert (run.prompt_tokens, run.completion_tokens) == (12, 2)
    assert run.user_id == "alice"
    assert run.params == {"temperature": 0.2, "maxTokens": 64}  # Lunary camelCases keys
    assert run.tags == ["llmproxy", "openai", "prod"]
    assert (run.created_at, run.ended_at) == (
        "2026-11-23T07:40:12.250Z",
        "2026-11-23T07:40:12.750Z",
    )
    # Lunary camelCases every key and keeps top-level scalars only.
    assert run.metadata is not None
    assert run.metadata["requestId"] == "req-oa-json"
    assert run.metadata["sessionId"] == "sess-1"
    assert (run.metadata["status"], run.metadata["durationMs"]) == (200, 500.0)
    assert all(not isinstance(v, dict | list) for v in run.metadata.values())


def test_metadata_sent_is_top_level_scalars_without_nulls() -> None:
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([timed_out()]))

    metadata = events_sent(fake)[0]["metadata"]
    assert metadata["outcome"] == "timeout"
    assert "status" not in metadata and "cache_status" not in metadata
    assert all(isinstance(v, str | int | float | bool) for v in metadata.values())


def test_a_cache_hit_is_a_successful_run_marked_in_its_metadata() -> None:
    sink, fake, _ = against_fake()
    events = [cache_hit(), cache_hit("req-hit-sse", stream=True), not_modified()]
    assert verdict_of(sink.deliver(events)) == Delivered()

    run = fake.runs[run_id("req-hit")]
    assert (run.status, run.name) == ("success", "gpt-4o-mini-2024-07-18")
    assert run.output == {"role": "assistant", "content": "Hi!"}
    assert (run.prompt_tokens, run.completion_tokens) == (12, 2)
    assert run.metadata is not None
    assert (run.metadata["cacheStatus"], run.metadata["cacheKey"]) == ("hit", CACHE_KEY)
    assert run.metadata["cacheAgeS"] == 42.5
    streamed = fake.runs[run_id("req-hit-sse")]
    assert streamed.output == {"role": "assistant", "content": "Grüß dich"}
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (12, 3)
    # A 304 served nothing: a successful run without output or tokens.
    revalidated = fake.runs[run_id("req-304")]
    assert revalidated.status == "success" and revalidated.output is None
    assert revalidated.prompt_tokens is None
    assert revalidated.metadata is not None
    assert revalidated.metadata["cacheStatus"] == "conditional-hit"


def test_a_stream_is_sent_as_its_merged_reply() -> None:
    sink, fake, _ = against_fake()
    assert verdict_of(sink.deliver([openai_stream()])) == Delivered()

    run = fake.runs[run_id("req-oa-sse")]
    assert run.output == {"role": "assistant", "content": "Grüß dich"}
    assert (run.prompt_tokens, run.completion_tokens) == (12, 3)
    assert run.params == {"temperature": 0.2, "maxTokens": 64, "stream": True}


def test_an_anthropic_exchange_puts_the_system_prompt_first() -> None:
    sink, fake, _ = against_fake()
    assert verdict_of(sink.deliver([anthropic_json()])) == Delivered()

    run = fake.runs[run_id("req-an-json")]
    assert run.input == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi"},
    ]
    assert run.output == {"role": "assistant", "content": "Hello!"}
    assert run.user_id == "bob"
    # Anthropic's input_tokens exclude cache reads; ours (and Lunary's prompt) include them.
    assert (run.prompt_tokens, run.completion_tokens) == (14, 3)
    assert events_sent(fake)[1]["tokensUsage"] == {"prompt": 14, "completion": 3, "promptCached": 4}


def test_an_anthropic_stream_is_merged() -> None:
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([anthropic_stream()]))

    run = fake.runs[run_id("req-an-sse")]
    assert run.output == {"role": "assistant", "content": "Hello"}
    assert (run.prompt_tokens, run.completion_tokens) == (10, 4)


def test_a_failed_exchange_ends_with_an_error_event() -> None:
    sink, fake, _ = against_fake()
    assert verdict_of(sink.deliver([rate_limited(), timed_out()])) == Delivered()

    limited = fake.runs[run_id("req-429")]
    assert limited.status == "error"
    assert limited.error == {"message": "HTTP 429: Rate limit reached for gpt-4o-mini"}
    timeout = fake.runs[run_id("req-timeout")]
    assert (timeout.status, timeout.error) == (
        "error",
        {"message": "timeout: no response within 300s"},
    )
    assert [e["event"] for e in events_sent(fake)] == ["start", "error", "start", "error"]


def test_a_plain_text_reply_is_the_output_and_binary_has_none() -> None:
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([plain_text(), binary_audio()]))

    assert fake.runs[run_id("req-text")].output == "pong from a plain server"
    audio = fake.runs[run_id("req-audio")]
    assert (audio.status, audio.output) == ("success", None)
    assert audio.input == [{"role": "user", "content": "Say hi"}]


def test_request_events_are_delivered_without_a_request() -> None:
    sink, fake, _ = against_fake()
    verdict = verdict_of(sink.deliver([request_only("a"), request_only("b")]))

    assert verdict == Delivered()
    assert fake.request_count == 0


def test_only_response_events_are_sent_from_a_mixed_batch() -> None:
    sink, fake, _ = against_fake()
    verdict = verdict_of(sink.deliver([request_only("req-oa-json"), openai_json()]))

    assert verdict == Delivered()
    assert len(events_sent(fake)) == 2
    assert list(fake.runs) == [run_id("req-oa-json")]


def test_a_failed_event_result_rejects_its_canonical_event_by_index() -> None:
    sink, fake, _ = against_fake()
    failed = run_id("req-429")
    results = {
        "results": [
            {"id": run_id("req-oa-json"), "success": True},
            {"id": run_id("req-oa-json"), "success": True},
            {"id": failed, "success": True},
            {"id": failed, "success": False, "error": "invalid input syntax for type json"},
        ]
    }
    fake.fail_next(Respond(200, orjson.dumps(results)))

    verdict = verdict_of(sink.deliver([request_only(), openai_json(), rate_limited()]))

    assert verdict == Delivered(rejected={2: "invalid input syntax for type json"})


def test_an_exchange_lunary_gave_no_result_for_is_rejected() -> None:
    sink, fake, _ = against_fake()
    results = {"results": [{"id": run_id("req-oa-json"), "success": True}] * 2}
    fake.fail_next(Respond(200, orjson.dumps(results)))

    verdict = verdict_of(sink.deliver([openai_json(), rate_limited()]))

    assert isinstance(verdict, Delivered)
    assert list(verdict.rejected) == [1]
    assert "no result" in verdict.rejected[1]


def test_a_200_without_results_is_rejected_for_good() -> None:
    sink, fake, _ = against_fake()
    fake.fail_next(Respond(200, b"<html>maintenance</html>"))

    verdict = verdict_of(sink.deliver([openai_json()]))

    assert isinstance(verdict, Rejected)
    assert "without per-event results" in verdict.reason


def test_a_batch_sent_again_is_not_failed_by_lunarys_duplicate_start() -> None:
    sink, fake, _ = against_fake()
    batch = [openai_json(), rate_limited()]
    fake.fail_next(Respond(502, store=True))  # stored, but the answer was lost

    assert isinstance(verdict_of(sink.deliver(batch)), Retry)
    assert verdict_of(sink.deliver(batch)) == Delivered()
    assert any("already exists" in r.get("error", "") for r in fake.last_results)
    assert fake.runs[run_id("req-oa-json")].status == "success"


def test_an_event_that_cannot_be_encoded_is_rejected_alone() -> None:
    sink, fake, _ = against_fake()
    broken = openai_json("req-broken")
    del broken["request_id"]

    verdict = verdict_of(sink.deliver([broken, openai_json()]))

    assert isinstance(verdict, Delivered)
    assert list(verdict.rejected) == [0]
    assert "could not encode" in verdict.rejected[0]
    assert list(fake.runs) == [run_id("req-oa-json")]


def test_an_unknown_project_is_rejected_for_good() -> None:
    clock = at_now()
    fake = FakeLunary(clock=clock, public_key="11111111-2222-4333-8444-555555555555")
    sink = LunarySink.from_settings(settings(), client=StubTreq(fake), clock=clock)

    verdict = verdict_of(sink.deliver([openai_json()]))

    assert isinstance(verdict, Rejected)
    assert verdict.reason.startswith("HTTP 401: This project does not exist")


def test_a_key_that_is_not_a_project_id_is_refused_402_for_good() -> None:
    clock = at_now()
    fake = FakeLunary(clock=clock)
    key = "lunary-private-key-abc123"
    sink = LunarySink(
        name="lunary", url="https://api.lunary.ai", client=StubTreq(fake), clock=clock, api_key=key
    )

    verdict = verdict_of(sink.deliver([openai_json()]))

    assert isinstance(verdict, Rejected)
    assert verdict.reason.startswith("HTTP 402: Incorrect project id format")
    assert key not in verdict.reason


def test_a_402_for_plan_limits_is_rejected_for_good() -> None:
    sink, fake, _ = against_fake()
    fake.fail_next(Respond(402, b'{"message": "Event limit reached for your plan"}'))

    verdict = verdict_of(sink.deliver([openai_json()]))

    assert isinstance(verdict, Rejected)
    assert "Event limit reached" in verdict.reason


def test_lunarys_rate_limit_is_retried_after_its_retry_after() -> None:
    clock = at_now()
    fake = FakeLunary(clock=clock, rate_limit=1)
    sink = LunarySink.from_settings(settings(), client=StubTreq(fake), clock=clock)
    assert verdict_of(sink.deliver([openai_json("a")])) == Delivered()

    verdict = verdict_of(sink.deliver([openai_json("b")]))

    assert verdict == Retry("HTTP 429: Sometimes You Just Have to Slow Down.", 60.0)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_server_errors_are_retried(status: int) -> None:
    sink, fake, _ = against_fake()
    fake.fail_next(Respond(status, b'{"message": "An unexpected error occurred"}'))

    verdict = verdict_of(sink.deliver([openai_json()]))

    assert verdict == Retry(f"HTTP {status}: An unexpected error occurred", None)


def test_other_client_errors_are_rejected_for_good() -> None:
    sink, fake, _ = against_fake()
    fake.fail_next(Respond(422, b'{"error": "Error", "message": "Validation error"}'))

    assert verdict_of(sink.deliver([openai_json()])) == Rejected("HTTP 422: Validation error")


def test_a_connection_failure_is_retried() -> None:
    sink = LunarySink.from_settings(settings(), client=RefusingClient(), clock=at_now())
    assert verdict_of(sink.deliver([openai_json()])) == Retry("connection refused")


def test_a_hung_request_is_retried_after_the_timeout() -> None:
    sink, fake, clock = against_fake(timeout=5.0)
    fake.fail_next(Hang())
    d = sink.deliver([openai_json()])

    clock.advance(5.0)

    assert verdict_of(d) == Retry("timed out after 5s")


def test_extra_headers_are_sent() -> None:
    sink, fake, _ = against_fake(headers=(("X-Gateway-Token", "gw-token-123456"),))
    verdict_of(sink.deliver([openai_json()]))
    assert fake.requests[-1].headers["x-gateway-token"] == "gw-token-123456"


@pytest.mark.parametrize("status", [200, 400, 401, 402, 429, 500])
def test_the_key_never_appears_in_a_verdict(status: int) -> None:
    sink, fake, _ = against_fake(headers=(("X-Gateway-Token", "gw-token-123456"),))
    echo = f"bad request: Authorization: Bearer {DEFAULT_KEY}; X-Gateway-Token: gw-token-123456"
    body = orjson.dumps(
        {"results": [{"id": run_id("req-oa-json"), "success": False, "error": echo}]}
        if status == 200
        else {"message": echo}
    )
    fake.fail_next(Respond(status, body))

    reasons = reasons_of(verdict_of(sink.deliver([openai_json()])))

    assert reasons and all(DEFAULT_KEY not in r and "gw-token-123456" not in r for r in reasons)
    assert "***" in reasons[0]


# -- NUL characters, and starts that fail ----------------------------------------------------


def with_nul(request_id: str = "req-nul") -> dict[str, Any]:
    """An exchange whose prompt, user and reply hold NUL characters (raw and as JSON escapes)."""
    request = {**OPENAI_REQUEST, "user": "al\u0000ice"}
    request["messages"] = [{"role": "user", "content": "pasted\u0000binary\u0000"}]
    reply = {**OPENAI_RESPONSE}
    reply["choices"] = [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "ok\u0000"},
            "finish_reason": "stop",
        }
    ]
    record = make_record(request_id, body=request)
    return _finish(record, 200, b"application/json", [orjson.dumps(reply)])


def test_nul_characters_are_replaced_and_counted_so_the_run_is_stored() -> None:
    sink, fake, _ = against_fake()

    verdict = verdict_of(sink.deliver([with_nul(), openai_json()]))

    assert verdict == Delivered()
    run = fake.runs[run_id("req-nul")]
    assert run.status == "success"
    assert run.input[-1]["content"] == "pasted\ufffdbinary\ufffd"
    assert run.user_id == "al\ufffdice"
    assert run.output["content"] == "ok\ufffd"
    assert run.metadata is not None and run.metadata["nulReplaced"] == 4
    assert sink.nul_replaced == 4
    assert "nulReplaced" not in (fake.runs[run_id("req-oa-json")].metadata or {})


def test_without_the_replacement_lunary_would_fail_the_run() -> None:
    """What the replacement prevents: the fake refuses NUL as Postgres does."""
    clock = at_now()
    fake = FakeLunary(clock=clock)
    event = with_nul()
    request = orjson.loads(event["request_body"]["text"])
    start = {
        "type": "llm",
        "event": "start",
        "runId": run_id("req-nul"),
        "timestamp": "2026-11-23T07:40:12.250Z",
        "input": request["messages"],
    }
    answer = verdict_of(
        StubTreq(fake).post(
            "https://api.lunary.ai/v1/runs/ingest",
            json={"events": [start]},
            headers={"Authorization": f"Bearer {DEFAULT_KEY}"},
        )
    )
    assert answer.code == 200
    assert fake.last_results[0]["error"] == "unsupported Unicode escape sequence"


def test_a_nul_in_a_stream_and_in_an_error_is_replaced_too() -> None:
    stream = openai_stream("req-nul-sse")
    stream["response_chunks"][0] = stream["response_chunks"][0].replace("Gr", "G\\u0000r")
    failed = timed_out("req-nul-err")
    failed["error"] = "upstream said \u0000"
    sink, fake, _ = against_fake()

    assert verdict_of(sink.deliver([stream, failed])) == Delivered()
    assert fake.runs[run_id("req-nul-sse")].output["content"] == "G\ufffdrüß dich"
    assert fake.runs[run_id("req-nul-err")].error["message"].endswith("\ufffd")


def test_a_nul_in_a_stream_of_the_older_chunk_shape_is_replaced_too() -> None:
    stream = openai_stream("req-nul-sse")
    stream["response_chunks"][0] = stream["response_chunks"][0].replace("Gr", "G\\u0000r")
    older = older_chunk_shape(stream)
    assert isinstance(older["response_chunks"][0], dict)
    sink, fake, _ = against_fake()

    assert verdict_of(sink.deliver([older])) == Delivered()
    assert fake.runs[run_id("req-nul-sse")].output["content"] == "G\ufffdrüß dich"


def delivered_in_both_chunk_shapes(
    against: Callable[[], tuple[Any, _F, Clock]], events: list[dict[str, Any]]
) -> tuple[_F, _F]:
    """``events`` through one sink and their older-shape copies
    (``older_chunk_shape``) through another, each made by ``against``: both encode
    the same body and are delivered.  Their two fakes, in that order."""
    older = [older_chunk_shape(e) for e in events]
    sink, fake, _ = against()
    older_sink, older_fake, _ = against()
    assert older_sink.encode(older).body == sink.encode(events).body
    assert verdict_of(sink.deliver(events)) == Delivered()
    assert verdict_of(older_sink.deliver(older)) == Delivered()
    return fake, older_fake


def test_events_of_the_older_chunk_shape_become_the_same_runs() -> None:
    """Events written before the chunk offsets had their own list still wait in
    spools, dead-letter files and Redis streams after an upgrade."""
    events = [openai_stream(), anthropic_stream(), openai_json(), timed_out()]
    fake, older_fake = delivered_in_both_chunk_shapes(against_fake, events)
    assert older_fake.runs == fake.runs and len(fake.runs) == 4
    assert older_fake.runs[run_id("req-oa-sse")].output["content"] == "Grüß dich"


def test_a_batch_that_times_out_is_sent_again_in_two_steps_so_lunary_never_waits() -> None:
    sink, fake, clock = against_fake(timeout=10.0)
    batch = [openai_json("ok-1"), openai_json("bad-1"), openai_json("bad-2"), openai_json("bad-3")]
    fake.fail_starts(*(run_id(f"bad-{i}") for i in (1, 2, 3)))
    first = sink.deliver(batch)

    clock.advance(10.0)  # three failed starts: Lunary would answer after 15 s

    assert verdict_of(first) == Retry("timed out after 10s")
    assert fake.waits == 2  # the third is still to come: Lunary goes on without us
    again = sink.deliver(batch)
    verdict = verdict_of(again)  # at once: no wait in either step

    assert isinstance(verdict, Delivered)
    assert verdict.rejected == dict.fromkeys((1, 2, 3), "connection to database lost")
    assert [[e["event"] for e in body["events"]] for body in fake.bodies[1:]] == [
        ["start"] * 4,
        ["end"],
    ]
    assert fake.runs[run_id("ok-1")].status == "success"
    clock.advance(5.0)
    assert fake.waits == 3  # only the first attempt's ends ever waited


def test_after_the_two_steps_the_runs_go_back_to_one_request() -> None:
    sink, fake, clock = against_fake(timeout=1.0)
    fake.fail_next(Hang())
    batch = [openai_json()]
    sink.deliver(batch)
    clock.advance(1.0)
    assert verdict_of(sink.deliver(batch)) == Delivered()
    assert len(fake.bodies) == 2  # starts, then ends
    verdict_of(sink.deliver(batch))  # sent once more (a replay): one request again
    assert len(fake.bodies) == 3


def test_a_retry_lunary_answered_is_sent_again_in_one_request() -> None:
    sink, fake, _ = against_fake()
    fake.fail_next(503)
    batch = [openai_json(), anthropic_json()]
    assert verdict_of(sink.deliver(batch)) == Retry("HTTP 503")
    assert verdict_of(sink.deliver(batch)) == Delivered()
    assert len(fake.bodies) == 1  # the 503 was scripted: only the second reached the handler
    assert len(fake.bodies[0]["events"]) == 4


def test_a_failure_in_the_second_step_retries_the_batch_in_two_steps_again() -> None:
    sink, fake, clock = against_fake(timeout=1.0)
    fake.fail_next(Hang())
    batch = [openai_json()]
    sink.deliver(batch)
    clock.advance(1.0)
    rid = run_id("req-oa-json")
    started = orjson.dumps({"results": [{"id": rid, "success": True}]})
    fake.fail_next(Respond(200, started, store=True), Respond(502))

    assert verdict_of(sink.deliver(batch)) == Retry("HTTP 502")
    assert verdict_of(sink.deliver(batch)) == Delivered()  # the start: already there
    assert [e["event"] for e in fake.bodies[-1]["events"]] == ["end"]
    assert fake.runs[rid].status == "success"
