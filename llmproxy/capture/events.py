"""The canonical event model (tests: tests/unit/test_events.py).

An :class:`~llmproxy.capture.record.ExchangeRecord` becomes two events:

- ``request``, published when the request body has been read.  Built from
  request-side fields only: the proxy keeps filling the record's response side
  while this event waits in an exporter, and the event must not change with it.
- ``response``, published when the exchange ends.  Self-contained: it repeats
  the request summary, headers and body, so a sink needing both (Helicone,
  Lunary, OTLP) never joins two records.

The events are frozen attrs classes, unstructured by a cattrs converter into
JSON-ready dicts (strings, ints, floats, bools, None, lists, dicts).  Timestamps
are RFC 3339 UTC strings with nanoseconds (``2026-11-23T07:40:12.123456789Z``),
``ts``/``ts_ns`` is the event time: the arrival for ``request``, the end for
``response``.

Bodies are :class:`~llmproxy.capture.body.CapturedBody` dicts.  For a stream
(``text/event-stream``) the text is carried once, in ``response_chunks``
(``[{"offset_ms": ..., "data": ...}]``, decoded, within the cap; joined they
are the body text) and ``response_body`` holds only sizes, flags and notes:
repeating a long stream in two fields would double every Loki line.  Use
:func:`response_text` to read the body of either kind.

:class:`RecordEnvelope` is what the proxy publishes: constructing it stores two
references; all the work happens in ``payload()``, off the request path.
"""

from __future__ import annotations

import codecs
import functools
import time
import types
from collections.abc import Sequence
from typing import Any, Union, get_args, get_origin

import attrs
import cattrs
import orjson

from llmproxy.capture.body import (
    CapturedBody,
    ContentDecoder,
    capture_body,
    content_codings,
    media_type,
)
from llmproxy.capture.machine import machine_id
from llmproxy.capture.obfuscate import HeaderObfuscator, mask_query, mask_url, scrub_text
from llmproxy.capture.record import ExchangeRecord, Headers
from llmproxy.capture.sse import SSEEvent, SSEParser
from llmproxy.capture.usage import (
    EMPTY_FACTS,
    ResponseFacts,
    Usage,
    facts_from_json,
    facts_from_sse,
    model_from_prefix,
)
from llmproxy.settings import CaptureSettings

SCHEMA_VERSION = 1
EVENT_KINDS = ("request", "response")

JSONHeaders = dict[str, str | list[str]]


@attrs.frozen(kw_only=True)
class RequestEvent:
    schema: int = SCHEMA_VERSION
    type: str  # the event kind: "request" | "response"
    ts: str
    ts_ns: int
    request_id: str
    session_id: str | None
    seq: int | None
    start: str
    method: str
    path: str
    query: str
    route: str
    provider: str
    upstream_host: str
    upstream_url: str
    # The model the exchange is about: the response's when known, else the request's.
    model: str | None
    request_model: str | None
    # request: the client asked for a stream; response: the response was SSE.
    is_stream: bool
    client_addr: str
    machine: str
    environment: str
    request_headers: JSONHeaders
    request_body: CapturedBody


@attrs.frozen(kw_only=True)
class ResponseEvent(RequestEvent):
    first_byte: str | None
    end: str | None
    duration_ms: float | None
    ttfb_ms: float | None
    status: int | None
    outcome: str
    error: str | None
    cache_status: str | None
    response_model: str | None
    usage: Usage | None
    finish_reasons: list[str]
    response_headers: JSONHeaders
    response_body: CapturedBody
    response_chunks: list[dict[str, Any]] | None


def _passthrough(value: Any) -> Any:
    return value


_SCALARS = (str, int, float, bool, type(None))


