"""Token usage, model, finish reasons, reply and merged object, from JSON and SSE.

The fixtures follow the shapes in OpenAI's and Anthropic's API references.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llmproxy.events.usage as usage_module
from llmproxy.events.sse import SSEEvent, parse_sse
from llmproxy.events.usage import (
    EMPTY_FACTS,
    ResponseFacts,
    Usage,
    _merge,  # the templates' on/off switch
    anthropic_usage,
    facts_from_json,
    facts_from_sse,
    facts_from_sse_bytes,
    openai_usage,
    request_model,
    summary_from_sse_text,
    usage_dict,
)


def sse(*objects: Any, named: bool = False, done: bool = False) -> bytes:
    """An SSE stream of JSON objects; ``named`` adds ``event:`` lines (Anthropic, Responses)."""
    out = []
    for obj in objects:
        head = f"event: {obj['type']}\n" if named else ""
        out.append(f"{head}data: {json.dumps(obj)}\n\n")
    if done:
        out.append("data: [DONE]\n\n")
    return "".join(out).encode()


def stream_facts(stream: bytes) -> ResponseFacts:
    return facts_from_sse(parse_sse(stream))


# ---------------------------------------------------------------- OpenAI chat

CHAT_JSON = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "The image shows a wooden boardwalk.",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 1117,
        "completion_tokens": 46,
        "total_tokens": 1163,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
    "service_tier": "default",
    "system_fingerprint": "fp_fc9f1d7035",
}


def chat_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": 1694268190,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }


CHAT_STREAM = sse(
    chat_chunk({"role": "assistant", "content": "", "refusal": None}, usage=None),
    chat_chunk({"content": "Hello"}, usage=None),
    chat_chunk({"content": " there"}, usage=None),
    chat_chunk({"content": "!"}, usage=None),
    chat_chunk({}, "stop", usage=None),
    {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": 1694268190,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 3,
            "total_tokens": 12,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    },
    done=True,
)

CHAT_TOOL_STREAM = sse(
    chat_chunk(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ],
        }
    ),
    chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"loca'}}]}),
    chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'tion": "Paris"}'}}]}),
    chat_chunk(
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_def",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
                }
            ]
        }
    ),
    chat_chunk({}, "tool_calls"),
    done=True,
)


def test_openai_chat_json_usage_with_cached_tokens() -> None:
    facts = facts_from_json(json.dumps(CHAT_JSON).encode())
    assert facts.usage == Usage(
        input_tokens=1117,
        output_tokens=46,
        total_tokens=1163,
        cache_read_tokens=1024,
        service_tier="default",  # the answer's, for the price
    )
    assert facts.model == "gpt-4o-2024-08-06"
    assert facts.finish_reasons == ("stop",)
    assert facts.assistant_message == {
        "role": "assistant",
        "content": "The image shows a wooden boardwalk.",
    }
    assert facts.merged_json == CHAT_JSON


def test_openai_chat_json_with_tool_calls() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
    }
    body = {
        "object": "chat.completion",
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                "finish_reason": "tool_calls",
            }
        ],
    }
    facts = facts_from_json(body)
    assert facts.assistant_message == {"role": "assistant", "content": None, "tool_calls": [call]}
    assert facts.finish_reasons == ("tool_calls",)
    assert facts.usage is None


def test_openai_chat_stream_usage_from_the_final_chunk() -> None:
    facts = stream_facts(CHAT_STREAM)
    assert facts.usage == Usage(
        input_tokens=9, output_tokens=3, total_tokens=12, cache_read_tokens=0
    )
    assert facts.model == "gpt-4o-mini-2024-07-18"
    assert facts.finish_reasons == ("stop",)
    assert facts.assistant_message == {"role": "assistant", "content": "Hello there!"}


def test_openai_chat_stream_merges_into_a_chat_completion() -> None:
    merged = stream_facts(CHAT_STREAM).merged_json
    assert merged == {
        "id": "chatcmpl-123",
        "object": "chat.completion",
        "created": 1694268190,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there!"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 3,
            "total_tokens": 12,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


def test_openai_chat_stream_without_include_usage_has_no_usage() -> None:
    stream = sse(chat_chunk({"role": "assistant", "content": "Hi"}), chat_chunk({}, "stop"))
    facts = stream_facts(stream)
    assert facts.usage is None
    assert facts.assistant_message == {"role": "assistant", "content": "Hi"}


def test_openai_chat_stream_tool_call_fragments_are_merged() -> None:
    facts = stream_facts(CHAT_TOOL_STREAM)
    assert facts.finish_reasons == ("tool_calls",)
    message = facts.assistant_message
    assert message is not None and message["content"] is None
    calls = message["tool_calls"]
    assert [c["id"] for c in calls] == ["call_abc", "call_def"]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"location": "Paris"}'}
    assert calls[1]["function"] == {"name": "get_time", "arguments": '{"tz": "CET"}'}
    assert json.loads(calls[0]["function"]["arguments"]) == {"location": "Paris"}


def test_openai_chat_stream_with_several_choices() -> None:
    def chunk(index: int, content: str, finish: str | None = None) -> dict[str, Any]:
        return {
            "object": "chat.completion.chunk",
            "model": "gpt-4o",
            "choices": [{"index": index, "delta": {"content": content}, "finish_reason": finish}],
        }

    facts = stream_facts(
        sse(chunk(1, "B"), chunk(0, "A"), chunk(0, "a", "stop"), chunk(1, "b", "length"))
    )
    assert facts.finish_reasons == ("stop", "length")
    assert facts.assistant_message == {"role": "assistant", "content": "Aa"}
    merged = facts.merged_json
    assert merged is not None
    assert [c["message"]["content"] for c in merged["choices"]] == ["Aa", "Bb"]


# ---------------------------------------------------------------- legacy completions


def test_legacy_completion_json() -> None:
    body = {
        "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
        "object": "text_completion",
        "created": 1589478378,
        "model": "gpt-3.5-turbo-instruct",
        "choices": [
            {"text": "\n\nThis is a test", "index": 0, "logprobs": None, "finish_reason": "length"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
    facts = facts_from_json(body)
    assert facts.usage == Usage(input_tokens=5, output_tokens=7, total_tokens=12)
    assert facts.finish_reasons == ("length",)
    assert facts.assistant_message == {"role": "assistant", "content": "\n\nThis is a test"}


def test_legacy_completion_stream() -> None:
    def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "model": "gpt-3.5-turbo-instruct",
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        }

    facts = stream_facts(sse(chunk("Hel"), chunk("lo"), chunk("", "stop"), done=True))
    assert facts.assistant_message == {"role": "assistant", "content": "Hello"}
    assert facts.merged_json is not None
    assert facts.merged_json["object"] == "text_completion"
    assert facts.merged_json["choices"][0]["text"] == "Hello"
    assert facts.finish_reasons == ("stop",)


# ---------------------------------------------------------------- Responses API

RESPONSE_JSON = {
    "id": "resp_67ccd2bed1ec8190b14f964abc054267",
    "object": "response",
    "created_at": 1741476542,
    "status": "completed",
    "error": None,
    "incomplete_details": None,
    "model": "gpt-4.1-2025-04-14",
    "output": [
        {
            "type": "message",
            "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e6",
            "status": "completed",
            "role": "assistant",
            "content": [
                {
                    "type": "output_text",
                    "text": "In a peaceful grove beneath a silver moon...",
                    "annotations": [],
                }
            ],
        }
    ],
    "usage": {
        "input_tokens": 36,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 87,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 123,
    },
}


def responses_stream(*, complete: bool = True) -> bytes:
    created = {**RESPONSE_JSON, "status": "in_progress", "output": [], "usage": None}
    item = {
        "type": "message",
        "id": "msg_1",
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    events: list[dict[str, Any]] = [
        {"type": "response.created", "sequence_number": 0, "response": created},
        {"type": "response.in_progress", "sequence_number": 1, "response": created},
        {
            "type": "response.output_item.added",
            "sequence_number": 2,
            "output_index": 0,
            "item": item,
        },
        {
            "type": "response.content_part.added",
            "sequence_number": 3,
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": []},
        },
    ]
    for n, piece in enumerate(["In a peaceful grove", " beneath a silver moon..."]):
        events.append(
            {
                "type": "response.output_text.delta",
                "sequence_number": 4 + n,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": piece,
            }
        )
    if complete:
        events += [
            {
                "type": "response.output_text.done",
                "sequence_number": 6,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "text": "In a peaceful grove beneath a silver moon...",
            },
            {
                "type": "response.output_item.done",
                "sequence_number": 7,
                "output_index": 0,
                "item": RESPONSE_JSON["output"][0],  # type: ignore[index]
            },
            {"type": "response.completed", "sequence_number": 8, "response": RESPONSE_JSON},
        ]
    return sse(*events, named=True)


def test_responses_json() -> None:
    facts = facts_from_json(RESPONSE_JSON)
    assert facts.usage == Usage(
        input_tokens=36, output_tokens=87, total_tokens=123, cache_read_tokens=0
    )
    assert facts.model == "gpt-4.1-2025-04-14"
    assert facts.finish_reasons == ("completed",)
    assert facts.assistant_message == {
        "role": "assistant",
        "content": "In a peaceful grove beneath a silver moon...",
    }


def test_responses_stream_takes_the_completed_response() -> None:
    facts = stream_facts(responses_stream())
    assert facts.usage == Usage(
        input_tokens=36, output_tokens=87, total_tokens=123, cache_read_tokens=0
    )
    assert facts.merged_json == RESPONSE_JSON
    assert facts.finish_reasons == ("completed",)


def test_responses_stream_cut_short_is_rebuilt_from_deltas() -> None:
    facts = stream_facts(responses_stream(complete=False))
    assert facts.usage is None
    assert facts.finish_reasons == ()
    assert facts.model == "gpt-4.1-2025-04-14"
    assert facts.assistant_message == {
        "role": "assistant",
        "content": "In a peaceful grove beneath a silver moon...",
    }


def test_responses_incomplete_reports_its_reason() -> None:
    body = {
        **RESPONSE_JSON,
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
    }
    assert facts_from_json(body).finish_reasons == ("max_output_tokens",)


def test_responses_function_call() -> None:
    body = {
        **RESPONSE_JSON,
        "output": [
            {
                "type": "function_call",
                "id": "fc_1",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"location":"Paris"}',
                "status": "completed",
            }
        ],
    }
    assert facts_from_json(body).assistant_message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
            }
        ],
    }


def test_responses_stream_function_call_arguments_from_deltas() -> None:
    events = [
        {
            "type": "response.created",
            "response": {
                "object": "response",
                "model": "gpt-4.1",
                "status": "in_progress",
                "output": [],
            },
        },
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {
                "type": "function_call",
                "id": "fc_1",
                "call_id": "call_1",
                "name": "f",
                "arguments": "",
                "status": "in_progress",
            },
        },
        {
            "type": "response.function_call_arguments.delta",
            "output_index": 0,
            "item_id": "fc_1",
            "delta": '{"a"',
        },
        {
            "type": "response.function_call_arguments.delta",
            "output_index": 0,
            "item_id": "fc_1",
            "delta": ": 1}",
        },
    ]
    message = stream_facts(sse(*events, named=True)).assistant_message
    assert message is not None
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}


# ---------------------------------------------------------------- Anthropic

ANTHROPIC_JSON = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [
        {"type": "text", "text": "I'll check the weather."},
        {
            "type": "tool_use",
            "id": "toolu_01A09q90qw90lq917835lq9",
            "name": "get_weather",
            "input": {"location": "San Francisco, CA"},
        },
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 472,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 2000,
        "output_tokens": 89,
    },
}

ANTHROPIC_STREAM = sse(
    {
        "type": "message_start",
        "message": {
            "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "claude-sonnet-4-5-20250929",
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 25,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 1000,
                "output_tokens": 1,
            },
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Okay,"}},
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": " let me look."},
    },
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {
            "type": "tool_use",
            "id": "toolu_01T1x",
            "name": "get_weather",
            "input": {},
        },
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": ""},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '{"location": "San Fra'},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": 'ncisco, CA"}'},
    },
    {"type": "content_block_stop", "index": 1},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 89},
    },
    {"type": "message_stop"},
    named=True,
)


def test_anthropic_json_usage_counts_cache_tokens_as_input() -> None:
    facts = facts_from_json(ANTHROPIC_JSON)
    assert facts.usage == Usage(
        input_tokens=472 + 100 + 2000,
        output_tokens=89,
        total_tokens=472 + 100 + 2000 + 89,
        cache_read_tokens=2000,
        cache_creation_tokens=100,
    )
    assert facts.finish_reasons == ("tool_use",)
    assert facts.model == "claude-sonnet-4-5-20250929"


def test_anthropic_json_reply_with_tool_use_in_openai_shape() -> None:
    assert facts_from_json(ANTHROPIC_JSON).assistant_message == {
        "role": "assistant",
        "content": "I'll check the weather.",
        "tool_calls": [
            {
                "id": "toolu_01A09q90qw90lq917835lq9",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": '{"location":"San Francisco, CA"}',
                },
            }
        ],
    }


def test_anthropic_stream_usage_from_message_start_and_delta() -> None:
    facts = stream_facts(ANTHROPIC_STREAM)
    assert facts.usage == Usage(
        input_tokens=1025,
        output_tokens=89,
        total_tokens=1114,
        cache_read_tokens=1000,
        cache_creation_tokens=0,
    )
    assert facts.finish_reasons == ("tool_use",)
    assert facts.model == "claude-sonnet-4-5-20250929"


def test_anthropic_stream_merges_into_a_message() -> None:
    merged = stream_facts(ANTHROPIC_STREAM).merged_json
    assert merged == {
        "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
        "type": "message",
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Okay, let me look."},
            {
                "type": "tool_use",
                "id": "toolu_01T1x",
                "name": "get_weather",
                "input": {"location": "San Francisco, CA"},
            },
        ],
        "model": "claude-sonnet-4-5-20250929",
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 25,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 1000,
            "output_tokens": 89,
        },
    }


def test_anthropic_stream_reply() -> None:
    message = stream_facts(ANTHROPIC_STREAM).assistant_message
    assert message == {
        "role": "assistant",
        "content": "Okay, let me look.",
        "tool_calls": [
            {
                "id": "toolu_01T1x",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": '{"location":"San Francisco, CA"}',
                },
            }
        ],
    }


def test_anthropic_stream_cut_before_message_delta_keeps_input_usage() -> None:
    cut = ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"event: message_delta")]
    facts = stream_facts(cut)
    assert facts.usage is not None and facts.usage.input_tokens == 1025
    assert facts.usage.output_tokens == 1
    assert facts.finish_reasons == ()


def test_anthropic_thinking_blocks_are_merged() -> None:
    stream = sse(
        {
            "type": "message_start",
            "message": {"model": "claude-opus-4", "usage": {"input_tokens": 3}},
        },
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "thinking", "thinking": ""},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "Hmm"},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "signature_delta", "signature": "EqQ"},
        },
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "42"}},
        named=True,
    )
    facts = stream_facts(stream)
    assert facts.merged_json is not None
    assert facts.merged_json["content"][0] == {
        "type": "thinking",
        "thinking": "Hmm",
        "signature": "EqQ",
    }
    assert facts.assistant_message == {"role": "assistant", "content": "42"}


def test_anthropic_error_event_is_kept_in_the_merged_message() -> None:
    stream = sse(
        {"type": "message_start", "message": {"model": "claude-x", "usage": {"input_tokens": 3}}},
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        named=True,
    )
    merged = stream_facts(stream).merged_json
    assert merged is not None and merged["error"]["type"] == "overloaded_error"


# ---------------------------------------------------------------- other shapes


def test_error_body_gives_no_usage() -> None:
    body = (
        b'{"error": {"message": "Rate limit", "type": "requests", "code": "rate_limit_exceeded"}}'
    )
    facts = facts_from_json(body)
    assert facts.usage is None and facts.model is None and facts.assistant_message is None


def test_embeddings_usage() -> None:
    body = {
        "object": "list",
        "data": [],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
    facts = facts_from_json(body)
    assert facts.usage == Usage(input_tokens=8, total_tokens=8)
    assert facts.model == "text-embedding-3-small"


def test_truncated_json_still_gives_the_model() -> None:
    body = json.dumps(CHAT_JSON).encode()[:150]
    assert facts_from_json(body) == ResponseFacts(model="gpt-4o-2024-08-06")


def test_usage_normalisers_reject_nonsense() -> None:
    assert openai_usage({"prompt_tokens": "many"}) is None
    assert openai_usage({"prompt_tokens": True, "completion_tokens": -3}) is None
    assert anthropic_usage([1, 2]) is None
    assert openai_usage({"prompt_tokens": 4.0}) == Usage(input_tokens=4, total_tokens=4)


def test_usage_dict_has_the_event_field_names() -> None:
    assert usage_dict(Usage(input_tokens=1, output_tokens=2, total_tokens=3)) == {
        "input_tokens": 1,
        "output_tokens": 2,
        "total_tokens": 3,
        "cache_read_tokens": None,
        "cache_creation_tokens": None,
        "service_tier": None,
    }
    assert usage_dict(None) is None


def test_request_model() -> None:
    assert request_model(b'{"model": "gpt-4o", "messages": []}') == "gpt-4o"
    assert request_model(b'{"model": "claude-x", "messages": [{"role": "us') == "claude-x"
    assert request_model(b"") is None
    assert request_model(b"[1, 2]") is None


# ---------------------------------------------------------------- never raises

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "object",
                    "model",
                    "choices",
                    "delta",
                    "message",
                    "content",
                    "usage",
                    "index",
                    "tool_calls",
                    "function",
                    "arguments",
                    "text",
                    "output",
                    "status",
                    "response",
                    "item",
                    "output_index",
                    "content_block",
                    "partial_json",
                    "stop_reason",
                    "finish_reason",
                    "input_tokens",
                    "prompt_tokens",
                    "error",
                ]
            ),
            inner,
            max_size=6,
        )
    ),
    max_leaves=30,
)
event_types = st.sampled_from(
    [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "message_delta",
        "error",
        "response.created",
        "response.completed",
        "response.output_item.added",
        "response.output_text.delta",
        "response.function_call_arguments.delta",
        "message",
    ]
)


@given(st.binary(max_size=500))
def test_arbitrary_bytes_as_json_body_never_raise(data: bytes) -> None:
    assert isinstance(facts_from_json(data), ResponseFacts)


@given(json_values)
def test_arbitrary_json_body_never_raises(value: Any) -> None:
    assert isinstance(facts_from_json(json.dumps(value)), ResponseFacts)


@given(st.lists(st.tuples(event_types, json_values), max_size=12))
def test_arbitrary_event_sequences_never_raise(items: list[tuple[str, Any]]) -> None:
    events = []
    for name, value in items:
        if isinstance(value, dict):
            value = {"type": name, **value} if name != "message" else value
        events.append(SSEEvent(name, json.dumps(value)))
    assert isinstance(facts_from_sse(events), ResponseFacts)


@given(st.binary(max_size=500))
def test_arbitrary_bytes_as_stream_never_raise(data: bytes) -> None:
    assert isinstance(stream_facts(data), ResponseFacts)


@given(
    st.sampled_from([CHAT_STREAM, CHAT_TOOL_STREAM, ANTHROPIC_STREAM, responses_stream()]),
    st.data(),
)
def test_real_streams_cut_anywhere_never_raise(stream: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(min_value=0, max_value=len(stream)))
    facts = stream_facts(stream[:cut])
    assert isinstance(facts, ResponseFacts)
    if cut == 0:
        assert facts == EMPTY_FACTS


def test_tool_call_id_repeated_in_every_chunk_is_not_doubled() -> None:
    def part(arguments: str) -> dict[str, Any]:
        call = {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"arguments": arguments},
        }
        return chat_chunk({"tool_calls": [call]})

    first = chat_chunk(
        {
            "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}
            ]
        }
    )
    facts = stream_facts(sse(first, part('{"x"'), part(": 1}"), chat_chunk({}, "tool_calls")))
    message = facts.assistant_message
    assert message is not None
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    ]


_odd = st.none() | st.booleans() | st.integers(-1, 2) | st.floats(0, 1) | st.text(max_size=3)

# Anthropic content events, usual and odd, for the model below.
_block_index = st.sampled_from([0, 0, 1, 2, -1, "1", None, True])
_anthropic_events = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.just("content_block_delta"),
            "index": _block_index,
            "delta": st.fixed_dictionaries(
                {"type": st.just("text_delta"), "text": st.text(max_size=3)}
            ),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("content_block_delta"),
            "index": _block_index,
            "delta": st.fixed_dictionaries(
                {
                    "type": st.sampled_from(
                        ["text_delta", "thinking_delta", "signature_delta", "other"]
                    ),
                    "text": _odd,
                    "thinking": _odd,
                    "signature": _odd,
                }
            )
            | _odd,
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("content_block_start"),
            "index": _block_index,
            "content_block": st.fixed_dictionaries(
                {"type": st.sampled_from(["text", "thinking"])},
                optional={"text": _odd, "thinking": _odd, "signature": _odd},
            )
            | _odd,
        }
    ),
)


def _blocks_read_plainly(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a stream's content blocks are, read the straightforward way: each text,
    thinking or signature delta appended to its block's field as it comes."""

    def index_of(value: Any, default: int) -> int:
        return value if type(value) is int and value >= 0 else default

    blocks: dict[int, dict[str, Any]] = {}
    for event in events:
        if event["type"] == "content_block_start":
            start = event["content_block"]
            blocks[index_of(event["index"], len(blocks))] = (
                dict(start) if isinstance(start, dict) else {}
            )
            continue
        block = blocks.setdefault(index_of(event["index"], 0), {})
        delta = event["delta"] if isinstance(event["delta"], dict) else {}
        if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
            block.setdefault("type", "text")
            text = block.get("text")
            block["text"] = (text if isinstance(text, str) else "") + delta["text"]
        for kind, field in (("thinking_delta", "thinking"), ("signature_delta", "signature")):
            if delta.get("type") == kind and isinstance(delta.get(field), str):
                before = block.get(field)
                block[field] = (before if isinstance(before, str) else "") + delta[field]
    return [blocks[index] for index in sorted(blocks)]


