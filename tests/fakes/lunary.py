"""A faithful fake of Lunary's ingestion endpoint (tests: tests/fakes/test_fake_lunary.py).

``FakeLunary`` is a twisted.web resource implementing ``POST /v1/runs/ingest``
the way Lunary's backend does, from its public API reference
(docs.lunary.ai, "Ingest run events", "Sending Events via the Lunary API") and
its source (repository lunary-ai/lunary: ``packages/backend/src/api/v1/runs/
ingest.ts``, ``packages/backend/src/utils/ingest.ts``, ``api/v1/auth/utils.ts``,
``utils/ratelimit.ts``, ``utils/errors.ts``):

- Authentication: the bearer token of ``Authorization: Bearer <key>`` *is* the
  project id (the project's public key).  A missing token or one that is not a
  UUID answers **402** ``{"message": "Incorrect project id format"}``; a UUID that
  names no project answers **401** ``{"message": "This project does not exist"}``.
- Rate limit (koa-ratelimit, before the body is read): 150 requests per 60 s
  window per client; past it **429** with ``Retry-After`` (seconds to the end of
  the window) and the text ``Sometimes You Just Have to Slow Down.``
- Body: JSON; a body that does not parse is **400** (koa-bodyparser).  The
  handler reads ``body.events`` — one event object or an array of them.  A bare
  array (or anything without ``events``) throws ``Missing events payload.``,
  which Lunary's error middleware answers with **500** (the source has no 400
  for it; the request is refused all the same).
- Processing: events are sorted by ``timestamp`` (a stable sort, so a ``start``
  and an ``end`` with the same time keep their order) and taken one by one;
  each gets a result ``{id, success, error?}`` where ``id`` is the ``runId`` *as
  sent*.  The answer is **200** ``{"results": [...]}`` in processing order.
- Per event, as ``cleanEvent`` does: every key is converted to camelCase,
  recursively (``request_id`` is stored as ``requestId``); a ``runId`` that is
  not 36 characters long is turned into a UUID from its SHA-256;
  ``metadata`` keeps only first-level strings, numbers, booleans and arrays of
  those; ``name`` loses a ``models/`` prefix; a string ``tags`` becomes a list.
- ``start`` creates the run; a second ``start`` for the same id fails with
  ``Run with this ID already exists in the database.``  ``end`` sets the output,
  token usage (``tokensUsage.prompt``/``completion``), status ``success`` and
  merges metadata; ``error`` sets status ``error`` and the ``error`` object.
- Postgres refuses ``\\u0000`` in text and jsonb: an event carrying a NUL
  character fails, alone, with Postgres's message (``unsupported Unicode
  escape sequence`` for the jsonb columns ``input``, ``output``, ``params``,
  ``metadata``, ``error``; ``invalid byte sequence for encoding "UTF8": 0x00``
  for the text columns ``name``, ``tags`` and the user id).  A start that fails
  leaves no run.
- An ``llm`` ``end`` whose run does not exist makes Lunary wait **5 seconds**
  (``registerRunEvent``: "Retrying insertion (end event) in 5s in case start
  event not inserted yet") and look again; events are taken one at a time, so
  every such end delays the whole answer by 5 s (on the fake's clock; counted in
  ``waits``).  A request whose client left meanwhile is still processed, as
  Lunary does, and its answer dropped.

Where the real server is lax the fake is strict, so sink bugs show (each is a
failed per-event result, never a silent drop): an ``end`` or ``error`` whose
``start`` was never seen fails with ``end before start`` (after its 5-second
wait, Lunary answers such an ``end`` with success and stores nothing, and updates
nothing for an ``error``); events missing ``type`` (or with one outside Lunary's enum),
``event``, ``runId`` or a parseable ``timestamp`` fail; event kinds this fake does
not model (feedback, chat, log...) fail.

For tests it records every request, stores runs by id, plays scripted
answers first (``fail_next``: a status such as 402, 429 with ``Retry-After``,
500; a hang; a connection reset), and can make the start of chosen runs fail
(``fail_starts``, as a database error would).  Use it in memory with
``treq.testing.StubTreq(fake)`` or on a real port with :func:`listen_fake_lunary`.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

import attrs
import orjson
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

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
    "INGEST_PATH",
    "FakeLunary",
    "Hang",
    "ReceivedRequest",
    "Reset",
    "Respond",
    "RunningFakeLunary",
    "StoredRun",
    "listen_fake_lunary",
]

INGEST_PATH = b"/v1/runs/ingest"
DEFAULT_KEY = "0b6a8f3e-2c1d-4e5f-8a9b-7c6d5e4f3a2b"
EVENT_TYPES = frozenset(
    {"llm", "chain", "agent", "tool", "log", "embed", "retriever", "chat", "convo"}
    | {"message", "thread"}
)
RATE_LIMIT = 150
RATE_WINDOW = 60.0
SLOW_DOWN = "Sometimes You Just Have to Slow Down."
DUPLICATE = "Run with this ID already exists in the database."
END_WAIT = 5.0  # seconds: registerRunEvent's wait before an end whose run is missing
JSONB_NUL = "unsupported Unicode escape sequence"
TEXT_NUL = 'invalid byte sequence for encoding "UTF8": 0x00'


@attrs.define
class StoredRun:
    """A run as Lunary stores it (after ``cleanEvent``)."""

    id: str
    type: str
    name: str | None
    created_at: str
    input: Any = None
    tags: list[str] | None = None
    user_id: str | None = None
    params: Any = None
    metadata: dict[str, Any] | None = None
    status: str = "started"
    output: Any = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: Any = None
    ended_at: str | None = None


class _EventError(Exception):
    """One event failed: its result says ``success: false`` with this text."""


class FakeLunary(ScriptedResource):
    """Lunary's ingest endpoint for one project.  See the module docstring."""

    def __init__(
        self,
        *,
        clock: IReactorTime | None = None,
        public_key: str = DEFAULT_KEY,
        rate_limit: int | None = RATE_LIMIT,
        rate_window: float = RATE_WINDOW,
    ) -> None:
        super().__init__(clock)
        self.public_key = public_key
        self._rate_limit = rate_limit
        self._rate_window = rate_window
        self._window_end = -math.inf
        self._window_count = 0
        self.runs: dict[str, StoredRun] = {}
        self.bodies: list[Any] = []  # every parsed body, as received
        self.last_results: list[dict[str, Any]] = []
        self.waits = 0  # 5-second waits for an end whose run was missing
        self._failing_starts: dict[str, str] = {}

    def fail_starts(self, *run_ids: str, error: str = "connection to database lost") -> None:
        """The ``start`` of these runs fails with ``error`` (each time it is sent)."""
        self._failing_starts.update(dict.fromkeys(run_ids, error))

    # -- test helpers -------------------------------------------------------------

    # -- the endpoint -------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        headers, body, method, path = read_request(request)

        def answer(status: int, reply: Any, extra: Mapping[str, str] | None = None) -> bytes:
            text = reply if isinstance(reply, str) else orjson.dumps(reply).decode()
            self.requests.append(ReceivedRequest(method, path, headers, len(body), status, text))
            request.setResponseCode(status)
            kind = b"text/plain; charset=utf-8" if isinstance(reply, str) else b"application/json"
            request.setHeader(b"content-type", kind)  # type: ignore[no-untyped-call]
            for name, value in (extra or {}).items():
                request.setHeader(name, value)  # type: ignore[no-untyped-call]
            return text.encode("utf-8")

        if request.path != INGEST_PATH:
            return answer(404, {"message": "Not Found"})
        if request.method != b"POST":
            return answer(405, "Method Not Allowed")
        action = self.next_scripted()
        if action is not None:
            if not isinstance(action, Respond):
                self.requests.append(ReceivedRequest(method, path, headers, len(body), None, ""))
                return self._stall(request, action)
            if action.store:
                stored = self._ingest(headers, body)
                if not isinstance(stored, tuple) or stored[0] != 200:
                    raise AssertionError(f"Respond(store=True) but the ingest failed: {stored}")
            text = action.body.decode("utf-8", "replace")
            self.requests.append(
                ReceivedRequest(method, path, headers, len(body), action.status, text)
            )
            request.setResponseCode(action.status)
            for name, value in action.headers.items():
                request.setHeader(name, value)  # type: ignore[no-untyped-call]
            return action.body
        limited = self._rate_limited()
        if limited is not None:
            return answer(429, SLOW_DOWN, {"Retry-After": str(limited)})
        result = self._ingest(headers, body)
        if isinstance(result, tuple):
            return answer(*result)
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def later(done: tuple[int, Any]) -> None:
            if gone or request.finished:
                return  # the client left: Lunary still did the work; nobody reads it
            request.write(answer(*done))
            request.finish()  # type: ignore[no-untyped-call]

        result.append(later)
        return NOT_DONE_YET

    def _rate_limited(self) -> int | None:
        """koa-ratelimit's fixed window: seconds to wait, or None when allowed."""
        if self._rate_limit is None:
            return None
        now = self.now()
        if now >= self._window_end:
            self._window_end = now + self._rate_window
            self._window_count = 0
        self._window_count += 1
        if self._window_count <= self._rate_limit:
            return None
        return max(1, math.ceil(self._window_end - now))

    def _ingest(
        self, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Any] | list[Callable[[tuple[int, Any]], None]]:
        """The route handler: (status, reply), or when it has to wait, a list the
        caller appends its callback to, called with (status, reply) later."""
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        doc: Any = {}
        if media == "application/json" or media.endswith("+json"):
            try:
                doc = orjson.loads(body) if body.strip() else {}
            except orjson.JSONDecodeError as e:
                return 400, {"message": f"invalid JSON: {e}"}
            if not isinstance(doc, dict | list):
                return 400, {"message": "invalid JSON, only supports object and array"}
        self.bodies.append(doc)
        token = headers.get("authorization", "").split(" ")
        bearer = token[1] if len(token) > 1 else ""
        if not _is_uuid(bearer):
            return 402, {"message": "Incorrect project id format"}
        if bearer.lower() != self.public_key.lower():
            return 401, {"message": "This project does not exist"}
        events = doc.get("events") if isinstance(doc, dict) else None
        if _js_falsy(events):
            # ``throw new Error("Missing events payload.")``: the error middleware
            # answers error.status || 500.
            return 500, {"message": "Missing events payload."}
        batch = events if isinstance(events, list) else [events]
        pending = iter(sorted(batch, key=_sort_key))
        results: list[dict[str, Any]] = []
        waiters: list[Callable[[tuple[int, Any]], None]] = []
        if self._run(pending, results, waiters):
            self.last_results = results
            return 200, {"results": results}
        return waiters

    def _run(
        self,
        pending: Iterator[Any],
        results: list[dict[str, Any]],
        waiters: list[Callable[[tuple[int, Any]], None]],
    ) -> bool:
        """Take the events one by one; False when an end has to wait first (the
        rest is taken, and ``waiters`` told, once the wait is over)."""
        for raw in pending:
            if isinstance(raw, list) and len(raw) == 1:
                raw = raw[0]
            sent_id = raw.get("runId") if isinstance(raw, dict) else None
            result: dict[str, Any] = {} if sent_id is None else {"id": sent_id}
            results.append(result)
            try:
                event = _clean(raw)
            except _EventError as e:
                result.update(success=False, error=str(e))
                continue
            if _waits(event) and event["runId"] not in self.runs:
                self.waits += 1

                def resume(event: dict[str, Any] = event, result: dict[str, Any] = result) -> None:
                    self._settle(event, result)
                    if self._run(pending, results, waiters):
                        self.last_results = results
                        for waiter in waiters:
                            waiter((200, {"results": results}))

                self._call_later(END_WAIT, resume)
                return False
            self._settle(event, result)
        return True

    def _settle(self, event: dict[str, Any], result: dict[str, Any]) -> None:
        try:
            self._register(event)
        except _EventError as e:
            result.update(success=False, error=str(e))
        else:
            result["success"] = True

    def _call_later(self, delay: float, call: Callable[[], None]) -> None:
        clock = self._clock
        if clock is None:
            from twisted.internet import reactor as clock
        clock.callLater(delay, call)  # type: ignore[attr-defined]

    def _register(self, event: dict[str, Any]) -> None:
        name = event["event"]
        rid = event["runId"]
        if event["type"] == "log":
            raise _EventError("log events are not modelled by this fake")
        _refuse_nul(event)
        if name == "start":
            if rid in self.runs:
                raise _EventError(DUPLICATE)
            if rid in self._failing_starts:
                raise _EventError(self._failing_starts[rid])
            self.runs[rid] = StoredRun(
                id=rid,
                type=event["type"],
                name=event.get("name"),
                created_at=event["timestamp"],
                input=event.get("input"),
                tags=event.get("tags"),
                user_id=event.get("userId"),
                params=event.get("params") or event.get("extra"),
                metadata=event.get("metadata"),
            )
            return
        if name not in ("end", "error"):
            raise _EventError(f"event {name!r} is not modelled by this fake")
        run = self.runs.get(rid)
        if run is None:
            raise _EventError(
                f"end before start: no run {rid} (its start was never stored; Lunary waits "
                "5 s, then answers success and stores nothing)"
            )
        run.ended_at = event["timestamp"]
        if name == "error":
            run.status = "error"
            run.error = event.get("error")
            return
        run.status = "success"
        run.output = event.get("output")
        usage = event.get("tokensUsage")
        if isinstance(usage, dict):
            run.prompt_tokens = usage.get("prompt")
            run.completion_tokens = usage.get("completion")
        metadata = event.get("metadata")
        if metadata:
            run.metadata = {**(run.metadata or {}), **metadata}
        if event.get("input") is not None:
            run.input = event["input"]