def _is_json_ready(type_: Any) -> bool:
    """Types whose values are already JSON-ready as built here.

    Header dicts, chunk lists and reason lists are built JSON-ready, and scalars
    and optional scalars need no work; cattrs would otherwise walk containers
    element by element and dispatch every ``str | None`` at run time.
    """
    if type_ in (dict, list) or get_origin(type_) in (dict, list):
        return True
    if isinstance(type_, types.UnionType) or get_origin(type_) is Union:
        return all(arg in _SCALARS or _is_json_ready(arg) for arg in get_args(type_))
    return False


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter()
    converter.register_unstructure_hook_func(_is_json_ready, _passthrough)
    return converter


converter = _make_converter()


# ---------------------------------------------------------------- time


@functools.lru_cache(maxsize=1024)
def _utc_second(second: int) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    except (OverflowError, OSError, ValueError):
        return "1970-01-01T00:00:00"


def rfc3339_ns(ns: int) -> str:
    """Epoch nanoseconds -> ``2026-11-23T07:40:12.123456789Z``."""
    second, fraction = divmod(ns, 1_000_000_000)
    return f"{_utc_second(second)}.{fraction:09d}Z"


def epoch_ns(seconds: float) -> int:
    # Through microseconds: a float epoch holds no more, and scaling it by 1e9
    # directly would invent digits past 2**53.
    return round(seconds * 1_000_000) * 1000


def _offset_ns(start_ns: int, offset: float | None) -> int | None:
    return None if offset is None else start_ns + round(offset * 1_000_000_000)


def _ms(offset: float | None) -> float | None:
    return None if offset is None else round(offset * 1000.0, 3)


# ---------------------------------------------------------------- pieces


def _header(headers: Headers, name: bytes) -> str | None:
    for raw_name, raw_value in headers:
        if raw_name.lower() == name:
            return raw_value.decode("latin-1")
    return None


@attrs.frozen
class _RequestSide:
    fields: dict[str, Any]
    start_ns: int


def _request_model_and_stream(body: CapturedBody) -> tuple[str | None, bool]:
    text = body.text
    if not text or text[0] not in "{ \t\r\n":
        return None, False
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        # Cut at the cap: the model usually comes first and is still there.
        return model_from_prefix(text.encode("utf-8")), False
    if not isinstance(obj, dict):
        return None, False
    model = obj.get("model")
    return (model if isinstance(model, str) else None), obj.get("stream") is True


def _request_side(record: ExchangeRecord, capture: CaptureSettings) -> _RequestSide:
    """Everything both events say about the request.  Reads request fields only."""
    obfuscator = HeaderObfuscator.for_names(capture.redact_headers)
    headers = record.request_headers
    raw = record.request_body
    body = capture_body(
        raw,
        size=max(record.request_body_size, len(raw)),
        truncated=record.request_body_size > len(raw),
        content_type=_header(headers, b"content-type"),
        content_encoding=_header(headers, b"content-encoding"),
        limit=capture.request_body_bytes,
    )
    model, stream = _request_model_and_stream(body)
    start_ns = epoch_ns(record.started_at)
    start = rfc3339_ns(start_ns)
    fields = {
        "ts": start,
        "ts_ns": start_ns,
        "request_id": record.request_id,
        "session_id": record.session_id,
        "seq": record.seq,
        "start": start,
        "method": record.method,
        "path": record.path,
        "query": mask_query(record.query),
        "route": record.route,
        "provider": record.provider,
        "upstream_host": record.upstream_host,
        "upstream_url": mask_url(record.upstream_url),
        "model": model,
        "request_model": model,
        "is_stream": stream,
        "client_addr": record.client_addr,
        "machine": record.machine or machine_id(),
        "environment": record.environment,
        "request_headers": obfuscator.obfuscate(headers),
        "request_body": body,
    }
    return _RequestSide(fields, start_ns)


@attrs.frozen
class _StreamCapture:
    chunks: list[dict[str, Any]]
    events: list[SSEEvent]
    captured_bytes: int
    truncated: bool
    decode_error: str | None


