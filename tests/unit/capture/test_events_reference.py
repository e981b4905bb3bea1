"""The fast event builder gives exactly the reference (attrs + cattrs) events.

``request_event``, ``response_event`` and ``RecordEnvelope`` build plain dicts
directly; ``build_request_event`` / ``build_response_event`` build the attrs
schema classes, which the cattrs converter unstructures.  For any record the two
must agree, down to the key order (so the JSON is the same bytes), and the
envelope's facts must be the ones the reference computes with the event.
"""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import brotli  # type: ignore[import-untyped]
import orjson
from hypothesis import example, given
from hypothesis import strategies as st

from llmproxy.capture.events import (
    RecordEnvelope,
    build_request_event,
    build_response_event,
    converter,
    request_event,
    response_event,
)
from llmproxy.capture.record import ExchangeRecord
from llmproxy.config.model import CaptureSettings
from llmproxy.events.sse import parse_sse, sse_fields
from llmproxy.events.time import ms3
from llmproxy.events.usage import (
    facts_from_json,
    facts_from_sse,
    summary_from_json,
    summary_from_sse_fields,
)

KEY = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"


def reference_request(record: ExchangeRecord, capture: CaptureSettings) -> dict[str, Any]:
    result: dict[str, Any] = converter.unstructure(build_request_event(record, capture))
    return result


def reference_response(record: ExchangeRecord, capture: CaptureSettings) -> dict[str, Any]:
    result: dict[str, Any] = converter.unstructure(build_response_event(record, capture)[0])
    return result


def same(fast: dict[str, Any], reference: dict[str, Any]) -> None:
    assert fast == reference
    # Same keys in the same order: the encoded events are the same bytes.
    assert orjson.dumps(fast) == orjson.dumps(reference)


# ---------------------------------------------------------------- strategies

header_names = st.sampled_from(
    [
        b"Content-Type",
        b"content-type",
        b"Content-Encoding",
        b"Authorization",
        b"x-api-key",
        b"X-Goog-Api-Key",
        b"Cookie",
        b"Set-Cookie",
        b"X-Tenant",
        b"User-Agent",
        b"Date",
        b"X-\xc0dd",
    ]
)
header_values = st.one_of(
    st.sampled_from(
        [
            b"application/json",
            b"application/json; charset=utf-8",
            b"text/event-stream",
            b"image/png",
            b"gzip",
            b"identity",
            b"",
            f"Bearer {KEY}".encode(),
            b"session=0123456789abcdefghijkl; theme=dark",
            b"__cf_bm=abcdefghijklmnopqrstuvwxyz; path=/; HttpOnly",
        ]
    ),
    st.binary(max_size=40),
)
headers = st.lists(st.tuples(header_names, header_values), max_size=6)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "model",
                    "stream",
                    "usage",
                    "choices",
                    "finish_reason",
                    "index",
                    "message",
                    "delta",
                    "content",
                    "type",
                    "object",
                    "stop_reason",
                    "output",
                    "status",
                    "prompt_tokens",
                    "completion_tokens",
                    "input_tokens",
                    "output_tokens",
                    "total_tokens",
                    "text",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=12,
)

CHAT_JSON = orjson.dumps(
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
ANTHROPIC_JSON = orjson.dumps(
    {
        "type": "message",
        "model": "claude-sonnet-4",
        "content": [{"type": "text", "text": "Hi"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 3, "output_tokens": 1, "cache_read_input_tokens": 2},
    }
)


def sse_frame(obj: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


OPENAI_STREAM = (
    sse_frame(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Grüß"}}],
        }
    )
    + b": keep-alive\n\n"
    + sse_frame(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"content": " 👋"}, "finish_reason": "stop"}],
        }
    )
    + sse_frame({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}})
    + b"data: [DONE]\n\n"
)
ANTHROPIC_STREAM = (
    sse_frame(
        {"type": "message_start", "message": {"model": "claude", "usage": {"input_tokens": 5}}},
        "message_start",
    )
    + sse_frame(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "é"}},
        "content_block_delta",
    )
    + sse_frame(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 2},
        },
        "message_delta",
    )
)


