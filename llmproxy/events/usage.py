"""Token usage and response facts from LLM responses (tests: tests/unit/events/test_usage.py).

Understands, from JSON bodies and SSE streams alike:

- OpenAI chat completions (``chat.completion`` / ``chat.completion.chunk``,
  including the usage-only last chunk of ``stream_options.include_usage``),
- OpenAI legacy completions (``text_completion``),
- the OpenAI Responses API (``response`` objects; ``response.*`` stream events),
- Anthropic messages (``message``; ``message_start`` .. ``message_stop`` events),
- anything else with an OpenAI-style ``usage`` object (embeddings, compatible servers).

The shape is recognised from the content, not from the route, so OpenAI-compatible
servers behind a passthrough route work too.

Usage is normalised: ``input_tokens`` counts *all* input tokens, cached ones
included (OpenAI's ``prompt_tokens`` already does; for Anthropic it is
``input_tokens + cache_read_input_tokens + cache_creation_input_tokens``, as
the OpenTelemetry GenAI conventions ask), and ``total_tokens`` is input + output
when the provider gives no total.

Nothing here raises: what it reads is whatever an upstream sent, cut at a cap
or mid-stream.  Malformed input gives fewer facts, never an exception.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, cast

import attrs
import orjson

from llmproxy.events.sse import SSEEvent, block_fields, sse_blocks, sse_fields

__all__ = [
    "EMPTY_FACTS",
    "ResponseFacts",
    "Usage",
    "anthropic_usage",
    "facts_from_json",
    "facts_from_sse",
    "facts_from_sse_bytes",
    "facts_from_sse_fields",
    "model_from_prefix",
    "openai_usage",
    "request_model",
    "summary_from_json",
    "summary_from_sse_fields",
    "summary_from_sse_text",
    "usage_dict",
]


@attrs.frozen
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None
    # OpenAI's answer-level "service_tier" (default, flex, priority...): it sets the
    # price of the tokens (llmproxy/pricing/pricer.py).
    service_tier: str | None = None


@attrs.frozen
class ResponseFacts:
    """What an exchange's response says about itself.

    ``assistant_message`` is the reply as a chat message (``{"role": "assistant",
    "content": text}``, plus OpenAI-shaped ``tool_calls`` when the model called
    tools).  ``merged_json`` is the response as one object: the body itself for
    JSON, and for a stream the object the non-streamed call would have returned.
    """

    model: str | None = None
    usage: Usage | None = None
    finish_reasons: tuple[str, ...] = ()
    assistant_message: dict[str, Any] | None = None
    merged_json: dict[str, Any] | None = None


EMPTY_FACTS = ResponseFacts()

_F = TypeVar("_F", bound=Callable[..., ResponseFacts])


def _never_raises(func: _F) -> _F:
    def guarded(*args: Any, **kwargs: Any) -> ResponseFacts:
        try:
            return func(*args, **kwargs)
        except Exception:
            # A shape nobody foresaw: no facts, rather than a lost event.
            return EMPTY_FACTS

    guarded.__doc__ = func.__doc__
    guarded.__name__ = func.__name__
    return guarded  # type: ignore[return-value]


# ---------------------------------------------------------------- small readers


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    if type(value) is int:  # the usual case first; excludes bool, a subclass
        return value if value >= 0 else None
    if value is None:
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def _index(value: Any, default: int) -> int:
    i = _int(value)
    return default if i is None else i


def _sum(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError, ValueError, RecursionError):
        return None


def _join_json(parts: list[str]) -> Any:
    """The value a tool call's streamed argument fragments add up to, if valid."""
    text = "".join(parts)
    if not text:
        return {}
    value = _loads(text)
    return value if value is not None else text


def _dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode("utf-8")
    except (TypeError, orjson.JSONEncodeError):
        return ""


# ---------------------------------------------------------------- usage