def _stream_capture(
    chunks: Sequence[tuple[float, bytes]], content_encoding: str | None, limit: int
) -> _StreamCapture:
    """Decode stream chunks one by one, so each keeps its arrival offset."""
    decoder = ContentDecoder(content_encoding, limit) if content_codings(content_encoding) else None
    text = codecs.getincrementaldecoder("utf-8")("replace")
    parser = SSEParser()
    out: list[dict[str, Any]] = []
    events: list[SSEEvent] = []
    captured = 0
    for offset, raw in chunks:
        data = raw if decoder is None else decoder.feed(raw)
        if decoder is not None and decoder.error is not None:
            # Undecodable: fall back to the bytes as sent, with the reason.
            fallback = _stream_capture(chunks, None, limit)
            return attrs.evolve(fallback, decode_error=decoder.error)
        captured += len(data)
        events.extend(parser.feed(data))
        # A character split across chunks is carried by the chunk completing it.
        out.append({"offset_ms": round(offset * 1000.0, 3), "data": text.decode(data)})
    tail = text.decode(b"", final=True)
    if tail and out:
        out[-1]["data"] += tail
    events.extend(parser.close())
    return _StreamCapture(
        chunks=out,
        events=events,
        captured_bytes=captured,
        truncated=decoder is not None and decoder.truncated,
        decode_error=None,
    )


def _looks_like_json(text: str, content_type: str | None) -> bool:
    return media_type(content_type).endswith("json") or text.lstrip()[:1] in ("{", "[")


# ---------------------------------------------------------------- events


def build_request_event(record: ExchangeRecord, capture: CaptureSettings) -> RequestEvent:
    side = _request_side(record, capture)
    return RequestEvent(type="request", **side.fields)


def build_response_event(
    record: ExchangeRecord, capture: CaptureSettings
) -> tuple[ResponseEvent, ResponseFacts]:
    side = _request_side(record, capture)
    obfuscator = HeaderObfuscator.for_names(capture.redact_headers)
    headers = record.response_headers
    content_type = _header(headers, b"content-type")
    content_encoding = _header(headers, b"content-encoding")
    chunks = record.response_chunks
    captured_raw = sum(len(chunk) for _, chunk in chunks)
    size = max(record.response_body_size, captured_raw)
    truncated = record.response_truncated or size > captured_raw
    is_stream = media_type(content_type) == "text/event-stream"
    stream_chunks: list[dict[str, Any]] | None = None
    if is_stream:
        stream = _stream_capture(chunks, content_encoding, capture.response_body_bytes)
        stream_chunks = stream.chunks
        body = CapturedBody(
            size=size,
            captured_bytes=stream.captured_bytes,
            truncated=truncated or stream.truncated,
            content_encoding=content_encoding.strip() if content_encoding else None,
            decode_error=stream.decode_error,
        )
        facts = facts_from_sse(stream.events)
    else:
        body = capture_body(
            b"".join(chunk for _, chunk in chunks),
            size=size,
            truncated=truncated,
            content_type=content_type,
            content_encoding=content_encoding,
            limit=capture.response_body_bytes,
        )
        text = body.text
        facts = (
            EMPTY_FACTS
            if text is None or not _looks_like_json(text, content_type)
            else (facts_from_json(text))
        )
    start_ns = side.start_ns
    end_ns = _offset_ns(start_ns, record.ended_at)
    ts_ns = end_ns if end_ns is not None else start_ns
    fields = side.fields
    fields.update(
        ts=rfc3339_ns(ts_ns),
        ts_ns=ts_ns,
        model=facts.model or fields["request_model"],
        is_stream=is_stream,
    )
    first_byte_ns = _offset_ns(start_ns, record.first_byte_at)
    event = ResponseEvent(
        type="response",
        first_byte=None if first_byte_ns is None else rfc3339_ns(first_byte_ns),
        end=None if end_ns is None else rfc3339_ns(end_ns),
        duration_ms=_ms(record.ended_at),
        ttfb_ms=_ms(record.first_byte_at),
        status=record.status,
        outcome=record.outcome,
        error=None if record.error is None else scrub_text(record.error),
        cache_status=record.cache_status,
        response_model=facts.model,
        usage=facts.usage,
        finish_reasons=list(facts.finish_reasons),
        response_headers=obfuscator.obfuscate(headers),
        response_body=body,
        response_chunks=stream_chunks,
        **fields,
    )
    return event, facts