# Odd values where responses have strings and numbers.
odd = st.none() | st.sampled_from(["", "stop", "length", 0, 1, 2, -1, 2.0, True, [], {}, ["stop"]])
usages = st.fixed_dictionaries(
    {},
    optional={
        "prompt_tokens": odd,
        "completion_tokens": odd,
        "total_tokens": odd,
        "input_tokens": odd,
        "output_tokens": odd,
        "prompt_tokens_details": st.fixed_dictionaries({"cached_tokens": odd}),
    },
)
chat_choices = st.fixed_dictionaries(
    {},
    optional={
        "index": odd,
        "finish_reason": odd,
        "message": st.fixed_dictionaries({"role": st.just("assistant"), "content": odd}),
        "delta": st.fixed_dictionaries({}, optional={"role": odd, "content": odd}),
        "text": odd,
    },
)
# Chat completions and their chunks, with odd values where they can be.
chat_objects = st.fixed_dictionaries(
    {},
    optional={
        "id": odd,
        "object": st.sampled_from(["chat.completion", "chat.completion.chunk", "text_completion"]),
        "model": odd | st.just("gpt-4o"),
        "choices": st.lists(chat_choices, max_size=3) | odd,
        "usage": usages | odd,
    },
)


chat_streams = st.lists(chat_objects, max_size=6).map(
    lambda objects: b"".join(sse_frame(o) for o in objects)
)


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    """Real streams, their line endings varied, or SSE-shaped noise."""
    generated = draw(chat_streams)
    base = draw(st.sampled_from([OPENAI_STREAM, ANTHROPIC_STREAM, b"", generated]))
    ending = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    stream = base.replace(b"\n", ending)
    if draw(st.booleans()):
        stream = b"\xef\xbb\xbf" + stream
    noise = draw(
        st.lists(
            st.sampled_from(
                [
                    b"data: ",
                    b"data:",
                    b"event: x",
                    b"id: 1",
                    b"id: \x00",
                    b":",
                    b"retry: 1",
                    b"\n",
                    b"\r",
                    b"\r\n",
                    b"{",
                    b"}",
                    b"\xc3",
                    b"\xa9",
                    b"\xff",
                    b"[DONE]",
                    b"x",
                ]
            ),
            max_size=12,
        )
    )
    return stream + b"".join(noise)


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=4))))
    pieces, start = [], 0
    for cut in [*cuts, len(data)]:
        pieces.append(data[start:cut])
        start = cut
    return [p for p in pieces if p] or [data]


def encode(data: bytes, coding: bytes | None) -> bytes:
    if coding == b"gzip":
        return gzip.compress(data)
    if coding == b"br":
        return bytes(brotli.compress(data))
    if coding == b"deflate":
        return zlib.compress(data)
    return data


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    return draw(
        st.one_of(
            st.sampled_from(
                [CHAT_JSON, ANTHROPIC_JSON, b"", b'{"model": "gpt-4o", "stream": true}']
            ),
            json_values.map(orjson.dumps),
            chat_objects.map(orjson.dumps),
            st.binary(max_size=60),
            st.text(max_size=30).map(str.encode),
        )
    )


