"""The canonical events built from an exchange record, and their envelope."""

from __future__ import annotations

import datetime
import gzip
import json
import re
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmproxy.capture.events import SCHEMA_VERSION, RecordEnvelope, request_event, response_event
from llmproxy.capture.record import ExchangeRecord
from llmproxy.config.model import CaptureSettings
from llmproxy.events import machine
from llmproxy.events.envelope import Envelope
from llmproxy.events.facts import facts_of, response_text
from llmproxy.events.time import epoch_ns, rfc3339_ns

CAPTURE = CaptureSettings()
STARTED = 1763883612.123456  # 2025-11-23T07:40:12.123456Z
KEY = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")

REQUEST_BODY = orjson.dumps(
    {
        "model": "gpt-4o-mini",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Say hi"}],
    }
)
JSON_RESPONSE = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi!"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }
)


def chunk(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


SSE_CHUNKS = [
    chunk(
        {
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Grüß"}}],
        }
    ),
    chunk(
        {
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "delta": {"content": " dich 👋"}, "finish_reason": "stop"}],
        }
    ),
    chunk(
        {
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
        }
    )
    + b"data: [DONE]\n\n",
]


def make_record(**overrides: Any) -> ExchangeRecord:
    fields: dict[str, Any] = {
        "request_id": "req-1",
        "started_at": STARTED,
        "method": "POST",
        "path": "/openai/v1/chat/completions",
        "query": "",
        "route": "openai",
        "provider": "openai",
        "upstream_url": "https://api.openai.com/v1/chat/completions",
        "upstream_host": "api.openai.com",
        "client_addr": "10.0.0.7",
        "request_headers": [
            (b"Content-Type", b"application/json"),
            (b"Authorization", f"Bearer {KEY}".encode()),
            (b"Cookie", b"session=0123456789abcdefghijkl"),
        ],
        "request_body": REQUEST_BODY,
        "request_body_size": len(REQUEST_BODY),
        "session_id": "sess-1",
        "seq": 3,
        "environment": "prod",
        "machine": "proxy@host1",
    }
    fields.update(overrides)
    return ExchangeRecord(**fields)


def finish_json(record: ExchangeRecord, body: bytes = JSON_RESPONSE) -> ExchangeRecord:
    record.first_byte_at = 0.25
    record.status = 200
    record.response_headers = [
        (b"Content-Type", b"application/json"),
        (b"Set-Cookie", b"__cf_bm=abcdefghijklmnopqrstuvwxyz; path=/; HttpOnly"),
    ]
    record.response_chunks = [(0.25, body[:40]), (0.5, body[40:])]
    record.response_body_size = len(body)
    record.ended_at = 0.75
    record.cache_status = "miss"
    return record


def finish_stream(
    record: ExchangeRecord, chunks: list[bytes] = SSE_CHUNKS, encoding: bytes | None = None
) -> ExchangeRecord:
    record.first_byte_at = 0.1
    record.status = 200
    record.response_headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
    if encoding is not None:
        record.response_headers.append((b"content-encoding", encoding))
    record.response_chunks = [(0.1 * (i + 1), c) for i, c in enumerate(chunks)]
    record.response_body_size = sum(len(c) for c in chunks)
    record.ended_at = 0.5
    return record


def parse_ts(ts: str) -> int:
    seconds = datetime.datetime.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.UTC)
    return int(seconds.timestamp()) * 1_000_000_000 + int(ts[20:29])


def test_timestamps_are_rfc3339_utc_with_nanoseconds() -> None:
    assert rfc3339_ns(0) == "1970-01-01T00:00:00.000000000Z"
    assert rfc3339_ns(1763883612123456789) == "2025-11-23T07:40:12.123456789Z"
    assert epoch_ns(STARTED) == 1763883612123456000