def request_event(record: ExchangeRecord, capture: CaptureSettings) -> dict[str, Any]:
    """The ``request`` event dict of an exchange (request-side fields only)."""
    result: dict[str, Any] = converter.unstructure(build_request_event(record, capture))
    return result


def response_event(record: ExchangeRecord, capture: CaptureSettings) -> dict[str, Any]:
    """The ``response`` event dict of a finished exchange."""
    result: dict[str, Any] = converter.unstructure(build_response_event(record, capture)[0])
    return result


# ---------------------------------------------------------------- reading events back


def response_text(payload: dict[str, Any]) -> str | None:
    """The captured response body text of a ``response`` event, stream or not."""
    chunks = payload.get("response_chunks")
    if isinstance(chunks, list):
        return "".join(str(c.get("data", "")) for c in chunks if isinstance(c, dict))
    body = payload.get("response_body")
    text = body.get("text") if isinstance(body, dict) else None
    return text if isinstance(text, str) else None


def facts_of(payload: dict[str, Any]) -> ResponseFacts:
    """Response facts of a ``response`` event dict (e.g. one read back from the spool).

    Sinks that need the reply or the merged response object (Lunary, Helicone,
    the session tracker) call this; it never raises.
    """
    try:
        text = response_text(payload)
        if text is None:
            return EMPTY_FACTS
        if isinstance(payload.get("response_chunks"), list):
            parser = SSEParser()
            data = text.encode("utf-8")
            return facts_from_sse(parser.feed(data) + parser.close())
        return facts_from_json(text)
    except Exception:
        return EMPTY_FACTS


# ---------------------------------------------------------------- the envelope

# Per-chunk JSON overhead ({"offset_ms":..., "data":"..."}) and escaping, roughly.
_CHUNK_OVERHEAD = 48


@attrs.define(eq=False)
class RecordEnvelope:
    """An ``Envelope`` over an exchange record.

    Construction only stores references (it happens on the request path); the
    event is built on the first ``payload()`` call, in the exporter.  A
    ``request`` envelope reads request-side fields only, so it is safe to build
    its payload while the proxy still fills the record's response side; the
    session id and seq, which a tracker may still assign, are the ones the
    record had when the envelope was made.
    """

    kind: str = attrs.field(validator=attrs.validators.in_(EVENT_KINDS))
    _record: ExchangeRecord
    _capture: CaptureSettings
    _session_id: str | None = attrs.field(init=False, repr=False)
    _seq: int | None = attrs.field(init=False, repr=False)
    _payload: dict[str, Any] | None = attrs.field(default=None, init=False, repr=False)
    _encoded: bytes | None = attrs.field(default=None, init=False, repr=False)
    _facts: ResponseFacts | None = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._session_id = self._record.session_id
        self._seq = self._record.seq

    @property
    def size_hint(self) -> int:
        record = self._record
        size = len(record.request_body) + 1024
        if self.kind == "response":
            size += (
                min(record.response_body_size, self._capture.response_body_bytes)
                + len(record.response_chunks) * _CHUNK_OVERHEAD
            )
        return size

    def payload(self) -> dict[str, Any]:
        if self._payload is None:
            if self.kind == "request":
                payload = request_event(self._record, self._capture)
                payload["session_id"] = self._session_id
                payload["seq"] = self._seq
                self._payload = payload
                self._facts = EMPTY_FACTS
            else:
                event, self._facts = build_response_event(self._record, self._capture)
                self._payload = converter.unstructure(event)
        return self._payload

    def json(self) -> bytes:
        if self._encoded is None:
            self._encoded = orjson.dumps(self.payload())
        return self._encoded

    def facts(self) -> ResponseFacts:
        """The response facts computed with the payload (empty for ``request``)."""
        self.payload()
        assert self._facts is not None
        return self._facts
