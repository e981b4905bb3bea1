"""The session tracker: session ids, seq and forks for realistic multi-turn
conversations (OpenAI chat and Responses, Anthropic messages; JSON and SSE
replies), client-supplied ids, its journal across restarts, and its bounds."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from llmproxy.capture import sessions as sessions_module
from llmproxy.capture.events import RecordEnvelope
from llmproxy.capture.record import ExchangeRecord
from llmproxy.capture.sessions import (
    FORK_REASON,
    Fingerprints,
    SessionTracker,
    conversation_kind,
    fingerprint,
    reduce_message,
    scoped_id,
    tenant_namespace,
    tenant_tag,
)
from llmproxy.config.model import CaptureSettings, ExporterSettings
from llmproxy.events.envelope import Envelope
from llmproxy.events.time import epoch_ns, rfc3339_ns
from llmproxy.export.sinks.loki import LokiSink
from llmproxy.export.verdict import Delivered
from llmproxy.state.health import StateHealth
from tests.fakes.loki import FakeLoki

NOW = 1_795_419_612.0  # 2026-11-23T07:40:12Z
KEY = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
# Every harness request carries KEY: a client's session ids are kept within its tenant.
TENANT = tenant_tag(tenant_namespace("", [(b"Authorization", f"Bearer {KEY}".encode())]))


def scoped(session: str) -> str:
    return scoped_id(TENANT, session)


CANONICAL_FIELDS = {
    "schema",
    "type",
    "ts",
    "ts_ns",
    "request_id",
    "session_id",
    "seq",
    "route",
    "provider",
    "upstream_host",
    "environment",
    "machine",
}


# ---------------------------------------------------------------- replies as upstreams send them


@attrs.frozen
class Reply:
    chunks: list[bytes]
    content_type: bytes = b"application/json"
    status: int = 200
    encoding: bytes | None = None


def sse(*events: tuple[str | None, dict[str, Any] | str]) -> list[bytes]:
    out = []
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data)
        head = f"event: {name}\n" if name else ""
        out.append(f"{head}data: {text}\n\n".encode())
    return out


def openai_json(text: str | None, tool_calls: list[dict[str, Any]] | None = None) -> Reply:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    body = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "tool_calls" if tool_calls else "stop",
            }
        ],
        "usage": {"prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163},
        "system_fingerprint": "fp_fc9f1d7035",
    }
    raw = json.dumps(body).encode()
    return Reply([raw[:50], raw[50:]])


def openai_sse(text: str, tool_calls: list[tuple[str, str, str]] = ()) -> Reply:  # type: ignore[assignment]
    head = {"id": "chatcmpl-123", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    events: list[tuple[str | None, dict[str, Any] | str]] = [
        (None, {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    ]
    for word in text.split(" ") if text else []:
        delta = {"content": word if not events[1:] else " " + word}
        events.append((None, {**head, "choices": [{"index": 0, "delta": delta}]}))
    for index, (call_id, name, arguments) in enumerate(tool_calls):
        first = {"index": index, "id": call_id, "type": "function"}
        first["function"] = {"name": name, "arguments": ""}
        events.append((None, {**head, "choices": [{"index": 0, "delta": {"tool_calls": [first]}}]}))
        for piece in (arguments[:5], arguments[5:]):
            frag = {"index": index, "function": {"arguments": piece}}
            events.append(
                (None, {**head, "choices": [{"index": 0, "delta": {"tool_calls": [frag]}}]})
            )
    finish = "tool_calls" if tool_calls else "stop"
    events.append((None, {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
    events.append(
        (None, {**head, "choices": [], "usage": {"prompt_tokens": 9, "total_tokens": 20}})
    )
    events.append((None, "[DONE]"))
    return Reply(sse(*events), b"text/event-stream")


def anthropic_json(blocks: list[dict[str, Any]]) -> Reply:
    body = {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": blocks,
        "stop_reason": "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 2095, "output_tokens": 503},
    }
    return Reply([json.dumps(body).encode()])


def anthropic_sse(blocks: list[dict[str, Any]]) -> Reply:
    start = {
        "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "claude-sonnet-4-5-20250929",
        "stop_reason": None,
        "usage": {"input_tokens": 25, "output_tokens": 1},
    }
    events: list[tuple[str | None, dict[str, Any] | str]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("ping", {"type": "ping"}),
    ]
    for index, block in enumerate(blocks):
        kind = block["type"]
        opening = {"type": kind, **({"text": ""} if kind == "text" else {})}
        if kind == "tool_use":
            opening.update(id=block["id"], name=block["name"], input={})
        if kind == "thinking":
            opening.update(thinking="")
        events.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": opening},
            )
        )
        if kind == "text":
            text = block["text"]
            deltas = [{"type": "text_delta", "text": p} for p in (text[:7], text[7:])]
        elif kind == "thinking":
            deltas = [
                {"type": "thinking_delta", "thinking": block["thinking"]},
                {"type": "signature_delta", "signature": block["signature"]},
            ]
        else:
            raw = json.dumps(block["input"])
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in (raw[:4], raw[4:])]
        for delta in deltas:
            events.append(
                (
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            )
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop},
                "usage": {"output_tokens": 9},
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return Reply(sse(*events), b"text/event-stream")


def responses_json(response_id: str, output: list[dict[str, Any]]) -> Reply:
    body = {
        "id": response_id,
        "object": "response",
        "created_at": 1741476542,
        "status": "completed",
        "model": "gpt-4.1-2025-04-14",
        "output": output,
        "usage": {"input_tokens": 36, "output_tokens": 87, "total_tokens": 123},
    }
    return Reply([json.dumps(body).encode()])


def output_message(text: str, n: int = 1) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_67ccd3acc8d48190a77525dc6de64b4{n}",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


# ---------------------------------------------------------------- the harness


@attrs.define
class Harness:
    tracker: SessionTracker
    clock: Clock
    published: list[Envelope]
    exchanges: int = 0
    shared: Elsewhere | None = None

    def exchange(
        self,
        path: str,
        body: dict[str, Any] | bytes,
        reply: Reply,
        headers: list[tuple[bytes, bytes]] | None = None,
        method: str = "POST",
        outcome: str = "ok",
        truncated: bool = False,
    ) -> ExchangeRecord:
        self.exchanges += 1
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        record = ExchangeRecord(
            request_id=f"req-{self.exchanges:03d}",
            started_at=NOW + self.exchanges,
            method=method,
            path=path,
            query="",
            route="openai" if "anthropic" not in path else "anthropic",
            provider="openai" if "anthropic" not in path else "anthropic",
            upstream_url="https://api.example" + path,
            upstream_host="api.openai.com" if "anthropic" not in path else "api.anthropic.com",
            client_addr="10.0.0.7:51234",
            request_headers=[
                (b"Content-Type", b"application/json"),
                (b"Authorization", f"Bearer {KEY}".encode()),
                *(headers or []),
            ],
            request_body=raw,
            request_body_size=len(raw),
            environment="prod",
            machine="proxy@host1",
        )
        self.tracker.assign(record, raw)
        self.settle()
        record.first_byte_at = 0.2
        record.status = reply.status
        record.response_headers = [(b"Content-Type", reply.content_type)]
        chunks = reply.chunks
        if reply.encoding == b"gzip":
            chunks = [gzip.compress(b"".join(chunks))]
            record.response_headers.append((b"Content-Encoding", b"gzip"))
        record.response_chunks = [(0.2 + i / 10, c) for i, c in enumerate(chunks)]
        record.response_body_size = sum(len(c) for c in chunks)
        record.response_truncated = truncated
        record.outcome = outcome
        record.ended_at = 1.5
        self.tracker.finished(record)
        self.settle()
        return record

    def settle(self) -> None:
        """With a shared state: its batch goes out (next turn) and is answered
        (a continuation nobody recorded is asked until its wait is over)."""
        if self.shared is not None:
            self.clock.advance(0)
            while self.tracker.stats()["continuations_waiting"]:
                self.clock.advance(0.05)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [e.payload() for e in self.published if kind is None or e.kind == kind]


@attrs.define
class Elsewhere:
    """A shared state (``[state] store = redis``) for the tracker: the operations
    run on another tracker's maps (the Redis script decides as they do:
    tests/unit/state/test_sessions.py) and are answered at once."""

    maps: SessionTracker
    usable: bool = True
    batches: int = 0

    def apply(self, ops: Any) -> Deferred[None]:
        self.batches += 1
        self.maps.apply_locally(ops)
        return succeed(None)


def harness(
    store: Path | None = None, max_states: int = 1000, shared: bool = False, **kw: Any
) -> Harness:
    clock = Clock()
    clock.advance(NOW)
    published: list[Envelope] = []
    counter = iter(range(1, 1_000_000))
    elsewhere = (
        Elsewhere(SessionTracker(lambda _: None, None, max_states, Clock())) if shared else None
    )
    tracker = SessionTracker(
        published.append,
        store,
        max_states,
        clock,
        new_id=lambda: f"sess-{next(counter):04d}",
        shared=elsewhere,
        **kw,
    )
    tracker.start()
    return Harness(tracker, clock, published, shared=elsewhere)


@pytest.fixture(params=["local", "shared", "shared-waiting"])
def h(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """Every conversation test runs three times: decided here, and decided in a
    shared state (as with Redis) with this tracker mirroring it, where a
    continuation nobody recorded starts at once, or after waiting for its
    history (``[state] continuation_wait``): the same decisions."""
    waiting = request.param == "shared-waiting"
    running = harness(
        shared=request.param != "local", **({"continuation_wait": 1.0} if waiting else {})
    )
    yield running
    running.tracker.stop(0)
    if running.shared is not None:
        # The tracker's own maps mirror what the shared state decided.
        # (A session started here is known there once a state of it is recorded.)
        mine, theirs = running.tracker.stats(), running.shared.maps.stats()
        assert mine["states"] == theirs["states"]
        assert mine["sessions"] >= theirs["sessions"]
        assert running.shared.batches > 0 or not mine["states"]


# ---------------------------------------------------------------- clients as SDKs behave


@attrs.define
class ChatClient:
    """An OpenAI SDK user: appends each reply message as the SDK dumps it."""

    h: Harness
    messages: list[dict[str, Any]] = attrs.Factory(
        lambda: [{"role": "system", "content": "You are a helpful assistant. Be brief."}]
    )
    stream: bool = False
    path: str = "/openai/v1/chat/completions"

    def say(self, text: str, answer: str, **kw: Any) -> ExchangeRecord:
        self.messages.append({"role": "user", "content": text})
        return self.send(answer, **kw)

    def send(self, answer: str, **kw: Any) -> ExchangeRecord:
        body = {"model": "gpt-4o", "messages": list(self.messages), "stream": self.stream}
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        reply = openai_sse(answer) if self.stream else openai_json(answer)
        record = self.h.exchange(self.path, body, reply, **kw)
        self.messages.append(
            {"role": "assistant", "content": answer, "refusal": None, "annotations": []}
        )
        return record


@attrs.define
class ClaudeClient:
    """An Anthropic SDK user: appends the reply's content blocks as they came."""

    h: Harness
    messages: list[dict[str, Any]] = attrs.Factory(list)
    stream: bool = True
    metadata: dict[str, Any] | None = None
    path: str = "/anthropic/api.anthropic.com/v1/messages"

    def turn(self, content: str | list[dict[str, Any]], blocks: list[dict[str, Any]]) -> Any:
        # Like Claude Code: the cache breakpoint moves to the newest user message.
        for message in self.messages:
            if message["role"] == "user" and isinstance(message["content"], list):
                for block in message["content"]:
                    block.pop("cache_control", None)
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        content[-1]["cache_control"] = {"type": "ephemeral"}
        self.messages.append({"role": "user", "content": content})
        body: dict[str, Any] = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 4096,
            "system": [
                {"type": "text", "text": "You are Claude.", "cache_control": {"type": "ephemeral"}}
            ],
            "messages": json.loads(json.dumps(self.messages)),
            "stream": self.stream,
        }
        if self.metadata is not None:
            body["metadata"] = self.metadata
        reply = anthropic_sse(blocks) if self.stream else anthropic_json(blocks)
        record = self.h.exchange(self.path, body, reply)
        self.messages.append({"role": "assistant", "content": json.loads(json.dumps(blocks))})
        return record