def openai_usage(raw: Any) -> Usage | None:
    """OpenAI chat/completions usage (``prompt_tokens``...) or Responses usage
    (``input_tokens``...); both count cached tokens inside the input."""
    if not raw or not isinstance(raw, dict):
        return None
    get = raw.get
    if "prompt_tokens" in raw or "completion_tokens" in raw:
        inp = _int(get("prompt_tokens"))
        out = _int(get("completion_tokens"))
        details = get("prompt_tokens_details")
    else:
        inp = _int(get("input_tokens"))
        out = _int(get("output_tokens"))
        details = get("input_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
    total = _int(get("total_tokens"))
    if total is None:
        if inp is None and out is None:
            return None
        total = _sum(inp, out)
    return Usage(inp, out, total, cached)


def anthropic_usage(raw: Any) -> Usage | None:
    """Anthropic usage; its ``input_tokens`` excludes cache reads and writes."""
    u = _dict(raw)
    uncached = _int(u.get("input_tokens"))
    read = _int(u.get("cache_read_input_tokens"))
    created = _int(u.get("cache_creation_input_tokens"))
    out = _int(u.get("output_tokens"))
    inp = _sum(uncached, read, created)
    if inp is None and out is None:
        return None
    return Usage(
        input_tokens=inp,
        output_tokens=out,
        total_tokens=_sum(inp, out),
        cache_read_tokens=read,
        cache_creation_tokens=created,
    )


# ---------------------------------------------------------------- messages


def _tool_call(call_id: Any, name: Any, arguments: Any) -> dict[str, Any]:
    if not isinstance(arguments, str):
        arguments = _dumps(arguments)
    return {
        "id": _str(call_id) or "",
        "type": "function",
        "function": {"name": _str(name) or "", "arguments": arguments},
    }


def _message(content: Any, tool_calls: list[dict[str, Any]], refusal: Any = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if isinstance(refusal, str) and refusal:
        message["refusal"] = refusal
    return message


def _anthropic_message(content: list[Any]) -> dict[str, Any]:
    texts = []
    calls = []
    for block in content:
        b = _dict(block)
        kind = b.get("type")
        if kind == "text" and isinstance(b.get("text"), str):
            texts.append(b["text"])
        elif kind in ("tool_use", "server_tool_use"):
            calls.append(_tool_call(b.get("id"), b.get("name"), b.get("input", {})))
    return _message("".join(texts) if texts or not calls else None, calls)


def _responses_message(output: list[Any]) -> dict[str, Any] | None:
    texts = []
    refusals = []
    calls = []
    seen = False
    for item in output:
        it = _dict(item)
        kind = it.get("type")
        if kind == "message":
            seen = True
            for part in _list(it.get("content")):
                p = _dict(part)
                if p.get("type") == "output_text" and isinstance(p.get("text"), str):
                    texts.append(p["text"])
                elif p.get("type") == "refusal" and isinstance(p.get("refusal"), str):
                    refusals.append(p["refusal"])
        elif kind == "function_call":
            seen = True
            calls.append(_tool_call(it.get("call_id"), it.get("name"), it.get("arguments", "")))
    if not seen:
        return None
    return _message("".join(texts) if texts or not calls else None, calls, "".join(refusals))


def _chat_message(message: Any) -> dict[str, Any]:
    m = _dict(message)
    get = m.get
    tool_calls = get("tool_calls")
    calls = [c for c in tool_calls if isinstance(c, dict)] if isinstance(tool_calls, list) else []
    if not calls:
        legacy = get("function_call")
        if legacy and isinstance(legacy, dict):
            calls = [_tool_call("", legacy.get("name"), legacy.get("arguments", ""))]
    # _message, inlined
    result: dict[str, Any] = {"role": "assistant", "content": get("content")}
    if calls:
        result["tool_calls"] = calls
    refusal = get("refusal")
    if isinstance(refusal, str) and refusal:
        result["refusal"] = refusal
    return result


def _sorted_choices(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    raw = obj.get("choices")
    if not raw or not isinstance(raw, list):
        return []
    choices = [c for c in raw if isinstance(c, dict)]
    if len(choices) > 1:  # usually one: nothing to sort
        choices.sort(key=lambda c: _index(c.get("index"), 0))
    return choices


def _responses_finish(response: Mapping[str, Any]) -> tuple[str, ...]:
    status = _str(response.get("status"))
    if status is None or status in ("in_progress", "queued"):
        return ()
    reason = _str(_dict(response.get("incomplete_details")).get("reason"))
    return (reason,) if status == "incomplete" and reason else (status,)


# ---------------------------------------------------------------- JSON bodies

_MODEL_RE = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')


def model_from_prefix(data: bytes) -> str | None:
    """The first ``"model": "..."`` in a (maybe truncated, unparsable) JSON body."""
    match = _MODEL_RE.search(data, 0, 65536)
    return match.group(1).decode("utf-8", "replace") if match else None


def request_model(body: bytes) -> str | None:
    """The model a request JSON body asks for (also from a body cut at the cap)."""
    if not body:
        return None
    obj = _loads(body)
    if isinstance(obj, dict):
        return _str(obj.get("model"))
    return model_from_prefix(body)


# The three shapes of a JSON response body.
_ANTHROPIC = 0
_RESPONSES = 1
_CHAT = 2  # chat completions, legacy completions, anything else with ``usage``


def _shape(obj: Mapping[str, Any]) -> int:
    if obj.get("type") == "message" or ("stop_reason" in obj and "content" in obj):
        return _ANTHROPIC
    if obj.get("object") == "response" or ("output" in obj and "status" in obj):
        return _RESPONSES
    return _CHAT


def _summary(
    obj: Mapping[str, Any], shape: int, choices: list[dict[str, Any]]
) -> tuple[str | None, Usage | None, tuple[str, ...]]:
    """Model, usage and finish reasons of a parsed body (``choices``: sorted, for _CHAT)."""
    model = obj.get("model")
    if not isinstance(model, str):
        model = None
    if shape == _ANTHROPIC:
        reason = _str(obj.get("stop_reason"))
        return model, anthropic_usage(obj.get("usage")), (reason,) if reason else ()
    if shape == _RESPONSES:
        return model, _tiered(openai_usage(obj.get("usage")), obj), _responses_finish(obj)
    reasons: tuple[str, ...]
    if len(choices) == 1:  # the usual case: no list to build
        reason = choices[0].get("finish_reason")
        reasons = (reason,) if reason and isinstance(reason, str) else ()
    else:
        reasons = tuple(
            reason
            for choice in choices
            if (reason := choice.get("finish_reason")) and isinstance(reason, str)
        )
    return model, _tiered(openai_usage(obj.get("usage")), obj), reasons


def _tiered(usage: Usage | None, obj: Mapping[str, Any]) -> Usage | None:
    """``usage`` with the service tier an OpenAI answer (``obj``, or a stream's
    chunk header) names, when it names one (a short word)."""
    tier = obj.get("service_tier")
    if usage is None or type(tier) is not str or not 0 < len(tier) <= 32:
        return usage
    return attrs.evolve(usage, service_tier=tier)


def facts_from_json(body: bytes | str | Mapping[str, Any]) -> ResponseFacts:
    """Facts of a non-streamed response body (bytes, text or parsed object)."""
    try:
        if isinstance(body, bytes | str):
            obj = _loads(body)
            if type(obj) is dict:  # parsed here (orjson gives plain dicts): no copy needed
                return _facts_of(obj)
            raw = body.encode("utf-8", "replace") if isinstance(body, str) else body
            return ResponseFacts(model=model_from_prefix(raw))
        if isinstance(body, Mapping):
            return _facts_of(dict(body))
        return EMPTY_FACTS
    except Exception:
        # A shape nobody foresaw: no facts, rather than a lost event.
        return EMPTY_FACTS


def _facts_of(obj: dict[str, Any]) -> ResponseFacts:
    """``facts_from_json`` of a parsed object, which becomes ``merged_json`` as it is."""
    shape = _shape(obj)
    choices = _sorted_choices(obj) if shape == _CHAT else []
    model, usage, finish = _summary(obj, shape, choices)
    assistant: dict[str, Any] | None = None
    if shape == _ANTHROPIC:
        assistant = _anthropic_message(_list(obj.get("content")))
    elif shape == _RESPONSES:
        assistant = _responses_message(_list(obj.get("output")))
    elif choices:
        first = choices[0]
        if "message" in first:
            assistant = _chat_message(first.get("message"))
        elif isinstance(first.get("text"), str):
            assistant = _message(first["text"], [])
    return ResponseFacts(model, usage, finish, assistant, obj)


def _merged_facts(merged: dict[str, Any]) -> ResponseFacts:
    """The facts of a stream's merged response object, ``merged`` itself as
    ``merged_json`` (what ``attrs.evolve(facts_from_json(merged), merged_json=merged)``
    gives, without the copy and the evolve)."""
    try:
        return _facts_of(merged)
    except Exception:
        return ResponseFacts(merged_json=merged)


def summary_from_json(body: bytes | str) -> tuple[str | None, Usage | None, tuple[str, ...]]:
    """``(model, usage, finish_reasons)`` of ``facts_from_json(body)``, for less.

    Neither the reply message nor the merged object is built: an event carries
    only these three, and builds one for every exchange.
    """
    try:
        obj = _loads(body)
        if not isinstance(obj, dict):
            raw = body.encode("utf-8", "replace") if isinstance(body, str) else body
            return model_from_prefix(raw), None, ()
        shape = _shape(obj)
        return _summary(obj, shape, _sorted_choices(obj) if shape == _CHAT else [])
    except Exception:
        return None, None, ()  # what facts_from_json's EMPTY_FACTS says


# ---------------------------------------------------------------- streams


@attrs.define
class _ChatChoice:
    role: str = "assistant"
    content: list[str] = attrs.Factory(list)
    refusal: list[str] = attrs.Factory(list)
    text: list[str] = attrs.Factory(list)  # legacy completions
    # tool call index -> [id, type, name parts, argument parts]; id and type are
    # taken once (some servers repeat them in every chunk), name and arguments
    # are fragments to concatenate, as the OpenAI SDK does.
    tool_calls: dict[int, tuple[list[str], list[str], list[str], list[str]]] = attrs.Factory(dict)
    function_name: list[str] = attrs.Factory(list)
    function_arguments: list[str] = attrs.Factory(list)
    has_content: bool = False
    finish_reason: str | None = None
    logprobs: list[Any] = attrs.Factory(list)

    def calls(self) -> list[dict[str, Any]]:
        calls = []
        for index in sorted(self.tool_calls):
            ids, types, names, args = self.tool_calls[index]
            call = _tool_call(ids[0] if ids else "", "".join(names), "".join(args))
            if types:
                call["type"] = types[0]
            calls.append(call)
        return calls


_CHUNK_HEADER_KEYS = ("id", "created", "model", "system_fingerprint", "service_tier")


@attrs.define
class _StreamMerger:
    """Accumulates any of the three stream dialects into one response object."""

    dialect: str | None = None  # "chat" | "completion" | "responses" | "anthropic"
    # OpenAI chat / completions
    header: dict[str, Any] = attrs.Factory(dict)
    # The header keys no chunk has given yet (service_tier, say, may never come).
    header_missing: tuple[str, ...] = _CHUNK_HEADER_KEYS
    choices: dict[int, _ChatChoice] = attrs.Factory(dict)
    usage_raw: dict[str, Any] | None = None
    # Responses API
    response: dict[str, Any] | None = None
    items: dict[int, dict[str, Any]] = attrs.Factory(dict)
    item_text: dict[tuple[int, int], list[str]] = attrs.Factory(dict)
    item_args: dict[int, list[str]] = attrs.Factory(dict)
    terminal: bool = False
    # Anthropic
    message: dict[str, Any] | None = None
    blocks: dict[int, dict[str, Any]] = attrs.Factory(dict)
    block_json: dict[int, list[str]] = attrs.Factory(dict)
    # A block's text, thinking and signature deltas, joined once at the end (``+=``
    # on a dict's value copies the text so far, per token: quadratic in a long
    # stream), after what the block started with.
    block_pieces: dict[int, dict[str, list[str]]] = attrs.Factory(dict)
    anthropic_usage: dict[str, Any] = attrs.Factory(dict)
    error: Any = None

    def add(self, obj: dict[str, Any], sse_name: str) -> None:
        kind = obj.get("type")
        if not isinstance(kind, str):
            kind = sse_name
        if kind.startswith("response."):
            self._responses(kind, obj)
        elif kind in _ANTHROPIC_EVENTS:
            self._anthropic(kind, obj)
        elif "choices" in obj or "usage" in obj:
            self._openai(obj)
        elif kind == "error" or "error" in obj:
            self.error = obj.get("error", obj)

    # -- OpenAI chat / completions

    def _openai(self, chunk: dict[str, Any]) -> None:
        raw_choices = chunk.get("choices")
        if self.dialect is None and (raw_choices or chunk.get("object")):
            first = _dict(next(iter(_list(raw_choices)), None))
            legacy = chunk.get("object") == "text_completion" or (
                "text" in first and "delta" not in first
            )
            self.dialect = "completion" if legacy else "chat"
        missing = self.header_missing
        if missing:
            for key in missing:
                if chunk.get(key) is not None:
                    header = self.header
                    for name in missing:
                        if chunk.get(name) is not None:
                            header[name] = chunk[name]
                    self.header_missing = tuple(k for k in missing if k not in header)
                    break
        usage = chunk.get("usage")
        if usage:
            self.usage_raw = _dict(usage)
        if not isinstance(raw_choices, list):
            return  # no choices (a usage-only chunk), or not a list: nothing more to read
        # One chunk per token: each value is read once, into a local, and the small
        # readers (_dict, _index) are inlined for the usual types.
        choices = self.choices
        for raw in raw_choices:
            c = raw if type(raw) is dict else _dict(raw)
            index = c.get("index")
            if type(index) is not int or index < 0:
                index = _index(index, 0)
            choice = choices.get(index)
            if choice is None:  # not setdefault: building a choice costs, once is enough
                choice = choices[index] = _ChatChoice()
            finish_reason = c.get("finish_reason")
            if finish_reason:
                choice.finish_reason = _str(finish_reason)
            text = c.get("text")
            if isinstance(text, str):
                choice.text.append(text)
            logprobs = c.get("logprobs")
            if logprobs:
                lp = _dict(logprobs).get("content")
                if isinstance(lp, list):
                    choice.logprobs.extend(lp)
            delta = c.get("delta")
            if not isinstance(delta, dict) or not delta:
                continue
            role = delta.get("role")
            if isinstance(role, str):
                choice.role = role
            content = delta.get("content")
            if isinstance(content, str):
                choice.content.append(content)
                choice.has_content = True
            refusal = delta.get("refusal")
            if isinstance(refusal, str):
                choice.refusal.append(refusal)
            if "tool_calls" not in delta and "function_call" not in delta:
                continue
            for raw_call in _list(delta.get("tool_calls")):
                tc = _dict(raw_call)
                slot = choice.tool_calls.setdefault(
                    _index(tc.get("index"), len(choice.tool_calls)), ([], [], [], [])
                )
                fn = _dict(tc.get("function"))
                for part, value in zip(
                    slot,
                    (tc.get("id"), tc.get("type"), fn.get("name"), fn.get("arguments")),
                    strict=True,
                ):
                    if isinstance(value, str):
                        part.append(value)
            legacy = _dict(delta.get("function_call"))
            if isinstance(legacy.get("name"), str):
                choice.function_name.append(legacy["name"])
            if isinstance(legacy.get("arguments"), str):
                choice.function_arguments.append(legacy["arguments"])

    def _openai_facts(self) -> ResponseFacts:
        merged: dict[str, Any] = {"id": self.header.get("id")}
        completion = self.dialect == "completion"
        merged["object"] = "text_completion" if completion else "chat.completion"
        for key in ("created", "model", "system_fingerprint", "service_tier"):
            if key in self.header:
                merged[key] = self.header[key]
        choices = []
        for index in sorted(self.choices):
            ch = self.choices[index]
            if completion:
                choices.append(
                    {"index": index, "text": "".join(ch.text), "finish_reason": ch.finish_reason}
                )
                continue
            calls = ch.calls()
            message: dict[str, Any] = {
                "role": ch.role,
                "content": "".join(ch.content) if ch.has_content or not calls else None,
            }
            if ch.refusal:
                message["refusal"] = "".join(ch.refusal)
            if calls:
                message["tool_calls"] = calls
            if ch.function_name or ch.function_arguments:
                message["function_call"] = {
                    "name": "".join(ch.function_name),
                    "arguments": "".join(ch.function_arguments),
                }
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": {"content": ch.logprobs} if ch.logprobs else None,
                    "finish_reason": ch.finish_reason,
                }
            )
        merged["choices"] = choices
        if self.usage_raw is not None:
            merged["usage"] = self.usage_raw
        return _merged_facts(merged)

    # -- Responses API

    def _responses(self, kind: str, event: dict[str, Any]) -> None:
        self.dialect = self.dialect or "responses"
        if isinstance(event.get("response"), dict):
            if not self.terminal:
                self.response = event["response"]
            if kind in _RESPONSES_TERMINAL:
                self.terminal = True
            return
        index = _index(event.get("output_index"), 0)
        if kind in ("response.output_item.added", "response.output_item.done"):
            item = event.get("item")
            if isinstance(item, dict) and (kind.endswith(".done") or index not in self.items):
                self.items[index] = item
        elif kind == "response.output_text.delta" and isinstance(event.get("delta"), str):
            key = (index, _index(event.get("content_index"), 0))
            self.item_text.setdefault(key, []).append(event["delta"])
        elif kind == "response.function_call_arguments.delta" and isinstance(
            event.get("delta"), str
        ):
            self.item_args.setdefault(index, []).append(event["delta"])
        elif kind == "response.error" or kind == "error":
            self.error = event

    def _responses_output(self) -> list[dict[str, Any]]:
        """Output items rebuilt from item and delta events (a stream cut short)."""
        output = []
        for index in sorted(set(self.items) | {i for i, _ in self.item_text} | set(self.item_args)):
            item = dict(self.items.get(index) or {})
            if item.get("status") == "completed":  # an output_item.done: already whole
                output.append(item)
                continue
            if index in self.item_args:
                item.setdefault("type", "function_call")
                if not item.get("arguments"):
                    item["arguments"] = "".join(self.item_args[index])
            texts = sorted((ci, parts) for (oi, ci), parts in self.item_text.items() if oi == index)
            if texts and not _list(item.get("content")):
                item.setdefault("type", "message")
                item.setdefault("role", "assistant")
                item["content"] = [
                    {"type": "output_text", "text": "".join(parts), "annotations": []}
                    for _, parts in texts
                ]
            output.append(item)
        return output

    def _responses_facts(self) -> ResponseFacts:
        merged = dict(self.response or {})
        merged.setdefault("object", "response")
        if not _list(merged.get("output")):
            merged["output"] = self._responses_output()
        if self.error is not None and "error" not in merged:
            merged["error"] = self.error
        return _merged_facts(merged)

    # -- Anthropic

    def _anthropic(self, kind: str, event: dict[str, Any]) -> None:
        self.dialect = self.dialect or "anthropic"
        if kind == "message_start":
            self.message = dict(_dict(event.get("message")))
            self.anthropic_usage.update(_dict(self.message.get("usage")))
        elif kind == "content_block_start":
            index = _index(event.get("index"), len(self.blocks))
            self.blocks[index] = dict(_dict(event.get("content_block")))
            self.block_pieces.pop(index, None)  # the text of the block it replaces
        elif kind == "content_block_delta":
            self._anthropic_delta(event)
        elif kind == "message_delta":
            if self.message is None:
                self.message = {}
            for key, value in _dict(event.get("delta")).items():
                self.message[key] = value
            self.anthropic_usage.update(
                {k: v for k, v in _dict(event.get("usage")).items() if v is not None}
            )
        elif kind == "error":
            self.error = event.get("error", event)

    def _anthropic_delta(self, event: dict[str, Any]) -> None:
        """A ``content_block_delta``: nearly every event of an Anthropic stream."""
        if self.dialect is None:
            self.dialect = "anthropic"
        index = event.get("index")
        if type(index) is not int or index < 0:
            index = _index(index, 0)
        block = self.blocks.setdefault(index, {})  # even for a delta it cannot read
        delta = _dict(event.get("delta"))
        dtype = delta.get("type")
        field = _PIECE_FIELDS.get(dtype)
        if field is not None:
            piece = delta.get(field)
            if isinstance(piece, str):
                if field == "text":
                    block.setdefault("type", "text")
                self.block_pieces.setdefault(index, {}).setdefault(field, []).append(piece)
        elif dtype == "input_json_delta" and isinstance(delta.get("partial_json"), str):
            self.block_json.setdefault(index, []).append(delta["partial_json"])
        elif dtype == "citations_delta" and "citation" in delta:
            citations = block.get("citations")
            if not isinstance(citations, list):
                citations = block["citations"] = []
            citations.append(delta["citation"])

    def _anthropic_facts(self) -> ResponseFacts:
        merged = dict(self.message or {})
        merged.setdefault("type", "message")
        merged.setdefault("role", "assistant")
        content = []
        for index in sorted(self.blocks):
            block = dict(self.blocks[index])
            for field, pieces in self.block_pieces.get(index, {}).items():
                block[field] = (_str(block.get(field)) or "") + "".join(pieces)
            if index in self.block_json:
                block["input"] = _join_json(self.block_json[index])
            content.append(block)
        merged["content"] = content
        if self.anthropic_usage:
            merged["usage"] = dict(self.anthropic_usage)
        if self.error is not None:
            merged["error"] = self.error
        return _merged_facts(merged)

    def summary(self) -> tuple[str | None, Usage | None, tuple[str, ...]]:
        """``(model, usage, finish_reasons)`` of ``facts()``; for OpenAI chat and
        completion streams (nearly all) without building the merged response."""
        if self.dialect not in ("anthropic", "responses") and (
            self.dialect is not None or self.usage_raw is not None
        ):
            # What facts_from_json reads back from _openai_facts' merged object.
            choices = self.choices
            reasons = tuple(
                reason for index in sorted(choices) if (reason := choices[index].finish_reason)
            )
            usage = _tiered(openai_usage(self.usage_raw), self.header)
            return _str(self.header.get("model")), usage, reasons
        facts = self.facts()
        return facts.model, facts.usage, facts.finish_reasons

    def facts(self) -> ResponseFacts:
        if self.dialect == "anthropic":
            return self._anthropic_facts()
        if self.dialect == "responses":
            return self._responses_facts()
        if self.dialect in ("chat", "completion") or self.usage_raw is not None:
            return self._openai_facts()
        return EMPTY_FACTS


# Anthropic deltas that add to a string field of their block, and that field.
_PIECE_FIELDS: dict[Any, str] = {
    "text_delta": "text",
    "thinking_delta": "thinking",
    "signature_delta": "signature",
}

_ANTHROPIC_EVENTS = frozenset(
    {
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
        "ping",
    }
)
_RESPONSES_TERMINAL = frozenset(
    {"response.completed", "response.failed", "response.incomplete", "response.cancelled"}
)


def facts_from_sse(events: Iterable[SSEEvent]) -> ResponseFacts:
    """Facts of a streamed response, merged from its SSE events."""
    return facts_from_sse_fields((event.event, event.data) for event in events)


@_never_raises
def facts_from_sse_fields(events: Iterable[tuple[str, str]]) -> ResponseFacts:
    """``facts_from_sse`` of events given as ``(event name, data)`` pairs.

    For callers that split a stream themselves and need no ``SSEEvent`` objects.
    """
    return _merge(events).facts()


@_never_raises
def facts_from_sse_bytes(stream: bytes) -> ResponseFacts:
    """``facts_from_sse_fields(sse_fields(stream))`` of a whole stream, for less:
    the template (``_Merge``) is tried on each event's text in the stream."""
    if b"\r" in stream:
        return _merge(sse_fields(stream)).facts()
    return _merge_text(stream.decode("utf-8", "replace")).facts()


def summary_from_sse_text(text: str) -> tuple[str | None, Usage | None, tuple[str, ...]]:
    """``summary_from_sse_fields(sse_fields_of_text(text))``, for less (a stream
    decoded with "replace", without CR)."""
    try:
        return _merge_text(text).summary()
    except Exception:
        return None, None, ()  # what facts_from_sse_fields' EMPTY_FACTS says


def summary_from_sse_fields(
    events: Iterable[tuple[str, str]],
) -> tuple[str | None, Usage | None, tuple[str, ...]]:
    """``(model, usage, finish_reasons)`` of ``facts_from_sse_fields(events)``, for less."""
    try:
        return _merge(events).summary()
    except Exception:
        return None, None, ()  # what facts_from_sse_fields' EMPTY_FACTS says


# What ends a JSON string's body or needs decoding in it: a quote, a backslash
# escape, or a control character (which makes the JSON invalid).
_NOT_PLAIN = re.compile(r'["\\\x00-\x1f]').search
# Content chunks tried as a template before giving up on a stream (a template is
# found in the first content chunk of nearly every OpenAI stream).
_TEMPLATE_TRIES = 4
_PROBE = "llmproxy template probe"


# A top-level string OpenAI adds to each chunk (random padding, different in every
# chunk; ``stream_options.include_obfuscation``), which nothing here reads.
_PADDING_KEY = "obfuscation"


@attrs.frozen
class _ContentTemplate:
    """A chat chunk's text around its content string: a chunk ``prefix + body +
    suffix`` whose body is plain (see ``_NOT_PLAIN``) is the template chunk with
    that content, and adds ``body`` to ``choice`` and nothing else.

    With ``padding``, the suffix holds OpenAI's padding string: the chunk is
    ``prefix + body + padding + pad + suffix`` with ``pad`` plain too.
    """

    prefix: str
    suffix: str
    choice: _ChatChoice
    padding: str | None = None

    @property
    def fixed(self) -> int:
        """The length of a chunk with an empty content (and pad)."""
        return len(self.prefix) + len(self.padding or "") + len(self.suffix)

    def append(self, content: str) -> None:
        self.choice.content.append(content)


def _content_template(
    data: str, obj: dict[str, Any], merger: _StreamMerger
) -> _ContentTemplate | bool:
    """The template of ``data``, a chat chunk the merger has just read (``obj``),
    when ``data`` is a plain content delta; else False when the chunk is one but
    its text is no template (a try lost), True when it is no plain content delta.

    Such a chunk changes nothing but its choice's content, which is what makes
    the template exact: its header keys were taken (or were None) when the
    merger read it, and the chunks it matches have the same text around the
    content, hence the same values.  The slot is checked by parsing the template
    with another content: a key given twice, or a second place that text
    appears, makes it no template.
    """
    if merger.dialect != "chat" or obj.get("usage"):
        return True
    choices = obj.get("choices")
    if type(choices) is not list or len(choices) != 1:
        return True
    c = choices[0]
    if type(c) is not dict or "text" in c or c.get("finish_reason") or c.get("logprobs"):
        return True
    index = c.get("index")
    delta = c.get("delta")
    if type(index) is not int or type(delta) is not dict or len(delta) != 1:
        return True
    content = delta.get("content")
    choice = merger.choices.get(index)
    if type(content) is not str or _NOT_PLAIN(content) or choice is None:
        return True
    slot = '"content":"' + content + '"'
    if data.count(slot) != 1:
        return False
    at = data.index(slot) + len(slot) - 1 - len(content)
    prefix, suffix = data[:at], data[at + len(content) :]
    expected = orjson.loads(data)
    expected["choices"][0]["delta"]["content"] = _PROBE
    padding: str | None = None
    pad = obj.get(_PADDING_KEY)
    if type(pad) is str and not _NOT_PLAIN(pad):
        pad_slot = f'"{_PADDING_KEY}":"{pad}"'
        if suffix.count(pad_slot) != 1:
            return False
        cut = suffix.index(pad_slot) + len(pad_slot) - 1 - len(pad)
        padding, suffix = suffix[:cut], suffix[cut + len(pad) :]
        expected[_PADDING_KEY] = _PROBE[::-1]
        text = prefix + _PROBE + padding + _PROBE[::-1] + suffix
    else:
        text = prefix + _PROBE + suffix
    try:
        probe = orjson.loads(text)
    except (ValueError, RecursionError):
        return False
    if probe != expected:
        return False
    return _ContentTemplate(prefix, suffix, choice, padding)


class _Merge:
    """One stream's merge: the events that are read (parsed, or sliced through a
    template) into a :class:`_StreamMerger`.

    Nearly every event of an OpenAI chat stream is a content delta whose text is
    that of the one before but for the content: with ``templates``, such a
    chunk's content is sliced from its text (``_ContentTemplate``) instead of
    parsing it and reading the object, which is most of the cost of a stream.
    The result is the same either way (tests/unit/events/test_usage.py).
    """

    def __init__(self, templates: bool) -> None:
        self.merger = merger = _StreamMerger()
        self._add = merger.add
        self._openai = merger._openai
        self._anthropic_delta = merger._anthropic_delta
        self._tries = _TEMPLATE_TRIES if templates else 0
        self.template: _ContentTemplate | None = None

    def read(self, name: str, data: str) -> None:
        """Parse and read one event (not through the template)."""
        if data[:1] != "{":
            return  # "[DONE]", keep-alives, and arrays, which add nothing
        try:
            obj = orjson.loads(data)
        except (ValueError, RecursionError):  # orjson.JSONDecodeError is a ValueError
            return
        # Data starting with "{" that parses is an object: no type check needed.
        try:
            if name == "message" and "choices" in obj and "type" not in obj:
                self._openai(obj)  # a chat chunk (nearly every event): where add() sends it
                if self._tries and self.template is None and "\n" not in data:
                    found = _content_template(data, obj, self.merger)
                    if found is False:
                        self._tries -= 1
                    elif found is not True:
                        self.template = found
            elif name == "content_block_delta" and obj.get("type") == "content_block_delta":
                self._anthropic_delta(obj)  # an Anthropic token: where add() sends it
            else:
                self._add(obj, name)
        except Exception:
            return  # one odd event must not cost the others


def _sliced(text: str, start: int, template: _ContentTemplate) -> str | None:
    """The content ``text[start:]`` holds by ``template`` (whose prefix it has and
    whose suffix it ends with), or None when it holds no plain one."""
    end = len(text) - len(template.suffix)
    padding = template.padding
    if padding is None:
        body = text[start:end]
        return None if _NOT_PLAIN(body) else body
    # Neither the body nor the pad may hold a quote, and the padding text starts
    # with one: its last place is the only one.
    cut = text.rfind(padding, start, end)
    if cut < 0 or _NOT_PLAIN(text, cut + len(padding), end):
        return None
    body = text[start:cut]
    return None if _NOT_PLAIN(body) else body


def _merge(events: Iterable[tuple[str, str]], templates: bool = True) -> _StreamMerger:
    """The merger of a stream's ``(event name, data)`` pairs (see ``_Merge``)."""
    run = _Merge(templates)
    read = run.read
    template: _ContentTemplate | None = None
    prefix = suffix = ""
    fixed = 0
    for name, data in events:
        if (
            template is not None
            and data.startswith(prefix)
            and data.endswith(suffix)
            and len(data) >= fixed
            and name == "message"
        ):
            body = _sliced(data, len(prefix), template)
            if body is not None:
                template.append(body)
                continue
        read(name, data)
        if template is None and run.template is not None:
            template = run.template
            prefix, suffix, fixed = template.prefix, template.suffix, template.fixed
    return run.merger


def _merge_text(text: str, templates: bool = True) -> _StreamMerger:
    """``_merge(sse_fields_of_text(text))``, with the template tried on each
    event's text as it stands in the stream (``data: `` and the chunk, on one
    line): no event pair for the chunks it reads.

    The events before the template are found one blank line at a time (the
    template is nearly always the second event); the rest is read by
    :func:`_read_after`, or split at every blank line when no template turned
    up in the first ``_HEAD_BLOCKS``.
    """
    run = _Merge(templates)
    if text[:1] == "\ufeff":
        text = text[1:]
    find = text.find
    pos = 0
    for _ in range(_HEAD_BLOCKS):
        end = find("\n\n", pos)
        if end < 0:
            _read_block(run, text[pos:])
            return run.merger
        _read_block(run, text[pos:end])
        pos = end + 2
        template = run.template
        if template is not None:
            _read_after(run, template, text, pos)
            return run.merger
    for block in sse_blocks(text[pos:]):
        _read_block(run, block)
    return run.merger


# Events read one by one before giving up on a template and splitting the rest.
_HEAD_BLOCKS = 8


def _read_after(run: _Merge, template: _ContentTemplate, text: str, pos: int) -> None:
    """Read ``text[pos:]`` (at an event's start) once ``template`` is known.

    Without padding, a run of template events is ``P body S`` events one after
    the other, ``P`` being ``data: `` and the prefix and ``S`` the suffix.  The
    text is split at ``S`` and the blank line after it (one C pass: every event
    but the last ends there), and the pieces are checked all at once: they are
    ``P body`` with a plain body each when ``P`` and the bodies, joined back with
    the splitter and ``P`` between them, give the text again, and the bodies
    hold nothing ``_NOT_PLAIN``.  A stream whose pieces are not all such (an
    escape in a content, another kind of event) has its pieces checked one by
    one; one that is not ``P`` and a plain body is its events again (``piece +
    S``, split at blank lines), read through the template as they come.  What
    follows the last splitter (the finish and usage chunks, ``[DONE]``) is read
    the same way.
    """
    if template.padding is not None:
        _read_through(run, template, sse_blocks(text[pos:]))
        return
    prefix, suffix = "data: " + template.prefix, template.suffix
    splitter = suffix + "\n\n"
    pieces = text[pos:].split(splitter)
    rest = pieces.pop()
    if pieces:
        start = len(prefix)
        bodies = [piece[start:] for piece in pieces]
        # The pieces are text[pos:end], splitters between them.
        end = len(text) - len(rest) - len(splitter)
        rebuilt = (splitter + prefix).join(bodies)
        if (
            start + len(rebuilt) == end - pos
            and text.startswith(prefix, pos)
            and text.startswith(rebuilt, pos + start)
            and not _NOT_PLAIN("".join(bodies))
        ):
            template.choice.content.extend(bodies)
        else:
            add = template.choice.content.append
            for piece in pieces:
                if piece.startswith(prefix) and not _NOT_PLAIN(piece, start):
                    add(piece[start:])
                else:
                    _read_through(run, template, sse_blocks(piece + suffix))
    _read_through(run, template, sse_blocks(rest))


def _read_block(run: _Merge, block: str) -> None:
    """Read one event's text (one of ``sse_blocks``) without the template."""
    if block[:6] == "data: " and "\n" not in block:
        run.read("message", block[6:])  # the usual event: one data line
    elif block:
        for name, data in block_fields(block):
            run.read(name, data)


def _read_through(run: _Merge, template: _ContentTemplate, blocks: list[str]) -> None:
    """Read ``blocks``, the texts the template matches by slicing them.

    A matching text is one line (the body and pad are plain, the template has
    no LF): an event named "message" with the template's data.  Without
    padding, the bodies are sliced in one comprehension and checked in runs
    (one search of their join): a stream is mostly such a run.
    """
    prefix, suffix = "data: " + template.prefix, template.suffix
    fixed, start = template.fixed + 6, len(prefix)
    add = template.choice.content
    if template.padding is not None:
        for block in blocks:
            if block.startswith(prefix) and block.endswith(suffix) and len(block) >= fixed:
                body = _sliced(block, start, template)
                if body is not None:
                    add.append(body)
                    continue
            _read_block(run, block)
        return
    cut = len(suffix)
    bodies = [
        block[start : len(block) - cut]
        if block.startswith(prefix) and block.endswith(suffix) and len(block) >= fixed
        else None
        for block in blocks
    ]
    done, count = 0, len(bodies)
    while done < count:
        try:
            end = bodies.index(None, done)
        except ValueError:
            end = count
        if end > done:
            sliced = cast(list[str], bodies[done:end])  # no None before ``end``
            if _NOT_PLAIN("".join(sliced)):
                for body, block in zip(sliced, blocks[done:end], strict=True):
                    if _NOT_PLAIN(body):
                        _read_block(run, block)
                    else:
                        add.append(body)
            else:
                add.extend(sliced)
        if end < count:
            _read_block(run, blocks[end])
        done = end + 1


def usage_dict(usage: Usage | None) -> dict[str, int | str | None] | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_creation_tokens": usage.cache_creation_tokens,
        "service_tier": usage.service_tier,
    }