def test_request_event_fields() -> None:
    event = request_event(make_record(), CAPTURE)
    assert event["schema"] == SCHEMA_VERSION == 1
    assert event["type"] == "request"
    assert event["ts"] == event["start"] == "2025-11-23T07:40:12.123456000Z"
    assert event["ts_ns"] == 1763883612123456000 == parse_ts(event["ts"])
    assert event["request_id"] == "req-1"
    assert (event["session_id"], event["seq"]) == ("sess-1", 3)
    assert event["method"] == "POST"
    assert event["path"] == "/openai/v1/chat/completions"
    assert (event["route"], event["provider"]) == ("openai", "openai")
    assert event["upstream_host"] == "api.openai.com"
    assert event["model"] == event["request_model"] == "gpt-4o-mini"
    assert event["is_stream"] is True
    assert event["client_addr"] == "10.0.0.7"
    assert (event["machine"], event["environment"]) == ("proxy@host1", "prod")
    assert event["request_body"]["text"] == REQUEST_BODY.decode()
    assert event["request_body"]["size"] == len(REQUEST_BODY)
    assert (event["token_id"], event["project"]) == (None, None)  # no proxy token
    assert "status" not in event and "response_body" not in event


def test_both_events_say_which_proxy_token_and_project_made_the_request() -> None:
    record = make_record()
    record.token_id, record.project = "tok_0123456789ab", "team-a"
    for event in (request_event(record, CAPTURE), response_event(record, CAPTURE)):
        assert (event["token_id"], event["project"]) == ("tok_0123456789ab", "team-a")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"X-Request-Id", b"req_openai")], "req_openai"),  # OpenAI's
        ([(b"request-id", b"req_anthropic")], "req_anthropic"),  # Anthropic's
        ([(b"request-id", b"second"), (b"x-request-id", b"first")], "first"),
        ([(b"content-type", b"application/json")], None),
    ],
)
def test_the_response_event_keeps_the_providers_request_id_beside_the_proxys(
    headers: list[tuple[bytes, bytes]], expected: str | None
) -> None:
    record = make_record()
    record.response_headers = headers
    event = response_event(record, CAPTURE)
    assert (event["request_id"], event["upstream_request_id"]) == ("req-1", expected)


def test_request_event_headers_are_obfuscated() -> None:
    event = request_event(make_record(), CAPTURE)
    assert event["request_headers"] == {
        "content-type": "application/json",
        "authorization": "Bearer sk-proj-****" + KEY[-4:],
        "cookie": "session=****ijkl",
    }
    assert KEY[8:20] not in orjson.dumps(event).decode()


def test_configured_headers_are_obfuscated() -> None:
    record = make_record(request_headers=[(b"X-Tenant", b"tenant-secret-0123456789")])
    event = request_event(record, CaptureSettings(redact_headers=("x-tenant",)))
    assert event["request_headers"] == {"x-tenant": "****6789"}


def test_request_event_ignores_everything_the_response_side_adds() -> None:
    record = make_record()
    envelope = RecordEnvelope("request", record, CAPTURE)
    before = request_event(make_record(), CAPTURE)
    finish_stream(record)
    record.outcome = "client_disconnected"
    record.error = "gone"
    record.cache_status = "stored"
    record.session_id, record.seq = "sess-2", 1  # a later fork, say
    assert envelope.payload() == before
    assert request_event(record, CAPTURE) == {**before, "session_id": "sess-2", "seq": 1}


def test_capped_request_body_is_flagged_with_its_true_size() -> None:
    record = make_record(request_body=REQUEST_BODY[:30], request_body_size=len(REQUEST_BODY))
    body = request_event(record, CAPTURE)["request_body"]
    assert body["truncated"] is True
    assert (body["size"], body["captured_bytes"]) == (len(REQUEST_BODY), 30)
    # The model is still found in a cut body.
    assert request_event(record, CAPTURE)["model"] == "gpt-4o-mini"


def test_response_event_is_self_contained() -> None:
    event = response_event(finish_json(make_record()), CAPTURE)
    request = request_event(make_record(), CAPTURE)
    for key in (
        "request_id",
        "session_id",
        "seq",
        "start",
        "method",
        "path",
        "query",
        "route",
        "provider",
        "upstream_host",
        "upstream_url",
        "request_model",
        "client_addr",
        "machine",
        "environment",
        "request_headers",
        "request_body",
    ):
        assert event[key] == request[key], key