def ids(records: list[ExchangeRecord]) -> list[tuple[str | None, int | None]]:
    return [(r.session_id, r.seq) for r in records]


# ---------------------------------------------------------------- what is a conversation


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("POST", "/openai/v1/chat/completions", "chat"),
        ("POST", "/v1/chat/completions/", "chat"),
        ("POST", "/openai/v1/responses", "responses"),
        ("POST", "/anthropic/api.anthropic.com/v1/messages", "messages"),
        ("POST", "/v1/messages/count_tokens", None),
        ("POST", "/v1/embeddings", None),
        ("POST", "/v1/completions", None),
        ("GET", "/v1/chat/completions", None),
        ("GET", "/v1/models", None),
    ],
)
def test_conversation_requests_are_chat_responses_and_messages_posts(
    method: str, path: str, kind: str | None
) -> None:
    assert conversation_kind(method, path) == kind


def test_non_conversation_and_non_json_requests_get_no_session(h: Harness) -> None:
    messages = {"messages": [{"role": "user", "content": "hi"}]}
    records = [
        h.exchange(
            "/v1/embeddings", {"input": "hi", "model": "text-embedding-3-small"}, openai_json("x")
        ),
        h.exchange("/v1/messages/count_tokens", messages, anthropic_json([])),
        h.exchange("/v1/chat/completions", b"model=gpt-4o&messages=hi", openai_json("x")),
        h.exchange("/v1/chat/completions", b'{"messages": [{"role": "us', openai_json("x")),
        h.exchange("/v1/chat/completions", b"[1, 2]", openai_json("x")),
        h.exchange("/v1/chat/completions", messages, openai_json("x"), method="GET"),
        h.exchange("/v1/chat/completions", {"model": "gpt-4o"}, openai_json("x")),
    ]
    assert ids(records) == [(None, None)] * len(records)
    assert h.published == []


# ---------------------------------------------------------------- linear conversations


def test_five_turn_openai_conversation_is_one_session_with_seq_1_to_5(h: Harness) -> None:
    alice = ChatClient(h)
    records = [
        alice.say("What's the capital of France?", "Paris."),
        alice.say("And its population?", "About 2.1 million in the city proper."),
        alice.say("How about the metro area?", "Roughly 12 million."),
        alice.say("Which river runs through it?", "The Seine."),
        alice.say("Thanks!", "You're welcome!"),
    ]
    assert ids(records) == [("sess-0001", n) for n in range(1, 6)]
    starts = h.events("session_start")
    assert len(starts) == 1 and h.events("fork") == []
    assert starts[0]["session_id"] == "sess-0001" and starts[0]["seq"] == 1
    assert starts[0]["request_id"] == "req-001"
    assert h.tracker.stats()["continued"] == 4


def test_five_turn_openai_stream_conversation_is_one_session(h: Harness) -> None:
    bob = ChatClient(h, stream=True)
    records = [bob.say(f"Question {n}?", f"Streamed answer number {n} here.") for n in range(5)]
    assert ids(records) == [("sess-0001", n) for n in range(1, 6)]
    assert len(h.events("session_start")) == 1


def test_openai_parallel_tool_calls_continue_the_session(h: Harness) -> None:
    """The history ends in two tool results: ``messages[:-1]`` still holds one of
    them, so the match is the longest prefix ending with the assistant's calls."""
    client = ChatClient(h, stream=True)
    client.messages.append({"role": "user", "content": "Weather in Paris and Rome?"})
    calls = [
        ("call_FthC9qRpsL5kBpwwyw6c7j4k", "get_weather", '{"location": "Paris, France"}'),
        ("call_RpEDoB8O0FTL9JoKTuCVFOyR", "get_weather", '{"location": "Rome, Italy"}'),
    ]
    first = h.exchange(
        client.path,
        {"model": "gpt-4o", "messages": list(client.messages), "stream": True},
        openai_sse("", calls),
    )
    client.messages.append(
        {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "tool_calls": [
                {"id": c, "type": "function", "function": {"name": n, "arguments": a}}
                for c, n, a in calls
            ],
        }
    )
    client.messages.append({"role": "tool", "tool_call_id": calls[0][0], "content": "14°C"})
    client.messages.append({"role": "tool", "tool_call_id": calls[1][0], "content": "21°C"})
    second = client.send("Paris is 14°C, Rome 21°C.")
    third = client.say("Which is warmer?", "Rome.")
    assert ids([first, second, third]) == [("sess-0001", 1), ("sess-0001", 2), ("sess-0001", 3)]