def _waits(event: dict[str, Any]) -> bool:
    """``registerRunEvent`` waits 5 s before an ``llm`` end whose run is missing."""
    return event["event"] == "end" and event["type"] == "llm"


# The columns an event's fields are written to, by the kind of event.
_TEXT_FIELDS = {"start": ("name", "tags", "userId")}
_JSONB_FIELDS = {
    "start": ("input", "params", "extra", "metadata"),
    "end": ("output", "input", "metadata"),
    "error": ("error",),
}


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _refuse_nul(event: dict[str, Any]) -> None:
    """Postgres's refusal of NUL in text and jsonb (see the module docstring)."""
    name = event["event"]
    if any(_has_nul(event.get(f)) for f in _TEXT_FIELDS.get(name, ())):
        raise _EventError(TEXT_NUL)
    if any(_has_nul(event.get(f)) for f in _JSONB_FIELDS.get(name, ())):
        raise _EventError(JSONB_NUL)


# -- cleanEvent ----------------------------------------------------------------------

_CAMEL = re.compile(r"[-_][a-zA-Z]")
_ISO = re.compile(
    r"(\d{4}-\d{2}-\d{2})(?:[Tt](\d{2}:\d{2}(?::\d{2})?)(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})?)?\Z"
)


def _camel(key: str) -> str:
    return _CAMEL.sub(lambda m: m.group(0)[1].upper(), key)