def test_response_event_times_and_outcome() -> None:
    event = response_event(finish_json(make_record()), CAPTURE)
    assert event["type"] == "response"
    assert event["start"] == "2025-11-23T07:40:12.123456000Z"
    assert event["first_byte"] == "2025-11-23T07:40:12.373456000Z"
    assert event["end"] == event["ts"] == "2025-11-23T07:40:12.873456000Z"
    assert event["ts_ns"] == parse_ts(event["ts"])
    assert (event["duration_ms"], event["ttfb_ms"]) == (750.0, 250.0)
    assert (event["status"], event["outcome"], event["error"]) == (200, "ok", None)
    assert event["cache_status"] == "miss"


def test_response_event_json_body_usage_and_model() -> None:
    event = response_event(finish_json(make_record()), CAPTURE)
    assert event["response_body"] == {
        "text": JSON_RESPONSE.decode(),
        "base64": None,
        "size": len(JSON_RESPONSE),
        "captured_bytes": len(JSON_RESPONSE),
        "truncated": False,
        "content_encoding": None,
        "decode_error": None,
    }
    assert event["response_chunks"] is None
    assert event["response_chunk_offsets_ms"] is None
    assert event["is_stream"] is False
    assert event["model"] == event["response_model"] == "gpt-4o-mini-2024-07-18"
    assert event["request_model"] == "gpt-4o-mini"
    assert event["usage"] == {
        "input_tokens": 9,
        "output_tokens": 2,
        "total_tokens": 11,
        "cache_read_tokens": None,
        "cache_creation_tokens": None,
        "service_tier": None,
    }
    assert event["finish_reasons"] == ["stop"]
    assert event["response_headers"] == {
        "content-type": "application/json",
        "set-cookie": ["__cf_bm=****wxyz; path=/; HttpOnly"],
    }


def test_gzip_json_response_is_captured_decoded() -> None:
    encoded = gzip.compress(JSON_RESPONSE)
    record = finish_json(make_record(), encoded)
    record.response_headers.append((b"Content-Encoding", b"gzip"))
    event = response_event(record, CAPTURE)
    assert event["response_body"]["text"] == JSON_RESPONSE.decode()
    assert event["response_body"]["size"] == len(encoded)
    assert event["response_body"]["content_encoding"] == "gzip"
    assert event["usage"]["total_tokens"] == 11


def test_stream_response_carries_chunks_with_offsets() -> None:
    event = response_event(finish_stream(make_record()), CAPTURE)
    assert event["is_stream"] is True
    assert event["response_chunks"] == [c.decode() for c in SSE_CHUNKS]
    assert event["response_chunk_offsets_ms"] == [100.0, 200.0, 300.0]
    body = event["response_body"]
    assert body["text"] is None and body["base64"] is None
    assert body["size"] == body["captured_bytes"] == sum(len(c) for c in SSE_CHUNKS)
    assert response_text(event) == b"".join(SSE_CHUNKS).decode()


def test_a_response_event_ends_with_its_body_then_the_chunks_and_their_offsets() -> None:
    last = ["response_body", "response_chunks", "response_chunk_offsets_ms"]
    for record in (finish_json(make_record()), finish_stream(make_record())):
        for event in _both_builders(record):
            assert list(event)[-3:] == last


def test_offsets_are_milliseconds_to_the_microsecond_from_the_start() -> None:
    record = finish_stream(make_record())
    record.response_chunks = [(0.0001234, b"data: 1\n\n"), (1.0000006, b"data: 2\n\n")]
    for event in _both_builders(record):
        assert event["response_chunk_offsets_ms"] == [0.123, 1000.001]


def test_stream_response_usage_reply_and_reasons() -> None:
    event = response_event(finish_stream(make_record()), CAPTURE)
    assert event["usage"]["input_tokens"] == 9
    assert event["usage"]["output_tokens"] == 4
    assert event["finish_reasons"] == ["stop"]
    assert event["model"] == "gpt-4o-mini-2024-07-18"