def test_anthropic_tool_use_conversation_with_thinking_is_one_session(h: Harness) -> None:
    claude = ClaudeClient(h, stream=True)
    thinking = {
        "type": "thinking",
        "thinking": "Need the tool.",
        "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h",
    }
    tool_use = {
        "type": "tool_use",
        "id": "toolu_01A09q90qw90lq917835lq9",
        "name": "get_weather",
        "input": {"location": "San Francisco, CA", "unit": "celsius"},
    }
    records = [
        claude.turn(
            "What's the weather in San Francisco?",
            [thinking, {"type": "text", "text": "Let me check."}, tool_use],
        ),
        claude.turn(
            [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                    "content": "15 degrees, foggy",
                }
            ],
            [{"type": "text", "text": "It's 15°C and foggy in San Francisco."}],
        ),
        claude.turn("Should I bring a jacket?", [{"type": "text", "text": "Yes, a light one."}]),
        claude.turn(
            "And tomorrow?", [{"type": "text", "text": "I can't see tomorrow's forecast."}]
        ),
        claude.turn("OK, thanks.", [{"type": "text", "text": "Anytime!"}]),
    ]
    assert ids(records) == [("sess-0001", n) for n in range(1, 6)]
    assert h.events("fork") == []


def test_anthropic_json_replies_echoed_as_plain_strings_still_match(h: Harness) -> None:
    """A client may send the assistant turn back as a string, not as blocks."""
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "Hello, Claude"}],
    }
    path = "/anthropic/api.anthropic.com/v1/messages"
    first = h.exchange(path, body, anthropic_json([{"type": "text", "text": "Hello!"}]))
    body["messages"] += [
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Can you describe LLMs to me?"},
    ]
    second = h.exchange(path, body, anthropic_json([{"type": "text", "text": "Sure."}]))
    assert ids([first, second]) == [("sess-0001", 1), ("sess-0001", 2)]


def test_a_gzip_encoded_reply_is_decoded_before_it_is_fingerprinted(h: Harness) -> None:
    client = ChatClient(h)
    reply = attrs.evolve(openai_json("Bonjour."), encoding=b"gzip")
    client.messages.append({"role": "user", "content": "Say hello in French."})
    first = h.exchange(client.path, {"model": "gpt-4o", "messages": list(client.messages)}, reply)
    client.messages.append({"role": "assistant", "content": "Bonjour."})
    second = client.say("And in Italian?", "Ciao.")
    assert ids([first, second]) == [("sess-0001", 1), ("sess-0001", 2)]


def test_responses_api_stateless_input_with_function_calls_is_one_session(h: Harness) -> None:
    path = "/openai/v1/responses"
    items: list[dict[str, Any]] = [{"role": "user", "content": "What's 2+2? Use the calculator."}]
    call = {
        "type": "function_call",
        "id": "fc_12345xyz",
        "call_id": "call_12345xyz",
        "name": "calculate",
        "arguments": '{"expression":"2+2"}',
        "status": "completed",
    }
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": []}
    first = h.exchange(
        path,
        {"model": "o4-mini", "input": items, "store": False},
        responses_json("resp_1", [reasoning, call]),
    )
    items += [
        reasoning,
        call,
        {"type": "function_call_output", "call_id": "call_12345xyz", "output": "4"},
    ]
    second = h.exchange(
        path,
        {"model": "o4-mini", "input": items, "store": False},
        responses_json("resp_2", [output_message("2 + 2 = 4.")]),
    )
    items += [output_message("2 + 2 = 4."), {"role": "user", "content": "Times 3?"}]
    third = h.exchange(
        path,
        {"model": "o4-mini", "input": items, "store": False},
        responses_json("resp_3", [output_message("12.")]),
    )
    assert ids([first, second, third]) == [("sess-0001", n) for n in (1, 2, 3)]


# ---------------------------------------------------------------- forks


def five_turns(h: Harness, **kw: Any) -> tuple[ChatClient, list[ExchangeRecord]]:
    client = ChatClient(h, **kw)
    records = [
        client.say("Plan a 3-day trip to Lisbon.", "Day 1: Alfama. Day 2: Belém. Day 3: Sintra."),
        client.say("Swap day 3 for something in the city.", "Day 3: LX Factory and Bairro Alto."),
        client.say("Where should I eat on day 2?", "Try Pastéis de Belém."),
        client.say("Any dinner spot?", "Taberna da Rua das Flores."),
        client.say("Great, summarise it.", "Alfama, Belém, LX Factory; eat at the above."),
    ]
    return client, records


def test_editing_an_earlier_user_message_forks_from_the_turn_before_it(h: Harness) -> None:
    client, records = five_turns(h)
    session = records[0].session_id
    # The user edits their third message: the client resends turns 1-2 and the new text.
    edited = ChatClient(h, messages=client.messages[:5])
    assert [m["role"] for m in edited.messages] == ["system"] + ["user", "assistant"] * 2
    fork_record = edited.say("Where should I eat on day 1 instead?", "Try Time Out Market.")
    forks = h.events("fork")
    assert len(forks) == 1
    fork = forks[0]
    assert fork["from_seq"] == 2
    assert fork["parent_session"] == session
    assert fork["reason"] == FORK_REASON == "message_history_diverged"
    assert fork["session_id"] == fork_record.session_id != session
    assert fork["seq"] == fork_record.seq == 3
    assert fork["request_id"] == fork_record.request_id
    assert fork.keys() >= CANONICAL_FIELDS
    # The new branch goes on as its own session; the original is still there too.
    next_turn = edited.say("And dessert?", "Pastel de nata.")
    assert (next_turn.session_id, next_turn.seq) == (fork_record.session_id, 4)
    original = ChatClient(h, messages=client.messages)
    assert ids([original.say("One more thing?", "Sure.")]) == [(session, 6)]
    assert len(h.events("fork")) == 1
    assert len(h.events("session_start")) == 1  # a fork starts with its fork entry


def test_regenerating_the_last_reply_forks_from_the_turn_before(h: Harness) -> None:
    client, records = five_turns(h)
    session = records[0].session_id
    # "Regenerate": the same request as turn 5 again (history = turns 1-4).
    again = ChatClient(h, messages=client.messages[:-1])
    again.messages.pop()  # the user message is re-added by say()
    regenerated = again.say("Great, summarise it.", "A different summary this time.")
    (fork,) = h.events("fork")
    assert (fork["from_seq"], fork["parent_session"]) == (4, session)
    assert (regenerated.session_id, regenerated.seq) == (fork["session_id"], 5)
    assert regenerated.session_id != session
    # Regenerating again branches again, from the same place.
    again2 = ChatClient(h, messages=client.messages[:-2])
    third = again2.say("Great, summarise it.", "Yet another summary.")
    assert len(h.events("fork")) == 2
    assert third.session_id not in (session, regenerated.session_id)
    assert h.events("fork")[1]["from_seq"] == 4


def test_a_stream_regenerate_forks_too(h: Harness) -> None:
    client, records = five_turns(h, stream=True)
    again = ChatClient(h, messages=client.messages[:-2], stream=True)
    regenerated = again.say("Great, summarise it.", "Streamed alternative.")
    (fork,) = h.events("fork")
    assert (fork["from_seq"], fork["parent_session"]) == (4, records[0].session_id)
    assert regenerated.seq == 5


