"""A faithful fake of Helicone's async-log endpoints (tests: tests/fakes/test_fake_helicone.py).

``FakeHelicone`` is a twisted.web resource that takes and *reads* logs the way
Helicone does, from its source (repository Helicone/helicone):

- Routes (``worker/src/routers/api/apiRouter.ts``): the worker decides the
  provider from the URL alone — ``POST /custom/v1/log`` is ``CUSTOM``,
  ``/oai/v1/log`` is ``OPENAI``, ``/anthropic/v1/log`` is ``ANTHROPIC``,
  ``/googleapis/v1/log`` is ``GOOGLE``; any other path is **400** ``invalid
  path``.  Nothing in the body or in ``meta`` changes it (``Helicone-Provider``
  is read nowhere).  A self-hosted jawn takes ``/v1/trace/custom/v1/log`` and
  ``/v1/trace/custom/log`` (``valhalla/jawn/src/controllers/public/
  traceController.ts``) and reads the provider from the body's top-level
  ``provider`` field, ``OPENAI`` when absent
  (``valhalla/jawn/src/managers/customTraceManager.ts``).  ``prefix`` mounts
  them all under a path (a gateway in front).
- Validation, in the worker's order (``worker/src/lib/managers/
  AsyncLogManager.ts``, ``worker/src/lib/models/AsyncLog.ts``): a body over 10
  MiB is **400** ``Payload too large``; no ``Authorization`` is **401**
  ``Unauthorized``; then ``validateAsyncLogModel`` answers **400** ``{"error":
  ...}`` (``providerRequest``/``providerResponse``/``timing`` missing, ``url``
  not a string, ``meta`` not an object, ``json`` undefined, ``status`` not a
  number, ``headers`` not an object, times not numbers, the start after the end,
  a negative time); then an unknown key is **401** ``{"error": ...}``; stored is
  **200** ``ok`` with a ``helicone-id`` header.
- ``meta`` is read as the request's headers (``worker/src/lib/models/
  HeliconeHeaders.ts``, case-insensitive): ``Helicone-Request-Id`` (a UUID of
  versions 1-5, else Helicone makes a random one), ``Helicone-User-Id``,
  ``Helicone-Property-*`` (the property names lower-cased, as ``Headers``
  iterates them), and the Sessions feature's ``Helicone-Session-Id``,
  ``Helicone-Session-Path`` and ``Helicone-Session-Name``, which Helicone also
  files as the properties ``Helicone-Session-Id``/``-Path``/``-Name``.  A
  ``Helicone-Property-Session-Id`` is only a property called ``session-id``:
  Helicone's Sessions view never groups by it.
- The response body (``worker/src/lib/dbLogger/DBLoggable.ts``,
  ``dbLoggableRequestFromAsyncLogModel``): ``providerResponse.textBody`` when
  present and non-empty, else ``JSON.stringify(json)``; the request is a stream
  when ``providerRequest.json.stream == true``.
- Reading it (``valhalla/jawn/src/lib/handlers/ResponseBodyHandler.ts``,
  ``getBodyProcessor``, and the processors in ``valhalla/jawn/src/lib/shared/
  bodyProcessors/``): a non-stream ``ANTHROPIC`` log goes to
  ``anthropicBodyProcessor.ts``; a stream of an ``ANTHROPIC`` log, or of a model
  whose name holds ``claude``, to ``anthropicStreamBodyProcessor.ts``; any other
  stream to ``openAIStreamProcessor.ts``; the rest to
  ``genericBodyProcessor.ts``.  Both stream processors return at once, with *no
  usage*, when the body parses as JSON (``helpers.ts``, ``isParseInputJson``):
  a stream sent as merged JSON gets no token counts and so no cost.  The OpenAI
  stream processor reads a ``usage`` object from the ``data:`` lines (summed
  when there are several, ``utils/streamParser.ts``); without one Helicone shows
  ``-1`` tokens.  The Anthropic processors count usage only for model names
  holding ``claude-3``, ``claude-sonnet-4``, ``claude-opus-4`` or ``claude-4``
  (``input_tokens`` of ``message_start`` and ``output_tokens`` of the last
  ``message_delta``, both non-zero, plus the cache reads and writes); for any
  other model they count the legacy ``completion`` text, which a Messages answer
  does not have: 0 tokens.  The generic processor reads ``usage.prompt_tokens``
  (or ``input_tokens``) minus cached and audio tokens, the cached tokens as cache
  reads, and ``completion_tokens`` (or ``output_tokens``) minus reasoning and
  audio tokens.
- Cost: Helicone prices a request from its provider, model and usage; a
  ``CUSTOM`` log is never priced (:attr:`StoredLog.cost_inputs` is None).

Where the worker is lax the fake is strict, so sink bugs show: ``meta`` and
``providerResponse.headers`` must map names to strings (the worker would coerce
anything through ``new Headers()``), ``timing.startTime``/``endTime`` must be
objects (the worker throws a TypeError), ``timeToFirstToken`` must be a number
when present, ``textBody`` a string, and a ``Helicone-Request-Id`` that Helicone
would silently replace with a random one (not a UUID of versions 1-5) is refused
(400).  Requests are stored by id: a log sent again with the same
``Helicone-Request-Id`` replaces the first (counted in ``duplicates``).

For tests it records every request, stores the accepted logs, and plays
scripted answers first (``fail_next``: a status such as 429 with
``Retry-After`` or 500, a 200 ``{"error": ...}`` as the worker sends when it
cannot store a log, a hang, a reset).  Use it in memory with
``treq.testing.StubTreq(fake)`` or on a real port with
:func:`listen_fake_helicone`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

import attrs
import orjson
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from tests.fakes._http import (
    Hang,
    ReceivedRequest,
    Reset,
    Respond,
    RunningFake,
    ScriptedResource,
    listen,
    read_request,
)

__all__ = [
    "DEFAULT_KEY",
    "JAWN_PATHS",
    "LOG_PATH",
    "WORKER_PATHS",
    "FakeHelicone",
    "Hang",
    "HeliconeUsage",
    "ReceivedRequest",
    "Reset",
    "Respond",
    "RunningFakeHelicone",
    "StoredLog",
    "listen_fake_helicone",
]

LOG_PATH = b"/custom/v1/log"
# worker/src/routers/api/apiRouter.ts: the provider is the route's.
WORKER_PATHS = {
    b"/custom/v1/log": "CUSTOM",
    b"/oai/v1/log": "OPENAI",
    b"/googleapis/v1/log": "GOOGLE",
    b"/anthropic/v1/log": "ANTHROPIC",
}
# jawn's traceController.ts: the provider is the body's "provider", OPENAI if absent.
JAWN_PATHS = (b"/v1/trace/custom/v1/log", b"/v1/trace/custom/log")
DEFAULT_KEY = "sk-helicone-fake0001-abcdefg-hijklmn-opqrstu"
MAX_PAYLOAD = 10 * 1024 * 1024
# HeliconeHeaders.getValidUUID: anything else is replaced by a random UUID.
HELICONE_UUID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[1-5][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z", re.I
)
# The Anthropic processors count usage only for these model names.
CLAUDE_USAGE_MODELS = ("claude-3", "claude-sonnet-4", "claude-opus-4", "claude-4")
# openAIStreamProcessor.ts's NON_DATA_LINES (those of an Anthropic stream among them).
NON_DATA_LINES = frozenset(
    {
        "event: content_block_delta",
        "event: content_block_stop",
        "event: message_delta",
        "event: message_stop",
        "event: message_start",
        "event: content_block_start",
        "event: ping",
        "event: completion",
        "event: error",
        "event: done",
    }
)
PRICED_PROVIDERS = frozenset({"OPENAI", "ANTHROPIC", "GOOGLE"})
_HTML = ("<html", "<HTML", "<!DOCTYPE html>", "<!DOCTYPE HTML>", "<body", "<BODY", "<head")


@attrs.frozen
class HeliconeUsage:
    """The token counts Helicone files for a request (``-1`` when it could not count)."""

    prompt_tokens: int
    completion_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


@attrs.frozen
class StoredLog:
    """One request as Helicone stored it, and what its dashboards would show."""

    request_id: str
    provider: str  # from the URL (worker) or the body (jawn)
    path: str
    provider_request: Mapping[str, Any]
    provider_response: Mapping[str, Any]
    timing: Mapping[str, Any]
    authorization: str

    @property
    def meta(self) -> dict[str, str]:
        """``providerRequest.meta`` with lower-case names (it is read as headers)."""
        meta = self.provider_request.get("meta") or {}
        return {str(k).lower(): v for k, v in meta.items()}

    @property
    def properties(self) -> dict[str, str]:
        """The custom properties as ``getHeliconeProperties`` files them: each
        ``Helicone-Property-*`` by its lower-case name, then the session headers."""
        prefix = "helicone-property-"
        meta = self.meta
        out = {k[len(prefix) :]: v for k, v in meta.items() if k.startswith(prefix) and k != prefix}
        for header, name in (
            ("helicone-session-name", "Helicone-Session-Name"),
            ("helicone-session-id", "Helicone-Session-Id"),
            ("helicone-session-path", "Helicone-Session-Path"),
        ):
            if meta.get(header):
                out[name] = meta[header]
        return out

    @property
    def session(self) -> tuple[str | None, str | None, str | None]:
        """``(id, path, name)`` as the Sessions feature reads them."""
        meta = self.meta
        return (
            meta.get("helicone-session-id"),
            meta.get("helicone-session-path"),
            meta.get("helicone-session-name"),
        )

    @property
    def user_id(self) -> str | None:
        return self.meta.get("helicone-user-id")

    @property
    def request_json(self) -> Any:
        return self.provider_request.get("json")

    @property
    def response_json(self) -> Any:
        return self.provider_response.get("json")

    @property
    def is_stream(self) -> bool:
        """``providerRequest.json?.stream == true`` (JavaScript's loose equality)."""
        request = self.request_json
        stream = request.get("stream") if isinstance(request, dict) else None
        return stream is True or (type(stream) in (int, float) and stream == 1)

    @property
    def response_body(self) -> str:
        """The response body as Helicone reads it: ``textBody`` if present, else
        ``json`` stringified (``streamed_data`` as ``data:`` lines)."""
        text = self.provider_response.get("textBody")
        if text:
            return str(text)
        body = self.provider_response.get("json")
        if isinstance(body, dict) and body.get("streamed_data"):
            return "".join("data: " + _js(d) for d in body["streamed_data"])
        return _js(body)

    @property
    def model(self) -> str | None:
        """The model Helicone files: the request's, else the response's."""
        request = self.request_json
        model = request.get("model") if isinstance(request, dict) else None
        if isinstance(model, str) and model:
            return model
        body, _ = self.processed
        found = body.get("model") if isinstance(body, dict) else None
        return found if isinstance(found, str) else None

    @property
    def processed(self) -> tuple[Any, HeliconeUsage | None]:
        """``(processed body, usage)`` from the body processor Helicone picks."""
        return read_response(self.provider, self.is_stream, self.response_body, self._req_model)

    @property
    def usage(self) -> HeliconeUsage | None:
        return self.processed[1]

    @property
    def cost_inputs(self) -> tuple[str, str, HeliconeUsage] | None:
        """``(provider, model, usage)`` when Helicone can price the request, else None."""
        usage = self.usage
        model = self.model
        if self.provider not in PRICED_PROVIDERS or usage is None or model is None:
            return None
        if usage.prompt_tokens < 0 or usage.completion_tokens < 0:
            return None
        return self.provider, model, usage

    @property
    def start_ms(self) -> int:
        t = self.timing["startTime"]
        return int(t["seconds"] * 1000 + t["milliseconds"])

    @property
    def end_ms(self) -> int:
        t = self.timing["endTime"]
        return int(t["seconds"] * 1000 + t["milliseconds"])

    @property
    def time_to_first_token(self) -> float | None:
        value = self.timing.get("timeToFirstToken")
        return None if value is None else float(value)

    @property
    def _req_model(self) -> str | None:
        request = self.request_json
        model = request.get("model") if isinstance(request, dict) else None
        return model if isinstance(model, str) else None


class FakeHelicone(ScriptedResource):
    """Helicone's log endpoints for one organisation.  See the module docstring."""

    def __init__(
        self,
        *,
        clock: IReactorTime | None = None,
        api_key: str = DEFAULT_KEY,
        prefix: bytes = b"",
    ) -> None:
        super().__init__(clock)
        self.api_key = api_key
        self._prefix = prefix.rstrip(b"/")
        self.by_id: dict[str, StoredLog] = {}
        self.duplicates = 0

    # -- test helpers -------------------------------------------------------------

    @property
    def logs(self) -> list[StoredLog]:
        """The stored requests, in the order they were first stored."""
        return list(self.by_id.values())

    # -- the endpoint -------------------------------------------------------------

    def _route(self, path: bytes) -> tuple[str, bool] | None:
        """``(provider, from the body)`` for a log path, None for any other."""
        if self._prefix:
            if not path.startswith(self._prefix + b"/"):
                return None
            path = path[len(self._prefix) :]
        if path in WORKER_PATHS:
            return WORKER_PATHS[path], False
        if path in JAWN_PATHS:
            return "OPENAI", True
        return None

    def render(self, request: Request) -> bytes | int:
        headers, body, method, path = read_request(request)

        def answer(status: int, reply: str, extra: Mapping[str, str] | None = None) -> bytes:
            self.requests.append(ReceivedRequest(method, path, headers, len(body), status, reply))
            request.setResponseCode(status)
            for name, value in (extra or {}).items():
                request.setHeader(name, value)  # type: ignore[no-untyped-call]
            return reply.encode("utf-8")

        route = self._route(request.path or b"")
        if route is None or request.method != b"POST":
            return answer(400, "invalid path")  # the worker's catch-all route
        action = self.next_scripted()
        if action is not None:
            if not isinstance(action, Respond):
                self.requests.append(ReceivedRequest(method, path, headers, len(body), None, ""))
                return self._stall(request, action)
            if action.store:
                status, _, _ = self._log(headers, body, path, route)
                if status != 200:
                    raise AssertionError(f"Respond(store=True) but the log failed: {status}")
            return answer(action.status, action.body.decode("utf-8", "replace"), action.headers)
        status, reply, extra = self._log(headers, body, path, route)
        return answer(status, reply, extra)

    def _log(
        self, headers: Mapping[str, str], body: bytes, path: str, route: tuple[str, bool]
    ) -> tuple[int, str, dict[str, str]]:
        """logAsync: (status, reply, extra headers)."""
        try:
            model = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            return 400, _error(f"invalid JSON body: {e}"), {}
        if len(body) > MAX_PAYLOAD:
            return 400, "Payload too large", {}
        authorization = headers.get("authorization", "")
        if not authorization:
            return 401, "Unauthorized", {}
        problem = validate_async_log_model(model)
        if problem is not None:
            return 400, _error(problem), {}
        meta = {str(k).lower(): v for k, v in model["providerRequest"]["meta"].items()}
        request_id = meta.get("helicone-request-id")
        if request_id is None:
            request_id = str(uuid.uuid4())
        elif not HELICONE_UUID.match(request_id):
            return 400, _error(f"Helicone-Request-Id must be a UUID, not {request_id!r}"), {}
        if authorization != f"Bearer {self.api_key}":
            return 401, _error("Authentication failed: unknown API key"), {}
        provider, from_body = route
        if from_body:
            given = model.get("provider")
            provider = given if isinstance(given, str) and given else "OPENAI"
        if request_id in self.by_id:
            self.duplicates += 1
        self.by_id[request_id] = StoredLog(
            request_id=request_id,
            provider=provider,
            path=path,
            provider_request=model["providerRequest"],
            provider_response=model["providerResponse"],
            timing=model["timing"],
            authorization=authorization,
        )
        return 200, "ok", {"helicone-id": request_id}


def _error(message: str) -> str:
    return orjson.dumps({"error": message}).decode()


def _js(value: Any) -> str:
    """``JSON.stringify``."""
    return orjson.dumps(value).decode()


def _number(value: Any) -> bool:
    """JavaScript's ``typeof value === "number"``."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def validate_async_log_model(model: Any) -> str | None:
    """``validateAsyncLogModel`` (its messages), plus the fake's stricter checks."""
    if not isinstance(model, dict):
        return "the body must be a JSON object"
    request, response, timing = (
        model.get("providerRequest"),
        model.get("providerResponse"),
        model.get("timing"),
    )
    if not request or not response or not timing:
        return "One of the required fields is missing, providerRequest, providerResponse, or timing"
    if not isinstance(request, dict) or not isinstance(response, dict):
        return "providerRequest and providerResponse must be objects"
    if not isinstance(request.get("url"), str):
        return "Invalid providerRequest: 'url' should be a string"
    if not isinstance(request.get("meta"), dict):
        return "Invalid providerRequest: 'meta' should be an object"
    if not _string_map(request["meta"]):
        return "Invalid providerRequest: 'meta' values should be strings (they are headers)"
    if "json" not in request:
        return "Invalid providerRequest: 'json' is undefined"
    if "json" not in response:
        return "Invalid providerResponse: 'json' is undefined"
    if not _number(response.get("status")):
        return "Invalid providerResponse: 'status' should be a number"
    if not isinstance(response.get("headers"), dict):
        return "Invalid providerResponse: 'headers' should be an object"
    if not _string_map(response["headers"]):
        return "Invalid providerResponse: 'headers' values should be strings"
    if "textBody" in response and not isinstance(response["textBody"], str):
        return "Invalid providerResponse: 'textBody' should be a string"
    if not isinstance(timing, dict):
        return "Invalid timing structure or value type"
    for end in ("startTime", "endTime"):
        if not isinstance(timing.get(end), dict):
            return f"Invalid timing: '{end}' should be an object"
        for unit in ("seconds", "milliseconds"):
            if not _number(timing[end].get(unit)):
                return f"Invalid timing: '{end}.{unit}' should be a number"
    if "timeToFirstToken" in timing and not _number(timing["timeToFirstToken"]):
        return "Invalid timing: 'timeToFirstToken' should be a number (ms)"
    start = timing["startTime"]["seconds"] * 1000 + timing["startTime"]["milliseconds"]
    end_ = timing["endTime"]["seconds"] * 1000 + timing["endTime"]["milliseconds"]
    if start > end_:
        return "startTime cannot be greater than endTime"
    if start < 0 or end_ < 0:
        return "startTime and endTime cannot be negative"
    return None


# -- reading a response as jawn's body processors do ---------------------------------


def read_response(
    provider: str, is_stream: bool, body: str, model: str | None
) -> tuple[Any, HeliconeUsage | None]:
    """``(processed body, usage)``: ``getBodyProcessor`` and the processor it picks."""
    if not body:
        return {}, None
    if not _is_json(body) and body.startswith(_HTML):
        return {"error": "HTML response detected:", "html_response": body}, None
    try:
        if is_stream and (provider == "ANTHROPIC" or "claude" in (model or "")):
            return _anthropic_stream(body, model)
        if is_stream:
            return _openai_stream(body)
        parsed = _js_parse(body)
        if provider == "ANTHROPIC":
            return parsed, _anthropic_usage(parsed, model)
        return parsed, _generic_usage(parsed)
    except ValueError as e:  # JSON.parse threw: Helicone files a parse error
        return {"helicone_error": "error parsing response", "parse_response_error": str(e)}, None


def _is_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


def _js_parse(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"SyntaxError: {e}") from None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _claude_counts(model: str | None) -> bool:
    return any(name in (model or "") for name in CLAUDE_USAGE_MODELS)


def _anthropic_usage(parsed: Any, model: str | None) -> HeliconeUsage | None:
    """anthropicBodyProcessor.ts."""
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    if not _claude_counts(model or (parsed.get("model") if isinstance(parsed, dict) else None)):
        return HeliconeUsage(0, 0)  # the legacy `completion` text: none in a message
    if (
        not isinstance(usage, dict)
        or not usage.get("output_tokens")
        or not usage.get("input_tokens")
    ):
        return None
    return HeliconeUsage(
        usage["input_tokens"],
        usage["output_tokens"],
        _int(usage.get("cache_read_input_tokens")) or 0,
        _int(usage.get("cache_creation_input_tokens")) or 0,
    )


def _generic_usage(parsed: Any) -> HeliconeUsage | None:
    """genericBodyProcessor.ts."""
    if not isinstance(parsed, dict) or "usage" not in parsed:
        return None
    usage = parsed["usage"]
    if not isinstance(usage, dict):
        return None
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    if usage.get("prompt_tokens") is not None:
        prompt = (
            (_int(usage["prompt_tokens"]) or 0)
            - (_int(prompt_details.get("cached_tokens")) or 0)
            - (_int(prompt_details.get("audio_tokens")) or 0)
        )
        cached = _int(prompt_details.get("cached_tokens")) or 0
    else:
        details = usage.get("input_tokens_details") or {}
        prompt = (_int(usage.get("input_tokens")) or 0) - (_int(details.get("cached_tokens")) or 0)
        cached = _int(details.get("cached_tokens")) or 0
    if usage.get("completion_tokens") is not None:
        completion = (
            (_int(usage["completion_tokens"]) or 0)
            - (_int(completion_details.get("reasoning_tokens")) or 0)
            - (_int(completion_details.get("audio_tokens")) or 0)
        )
    else:
        details = usage.get("output_tokens_details") or {}
        completion = (_int(usage.get("output_tokens")) or 0) - (
            _int(details.get("reasoning_tokens")) or 0
        )
    return HeliconeUsage(max(0, prompt), max(0, completion), cached)


def _data_line(line: str) -> Any:
    """``mapLines``: the first ``data:`` removed, the rest parsed; a line that does
    not parse becomes an error object, as Helicone's ``err()``."""
    chunk = line.replace("data:", "", 1)
    if chunk == "[DONE]":
        return {"helicone_translated_for_logging_only": "[DONE]"}
    try:
        return orjson.loads(chunk)
    except orjson.JSONDecodeError:
        return {"data": None, "error": {"msg": "Helicone had an error parsing this line: "}}


def _add_usage(acc: dict[str, Any], usage: dict[str, Any]) -> None:
    """``recursivelyConsolidate``: numbers add up, missing keys are set."""
    for key, value in usage.items():
        if acc.get(key) is None:
            acc[key] = value
        elif isinstance(acc[key], dict) and isinstance(value, dict):
            _add_usage(acc[key], value)
        elif isinstance(acc[key], int | float) and isinstance(value, int | float):
            acc[key] += value


def _openai_stream(body: str) -> tuple[Any, HeliconeUsage | None]:
    """openAIStreamProcessor.ts (with ``consolidateTextFields``)."""
    if _is_json(body):
        return orjson.loads(body), None
    lines = [
        line
        for line in body.split("\n")
        if line and "OPENROUTER PROCESSING" not in line and line not in NON_DATA_LINES
    ]
    acc: dict[str, Any] = {}
    for cur in map(_data_line, lines):
        if not isinstance(cur, dict) or not cur:
            continue
        if cur.get("usage"):
            if not isinstance(acc.get("usage"), dict):
                acc["usage"] = {}
            _add_usage(acc["usage"], cur["usage"])
        elif acc.get("choices") is None:
            acc = dict(cur)
    if "usage" not in acc:
        return acc, HeliconeUsage(-1, -1)
    usage = acc["usage"] if isinstance(acc["usage"], dict) else {}
    prompt, completion = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
    if prompt is None or completion is None:
        return acc, None
    return acc, HeliconeUsage(prompt, completion)


def _anthropic_stream(body: str, model: str | None) -> tuple[Any, HeliconeUsage | None]:
    """anthropicStreamBodyProcessor.ts."""
    if _is_json(body):
        return orjson.loads(body), None
    message: dict[str, Any] = {}
    for line in body.split("\n"):
        if not line:
            continue
        try:
            data = orjson.loads(line.replace("data:", "", 1).strip())
        except orjson.JSONDecodeError:
            continue  # "event: ..." lines
        if not isinstance(data, dict):
            continue
        if data.get("type") == "message_start" and isinstance(data.get("message"), dict):
            message.update(data["message"])
        elif data.get("type") == "message_delta" and isinstance(data.get("delta"), dict):
            message.update({k: v for k, v in data["delta"].items() if v is not None})
            if isinstance(data.get("usage"), dict):
                merged = dict(message.get("usage") or {})
                merged["output_tokens"] = data["usage"].get("output_tokens")
                message["usage"] = merged
    if not _claude_counts(model):
        return message, HeliconeUsage(0, 0)
    usage = message.get("usage")
    if (
        not isinstance(usage, dict)
        or not usage.get("output_tokens")
        or not usage.get("input_tokens")
    ):
        return message, None
    return message, HeliconeUsage(
        usage["input_tokens"],
        usage["output_tokens"],
        _int(usage.get("cache_read_input_tokens")) or 0,
        _int(usage.get("cache_creation_input_tokens")) or 0,
    )


# -- on a real port -------------------------------------------------------------------


class RunningFakeHelicone(RunningFake[FakeHelicone]):
    """A ``FakeHelicone`` listening on 127.0.0.1; ``stop()`` when done."""

    @property
    def log_url(self) -> str:
        return self.url + LOG_PATH.decode()


def listen_fake_helicone(fake: FakeHelicone, reactor: Any = None) -> RunningFakeHelicone:
    """Serve ``fake`` on an OS-chosen port of 127.0.0.1 (for end-to-end tests)."""
    return listen(RunningFakeHelicone, fake, reactor)