def test_character_split_across_chunks_lands_whole_in_one_chunk() -> None:
    whole = b"".join(SSE_CHUNKS)
    cut = whole.index("👋".encode()) + 2
    event = response_event(finish_stream(make_record(), [whole[:cut], whole[cut:]]), CAPTURE)
    data = event["response_chunks"]
    assert data[0] == whole[: cut - 2].decode()  # the character is not in the first read
    assert "".join(data) == whole.decode()
    assert "\ufffd" not in "".join(data)
    assert len(event["response_chunk_offsets_ms"]) == 2


def test_gzip_stream_chunks_are_decoded_one_by_one() -> None:
    compressor = gzip.compress  # one member per chunk is valid gzip (concatenated members)
    chunks = [compressor(c) for c in SSE_CHUNKS]
    event = response_event(finish_stream(make_record(), chunks, encoding=b"gzip"), CAPTURE)
    assert event["response_chunks"] == [c.decode() for c in SSE_CHUNKS]
    assert event["response_chunk_offsets_ms"] == [100.0, 200.0, 300.0]
    assert event["response_body"]["size"] == sum(len(c) for c in chunks)
    assert event["usage"]["total_tokens"] == 13


def test_undecodable_stream_falls_back_to_raw_chunks_with_a_note() -> None:
    event = response_event(finish_stream(make_record(), SSE_CHUNKS, encoding=b"gzip"), CAPTURE)
    assert event["response_chunks"] == [c.decode() for c in SSE_CHUNKS]
    assert event["response_chunk_offsets_ms"] == [100.0, 200.0, 300.0]
    assert event["response_body"]["decode_error"] is not None


def test_truncated_response_is_flagged() -> None:
    record = finish_json(make_record())
    record.response_chunks = record.response_chunks[:1]
    record.response_truncated = True
    body = response_event(record, CAPTURE)["response_body"]
    assert body["truncated"] is True
    assert (body["size"], body["captured_bytes"]) == (len(JSON_RESPONSE), 40)


def test_error_text_and_url_secrets_are_masked() -> None:
    record = make_record(
        query="key=0123456789abcdefghij&alt=sse",
        upstream_url="https://gw.example/v1/x?key=0123456789abcdefghij&alt=sse",
    )
    record.outcome = "upstream_error"
    record.error = f"upstream said: Incorrect API key provided: {KEY}"
    event = response_event(record, CAPTURE)
    assert KEY not in event["error"] and event["error"].endswith("sk-proj-****" + KEY[-4:])
    assert event["query"] == "key=****ghij&alt=sse"
    assert event["upstream_url"] == "https://gw.example/v1/x?key=****ghij&alt=sse"


def test_unfinished_record_still_gives_a_response_event() -> None:
    record = make_record()
    record.outcome = "timeout"
    event = response_event(record, CAPTURE)
    assert event["end"] is None and event["duration_ms"] is None
    assert event["ts"] == event["start"]
    assert event["usage"] is None and event["finish_reasons"] == []


def test_machine_defaults_to_this_process() -> None:
    event = request_event(make_record(machine=""), CAPTURE)
    assert event["machine"] == machine.machine_id()


def test_events_are_json_ready() -> None:
    for event in (
        request_event(make_record(), CAPTURE),
        response_event(finish_json(make_record()), CAPTURE),
        response_event(finish_stream(make_record()), CAPTURE),
    ):
        assert orjson.loads(orjson.dumps(event)) == event
        assert json.loads(json.dumps(event)) == event
        assert TS_RE.match(event["ts"])


def test_envelope_is_lazy_and_memoised() -> None:
    record = finish_json(make_record())
    envelope = RecordEnvelope("response", record, CAPTURE)
    assert isinstance(envelope, Envelope)
    assert envelope.kind == "response"
    payload = envelope.payload()
    assert payload is envelope.payload()
    assert payload == response_event(record, CAPTURE)
    assert envelope.json() is envelope.json()
    assert orjson.loads(envelope.json()) == payload