def test_a_retry_after_a_failed_exchange_continues_instead_of_forking(h: Harness) -> None:
    client = ChatClient(h)
    first = client.say("Hi", "Hello!")
    client.messages.append({"role": "user", "content": "Tell me a joke."})
    body = {"model": "gpt-4o", "messages": list(client.messages)}
    overloaded = Reply([b'{"error": {"type": "overloaded_error"}}'], status=529)
    failed = h.exchange(client.path, body, overloaded, outcome="upstream_error")
    retried = client.send("Why did the chicken cross the road?")
    assert ids([first, failed, retried]) == [("sess-0001", 1), ("sess-0001", 2), ("sess-0001", 3)]
    assert h.events("fork") == []


def test_a_reply_cut_at_the_capture_cap_is_not_a_state(h: Harness) -> None:
    client = ChatClient(h)
    client.messages.append({"role": "user", "content": "Write a long essay."})
    body = {"model": "gpt-4o", "messages": list(client.messages)}
    h.exchange(client.path, body, openai_json("Essay..."), truncated=True)
    client.messages.append({"role": "assistant", "content": "Essay..."})
    follow_up = client.say("Shorter please.", "OK.")
    assert follow_up.session_id == "sess-0002" and follow_up.seq == 1


def test_a_first_turn_asked_again_is_a_new_session(h: Harness) -> None:
    one = ChatClient(h).say("Hi", "Hello!")
    two = ChatClient(h).say("Hi", "Hello!")
    assert ids([one, two]) == [("sess-0001", 1), ("sess-0002", 1)]


# ---------------------------------------------------------------- interleaving


def test_interleaved_conversations_are_kept_apart(h: Harness) -> None:
    alice = ChatClient(h)
    bob = ChatClient(h, stream=True)
    claude = ClaudeClient(h, stream=False)
    got: dict[str, list[ExchangeRecord]] = {"alice": [], "bob": [], "claude": []}
    for n in range(4):
        got["alice"].append(alice.say(f"Alice question {n}", f"Alice answer {n}"))
        got["claude"].append(
            claude.turn(f"Carol asks {n}", [{"type": "text", "text": f"To Carol {n}"}])
        )
        got["bob"].append(bob.say(f"Bob question {n}", f"Bob answer {n}"))
    sessions = {name: {r.session_id for r in records} for name, records in got.items()}
    assert all(len(s) == 1 for s in sessions.values())
    assert len(set().union(*sessions.values())) == 3
    for records in got.values():
        assert [r.seq for r in records] == [1, 2, 3, 4]
    assert len(h.events("session_start")) == 3 and h.events("fork") == []


# ---------------------------------------------------------------- client-supplied ids

CLAUDE_CODE_USER = (
    "user_5c9a3b2f0e1d4c7a8b6e9f0a1b2c3d4e5f60718293a4b5c6d7e8f9012345678_account_"
    "3f1e2d4c-5b6a-7980-a1b2-c3d4e5f60718_session_2b9e4c1a-7f3d-4e8b-9a6c-5d1f0e2b3a47"
)


@pytest.mark.parametrize(
    ("body", "headers", "session", "source"),
    [
        (
            {"metadata": {"user_id": CLAUDE_CODE_USER}},
            [],
            "2b9e4c1a-7f3d-4e8b-9a6c-5d1f0e2b3a47",
            "metadata.user_id",
        ),
        (
            {"conversation": "conv_689667905b048191b4740501625afd940c7533ace33a2dab"},
            [],
            "conv_689667905b048191b4740501625afd940c7533ace33a2dab",
            "conversation",
        ),
        ({"conversation": {"id": "conv_abc"}}, [], "conv_abc", "conversation"),
        ({"previous_response_id": "resp_unknown1"}, [], "resp_unknown1", "previous_response_id"),
        ({"metadata": {"session_id": "chat-42"}}, [], "chat-42", "metadata.session_id"),
        ({}, [(b"X-Session-ID", b"thread_7")], "thread_7", "x-session-id"),
        ({"user": "user-1234"}, [], "user-1234", "user"),
        # Priority: the body's session wins over the header and over user.
        (
            {"metadata": {"session_id": "from-body"}, "user": "u1"},
            [(b"x-session-id", b"from-header")],
            "from-body",
            "metadata.session_id",
        ),
        # Invalid ids are ignored: the next source is used.
        (
            {"metadata": {"session_id": "../../etc/passwd"}, "user": "ok_user"},
            [],
            "ok_user",
            "user",
        ),
        ({"metadata": {"user_id": "user_abc_session_"}, "user": "u2"}, [], "u2", "user"),
    ],
)
def test_a_client_supplied_id_wins(
    h: Harness,
    body: dict[str, Any],
    headers: list[tuple[bytes, bytes]],
    session: str,
    source: str,
) -> None:
    path = "/v1/responses" if "conversation" in body or "previous_response_id" in body else None
    request = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], **body}
    if path:
        request = {"model": "gpt-4o", "input": "Hi", **body}
    records = [
        h.exchange(path or "/v1/chat/completions", request, openai_json("Hello"), headers=headers)
        for _ in range(3)
    ]
    assert ids(records) == [(scoped(session), 1), (scoped(session), 2), (scoped(session), 3)]
    (start,) = h.events("session_start")
    assert (start["session_id"], start["id_source"], start["seq"]) == (scoped(session), source, 1)
    assert start["client_session_id"] == session


def test_an_id_longer_than_255_characters_is_ignored(h: Harness) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "user": "u" * 256}
    record = h.exchange("/v1/chat/completions", body, openai_json("Hello"))
    assert record.session_id == "sess-0001"


def test_claude_code_session_ids_keep_one_session_across_edits(h: Harness) -> None:
    """With the client's id the client decides: an edit stays in its session."""
    claude = ClaudeClient(h, metadata={"user_id": CLAUDE_CODE_USER})
    records = [
        claude.turn("Fix the bug in main.py", [{"type": "text", "text": "Done."}]),
        claude.turn("Now add a test", [{"type": "text", "text": "Added."}]),
    ]
    claude.messages = claude.messages[:2]
    records.append(claude.turn("Actually, add docs", [{"type": "text", "text": "Docs added."}]))
    session = scoped("2b9e4c1a-7f3d-4e8b-9a6c-5d1f0e2b3a47")
    assert ids(records) == [(session, 1), (session, 2), (session, 3)]
    assert h.events("fork") == []


def test_previous_response_id_follows_the_chain_and_forks_from_an_older_response(
    h: Harness,
) -> None:
    path = "/openai/v1/responses"
    first = h.exchange(
        path,
        {"model": "gpt-4.1", "input": "Tell me a joke"},
        responses_json("resp_a1", [output_message("Joke 1")]),
    )
    second = h.exchange(
        path,
        {"model": "gpt-4.1", "input": "Another", "previous_response_id": "resp_a1"},
        responses_json("resp_a2", [output_message("Joke 2")]),
    )
    third = h.exchange(
        path,
        {"model": "gpt-4.1", "input": "One more", "previous_response_id": "resp_a2"},
        responses_json("resp_a3", [output_message("Joke 3")]),
    )
    assert ids([first, second, third]) == [("sess-0001", 1), ("sess-0001", 2), ("sess-0001", 3)]
    branch = h.exchange(
        path,
        {"model": "gpt-4.1", "input": "A different one", "previous_response_id": "resp_a1"},
        responses_json("resp_b2", [output_message("Joke 2b")]),
    )
    (fork,) = h.events("fork")
    assert (fork["parent_session"], fork["from_seq"], fork["id_source"]) == (
        "sess-0001",
        1,
        "previous_response_id",
    )
    assert (branch.session_id, branch.seq) == (fork["session_id"], 2)
    on_branch = h.exchange(
        path,
        {"model": "gpt-4.1", "input": "More", "previous_response_id": "resp_b2"},
        responses_json("resp_b3", [output_message("Joke 3b")]),
    )
    assert (on_branch.session_id, on_branch.seq) == (branch.session_id, 3)


# ---------------------------------------------------------------- the events it publishes