def _to_camel(item: Any) -> Any:
    """Lunary's ``recursiveToCamel``: every object key, at every depth."""
    if isinstance(item, list):
        return [_to_camel(v) for v in item]
    if isinstance(item, dict):
        return {_camel(str(k)): _to_camel(v) for k, v in item.items()}
    return item


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _clean_metadata(metadata: Any) -> dict[str, Any] | None:
    """``cleanMetadata``: first-level strings, numbers, booleans and arrays of those."""
    if not isinstance(metadata, dict):
        return None
    return {
        k: v
        for k, v in metadata.items()
        if k == "enrichment" or _scalar(v) or (isinstance(v, list) and all(map(_scalar, v)))
    }


def _parse_time_ms(value: Any) -> int | None:
    """JavaScript's ``new Date(value)`` for the forms Lunary sees: ISO 8601 text
    or epoch milliseconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    match = _ISO.match(value.strip())
    if match is None:
        return None
    day, clock, fraction, zone = match.groups()
    clock = clock or "00:00:00"
    if clock.count(":") == 1:
        clock += ":00"
    if zone in (None, "Z", "z"):
        zone = "+00:00"
    try:
        whole = datetime.fromisoformat(f"{day}T{clock}{zone}")
    except ValueError:
        return None
    return int(whole.timestamp()) * 1000 + int((fraction or "0")[:3].ljust(3, "0"))


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _sort_key(raw: Any) -> float:
    ms = _parse_time_ms(raw.get("timestamp")) if isinstance(raw, dict) else None
    return -math.inf if ms is None else float(ms)


def uuid_from_seed(seed: str) -> str:
    """Lunary's ``uuidFromSeed``: a UUID-shaped string from a SHA-256 hex digest."""
    h = hashlib.sha256(seed.encode("utf-8")).hexdigest()
    return f"{h[0:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:32]}"