def test_envelope_size_hint_is_a_fair_estimate() -> None:
    for kind, record in (
        ("request", make_record()),
        ("response", finish_json(make_record())),
        ("response", finish_stream(make_record())),
    ):
        envelope = RecordEnvelope(kind, record, CAPTURE)
        actual = len(envelope.json())
        assert actual / 2 <= envelope.size_hint <= actual * 3


def test_envelope_rejects_other_kinds() -> None:
    with pytest.raises(ValueError):
        RecordEnvelope("fork", make_record(), CAPTURE)


def test_facts_of_a_stored_event_match_the_envelope_facts() -> None:
    for record in (finish_json(make_record()), finish_stream(make_record())):
        envelope = RecordEnvelope("response", record, CAPTURE)
        stored = orjson.loads(envelope.json())
        assert facts_of(stored) == envelope.facts()
        assert envelope.facts().assistant_message is not None
    assert RecordEnvelope("request", make_record(), CAPTURE).facts().usage is None


def test_facts_of_garbage_is_empty() -> None:
    assert facts_of({"response_chunks": [{"data": 3}], "response_body": None}).usage is None
    assert facts_of({}).model is None


@given(
    st.lists(st.binary(max_size=200), max_size=6),
    st.sampled_from([b"text/event-stream", b"application/json", b"image/png", b""]),
    st.sampled_from([None, b"gzip", b"br", b"deflate", b"zstd"]),
    st.booleans(),
)
def test_any_response_bytes_give_an_event(
    chunks: list[bytes], content_type: bytes, encoding: bytes | None, truncated: bool
) -> None:
    record = finish_stream(make_record(), chunks, encoding)
    record.response_headers[0] = (b"content-type", content_type)
    record.response_truncated = truncated
    event = response_event(record, CAPTURE)
    assert orjson.loads(orjson.dumps(event)) == event


def test_machine_id_never_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> str:
        raise KeyError("no passwd entry")

    monkeypatch.setattr(machine.getpass, "getuser", broken)
    monkeypatch.setattr(machine.socket, "gethostname", lambda: "")
    machine.machine_id.cache_clear()
    try:
        user, host = machine.machine_id().split("@")
        assert user.startswith("uid") and host == "unknown"
    finally:
        machine.machine_id.cache_clear()


def test_machine_id_is_user_at_host_and_cached() -> None:
    first = machine.machine_id()
    assert re.match(r"^[^@\s]+@[^@\s]+$", first)
    assert machine.machine_id() is first


# ---------------------------------------------------------------- answers from the cache


def answered_from_cache(record: ExchangeRecord, chunks: list[bytes]) -> ExchangeRecord:
    """The record of a cache hit as the proxy leaves it: the entry's chunks by reference."""
    record.first_byte_at = record.ended_at = 0.0005
    record.status = 200
    record.response_headers = [(b"content-type", b"text/event-stream")]
    record.replayed = tuple(chunks)
    record.cache_status, record.cache_key, record.cache_age = "hit", "openai/anon/POST/ab", 7.0
    return record


def test_a_replayed_body_is_captured_within_the_cap_as_a_relayed_one() -> None:
    record = answered_from_cache(make_record(), SSE_CHUNKS)
    cap = len(SSE_CHUNKS[0]) + 10
    record.capture_replayed(cap)
    assert record.replayed is None
    assert record.response_chunks == [(0.0005, SSE_CHUNKS[0]), (0.0005, SSE_CHUNKS[1][:10])]
    assert record.response_body_size == sum(len(c) for c in SSE_CHUNKS)
    assert record.response_truncated is True
    record.capture_replayed(cap)  # taken once: a second call adds nothing
    assert len(record.response_chunks) == 2
    body = response_event(record, CaptureSettings(response_body_bytes=cap))["response_body"]
    assert body["truncated"] is True and body["size"] == record.response_body_size


