"""A faithful fake OTLP/HTTP receiver, JSON encoding (tests: tests/fakes/test_fake_otlp.py).

``FakeCollector`` is a twisted.web resource implementing the OTLP/HTTP
``/v1/traces`` and ``/v1/logs`` endpoints as the OpenTelemetry protocol
specification (opentelemetry-proto ``docs/specification.md``, "OTLP/HTTP") and
the proto definitions (``trace/v1/trace.proto``, ``logs/v1/logs.proto``,
``common/v1/common.proto``) define them:

- ``POST`` only; ``Content-Type: application/json`` (the fake does not decode
  binary protobuf: **415** for that and anything else, as the collector answers
  an unsupported media type); ``Content-Encoding: gzip`` or ``deflate`` may be
  used; the body is limited to 20 MiB after decompression (the recommended
  default): **413**, which clients must not retry.
- JSON Protobuf encoding with OTLP's deviations: ``traceId``/``spanId``/
  ``parentSpanId`` are *hex* strings, parsed the way the Collector parses them
  (open-telemetry/opentelemetry-collector ``pdata/internal/data/bytesid.go``,
  ``unmarshalJSON``): any length other than 32/16 characters is ``invalid
  length for ID`` (so a base64 id, 24/12 characters, is refused), then
  ``hex.Decode`` (either case; anything else is refused); enum fields (``kind``,
  ``status.code``, ``severityNumber``) must be JSON integers, never names; keys
  are lowerCamelCase and unknown keys are ignored (so a snake_case ``trace_id``
  counts as missing).  Proto3 JSON mapping otherwise: 64-bit integers
  (``startTimeUnixNano``, ``intValue``, ``timeUnixNano``…) as decimal strings or
  JSON integers; ``doubleValue`` a number (or ``"NaN"``, ``"Infinity"``,
  ``"-Infinity"``); ``bytesValue`` base64; an ``AnyValue`` holds at most one of
  ``stringValue``, ``boolValue``, ``intValue``, ``doubleValue``, ``arrayValue``
  ``{values}``, ``kvlistValue`` ``{values: [KeyValue]}``, ``bytesValue``.
- Bad data is **400** with a ``Status`` JSON body ``{"code": 3, "message"}``;
  nothing of the request is stored.  An empty request is a success.
- Success is **200** ``{}`` (``Content-Type: application/json``); a scripted
  partial success (``partial_next``) stores all but the last N items and answers
  ``{"partialSuccess": {"rejectedSpans"|"rejectedLogRecords": "N",
  "errorMessage": ...}}`` (an int64, so a string).
- Throttling: scripted **429**/**503** with ``Retry-After`` (``fail_next``).

Stricter than a collector, so sink bugs show: every span must have a non-empty
``name``, non-zero ``traceId``/``spanId`` and both times, with the end not
before the start; attribute keys must be non-empty; a log record's ids are
empty or valid.

For tests it records every request and stores decoded spans and log records
(attributes as Python values).  Use it in memory with
``treq.testing.StubTreq(fake)`` or on a real port with
:func:`listen_fake_collector`.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import zlib
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
    "LOGS_PATH",
    "TRACES_PATH",
    "FakeCollector",
    "Hang",
    "ReceivedRequest",
    "Reset",
    "Respond",
    "RunningFakeCollector",
    "StoredLogRecord",
    "StoredSpan",
    "listen_fake_collector",
]

TRACES_PATH = b"/v1/traces"
LOGS_PATH = b"/v1/logs"
MAX_BODY = 20 * 1024 * 1024
UINT64 = 1 << 64
INT64 = 1 << 63
_HEX = re.compile(r"[0-9a-fA-F]*\Z")
_DECIMAL = re.compile(r"-?[0-9]+\Z")
_VALUE_KINDS = (
    "stringValue",
    "boolValue",
    "intValue",
    "doubleValue",
    "arrayValue",
    "kvlistValue",
    "bytesValue",
)


@attrs.frozen
class StoredSpan:
    """One span as the receiver decoded it."""

    resource: Mapping[str, Any]
    scope: Mapping[str, Any]
    trace_id: str  # lower-case hex
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: Mapping[str, Any]
    status_code: int
    status_message: str
    raw: Mapping[str, Any]


@attrs.frozen
class StoredLogRecord:
    """One log record as the receiver decoded it."""

    resource: Mapping[str, Any]
    scope: Mapping[str, Any]
    time_ns: int
    observed_time_ns: int
    severity_number: int
    severity_text: str
    body: Any
    attributes: Mapping[str, Any]
    trace_id: str
    span_id: str
    event_name: str
    raw: Mapping[str, Any]


class _BadData(Exception):
    """The request cannot be decoded or is invalid: 400, nothing stored."""


@attrs.frozen
class _Partial:
    rejected: int
    message: str


class FakeCollector(ScriptedResource):
    """An OTLP/HTTP JSON receiver for traces and logs.  See the module docstring."""

    def __init__(self, *, clock: IReactorTime | None = None, max_body: int = MAX_BODY) -> None:
        super().__init__(clock)
        self._max_body = max_body
        self._partial: list[_Partial] = []
        self.spans: list[StoredSpan] = []
        self.log_records: list[StoredLogRecord] = []

    # -- test helpers -------------------------------------------------------------

    def partial_next(self, rejected: int, message: str = "") -> None:
        """The next valid export is a partial success refusing its last ``rejected``
        items (0 with a message: a warning on a full success)."""
        self._partial.append(_Partial(rejected, message))

    # -- the endpoint -------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        headers, body, method, path = read_request(request)

        def answer(status: int, doc: Any, extra: Mapping[str, str] | None = None) -> bytes:
            data = orjson.dumps(doc)
            reply = data.decode()
            self.requests.append(ReceivedRequest(method, path, headers, len(body), status, reply))
            request.setResponseCode(status)
            request.setHeader(b"content-type", b"application/json")  # type: ignore[no-untyped-call]
            for name, value in (extra or {}).items():
                request.setHeader(name, value)  # type: ignore[no-untyped-call]
            return data

        if request.path not in (TRACES_PATH, LOGS_PATH):
            return answer(404, {"code": 5, "message": "404 page not found"})
        if request.method != b"POST":
            return answer(405, {"code": 12, "message": f"{method} method not allowed"})
        action = self.next_scripted()
        if action is not None:
            if not isinstance(action, Respond):
                self.requests.append(ReceivedRequest(method, path, headers, len(body), None, ""))
                return self._stall(request, action)
            if action.store:
                status, _ = self._export(request.path, headers, body)
                if status != 200:
                    raise AssertionError(f"Respond(store=True) but the export failed: {status}")
            text = action.body.decode("utf-8", "replace")
            self.requests.append(
                ReceivedRequest(method, path, headers, len(body), action.status, text)
            )
            request.setResponseCode(action.status)
            for name, value in action.headers.items():
                request.setHeader(name, value)  # type: ignore[no-untyped-call]
            return action.body
        status, doc = self._export(request.path, headers, body)
        return answer(status, doc)

    def _export(self, path: bytes, headers: Mapping[str, str], body: bytes) -> tuple[int, Any]:
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            return 415, {
                "code": 3,
                "message": f"415 unsupported media type {media or '(none)'!r}: this fake "
                "receiver decodes application/json only",
            }
        encoding = headers.get("content-encoding", "").strip().lower()
        try:
            data = _decompress(encoding, body, self._max_body)
        except _BadData as e:
            return 400, {"code": 3, "message": str(e)}
        if data is None:
            return 413, {"code": 8, "message": f"request body larger than {self._max_body} bytes"}
        try:
            doc = orjson.loads(data) if data.strip() else {}
        except orjson.JSONDecodeError as e:
            return 400, {"code": 3, "message": f"proto: syntax error: {e}"}
        logs = path == LOGS_PATH
        try:
            items: list[Any] = _logs(doc) if logs else _traces(doc)
        except _BadData as e:
            return 400, {"code": 3, "message": str(e)}
        partial = self._partial.pop(0) if self._partial and items else None
        keep = len(items) - (min(partial.rejected, len(items)) if partial else 0)
        if logs:
            self.log_records.extend(items[:keep])
        else:
            self.spans.extend(items[:keep])
        if partial is None:
            return 200, {}
        field = "rejectedLogRecords" if logs else "rejectedSpans"
        reply: dict[str, Any] = {field: str(len(items) - keep)}
        if partial.message:
            reply["errorMessage"] = partial.message
        return 200, {"partialSuccess": reply}


def _decompress(encoding: str, body: bytes, limit: int) -> bytes | None:
    """The body after Content-Encoding, or None when over ``limit``."""
    if len(body) > limit and encoding in ("", "identity"):
        return None
    try:
        if encoding in ("", "identity"):
            return body
        if encoding == "gzip":
            d = zlib.decompressobj(31)
        elif encoding == "deflate":
            d = zlib.decompressobj(15 if body[:1] == b"\x78" else -15)
        else:
            raise _BadData(f"unsupported Content-Encoding {encoding!r}")
        out = d.decompress(body, limit + 1)
    except (zlib.error, OSError, EOFError) as e:
        raise _BadData(f"{encoding}: invalid data ({e})") from None
    return None if len(out) > limit else out


# -- decoding (proto3 JSON mapping + OTLP deviations) -----------------------------------


def _obj(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _BadData(f"{where}: expected an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _BadData(f"{where}: expected an array")
    return value


def _str(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _BadData(f"{where}: expected a string")
    return value


def _hex_id(value: Any, size: int, where: str, *, required: bool) -> str:
    """A trace (16 bytes) or span (8 bytes) id: hex, case-insensitive, not base64."""
    text = _str(value, where)
    if not text:
        if required:
            raise _BadData(f"{where}: required (hex-encoded, {size * 2} characters)")
        return ""
    if len(text) != size * 2:
        raise _BadData(
            f"{where}: invalid length for ID: {len(text)} characters, want {size * 2} hex "
            "characters (OTLP/JSON ids are hex, not base64)"
        )
    if not _HEX.match(text):
        raise _BadData(f"{where}: invalid hex id {text!r}")
    if required and not any(binascii.unhexlify(text)):
        raise _BadData(f"{where}: an all-zero id is invalid")
    return text.lower()


def _integer(value: Any, where: str, low: int, high: int) -> int:
    """A 64-bit (or 32-bit) integer field: a JSON integer or a decimal string."""
    if isinstance(value, bool):
        raise _BadData(f"{where}: expected an integer, got a boolean")
    if isinstance(value, float):
        if not value.is_integer():
            raise _BadData(f"{where}: expected an integer, got {value!r}")
        value = int(value)
    if isinstance(value, str):
        if not _DECIMAL.match(value):
            raise _BadData(f"{where}: invalid integer string {value!r}")
        value = int(value)
    if not isinstance(value, int):
        raise _BadData(f"{where}: expected an integer (a number or a decimal string)")
    if not low <= value < high:
        raise _BadData(f"{where}: {value} out of range")
    return value


def _uint64(value: Any, where: str, *, required: bool = False) -> int:
    if value is None:
        if required:
            raise _BadData(f"{where}: required")
        return 0
    return _integer(value, where, 0, UINT64)


def _uint32(value: Any, where: str) -> int:
    return 0 if value is None else _integer(value, where, 0, 1 << 32)


def _enum(value: Any, where: str, known: range) -> int:
    """OTLP/JSON: "Values of enum fields MUST be encoded as integer values"."""
    if value is None:
        return 0
    if isinstance(value, str):
        raise _BadData(f"{where}: enum values must be integers, not names ({value!r})")
    number = _integer(value, where, -(1 << 31), 1 << 31)
    if number not in known:
        raise _BadData(f"{where}: unknown value {number}")
    return number


def _double(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise _BadData(f"{where}: expected a number")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        special = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
        if value in special:
            return special[value]
        try:
            return float(value)
        except ValueError:
            pass
    raise _BadData(f"{where}: expected a number")


def _any_value(value: Any, where: str) -> Any:
    v = _obj(value, where)
    present = [k for k in _VALUE_KINDS if k in v and v[k] is not None]
    if len(present) > 1:
        raise _BadData(f"{where}: an AnyValue holds one value, got {', '.join(present)}")
    if not present:
        return None
    kind = present[0]
    item = v[kind]
    here = f"{where}.{kind}"
    if kind == "stringValue":
        return _str(item, here)
    if kind == "boolValue":
        if not isinstance(item, bool):
            raise _BadData(f"{here}: expected true or false")
        return item
    if kind == "intValue":
        return _integer(item, here, -INT64, INT64)
    if kind == "doubleValue":
        return _double(item, here)
    if kind == "arrayValue":
        array = _obj(item, here)
        return [
            _any_value(x, f"{here}.values[{i}]")
            for i, x in enumerate(_list(array.get("values"), f"{here}.values"))
        ]
    if kind == "kvlistValue":
        return _attributes(_obj(item, here).get("values"), f"{here}.values")
    if not isinstance(item, str):
        raise _BadData(f"{here}: expected a base64 string")
    try:
        return base64.b64decode(item, validate=True)
    except binascii.Error:
        raise _BadData(f"{here}: invalid base64") from None


def _attributes(value: Any, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, kv in enumerate(_list(value, where)):
        here = f"{where}[{i}]"
        item = _obj(kv, here)
        key = _str(item.get("key"), f"{here}.key")
        if not key:
            raise _BadData(f"{here}.key: attribute keys must be non-empty")
        out[key] = _any_value(item.get("value"), f"{here}.value")
    return out


def _resource_and_scopes(
    raw: Any, where: str, scopes_key: str
) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any], dict[str, Any]]]]:
    item = _obj(raw, where)
    resource = _obj(item.get("resource"), f"{where}.resource")
    resource_attrs = _attributes(resource.get("attributes"), f"{where}.resource.attributes")
    _uint32(resource.get("droppedAttributesCount"), f"{where}.resource.droppedAttributesCount")
    _str(item.get("schemaUrl"), f"{where}.schemaUrl")
    scopes = []
    for j, raw_scope in enumerate(_list(item.get(scopes_key), f"{where}.{scopes_key}")):
        here = f"{where}.{scopes_key}[{j}]"
        scope_item = _obj(raw_scope, here)
        scope = _obj(scope_item.get("scope"), f"{here}.scope")
        decoded_scope = {
            "name": _str(scope.get("name"), f"{here}.scope.name"),
            "version": _str(scope.get("version"), f"{here}.scope.version"),
            "attributes": _attributes(scope.get("attributes"), f"{here}.scope.attributes"),
        }
        scopes.append((here, decoded_scope, scope_item))
    return resource_attrs, scopes


def _traces(doc: Any) -> list[StoredSpan]:
    """An ``ExportTraceServiceRequest``, decoded and checked."""
    top = _obj(doc, "ExportTraceServiceRequest")
    spans: list[StoredSpan] = []
    for i, raw in enumerate(_list(top.get("resourceSpans"), "resourceSpans")):
        resource, scopes = _resource_and_scopes(raw, f"resourceSpans[{i}]", "scopeSpans")
        for here, scope, scope_item in scopes:
            for k, raw_span in enumerate(_list(scope_item.get("spans"), f"{here}.spans")):
                spans.append(_span(raw_span, f"{here}.spans[{k}]", resource, scope))
    return spans


def _span(raw: Any, where: str, resource: dict[str, Any], scope: dict[str, Any]) -> StoredSpan:
    span = _obj(raw, where)
    name = _str(span.get("name"), f"{where}.name")
    if not name:
        raise _BadData(f"{where}.name: a span needs a name")
    start = _uint64(span.get("startTimeUnixNano"), f"{where}.startTimeUnixNano", required=True)
    end = _uint64(span.get("endTimeUnixNano"), f"{where}.endTimeUnixNano", required=True)
    if end < start:
        raise _BadData(f"{where}: endTimeUnixNano is before startTimeUnixNano")
    status = _obj(span.get("status"), f"{where}.status")
    for j, event in enumerate(_list(span.get("events"), f"{where}.events")):
        e = _obj(event, f"{where}.events[{j}]")
        _uint64(e.get("timeUnixNano"), f"{where}.events[{j}].timeUnixNano")
        _str(e.get("name"), f"{where}.events[{j}].name")
        _attributes(e.get("attributes"), f"{where}.events[{j}].attributes")
    for j, link in enumerate(_list(span.get("links"), f"{where}.links")):
        lk = _obj(link, f"{where}.links[{j}]")
        _hex_id(lk.get("traceId"), 16, f"{where}.links[{j}].traceId", required=True)
        _hex_id(lk.get("spanId"), 8, f"{where}.links[{j}].spanId", required=True)
        _attributes(lk.get("attributes"), f"{where}.links[{j}].attributes")
    _uint32(span.get("droppedAttributesCount"), f"{where}.droppedAttributesCount")
    _uint32(span.get("flags"), f"{where}.flags")
    _str(span.get("traceState"), f"{where}.traceState")
    return StoredSpan(
        resource=resource,
        scope=scope,
        trace_id=_hex_id(span.get("traceId"), 16, f"{where}.traceId", required=True),
        span_id=_hex_id(span.get("spanId"), 8, f"{where}.spanId", required=True),
        parent_span_id=_hex_id(
            span.get("parentSpanId"), 8, f"{where}.parentSpanId", required=False
        ),
        name=name,
        kind=_enum(span.get("kind"), f"{where}.kind", range(6)),
        start_ns=start,
        end_ns=end,
        attributes=_attributes(span.get("attributes"), f"{where}.attributes"),
        status_code=_enum(status.get("code"), f"{where}.status.code", range(3)),
        status_message=_str(status.get("message"), f"{where}.status.message"),
        raw=span,
    )


def _logs(doc: Any) -> list[StoredLogRecord]:
    """An ``ExportLogsServiceRequest``, decoded and checked."""
    top = _obj(doc, "ExportLogsServiceRequest")
    records: list[StoredLogRecord] = []
    for i, raw in enumerate(_list(top.get("resourceLogs"), "resourceLogs")):
        resource, scopes = _resource_and_scopes(raw, f"resourceLogs[{i}]", "scopeLogs")
        for here, scope, scope_item in scopes:
            for k, raw_record in enumerate(
                _list(scope_item.get("logRecords"), f"{here}.logRecords")
            ):
                where = f"{here}.logRecords[{k}]"
                record = _obj(raw_record, where)
                _uint32(record.get("droppedAttributesCount"), f"{where}.droppedAttributesCount")
                _uint32(record.get("flags"), f"{where}.flags")
                records.append(
                    StoredLogRecord(
                        resource=resource,
                        scope=scope,
                        time_ns=_uint64(record.get("timeUnixNano"), f"{where}.timeUnixNano"),
                        observed_time_ns=_uint64(
                            record.get("observedTimeUnixNano"), f"{where}.observedTimeUnixNano"
                        ),
                        severity_number=_enum(
                            record.get("severityNumber"), f"{where}.severityNumber", range(25)
                        ),
                        severity_text=_str(record.get("severityText"), f"{where}.severityText"),
                        body=_any_value(record.get("body"), f"{where}.body"),
                        attributes=_attributes(record.get("attributes"), f"{where}.attributes"),
                        trace_id=_hex_id(
                            record.get("traceId"), 16, f"{where}.traceId", required=False
                        ),
                        span_id=_hex_id(record.get("spanId"), 8, f"{where}.spanId", required=False),
                        event_name=_str(record.get("eventName"), f"{where}.eventName"),
                        raw=record,
                    )
                )
    return records


# -- on a real port -------------------------------------------------------------------


class RunningFakeCollector(RunningFake[FakeCollector]):
    """A ``FakeCollector`` listening on 127.0.0.1; ``stop()`` when done."""


def listen_fake_collector(fake: FakeCollector, reactor: Any = None) -> RunningFakeCollector:
    """Serve ``fake`` on an OS-chosen port of 127.0.0.1 (for end-to-end tests)."""
    return listen(RunningFakeCollector, fake, reactor)