@st.composite
def records(draw: st.DrawFn) -> ExchangeRecord:
    request_body = draw(bodies())
    request_coding = draw(st.sampled_from([None, b"gzip"]))
    request_headers = draw(headers)
    if request_coding is not None:
        request_body = encode(request_body, request_coding)
        request_headers.append((b"Content-Encoding", request_coding))
    captured_request = request_body[: draw(st.integers(0, len(request_body)))]
    if draw(st.booleans()):
        captured_request = request_body
    kind = draw(st.sampled_from(["json", "sse", "other"]))
    response_headers = draw(headers)
    for name in draw(st.lists(st.sampled_from([b"x-request-id", b"Request-Id"]), max_size=2)):
        response_headers.append((name, b"req_" + name[:1]))
    if kind == "json":
        content_type = draw(st.sampled_from([b"application/json", b"text/plain", b""]))
        raw = draw(bodies())
    elif kind == "sse":
        content_type = b"text/event-stream; charset=utf-8"
        raw = draw(sse_streams())
    else:
        content_type = draw(st.sampled_from([b"image/png", b"application/octet-stream"]))
        raw = draw(st.binary(max_size=40))
    response_headers.insert(
        draw(st.integers(0, len(response_headers))), (b"Content-Type", content_type)
    )
    coding = draw(st.sampled_from([None, None, b"gzip", b"br", b"deflate", b"identity", b"zstd"]))
    if coding is not None:
        response_headers.append((b"content-encoding", coding))
        raw = encode(raw, coding)
    if kind == "sse" and coding in (b"gzip", b"br", b"deflate") and draw(st.booleans()):
        # One compressed member per chunk (as a streaming server would flush).
        pieces = [encode(p, coding) for p in draw(split(raw))]
    else:
        pieces = draw(split(raw))
    if draw(st.booleans()):  # a capture cut at the cap
        pieces = pieces[: draw(st.integers(0, len(pieces)))]
    offsets = draw(
        st.lists(st.floats(0, 600, allow_nan=False), min_size=len(pieces), max_size=len(pieces))
    )
    return ExchangeRecord(
        request_id=draw(st.sampled_from(["req-1", "r"])),
        started_at=draw(st.floats(0, 2e9, allow_nan=False)),
        method="POST",
        path="/openai/v1/chat/completions",
        query=draw(st.sampled_from(["", "alt=sse", "key=0123456789abcdefghij&alt=sse"])),
        route="openai",
        provider=draw(st.sampled_from(["openai", "anthropic", ""])),
        upstream_url=draw(
            st.sampled_from(
                [
                    "https://api.openai.com/v1/chat/completions",
                    "https://user:pw@gw.example/v1/x?key=0123456789abcdefghij",
                    "",
                ]
            )
        ),
        upstream_host="api.openai.com",
        client_addr="10.0.0.7",
        request_headers=request_headers,
        request_body=captured_request,
        request_body_size=len(request_body),
        first_byte_at=draw(st.none() | st.floats(0, 600, allow_nan=False)),
        ended_at=draw(st.none() | st.floats(0, 600, allow_nan=False)),
        status=draw(st.none() | st.sampled_from([200, 429, 500])),
        response_headers=response_headers,
        response_chunks=list(zip(offsets, pieces, strict=True)),
        response_body_size=len(raw) + draw(st.sampled_from([0, 0, 10])),
        response_truncated=draw(st.booleans()),
        outcome=draw(
            st.sampled_from(["ok", "client_error", "upstream_rate_limited", "upstream_error"])
        ),
        error=draw(st.none() | st.sampled_from(["gone", f"Incorrect API key provided: {KEY}"])),
        session_id=draw(st.none() | st.just("sess-1")),
        seq=draw(st.none() | st.integers(0, 5)),
        cache_status=draw(st.none() | st.sampled_from(["miss", "hit", "conditional-hit"])),
        cache_key=draw(st.none() | st.just("openai/anon/POST/3be9")),
        cache_age=draw(st.none() | st.floats(0, 1e6, allow_nan=False)),
        environment="prod",
        machine=draw(st.sampled_from(["", "proxy@host1"])),
        token_id=draw(st.none() | st.just("tok_0123456789ab")),
        project=draw(st.none() | st.sampled_from(["team-a", ""])),
    )


captures = st.builds(
    CaptureSettings,
    request_body_bytes=st.sampled_from([8, 64 * 1024]),
    response_body_bytes=st.sampled_from([16, 256 * 1024]),
    redact_headers=st.sampled_from([(), ("x-tenant", "user-agent")]),
)


# ---------------------------------------------------------------- the properties