def test_a_replayed_body_within_the_cap_is_whole_and_gives_usage() -> None:
    record = answered_from_cache(make_record(), SSE_CHUNKS)
    record.capture_replayed(CAPTURE.response_body_bytes)
    assert record.response_truncated is False
    assert [c for _, c in record.response_chunks] == SSE_CHUNKS
    event = response_event(record, CAPTURE)
    usage = event["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (9, 4, 13)
    assert response_text(event) == b"".join(SSE_CHUNKS).decode()
    assert (event["cache_status"], event["cache_key"], event["cache_age_s"]) == (
        "hit",
        "openai/anon/POST/ab",
        7.0,
    )


def test_an_empty_replay_captures_nothing() -> None:
    record = answered_from_cache(make_record(), [])
    record.capture_replayed(CAPTURE.response_body_bytes)
    assert record.response_chunks == [] and record.response_body_size == 0
    assert record.response_truncated is False


def test_events_without_a_cache_carry_no_cache_fields() -> None:
    record = finish_json(make_record())
    record.cache_status = None
    event = response_event(record, CAPTURE)
    assert (event["cache_status"], event["cache_key"], event["cache_age_s"]) == (None, None, None)


ROUTE_KEY = "sk-proj-Q7vT9xKp2LmZ4rWb8NcY6hJd3FgS5aEu"


def _both_builders(record: ExchangeRecord) -> list[dict[str, Any]]:
    from llmproxy.capture.events import build_response_event, converter

    capture = CaptureSettings()
    reference = converter.unstructure(build_response_event(record, capture)[0])
    return [response_event(record, capture), reference]


def test_body_keys_userinfo_and_the_injected_key_are_masked_in_both_builders() -> None:
    body = json.dumps(
        {"model": "gpt-4o", "api_key": "QkF9sT2vLw8xRz4nYp6m-body", "messages": []}
    ).encode()
    record = make_record(
        path="/openai/user:S3cr3tPa55w0rd@api.openai.com/v1/chat/completions",
        request_body=body,
        request_body_size=len(body),
        masked=(ROUTE_KEY,),
        error=f"upstream said: your key {ROUTE_KEY} is wrong",
    )
    echo = json.dumps({"authorization": f"Bearer {ROUTE_KEY}"}).encode()
    finish_json(record, echo)
    record.response_headers.append((b"X-Echo", ROUTE_KEY.encode()))
    for event in _both_builders(record):
        text = json.dumps(event)
        assert "QkF9sT2vLw8xRz4n" not in text and "S3cr3tPa55w0rd" not in text
        assert ROUTE_KEY[:16] not in text and ROUTE_KEY[8:30] not in text
        assert event["path"] == "/openai/****@api.openai.com/v1/chat/completions"
        assert json.loads(event["request_body"]["text"])["api_key"] == "****body"
        assert json.loads(event["response_body"]["text"]) == {
            "authorization": "Bearer sk-proj-****5aEu"
        }
        assert event["response_headers"]["x-echo"] == "sk-proj-****5aEu"
        assert event["model"] == "gpt-4o"


def test_an_injected_key_echoed_as_the_provider_request_id_is_masked() -> None:
    record = finish_json(make_record(masked=(ROUTE_KEY,)))
    record.response_headers.append((b"X-Request-ID", f"req-{ROUTE_KEY}".encode()))
    for event in _both_builders(record):
        assert ROUTE_KEY[8:30] not in json.dumps(event)
        assert event["upstream_request_id"] == "req-sk-proj-****5aEu"
    plain = finish_json(make_record())
    plain.response_headers.append((b"X-Request-ID", b"req_abc123"))
    assert [e["upstream_request_id"] for e in _both_builders(plain)] == ["req_abc123"] * 2


def test_an_injected_key_echoed_in_a_stream_is_masked_in_every_chunk() -> None:
    chunks = [b'data: {"k": "' + ROUTE_KEY.encode() + b'"}\n\n', b"data: [DONE]\n\n"]
    record = finish_stream(make_record(masked=(ROUTE_KEY,)), chunks)
    for event in _both_builders(record):
        assert ROUTE_KEY[8:30] not in json.dumps(event)
        assert "sk-proj-****5aEu" in event["response_chunks"][0]
        assert len(event["response_chunk_offsets_ms"]) == 2
