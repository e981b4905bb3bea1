"""A faithful fake of Helicone's manual-logger endpoint (tests: tests/fakes/test_fake_helicone.py).

``FakeHelicone`` is a twisted.web resource implementing
``POST /custom/v1/log`` the way Helicone's worker does, from Helicone's docs
("Manual Logger - cURL", "Custom Logs with cURL", "Predefined Request IDs") and
the worker's source (``worker/src/lib/managers/AsyncLogManager.ts``,
``worker/src/lib/models/AsyncLog.ts``, ``lib/dbLogger/DBLoggable.ts``):

- The body is a ``HeliconeAsyncLogRequest``: ``providerRequest {url, json,
  meta}``, ``providerResponse {headers, status, json, textBody?}``, ``timing
  {startTime {seconds, milliseconds}, endTime {...}, timeToFirstToken?}``.
- In the worker's order: a body over 10 MiB is **400** ``Payload too large``; no
  ``Authorization`` header is **401** ``Unauthorized``; then
  ``validateAsyncLogModel`` answers **400** ``{"error": "<its message>"}`` when
  one of ``providerRequest``, ``providerResponse``, ``timing`` is missing, when
  ``providerRequest.url`` is not a string, ``meta`` not an object, ``json``
  missing, ``providerResponse.json`` missing, ``status`` not a number,
  ``headers`` not an object, any of ``startTime/endTime.seconds/milliseconds``
  not a number, the start after the end (``startTime cannot be greater than
  endTime``), or either negative; then a key Helicone does not know is **401**
  ``{"error": ...}``.
- ``providerRequest.meta`` is read as the request's headers (case-insensitive):
  ``Helicone-Request-Id`` names the request (a UUID; a random one otherwise),
  ``Helicone-User-Id`` the user, ``Helicone-Property-*`` the custom properties.
  Stored: **200** ``ok`` with a ``helicone-id`` header.  A ``textBody`` replaces
  ``json`` as the response body when present.

Where the worker is lax the fake is strict, so sink bugs show: ``meta`` and
``providerResponse.headers`` must map names to strings (the worker would coerce
anything through ``new Headers()``), ``timing.startTime``/``endTime`` must be
objects (the worker throws a TypeError), ``timeToFirstToken`` must be a number
when present, and a ``Helicone-Request-Id`` that is not a UUID is refused (400)
rather than failing later in Helicone's database.  Requests are stored by id: a
log sent again with the same ``Helicone-Request-Id`` replaces the first (counted
in ``duplicates``) — Helicone keys requests by that id.

For tests it records every request, stores the accepted logs, and plays
scripted answers first (``fail_next``: a status such as 429 with
``Retry-After`` or 500, a 200 ``{"error": ...}`` as the worker sends when it
cannot store a log, a hang, a reset).  Use it in memory with
``treq.testing.StubTreq(fake)`` or on a real port with
:func:`listen_fake_helicone`.
"""

from __future__ import annotations

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
    "LOG_PATH",
    "FakeHelicone",
    "Hang",
    "ReceivedRequest",
    "Reset",
    "Respond",
    "RunningFakeHelicone",
    "StoredLog",
    "listen_fake_helicone",
]

LOG_PATH = b"/custom/v1/log"
DEFAULT_KEY = "sk-helicone-fake0001-abcdefg-hijklmn-opqrstu"
MAX_PAYLOAD = 10 * 1024 * 1024


@attrs.frozen
class StoredLog:
    """One request as Helicone stored it."""

    request_id: str
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
        """The ``Helicone-Property-*`` values, by lower-case property name."""
        prefix = "helicone-property-"
        return {k[len(prefix) :]: v for k, v in self.meta.items() if k.startswith(prefix)}

    @property
    def user_id(self) -> str | None:
        return self.meta.get("helicone-user-id")

    @property
    def provider(self) -> str | None:
        return self.meta.get("helicone-provider")

    @property
    def request_json(self) -> Any:
        return self.provider_request.get("json")

    @property
    def response_json(self) -> Any:
        return self.provider_response.get("json")

    @property
    def response_body(self) -> str:
        """The response body as Helicone reads it: ``textBody`` if present, else
        ``json`` stringified."""
        text = self.provider_response.get("textBody")
        if text:
            return str(text)
        return orjson.dumps(self.provider_response.get("json")).decode()

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


class FakeHelicone(ScriptedResource):
    """Helicone's ``/custom/v1/log`` for one organisation.  See the module docstring."""

    def __init__(
        self,
        *,
        clock: IReactorTime | None = None,
        api_key: str = DEFAULT_KEY,
        path: bytes = LOG_PATH,
    ) -> None:
        super().__init__(clock)
        self.api_key = api_key
        self._path = path
        self.by_id: dict[str, StoredLog] = {}
        self.duplicates = 0

    # -- test helpers -------------------------------------------------------------

    @property
    def logs(self) -> list[StoredLog]:
        """The stored requests, in the order they were first stored."""
        return list(self.by_id.values())

    # -- the endpoint -------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        headers, body, method, path = read_request(request)

        def answer(status: int, reply: str, extra: Mapping[str, str] | None = None) -> bytes:
            self.requests.append(ReceivedRequest(method, path, headers, len(body), status, reply))
            request.setResponseCode(status)
            for name, value in (extra or {}).items():
                request.setHeader(name, value)  # type: ignore[no-untyped-call]
            return reply.encode("utf-8")

        if request.path != self._path or request.method != b"POST":
            return answer(400, "invalid path")  # the worker's catch-all route
        action = self.next_scripted()
        if action is not None:
            if not isinstance(action, Respond):
                self.requests.append(ReceivedRequest(method, path, headers, len(body), None, ""))
                return self._stall(request, action)
            if action.store:
                status, _, _ = self._log(headers, body)
                if status != 200:
                    raise AssertionError(f"Respond(store=True) but the log failed: {status}")
            return answer(action.status, action.body.decode("utf-8", "replace"), action.headers)
        status, reply, extra = self._log(headers, body)
        return answer(status, reply, extra)

    def _log(self, headers: Mapping[str, str], body: bytes) -> tuple[int, str, dict[str, str]]:
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
        elif not _is_uuid(request_id):
            return 400, _error(f"Helicone-Request-Id must be a UUID, not {request_id!r}"), {}
        if authorization != f"Bearer {self.api_key}":
            return 401, _error("Authentication failed: unknown API key"), {}
        if request_id in self.by_id:
            self.duplicates += 1
        self.by_id[request_id] = StoredLog(
            request_id=request_id,
            provider_request=model["providerRequest"],
            provider_response=model["providerResponse"],
            timing=model["timing"],
            authorization=authorization,
        )
        return 200, "ok", {"helicone-id": request_id}


def _error(message: str) -> str:
    return orjson.dumps({"error": message}).decode()


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


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return len(text) == 36


# -- on a real port -------------------------------------------------------------------


class RunningFakeHelicone(RunningFake[FakeHelicone]):
    """A ``FakeHelicone`` listening on 127.0.0.1; ``stop()`` when done."""

    @property
    def log_url(self) -> str:
        return self.url + LOG_PATH.decode()


def listen_fake_helicone(fake: FakeHelicone, reactor: Any = None) -> RunningFakeHelicone:
    """Serve ``fake`` on an OS-chosen port of 127.0.0.1 (for end-to-end tests)."""
    return listen(RunningFakeHelicone, fake, reactor)