@settings(max_examples=300)
@given(st.lists(_anthropic_events, max_size=12))
def test_anthropic_text_deltas_build_the_blocks_a_plain_reading_does(
    events: list[dict[str, Any]],
) -> None:
    start = {"type": "message_start", "message": {"id": "msg_1", "role": "assistant"}}
    facts = stream_facts(sse(start, *events, named=True))
    merged = facts.merged_json
    assert merged is not None
    assert merged["content"] == _blocks_read_plainly(events)


# -- content templates: chunks read by slicing their text, not parsing it --------

# Content that is plain (sliced from the text) and content that is not (quotes,
# escapes, control characters, non-ASCII), in any mix.
_contents = st.one_of(
    st.sampled_from(["Hello", " world", "", "é€😀", 'a"b', "back\\slash", "line\nbreak", "\t"]),
    st.text(max_size=6),
)
_pads = st.one_of(
    st.none(), st.text(alphabet="abcXYZ019", min_size=1, max_size=12), st.text(max_size=4)
)


@st.composite
def _chat_chunk(draw: st.DrawFn) -> tuple[str, str]:
    """An OpenAI chat chunk as some server may write it: key order, spacing,
    padding, a second choice, a role, a finish reason, a usage, duplicate keys."""
    delta: dict[str, Any] = {"content": draw(_contents)}
    if draw(st.integers(0, 9)) == 0:
        delta["role"] = "assistant"
    choice: dict[str, Any] = {
        "index": draw(st.sampled_from([0, 0, 0, 1])),
        "delta": delta,
        "logprobs": None,
        "finish_reason": draw(st.sampled_from([None, None, None, None, "stop"])),
    }
    chunk: dict[str, Any] = {
        "id": draw(st.sampled_from(["chatcmpl-1", "chatcmpl-2"])),
        "object": "chat.completion.chunk",
        "created": 1,
        "model": draw(st.sampled_from(["gpt-4o-mini", "gpt-4o", None])),
        "choices": [choice],
    }
    if draw(st.booleans()):
        chunk["usage"] = draw(st.sampled_from([None, {"prompt_tokens": 1, "completion_tokens": 2}]))
    pad = draw(_pads)
    if pad is not None:
        chunk["obfuscation"] = pad
    if draw(st.integers(0, 15)) == 0:
        chunk = dict(reversed(list(chunk.items())))
    text = json.dumps(chunk, separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))
    if draw(st.integers(0, 20)) == 0:
        text = text[:-1] + ',"choices":[]}'  # a key given twice: the last one counts
    if draw(st.integers(0, 20)) == 0:
        text = text[: draw(st.integers(0, len(text)))]  # cut short: not JSON
    name = "message" if draw(st.integers(0, 20)) else "other"
    return name, text