@given(records(), captures)
def test_fast_events_equal_the_reference_events(
    record: ExchangeRecord, capture: CaptureSettings
) -> None:
    same(request_event(record, capture), reference_request(record, capture))
    same(response_event(record, capture), reference_response(record, capture))


@given(records(), captures, st.booleans())
def test_envelopes_equal_the_reference_events_and_facts(
    record: ExchangeRecord, capture: CaptureSettings, response_first: bool
) -> None:
    request = RecordEnvelope("request", record, capture)
    response = RecordEnvelope("response", record, capture)
    # Whichever is built first computes the shared request side.
    for envelope in (response, request) if response_first else (request, response):
        envelope.json()
    same(request.payload(), reference_request(record, capture))
    same(response.payload(), reference_response(record, capture))
    assert orjson.loads(response.json()) == response.payload()
    assert response.facts() == build_response_event(record, capture)[1]


@given(records(), captures)
def test_a_streams_texts_and_offsets_pair_up_with_its_reads(
    record: ExchangeRecord, capture: CaptureSettings
) -> None:
    event = response_event(record, capture)
    texts, offsets = event["response_chunks"], event["response_chunk_offsets_ms"]
    if not event["is_stream"]:
        assert texts is None and offsets is None
        return
    # One entry in each per read kept under the cap, whatever the encoding.
    assert len(texts) == len(offsets) == len(record.response_chunks)
    assert offsets == [ms3(offset) for offset, _ in record.response_chunks]
    if not event["response_body"]["content_encoding"]:
        assert "".join(texts) == b"".join(c for _, c in record.response_chunks).decode(
            errors="replace"
        )


@given(st.one_of(sse_streams(), st.binary(max_size=80)))
def test_sse_fields_are_the_parsers_events(stream: bytes) -> None:
    expected = [(event.event, event.data) for event in parse_sse(stream)]
    assert sse_fields(stream) == expected


@given(st.one_of(chat_streams, sse_streams(), st.binary(max_size=80)))
@example(  # two choices finishing out of index order
    sse_frame({"object": "chat.completion.chunk", "choices": [{"index": 1, "finish_reason": "b"}]})
    + sse_frame({"choices": [{"index": 0, "finish_reason": "a"}]})
)
def test_sse_summary_is_the_facts_summary(stream: bytes) -> None:
    parsed = parse_sse(stream)
    facts = facts_from_sse(parsed)
    summary = summary_from_sse_fields([(e.event, e.data) for e in parsed])
    assert summary == (facts.model, facts.usage, facts.finish_reasons)


@given(st.one_of(bodies(), json_values.map(orjson.dumps)))
def test_json_summary_is_the_facts_summary(body: bytes) -> None:
    facts = facts_from_json(body)
    assert summary_from_json(body) == (facts.model, facts.usage, facts.finish_reasons)
    text = body.decode("utf-8", "replace")
    assert summary_from_json(text) == (facts.model, facts.usage, facts.finish_reasons)


def test_the_request_side_is_computed_once_per_record() -> None:
    record = ExchangeRecord(
        request_id="r",
        started_at=1763883612.5,
        method="POST",
        path="/v1/chat/completions",
        query="",
        route="openai",
        provider="openai",
        upstream_url="https://api.openai.com/v1/chat/completions",
        upstream_host="api.openai.com",
        client_addr="10.0.0.7",
        request_headers=[(b"Authorization", f"Bearer {KEY}".encode())],
        request_body=CHAT_JSON,
        request_body_size=len(CHAT_JSON),
    )
    capture = CaptureSettings()
    request = RecordEnvelope("request", record, capture).payload()
    response = RecordEnvelope("response", record, capture).payload()
    assert response["request_headers"] is request["request_headers"]
    assert response["request_body"] is request["request_body"]
    # Another capture configuration is another request side.
    other = RecordEnvelope("response", record, CaptureSettings(request_body_bytes=4)).payload()
    assert other["request_body"]["captured_bytes"] == 4