def test_session_start_and_fork_are_canonical_events_at_the_request_start(h: Harness) -> None:
    client, records = five_turns(h)
    again = ChatClient(h, messages=client.messages[:3])
    fork_record = again.say("Something else", "Other.")
    (start,) = h.events("session_start")
    (fork,) = h.events("fork")
    for event, record in ((start, records[0]), (fork, fork_record)):
        assert event.keys() >= CANONICAL_FIELDS
        assert event["schema"] == 1
        assert event["ts_ns"] == epoch_ns(record.started_at)
        assert event["ts"] == rfc3339_ns(event["ts_ns"])
        assert (event["route"], event["provider"]) == ("openai", "openai")
        assert (event["upstream_host"], event["environment"]) == ("api.openai.com", "prod")
        assert event["machine"] == "proxy@host1"
        assert KEY not in json.dumps(event)
    assert start["id_source"] == "fingerprint"
    assert [e.kind for e in h.published] == ["session_start", "fork"]
    assert all(e.size_hint == len(e.json()) for e in h.published)


def test_the_request_event_carries_the_assigned_session(h: Harness) -> None:
    client = ChatClient(h)
    client.say("Hi", "Hello!")
    record = client.say("How are you?", "Fine.")
    payload = RecordEnvelope("request", record, CaptureSettings()).payload()
    assert (payload["session_id"], payload["seq"]) == ("sess-0001", 2)


@pytest_twisted.ensureDeferred
async def test_session_entries_reach_loki_labelled_by_log_type(h: Harness) -> None:
    client, records = five_turns(h)
    ChatClient(h, messages=client.messages[:3]).say("Branch", "Branched.")
    capture = CaptureSettings()
    events = [*h.events()]
    for record in records[:2]:
        events.append(RecordEnvelope("request", record, capture).payload())
        events.append(RecordEnvelope("response", record, capture).payload())
    loki_clock = Clock()
    loki_clock.advance(NOW + 100)
    fake = FakeLoki(clock=loki_clock)
    sink = LokiSink.from_settings(
        ExporterSettings(name="loki", type="loki", url="http://loki:3100"),
        client=StubTreq(fake),
        clock=loki_clock,
    )
    verdict = await sink.deliver(events)
    assert verdict == Delivered()
    by_type = {
        t: fake.entries({"log_type": t}) for t in ("session_start", "fork", "request", "response")
    }
    assert [len(by_type[t]) for t in by_type] == [1, 1, 2, 2]
    assert by_type["fork"][0].json()["parent_session"] == records[0].session_id
    assert by_type["session_start"][0].json()["session_id"] == records[0].session_id
    labels = fake.streams()
    assert all("session_id" not in s and "request_id" not in s for s in labels)