@settings(max_examples=400)
@given(st.lists(_chat_chunk(), max_size=30))
def test_content_templates_merge_what_parsing_every_chunk_does(
    events: list[tuple[str, str]],
) -> None:
    with_templates = _merge(events).facts()
    assert with_templates == _merge(events, templates=False).facts()
    assert _merge(events).summary() == _merge(events, templates=False).summary()


@contextlib.contextmanager
def _counting_loads() -> Iterator[list[str]]:
    """The texts the stream reader parses as JSON (``orjson.loads``), meanwhile."""
    parsed: list[str] = []
    real_loads = orjson.loads

    def loads(data: str) -> Any:
        parsed.append(data)
        return real_loads(data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(usage_module.orjson, "loads", loads)
        yield parsed


def test_a_recorded_openai_stream_is_read_through_its_template() -> None:
    """The usual stream: after the role chunk, every content delta has the text of
    the first one but for its content and OpenAI's padding."""
    head = '{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":'
    events = [("message", head + '[{"index":0,"delta":{"role":"assistant","content":""}}]}')]
    words = ["Hel", "lo", ' \\"quoted\\"', " wor", "ld", "\\n"]
    for n, word in enumerate(words):
        choice = '[{"index":0,"delta":{"content":"' + word + '"},"finish_reason":null}]'
        events.append(("message", head + choice + f',"obfuscation":"{"x" * n}"}}'))
    events.append(("message", head + '[{"index":0,"delta":{},"finish_reason":"stop"}]}'))
    with _counting_loads() as parsed:
        merger = _merge(events)
    # The role chunk, the first content chunk (and its template's two checks), the
    # quoted and escaped ones and the finish chunk: not the three plain ones after.
    assert not any('"content":"lo"' in data or "wor" in data for data in parsed)
    assert merger.facts().assistant_message == {
        "role": "assistant",
        "content": 'Hello "quoted" world\n',
    }
    assert merger.facts() == _merge(events, templates=False).facts()
    assert merger.facts().finish_reasons == ("stop",)


def _as_stream(events: list[tuple[str, str]], ending: str) -> bytes:
    frames = []
    for name, data in events:
        head = "" if name == "message" else f"event: {name}{ending}"
        lines = ending.join(f"data: {line}" for line in data.split("\n"))
        frames.append(f"{head}{lines}{ending}{ending}")
    return ("".join(frames) + f"data: [DONE]{ending}{ending}").encode()


@settings(max_examples=300)
@given(st.lists(_chat_chunk(), max_size=30), st.sampled_from(["\n", "\r\n"]))
def test_a_whole_stream_read_through_templates_gives_the_parsers_facts(
    events: list[tuple[str, str]], ending: str
) -> None:
    stream = _as_stream(events, ending)
    expected = facts_from_sse(parse_sse(stream))
    assert facts_from_sse_bytes(stream) == expected
    text = stream.decode()
    if "\r" not in text:
        summary = (expected.model, expected.usage, expected.finish_reasons)
        assert summary_from_sse_text(text) == summary


# One OpenAI stream's shape: the role chunk, then content deltas that differ only
# in their content, among other events (the kinds a stream may hold between them).
_HEAD = '{"id":"c9","object":"chat.completion.chunk","created":7,"model":"m","choices":'
_ROLE = "data: " + _HEAD + '[{"index":0,"delta":{"role":"assistant","content":""}}]}'
_ODD_EVENTS = st.sampled_from(
    [
        "data: " + _HEAD + '[{"index":0,"delta":{},"finish_reason":"stop"}]}',
        "data: " + _HEAD + '[],"usage":{"prompt_tokens":3,"completion_tokens":4}}',
        "data: " + _HEAD + '[{"index":1,"delta":{"content":"other choice"},"finish_reason":null}]}',
        'event: ping\ndata: {"type":"ping"}',
        ": keep-alive",
        "",  # a second blank line
        "data: [DONE]",
        "data: " + _HEAD + '[{"index":0,"delta":{"content":"cut',
    ]
)


def _content_event(content: str) -> str:
    body = json.dumps(content)[1:-1]
    return (
        "data: " + _HEAD + '[{"index":0,"delta":{"content":"' + body + '"},"finish_reason":null}]}'
    )


@settings(max_examples=300)
@given(
    st.lists(st.one_of(_contents.map(_content_event), _ODD_EVENTS), max_size=40),
    st.booleans(),
)
def test_runs_of_template_events_among_other_events_give_the_parsers_facts(
    events: list[str], terminated: bool
) -> None:
    """The template's events are read from the text split at its suffix: every
    mix of plain contents, escaped ones and other events in between, with or
    without a blank line after the last event, gives what parsing gives."""
    plain = [_content_event(word) for word in ("Hel", "lo", " there")]
    # The template is found on the first content event; what follows it is drawn.
    text = "\n\n".join([_ROLE, plain[0], *events, *plain])
    stream = (text + ("\n\n" if terminated else "")).encode()
    expected = facts_from_sse(parse_sse(stream))
    assert facts_from_sse_bytes(stream) == expected
    summary = (expected.model, expected.usage, expected.finish_reasons)
    assert summary_from_sse_text(stream.decode()) == summary


def test_a_run_of_plain_template_events_is_read_without_parsing_them() -> None:
    words = [f"w{n} " for n in range(50)]
    text = "\n\n".join([_ROLE, *map(_content_event, words)]) + "\n\n"
    with _counting_loads() as parsed:
        facts = facts_from_sse_bytes(text.encode())
    assert facts.assistant_message == {"role": "assistant", "content": "".join(words)}
    # The role chunk, the first content chunk and its template's probe; none after.
    assert len(parsed) <= 4


@given(st.binary(max_size=300))
def test_any_bytes_read_as_a_whole_stream_give_the_parsers_facts(stream: bytes) -> None:
    assert facts_from_sse_bytes(stream) == facts_from_sse(parse_sse(stream))