def _clean(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _EventError("an event must be an object")
    event: dict[str, Any] = _to_camel(raw)
    kind = event.get("type")
    if not isinstance(kind, str) or kind not in EVENT_TYPES:
        raise _EventError(f"invalid event type {kind!r} (one of {', '.join(sorted(EVENT_TYPES))})")
    if not isinstance(event.get("event"), str) or not event["event"]:
        raise _EventError("event is required (start, end, error...)")
    rid = event.get("runId")
    if not isinstance(rid, str) or not rid:
        raise _EventError("runId is required")
    ms = _parse_time_ms(event.get("timestamp"))
    if ms is None:
        raise _EventError("Invalid time value (timestamp)")  # Date#toISOString's RangeError
    event["timestamp"] = _iso(ms)
    event["runId"] = rid if len(rid) == 36 else uuid_from_seed(rid)
    event["metadata"] = _clean_metadata(event.get("metadata"))
    name = event.get("name")
    event["name"] = name.replace("models/", "", 1) if isinstance(name, str) else None
    tags = event.get("tags")
    event["tags"] = [tags] if isinstance(tags, str) else tags
    return event


def _js_falsy(value: Any) -> bool:
    """``!value`` in JavaScript (an empty array or object is truthy there)."""
    if value is None or value is False or value == "":
        return True
    return isinstance(value, int | float) and not isinstance(value, bool) and not value


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return len(text) == 36


# -- on a real port -------------------------------------------------------------------


class RunningFakeLunary(RunningFake[FakeLunary]):
    """A ``FakeLunary`` listening on 127.0.0.1; ``stop()`` when done."""


def listen_fake_lunary(fake: FakeLunary, reactor: Any = None) -> RunningFakeLunary:
    """Serve ``fake`` on an OS-chosen port of 127.0.0.1 (for end-to-end tests)."""
    return listen(RunningFakeLunary, fake, reactor)