@pytest.mark.allow_logged_errors
def test_assign_never_raises_into_the_request_path(
    monkeypatch: pytest.MonkeyPatch, h: Harness
) -> None:
    def broken(messages: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(Fingerprints, "of", broken)
    record = h.exchange(
        "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, openai_json("y")
    )
    assert record.session_id is None
    assert h.tracker.stats()["errors"] == 1


# ---------------------------------------------------------------- the journal and restarts


def test_a_conversation_continues_after_a_restart(tmp_path: Path) -> None:
    store = tmp_path / "state" / "session-state.jsonl"
    first = harness(store)
    client = ChatClient(first)
    before = [client.say("Hi, I'm planning a garden.", "Nice! What will you grow?")]
    before.append(client.say("Tomatoes and basil.", "A classic pair."))
    first.tracker.stop(0)

    second = harness(store)
    client.h = second
    after = client.say("When should I plant them?", "After the last frost.")
    assert (after.session_id, after.seq) == (before[0].session_id, 3)
    assert second.published == []  # no new session_start: the session is known
    # Fork detection works across the restart as well.
    branch = ChatClient(second, messages=client.messages[:3]).say("Roses instead?", "Sure.")
    (fork,) = second.events("fork")
    assert (fork["parent_session"], fork["from_seq"]) == (before[0].session_id, 1)
    assert branch.seq == 2
    second.tracker.stop(0)


def test_a_client_id_session_counts_on_after_a_restart(tmp_path: Path) -> None:
    store = tmp_path / "session-state.jsonl"
    body = {"messages": [{"role": "user", "content": "Hi"}], "metadata": {"session_id": "s-1"}}
    first = harness(store)
    first.exchange("/v1/chat/completions", body, openai_json("Hello"))
    first.exchange("/v1/chat/completions", body, openai_json("Hello"))
    first.tracker.stop(0)
    second = harness(store)
    record = second.exchange("/v1/chat/completions", body, openai_json("Hello"))
    assert (record.session_id, record.seq) == (scoped("s-1"), 3)
    second.tracker.stop(0)


def test_the_journal_is_written_on_the_clock_not_on_the_request_path(tmp_path: Path) -> None:
    store = tmp_path / "session-state.jsonl"
    running = harness(store, flush_interval=1.0)
    ChatClient(running).say("Hi", "Hello!")
    assert not store.exists()
    running.clock.advance(1.0)
    lines = [orjson.loads(line) for line in store.read_bytes().splitlines()]
    assert {"k", "s", "q"} <= lines[0].keys() or {"h", "n", "l"} <= lines[0].keys()
    assert any(line.get("s") == "sess-0001" and line.get("q") == 1 for line in lines)
    assert any(line.get("h") == "sess-0001" for line in lines)
    running.tracker.stop(0)


def test_the_journal_is_compacted_and_reloads_the_same_states(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions_module, "COMPACT_SLACK", 0)
    store = tmp_path / "session-state.jsonl"
    running = harness(store, max_states=5)
    clients = [ChatClient(running) for _ in range(12)]
    for n, client in enumerate(clients):
        for turn in range(3):
            client.say(f"client {n} turn {turn}", f"answer {n}.{turn}")
            running.clock.advance(1.0)
    stats = running.tracker.stats()
    assert stats["states"] == 5 and stats["sessions"] == 5
    running.tracker.stop(0)
    lines = store.read_bytes().splitlines()
    assert len(lines) <= 2 * (stats["states"] + stats["sessions"]) + 12
    reloaded = harness(store, max_states=5)
    assert reloaded.tracker.stats()["states"] == 5
    assert reloaded.tracker._states == running.tracker._states
    # The most recent conversation goes on after the reload.
    clients[-1].h = reloaded
    record = clients[-1].say("one more", "ok")
    assert (record.session_id, record.seq) == ("sess-0012", 4)
    reloaded.tracker.stop(0)


class ManualThreads:
    """A ``run_in_thread`` whose jobs run when the test says so."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], int], Deferred[int]]] = []

    def __call__(self, job: Callable[[], int]) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.jobs.append((job, d))
        return d

    def run_all(self) -> None:
        jobs, self.jobs = self.jobs, []
        for job, d in jobs:
            try:
                result = job()
            except Exception:
                d.errback()
            else:
                d.callback(result)


def test_compaction_runs_in_the_thread_and_changes_meanwhile_wait_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions_module, "COMPACT_SLACK", 0)
    store = tmp_path / "session-state.jsonl"
    threads = ManualThreads()
    running = harness(store, max_states=3, run_in_thread=threads)
    client = ChatClient(running)
    for n in range(20):
        client.say(f"question {n}", f"answer {n}")
        running.clock.advance(1.0)
        if threads.jobs:
            break
    # A compaction is due: it waits in the "thread", and the file is left alone.
    assert len(threads.jobs) == 1
    before = store.read_bytes()
    client.say("while compacting", "changes wait")
    ChatClient(running).say("another conversation", "meanwhile")
    running.clock.advance(1.0)
    assert store.read_bytes() == before and len(threads.jobs) == 1
    threads.run_all()
    running.clock.advance(1.0)  # the held changes go into the new file
    reloaded = harness(store, max_states=3)
    assert reloaded.tracker._states == running.tracker._states
    assert reloaded.tracker._sessions == running.tracker._sessions
    running.tracker.stop(0)
    reloaded.tracker.stop(0)


def test_close_waits_for_a_running_compaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions_module, "COMPACT_SLACK", 0)
    store = tmp_path / "session-state.jsonl"
    threads = ManualThreads()
    running = harness(store, max_states=2, run_in_thread=threads)
    client = ChatClient(running)
    for n in range(20):
        client.say(f"q{n}", f"a{n}")
        running.clock.advance(1.0)
        if threads.jobs:
            break
    assert threads.jobs
    last = ChatClient(running).say("last", "one")
    closed = running.tracker.stop(0)
    assert not closed.called
    threads.run_all()
    assert closed.called
    reloaded = harness(store, max_states=2)
    assert reloaded.tracker._sessions.get(str(last.session_id)) is not None
    reloaded.tracker.stop(0)


def test_a_failed_compaction_is_retried_and_never_breaks_proxying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions_module, "COMPACT_SLACK", 0)
    store = tmp_path / "session-state.jsonl"
    threads = ManualThreads()
    running = harness(store, max_states=2, run_in_thread=threads)
    real = sessions_module._write_journal
    failures = [OSError(28, "No space left on device")]
    writes: list[int] = []

    def flaky(*args: Any) -> int:
        if failures:
            raise failures.pop()
        writes.append(real(*args))
        return writes[-1]

    monkeypatch.setattr(sessions_module, "_write_journal", flaky)
    client = ChatClient(running)
    for n in range(5):
        client.say(f"q{n}", f"a{n}")
        running.clock.advance(1.0)
        threads.run_all()
    assert client.say("again", "ok").seq == 6
    assert failures == [] and writes  # it failed once, then compacted
    running.tracker.stop(0)
    reloaded = harness(store, max_states=2)
    assert reloaded.tracker._states == running.tracker._states
    reloaded.tracker.stop(0)


def test_a_torn_journal_line_is_skipped(tmp_path: Path) -> None:
    store = tmp_path / "session-state.jsonl"
    first = harness(store)
    client = ChatClient(first)
    client.say("Hi", "Hello!")
    first.tracker.stop(0)
    with store.open("ab") as f:
        f.write(b'{"k": "ab12", "s": "x", "q"')  # a crash mid-write
    second = harness(store)
    client.h = second
    assert client.say("Again", "Hi again").seq == 2
    second.tracker.stop(0)


def test_an_unwritable_state_file_never_breaks_proxying(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    running = harness(blocker / "session-state.jsonl")
    client = ChatClient(running)
    first = client.say("Hi", "Hello!")
    running.clock.advance(1.0)
    second = client.say("Still there?", "Yes.")
    running.clock.advance(1.0)
    running.tracker.stop(0)
    assert ids([first, second]) == [("sess-0001", 1), ("sess-0001", 2)]


def journal_sessions(store: Path) -> set[str]:
    entries = [orjson.loads(line) for line in store.read_bytes().splitlines()]
    return {str(e.get("s") or e.get("h")) for e in entries}


def test_a_removed_state_directory_is_made_again_and_the_journal_rewritten(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    store = state / "sessions" / "session-state.jsonl"
    running = harness(store)
    first = ChatClient(running)
    first.say("Hi", "Hello!")
    running.clock.advance(1.0)
    assert journal_sessions(store) == {"sess-0001"}
    shutil.rmtree(state)  # while the journal is open
    ChatClient(running).say("Another", "Conversation.")
    running.clock.advance(1.0)
    # Written whole from memory, not only what changed since the removal.
    assert journal_sessions(store) == {"sess-0001", "sess-0002"}
    running.tracker.stop(0)
    reloaded = harness(store)
    first.h = reloaded
    record = first.say("Go on", "Going on.")
    assert (record.session_id, record.seq) == ("sess-0001", 2)
    assert reloaded.published == []  # known after the restart: no session_start
    reloaded.tracker.stop(0)


@pytest.mark.parametrize("how", ["moved", "unlinked"])
def test_a_journal_moved_or_deleted_under_the_tracker_is_written_again(
    tmp_path: Path, how: str
) -> None:
    store = tmp_path / "session-state.jsonl"
    running = harness(store)
    ChatClient(running).say("Hi", "Hello!")
    running.clock.advance(1.0)
    if how == "moved":
        store.rename(tmp_path / "aside.jsonl")
    else:
        store.unlink()
    ChatClient(running).say("Another", "Conversation.")
    running.clock.advance(1.0)
    assert journal_sessions(store) == {"sess-0001", "sess-0002"}
    running.tracker.stop(0)


def test_a_journal_deleted_before_the_first_append_is_written_again(tmp_path: Path) -> None:
    store = tmp_path / "session-state.jsonl"
    running = harness(store)
    client = ChatClient(running)
    client.say("Hi", "Hello!")
    running.clock.advance(1.0)
    running.tracker.stop(0)
    again = harness(store)  # loaded: no descriptor open until the next append
    store.unlink()
    client.h = again
    client.say("More", "Sure.")
    again.clock.advance(1.0)
    live = again.tracker.stats()
    assert len(store.read_bytes().splitlines()) == live["states"] + live["sessions"]
    again.tracker.stop(0)
    third = harness(store)
    client.h = third
    record = client.say("And more", "Yes.")
    assert (record.session_id, record.seq) == ("sess-0001", 3)
    third.tracker.stop(0)


def test_no_state_file_means_memory_only(tmp_path: Path) -> None:
    running = harness(None)
    ChatClient(running).say("Hi", "Hello!")
    running.clock.advance(5)
    running.tracker.stop(0)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bounds


def test_states_are_bounded_lru(h: Harness) -> None:
    small = harness(None, max_states=2)
    a, b, c = ChatClient(small), ChatClient(small), ChatClient(small)
    a.say("a1", "A1")
    b.say("b1", "B1")
    c.say("c1", "C1")  # a's state is the least recently used: forgotten
    assert small.tracker.stats()["states"] == 2
    assert b.say("b2", "B2").session_id == "sess-0002"
    forgotten = a.say("a2", "A2")
    assert (forgotten.session_id, forgotten.seq) == ("sess-0004", 1)
    small.tracker.stop(0)


def test_close_is_idempotent_and_stops_the_flush_loop(tmp_path: Path) -> None:
    running = harness(tmp_path / "s.jsonl")
    assert running.clock.getDelayedCalls()
    running.tracker.stop(0)
    running.tracker.stop(0)
    assert running.clock.getDelayedCalls() == []


# ---------------------------------------------------------------- the fingerprint itself


def test_reduced_messages_ignore_form_but_keep_content() -> None:
    blocks = {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "Hello", "cache_control": {"type": "ephemeral"}},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"b": 1, "a": [1, 2]}},
        ],
    }
    openai_form = {
        "role": "assistant",
        "content": "Hello",
        "refusal": None,
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "f", "arguments": '{"a":[1,2], "b":1}'},
            }
        ],
    }
    assert reduce_message(blocks) == reduce_message(openai_form)
    user = {
        "role": "user",
        "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}],
    }
    assert reduce_message(user) == reduce_message({"role": "user", "content": "x"})
    assert reduce_message({"role": "user", "content": "x"}) != reduce_message(
        {"role": "user", "content": "y"}
    )
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"},
    }
    with_image = {"role": "user", "content": [image, {"type": "text", "text": "x"}]}
    assert reduce_message(with_image) != reduce_message({"role": "user", "content": "x"})


_text = st.text(max_size=20)
_messages = st.lists(
    st.one_of(
        st.builds(lambda t: {"role": "user", "content": t}, _text),
        st.builds(lambda t: {"role": "assistant", "content": t}, _text),
        st.builds(lambda t: {"role": "tool", "tool_call_id": "c1", "content": t}, _text),
    ),
    max_size=8,
)


@given(messages=_messages, reply=_text)
def test_incremental_digests_equal_the_digest_of_each_prefix(
    messages: list[dict[str, Any]], reply: str
) -> None:
    reduced = [reduce_message(m) for m in messages]
    prints = Fingerprints.of(reduced)
    expected = [
        fingerprint(reduced[: i + 1])
        for i, m in enumerate(reduced[:-1])
        if m["role"] == "assistant"
    ]
    assert prints.history == expected
    answer = reduce_message({"role": "assistant", "content": reply})
    assert prints.state(answer) == fingerprint([*reduced, answer])
    # What the next request's history looks up is exactly this state.
    follow_up = Fingerprints.of([*reduced, answer, {"role": "user", "text": "next"}])
    assert follow_up.history[-1] == prints.state(answer)


def test_new_session_ids_are_random_version_4_uuids() -> None:
    import uuid

    from llmproxy.capture.sessions import _new_session_id

    ids = [_new_session_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)
    # Every variant digit shows up: the bits are random, only the top two are fixed.
    assert {text[19] for text in ids} == set("89ab")


def test_a_forked_child_does_not_reuse_its_parents_random_session_ids() -> None:
    import os

    from llmproxy.capture.sessions import _new_session_id

    _new_session_id()  # the parent holds random digits for the next ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        try:
            os.write(write, _new_session_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    child_id = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child_id) == 36 and child_id != _new_session_id()


def test_the_tracker_adds_no_objects_for_the_garbage_collector_to_scan() -> None:
    import gc

    from twisted.internet.task import Clock

    from llmproxy.capture.sessions import SessionTracker

    tracker = SessionTracker(lambda envelope: None, None, 10_000, Clock())
    for i in range(2000):
        tracker._set_head(f"s{i}", (i + 1, i))
    gc.collect()  # the collector untracks exact tuples of untracked values
    heads = list(tracker._sessions.values())
    assert len(heads) == 2000
    assert not any(gc.is_tracked(h) for h in heads)


# ---------------------------------------------------------------- with a shared state


@attrs.define
class Held:
    """A shared state whose answers the test gives (or withholds)."""

    maps: SessionTracker
    usable: bool = True
    asked: list[tuple[list[Any], Deferred[None]]] = attrs.Factory(list)

    def apply(self, ops: Any) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.asked.append((list(ops), d))
        return d

    def answer(self, index: int = 0) -> None:
        ops, d = self.asked.pop(index)
        self.maps.apply_locally(ops)
        d.callback(None)

    def fail(self, index: int = 0) -> None:
        from llmproxy.redis.connection import RedisUnavailable

        _, d = self.asked.pop(index)
        d.errback(RedisUnavailable("connection lost"))


def held(**kw: Any) -> tuple[Harness, Held, StateHealth]:
    clock = Clock()
    clock.advance(NOW)
    published: list[Envelope] = []
    counter = iter(range(1, 1_000_000))
    shared = Held(SessionTracker(lambda _: None, None, 1000, Clock()))
    health = StateHealth(clock)
    tracker = SessionTracker(
        published.append,
        None,
        1000,
        clock,
        new_id=lambda: f"sess-{next(counter):04d}",
        shared=shared,
        health=health,
        **kw,
    )
    tracker.start()
    return Harness(tracker, clock, published), shared, health


def chat_record(n: int, messages: list[dict[str, Any]]) -> tuple[ExchangeRecord, bytes]:
    raw = orjson.dumps({"model": "gpt-4o", "messages": messages})
    record = ExchangeRecord(
        request_id=f"req-{n}",
        started_at=NOW + n,
        method="POST",
        path="/v1/chat/completions",
        query="",
        route="openai",
        provider="openai",
        upstream_url="https://api.openai.com/v1/chat/completions",
        upstream_host="api.openai.com",
        client_addr="",
        request_headers=[],
        request_body=raw,
        request_body_size=len(raw),
    )
    return record, raw


def answered(record: ExchangeRecord, text: str) -> None:
    reply = openai_json(text)
    record.status = 200
    record.outcome = "ok"
    record.response_headers = [(b"Content-Type", reply.content_type)]
    record.response_chunks = [(0.1, c) for c in reply.chunks]
    record.response_body_size = sum(len(c) for c in reply.chunks)


HISTORY = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "more"},
]


def test_a_first_turn_is_decided_here_and_redis_hears_of_it_with_its_state() -> None:
    h, shared, _ = held()
    first, raw = chat_record(1, [{"role": "user", "content": "hi"}])
    assert h.tracker.assign(first, raw) is None  # no history, no client id: a new session
    assert (first.session_id, first.seq) == ("sess-0001", 1)
    answered(first, "hello")
    h.tracker.finished(first)
    h.clock.advance(0)
    ((ops, _),) = shared.asked
    (record_op,) = ops
    assert record_op.fresh and record_op.target() == ("sess-0001", 1)
    shared.answer()
    # The next turn, decided in the shared state, continues it there.
    second, raw = chat_record(2, HISTORY)
    h.tracker.assign(second, raw)
    h.clock.advance(0)
    shared.answer()
    assert (second.session_id, second.seq) == ("sess-0001", 2)


def test_a_turn_and_its_reply_go_in_one_batch() -> None:
    h, shared, _ = held()
    first, raw = chat_record(1, HISTORY)  # a history nobody recorded: decided in Redis
    waiting = h.tracker.assign(first, raw)
    assert isinstance(waiting, Deferred) and not waiting.called
    assert first.session_id is None  # decided elsewhere: not yet
    answered(first, "sure")
    h.tracker.finished(first)  # its record names the assignment in the same batch
    h.clock.advance(0)
    ((ops, _),) = shared.asked
    assert [type(op).__name__ for op in ops] == ["AssignOp", "RecordOp"]
    shared.answer()
    assert waiting.called and first.session_id is not None and first.seq == 1
    assert [e.payload()["type"] for e in h.published] == ["session_start"]
    second, raw = chat_record(
        2, [*HISTORY, {"role": "assistant", "content": "sure"}, {"role": "user", "content": "ok"}]
    )
    h.tracker.assign(second, raw)
    h.clock.advance(0)
    shared.answer()
    assert (second.session_id, second.seq) == (first.session_id, 2)


def test_one_batch_at_a_time_so_a_record_can_name_an_earlier_batchs_decision() -> None:
    h, shared, _ = held()
    first, raw = chat_record(1, HISTORY)
    h.tracker.assign(first, raw)
    h.clock.advance(0)
    answered(first, "sure")
    h.tracker.finished(first)
    h.clock.advance(0)
    assert len(shared.asked) == 1  # the record waits for the batch under way
    shared.answer()
    ((ops, _),) = shared.asked
    (record_op,) = ops
    assert record_op.target() == (first.session_id, 1) and not record_op.fresh
    shared.answer()
    assert h.tracker.stats()["states_recorded"] == 1


def test_unanswered_batches_are_decided_here_in_order() -> None:
    h, shared, health = held()
    first, raw = chat_record(1, HISTORY)
    waiting = h.tracker.assign(first, raw)
    h.clock.advance(0)
    shared.fail()
    assert waiting is not None and waiting.called
    assert first.session_id is not None and first.seq == 1
    assert h.tracker.stats()["local_fallbacks"] == 1
    assert health.stats()["sessions"]["connected"] == 0
    assert health.decisions == {("sessions", "local"): 1}
    # Not connected: decided at once, nothing sent.
    shared.usable = False
    answered(first, "sure")
    h.tracker.finished(first)
    second, raw = chat_record(
        2, [*HISTORY, {"role": "assistant", "content": "sure"}, {"role": "user", "content": "ok"}]
    )
    h.tracker.assign(second, raw)
    h.clock.advance(0)
    assert shared.asked == []
    assert (second.session_id, second.seq) == (first.session_id, 2)
    # Back: the next batch goes to the shared state again, and the part is up.
    shared.usable = True
    third, raw = chat_record(3, [*HISTORY[:2], {"role": "user", "content": "other"}])
    h.tracker.assign(third, raw)
    h.clock.advance(0)
    shared.answer()
    assert third.session_id not in (None, first.session_id)
    assert health.stats()["sessions"]["connected"] == 1


def test_stop_sends_what_waits_and_waits_for_the_answer() -> None:
    h, shared, _ = held()
    first, raw = chat_record(1, HISTORY)
    h.tracker.assign(first, raw)
    h.clock.advance(0)
    second, raw = chat_record(2, [*HISTORY[:2], {"role": "user", "content": "other"}])
    h.tracker.assign(second, raw)  # queued behind the batch under way
    closed = h.tracker.stop(5)
    assert not closed.called
    shared.answer()
    assert not closed.called and len(shared.asked) == 1  # the queued one went out
    shared.answer()
    assert closed.called
    assert second.session_id is not None and first.session_id is not None


# ------------------------------------------- a history another process records late


TURN_3 = [*HISTORY, {"role": "assistant", "content": "sure"}, {"role": "user", "content": "ok"}]


def waiting_pair() -> tuple[Harness, Held, Harness, Held]:
    """Two processes (trackers) on one shared state, this one waiting up to 1 s
    for a history the other has not recorded yet."""
    here, here_shared, _ = held(continuation_wait=1.0)
    there, there_shared, _ = held()
    there_shared.maps = here_shared.maps
    return here, here_shared, there, there_shared


def test_the_reply_of_a_waiting_turn_and_the_turn_after_it_wait_behind_it() -> None:
    h, shared, other, other_shared = waiting_pair()
    second, raw = chat_record(2, HISTORY)
    decided = h.tracker.assign(second, raw)
    h.clock.advance(0)
    shared.answer()  # missed: nobody recorded turn 1 yet
    assert decided is not None and not decided.called
    answered(second, "sure")
    h.tracker.finished(second)  # its record needs its session: parked
    third, raw = chat_record(3, TURN_3)
    later = h.tracker.assign(third, raw)  # continues from turn 2's reply: parked behind it
    h.clock.advance(0)
    assert shared.asked == []
    # Turn 1, served by the other process, is recorded there now.
    first, raw = chat_record(1, HISTORY[:1])
    other.tracker.assign(first, raw)
    answered(first, "hello")
    other.tracker.finished(first)
    other.clock.advance(0)
    other_shared.answer()
    h.clock.advance(0.05)  # asked again: found
    ((ops, _),) = shared.asked
    assert [type(op).__name__ for op in ops] == ["AssignOp"]  # its record still parked
    shared.answer()
    assert decided.called and (second.session_id, second.seq) == (first.session_id, 2)
    # Then its record, and the turn after it, in one batch, in that order.
    h.clock.advance(0)
    ((ops, _),) = shared.asked
    assert [type(op).__name__ for op in ops] == ["RecordOp", "AssignOp"]
    shared.answer()
    assert later is not None and later.called
    assert (third.session_id, third.seq) == (first.session_id, 3)
    assert h.events("session_start") == [] and h.events("fork") == []
    stats = h.tracker.stats()
    assert stats["continuations_waited"] == 1 and stats["continuations_not_found"] == 0


def test_a_waiting_turn_is_decided_here_when_redis_goes_away_meanwhile() -> None:
    h, shared, _, _ = waiting_pair()
    second, raw = chat_record(2, HISTORY)
    decided = h.tracker.assign(second, raw)
    h.clock.advance(0)
    shared.answer()
    shared.usable = False
    h.clock.advance(0.05)  # asked again: not connected, decided here at once
    assert decided is not None and decided.called
    assert second.session_id == "sess-0001" and second.seq == 1
    assert h.tracker.stats()["local_fallbacks"] == 1


def test_a_previous_response_id_recorded_late_by_another_process_is_followed() -> None:
    h, shared, other, other_shared = waiting_pair()
    path = "/openai/v1/responses"
    first = other.exchange(
        path,
        {"model": "gpt-4.1", "input": "Tell me a joke"},
        responses_json("resp_a1", [output_message("Joke 1")]),
    )  # its record (r:resp_a1) is queued there, not sent yet
    second = h.exchange(
        path,
        {"model": "gpt-4.1", "input": "Another", "previous_response_id": "resp_a1"},
        responses_json("resp_a2", [output_message("Joke 2")]),
    )
    h.clock.advance(0)
    shared.answer()  # resp_a1 unknown yet: not taken as the session's own id
    assert second.session_id is None
    other.clock.advance(0)
    other_shared.answer()
    h.clock.advance(0.05)
    shared.answer()
    assert (second.session_id, second.seq) == (first.session_id, 2)
    shared.answer()  # then its own reply's record
    assert h.events("session_start") == []


def test_without_a_wait_a_continuation_nobody_recorded_starts_at_once() -> None:
    h, shared, _ = held()  # continuation_wait = 0
    second, raw = chat_record(2, HISTORY)
    decided = h.tracker.assign(second, raw)
    h.clock.advance(0)
    ((ops, _),) = shared.asked
    assert not ops[0].wait
    shared.answer()
    assert decided is not None and decided.called and second.seq == 1


# ---------------------------------------------------------------- tenants and bounds

OTHER_TENANT = [(b"Authorization", b"Bearer sk-proj-SomeoneElseEntirely0123456789")]


def test_the_same_client_session_id_from_two_tenants_is_two_sessions(h: Harness) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
    header = [(b"X-Session-ID", b"shared-id")]
    first = h.exchange("/v1/chat/completions", body, openai_json("A"), headers=header)
    second = h.exchange(
        "/v1/chat/completions", body, openai_json("B"), headers=[*header, *OTHER_TENANT]
    )
    again = h.exchange("/v1/chat/completions", body, openai_json("C"), headers=header)
    assert first.session_id != second.session_id
    assert ids([first, second, again]) == [
        (scoped("shared-id"), 1),
        (second.session_id, 1),
        (scoped("shared-id"), 2),
    ]
    starts = h.events("session_start")
    assert [s["client_session_id"] for s in starts] == ["shared-id", "shared-id"]


def test_the_same_conversation_from_two_tenants_does_not_continue_across_them(
    h: Harness,
) -> None:
    mine, theirs = ChatClient(h), ChatClient(h)
    mine.say("Hi", "Hello!")
    theirs.say("Hi", "Hello!", headers=OTHER_TENANT)
    follow_mine = mine.say("Next", "Sure.")
    follow_theirs = theirs.say("Next", "Sure.", headers=OTHER_TENANT)
    assert follow_mine.seq == follow_theirs.seq == 2
    assert follow_mine.session_id != follow_theirs.session_id


def test_the_tenant_is_the_response_caches_namespace() -> None:
    from twisted.web.http_headers import Headers

    from llmproxy.cache.policy import namespace_for

    cases: list[tuple[str, list[tuple[bytes, bytes]]]] = [
        ("", [(b"Authorization", b"Bearer a"), (b"X-Api-Key", b"k"), (b"Authorization", b"b")]),
        ("", [(b"Cookie", b"c=1"), (b"Content-Type", b"application/json")]),
        ("", [(b"Cookie", b"c=1"), (b"Api-Key", b"z")]),
        ("", []),
        ("team-a", [(b"Authorization", b"Bearer llmp_x")]),
    ]
    for project, pairs in cases:
        headers = Headers()
        for name, value in pairs:
            headers.addRawHeader(name, value)
        assert tenant_namespace(project, pairs) == namespace_for(project, headers).full
    assert tenant_tag(b"anon") == ""
    assert len(tenant_tag(b"p:team-a")) == 12 and tenant_tag(b"p:team-a") != tenant_tag(b"p:b")


def test_a_body_over_max_body_bytes_is_not_parsed_and_only_a_header_names_its_session() -> None:
    h = harness(max_body_bytes=1000)
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 2000}]}
    unnamed = h.exchange("/v1/chat/completions", big, openai_json("A"))
    named = h.exchange(
        "/v1/chat/completions", big, openai_json("B"), headers=[(b"X-Session-ID", b"s-big")]
    )
    assert (unnamed.session_id, unnamed.seq) == (None, None)
    assert (named.session_id, named.seq) == (scoped("s-big"), 1)
    stats = h.tracker.stats()
    assert stats["too_large"] == 2 and stats["states_recorded"] == 0
    small = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
    assert h.exchange("/v1/chat/completions", small, openai_json("C")).seq == 1


def test_a_namespaced_client_id_survives_a_restart_at_its_longest(tmp_path: Path) -> None:
    store = tmp_path / "session-state.jsonl"
    longest = "z" * 255
    body = {"messages": [{"role": "user", "content": "Hi"}], "metadata": {"session_id": longest}}
    first = harness(store)
    first.exchange("/v1/chat/completions", body, openai_json("Hello"))
    first.tracker.stop(0)
    second = harness(store)
    record = second.exchange("/v1/chat/completions", body, openai_json("Hello"))
    assert (record.session_id, record.seq) == (scoped(longest), 2)
    second.tracker.stop(0)
