"""The canonical event model
(tests: tests/unit/capture/test_events.py, tests/unit/capture/test_events_reference.py).

An :class:`~llmproxy.capture.record.ExchangeRecord` becomes two events:

- ``request``, published when the request body has been read.  Built from
  request-side fields only: the proxy keeps filling the record's response side
  while this event waits in an exporter, and the event must not change with it.
- ``response``, published when the exchange ends.  Self-contained: it repeats
  the request summary, headers and body, so a sink needing both (Helicone,
  Lunary, OTLP) never joins two records.

An answer from the response cache makes the same two events; its ``response``
says so in ``cache_status`` (``hit``, ``conditional-hit``), ``cache_key`` and
``cache_age_s``, and its body is the one the client got (docs/sinks.md,
"Answers from the cache").

The schema is the frozen attrs classes :class:`RequestEvent` and
:class:`ResponseEvent`; ``build_request_event`` / ``build_response_event`` build
them, and the cattrs ``converter`` unstructures them into JSON-ready dicts
(strings, ints, floats, bools, None, lists, dicts).  That is the reference form.
The hot path (:func:`request_event`, :func:`response_event` and the envelope)
builds the very same dicts directly, with the same keys in the same order, at a
fraction of the cost (tests/unit/capture/test_events_reference.py asserts both agree on
arbitrary records).  Timestamps are RFC 3339 UTC strings with nanoseconds
(``2026-11-23T07:40:12.123456789Z``), ``ts``/``ts_ns`` is the event time: the
arrival for ``request``, the end for ``response``.

Bodies are :class:`~llmproxy.capture.body.CapturedBody` dicts.  For a stream
(``text/event-stream``) the text is carried once, in ``response_chunks``: the
decoded text of each read, in order, within the cap (joined they are the body
text), with ``response_chunk_offsets_ms``, each read's arrival offset from the
exchange's start in milliseconds to the microsecond (the same length; a
character split across two reads belongs to the read completing it).
``response_body`` then holds only sizes, flags and notes: repeating a long
stream in two fields would double every Loki line.  Both keys are null for a
body that is not a stream.  Two flat lists rather than a dict per read
(``[{"offset_ms": ..., "data": ...}]``, the shape before): the dicts were about
half the cost of a 100-chunk stream's chunk list and ~8 % of its line (docs/
performance.md, "A stream").  Events of that
older shape still wait in spools, dead-letter files and Redis streams after an
upgrade; every reader takes both (:func:`llmproxy.events.facts.response_text`,
:func:`llmproxy.events.facts.chunk_texts`).  Use ``response_text`` to read the
body of either kind.

:class:`RecordEnvelope` is what the proxy publishes: constructing it stores two
references; all the work happens in ``payload()``, off the request path.  The
request side of an exchange (obfuscated headers, captured body, requested model,
start time) is computed once per record and shared by its two envelopes.
"""

from __future__ import annotations

import codecs
import functools
import operator
import types
import weakref
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
    content_headers,
    is_binary_type,
    media_type,
)
from llmproxy.capture.obfuscate import (
    HeaderObfuscator,
    mask_body_keys,
    mask_query,
    mask_url,
    mask_userinfo,
    mask_values,
    scrub_text,
)
from llmproxy.capture.record import ExchangeRecord, Headers
from llmproxy.config.model import CaptureSettings
from llmproxy.events.machine import machine_id
from llmproxy.events.sse import SSEEvent, SSEParser, sse_fields
from llmproxy.events.time import epoch_ns, ms3, ms3_each, rfc3339_ns, s3
from llmproxy.events.usage import (
    EMPTY_FACTS,
    ResponseFacts,
    Usage,
    facts_from_json,
    facts_from_sse,
    facts_from_sse_fields,
    model_from_prefix,
    summary_from_json,
    summary_from_sse_fields,
    summary_from_sse_text,
    usage_dict,
)
from llmproxy.http.headers import upstream_request_id

__all__ = [
    "EVENT_KINDS",
    "SCHEMA_VERSION",
    "JSONHeaders",
    "RecordEnvelope",
    "RequestEvent",
    "ResponseEvent",
    "build_request_event",
    "build_response_event",
    "converter",
    "prepare_request",
    "request_event",
    "response_event",
]

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
    # The proxy token's public id and its project, when one was presented.
    token_id: str | None
    project: str | None
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
    # The provider's id of its answer (x-request-id, else request-id); request_id is
    # the proxy's own (X-LLMProxy-Request-ID).
    upstream_request_id: str | None
    # hit | conditional-hit | miss | stored | bypass; None: the route is not cached.
    cache_status: str | None
    cache_key: str | None  # the cache key, when one was derived
    cache_age_s: float | None  # hits: the entry's age in seconds (the Age header, to the ms)
    response_model: str | None
    usage: Usage | None
    # What the answer cost (llmproxy/pricing/): set by the capture pump, which prices
    # the usage; None when there is no usage or the model has no price.
    cost: dict[str, Any] | None
    finish_reasons: list[str]
    response_headers: JSONHeaders
    response_body: CapturedBody
    # A stream's text, one entry per read as decoded (joined: the body text), and
    # each read's arrival offset from the exchange's start, in ms to the
    # microsecond (the same length).  None for a body that is not a stream.
    response_chunks: list[str] | None
    response_chunk_offsets_ms: list[float] | None


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


def _offset_ns(start_ns: int, offset: float | None) -> int | None:
    return None if offset is None else start_ns + round(offset * 1_000_000_000)


def _ms(offset: float | None) -> float | None:
    return None if offset is None else ms3(offset)


def _age(seconds: float | None) -> float | None:
    return None if seconds is None else s3(seconds)


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
    return _request_model_and_stream_text(body.text)


def _request_model_and_stream_text(text: str | None) -> tuple[str | None, bool]:
    return _request_json(text)[1:]


def _request_json(text: str | None) -> tuple[dict[str, Any] | None, str | None, bool]:
    """The request body's JSON object (None when it is not one), the model it asks
    for and whether it asks for a stream."""
    if not text or text[0] not in "{ \t\r\n":
        return None, None, False
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        # Cut at the cap: the model usually comes first and is still there.
        return None, model_from_prefix(text.encode("utf-8")), False
    if not isinstance(obj, dict):
        return None, None, False
    model = obj.get("model")
    return obj, (model if isinstance(model, str) else None), obj.get("stream") is True


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
    if body.text is not None:
        body = attrs.evolve(body, text=mask_body_keys(body.text, capture.mask_body_keys))
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
        "path": mask_userinfo(record.path),
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
        "token_id": record.token_id,
        "project": record.project,
        "request_headers": obfuscator.obfuscate(headers),
        "request_body": body,
    }
    return _RequestSide(fields, start_ns)


# Looked up once: ``codecs.getincrementaldecoder`` goes through the codec registry.
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


@attrs.frozen
class _StreamCapture:
    texts: list[str]  # one per read: its decoded text
    offsets_ms: list[float]  # one per read: its arrival offset
    events: list[SSEEvent]
    captured_bytes: int
    truncated: bool
    decode_error: str | None


def _stream_capture(
    chunks: Sequence[tuple[float, bytes]], content_encoding: str | None, limit: int
) -> _StreamCapture:
    """Decode stream chunks one by one, so each keeps its arrival offset."""
    decoder = ContentDecoder(content_encoding, limit) if content_codings(content_encoding) else None
    text = _Utf8Decoder("replace")
    parser = SSEParser()
    texts: list[str] = []
    events: list[SSEEvent] = []
    captured = 0
    for _, raw in chunks:
        data = raw if decoder is None else decoder.feed(raw)
        if decoder is not None and decoder.error is not None:
            # Undecodable: fall back to the bytes as sent, with the reason.
            fallback = _stream_capture(chunks, None, limit)
            return attrs.evolve(fallback, decode_error=decoder.error)
        captured += len(data)
        events.extend(parser.feed(data))
        # A character split across chunks is carried by the chunk completing it.
        texts.append(text.decode(data))
    tail = text.decode(b"", final=True)
    if tail and texts:
        texts[-1] += tail
    events.extend(parser.close())
    return _StreamCapture(
        texts=texts,
        offsets_ms=ms3_each(map(_first, chunks)),
        events=events,
        captured_bytes=captured,
        truncated=decoder is not None and decoder.truncated,
        decode_error=None,
    )


# A read's arrival offset, of its (offset, bytes) pair.
_first = operator.itemgetter(0)


def _looks_like_json(text: str, content_type: str | None) -> bool:
    if media_type(content_type).endswith("json"):
        return True
    # text[:1] first: lstrip() copies the whole text.
    return text[:1] in ("{", "[") or text.lstrip()[:1] in ("{", "[")


# ---------------------------------------------------------------- events: the reference


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
    stream_chunks: list[str] | None = None
    stream_offsets: list[float] | None = None
    if is_stream:
        stream = _stream_capture(chunks, content_encoding, capture.response_body_bytes)
        stream_chunks = stream.texts
        stream_offsets = stream.offsets_ms
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
    masked = record.masked
    response_headers = obfuscator.obfuscate(headers)
    if masked:
        body, stream_chunks = _mask_injected(body, stream_chunks, response_headers, masked)
    event = ResponseEvent(
        type="response",
        first_byte=None if first_byte_ns is None else rfc3339_ns(first_byte_ns),
        end=None if end_ns is None else rfc3339_ns(end_ns),
        duration_ms=_ms(record.ended_at),
        ttfb_ms=_ms(record.first_byte_at),
        status=record.status,
        outcome=record.outcome,
        error=None if record.error is None else scrub_text(mask_values(record.error, masked)),
        upstream_request_id=_masked_id(upstream_request_id(headers), masked),
        cache_status=record.cache_status,
        cache_key=record.cache_key,
        cache_age_s=_age(record.cache_age),
        response_model=facts.model,
        usage=facts.usage,
        cost=None,
        finish_reasons=list(facts.finish_reasons),
        response_headers=response_headers,
        response_body=body,
        response_chunks=stream_chunks,
        response_chunk_offsets_ms=stream_offsets,
        **fields,
    )
    return event, facts


def _mask_injected(
    body: CapturedBody,
    chunks: list[str] | None,
    headers: JSONHeaders,
    masked: tuple[str, ...],
) -> tuple[CapturedBody, list[str] | None]:
    """The response side with the values in ``masked`` (the provider key the proxy
    injected) masked wherever an upstream echoed them; ``headers`` in place."""
    if body.text is not None:
        body = attrs.evolve(body, text=mask_values(body.text, masked))
    if chunks is not None:
        chunks = [mask_values(text, masked) for text in chunks]
    _mask_header_values(headers, masked)
    return body, chunks


def _masked_id(request_id: str | None, masked: tuple[str, ...]) -> str | None:
    """The provider's request id, with an echoed injected key masked as in its headers."""
    return mask_values(request_id, masked) if masked and request_id else request_id


def _mask_header_values(headers: JSONHeaders, masked: tuple[str, ...]) -> None:
    for name, value in headers.items():
        if isinstance(value, list):
            headers[name] = [mask_values(v, masked) for v in value]
        else:
            headers[name] = mask_values(value, masked)


# ---------------------------------------------------------------- events: the fast builder
#
# The same dicts as ``converter.unstructure(build_*_event(...))``, keys in the
# same order (so the JSON is byte for byte the same), built without attrs
# instances: this runs for every exchange, in every exporter's reactor turn.


@functools.lru_cache(maxsize=256)
def _is_binary_type(content_type: str | None) -> bool:
    return is_binary_type(content_type)


def _body_dict(body: CapturedBody) -> dict[str, Any]:
    return {
        "text": body.text,
        "base64": body.base64,
        "size": body.size,
        "captured_bytes": body.captured_bytes,
        "truncated": body.truncated,
        "content_encoding": body.content_encoding,
        "decode_error": body.decode_error,
    }


def _captured_body_dict(
    raw: bytes,
    *,
    size: int,
    truncated: bool,
    content_type: str | None,
    content_encoding: str | None,
    limit: int,
) -> dict[str, Any]:
    """``capture_body(...)`` as a dict; plain UTF-8 within the cap skips all decoding work."""
    if content_encoding is None and len(raw) <= limit and not _is_binary_type(content_type):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            return {
                "text": text,
                "base64": None,
                "size": size,
                "captured_bytes": len(raw),
                "truncated": truncated or size > len(raw),
                "content_encoding": None,
                "decode_error": None,
            }
    return _body_dict(
        capture_body(
            raw,
            size=size,
            truncated=truncated,
            content_type=content_type,
            content_encoding=content_encoding,
            limit=limit,
        )
    )


@attrs.define(eq=False)
class _SharedRequestSide:
    """What both events of an exchange say about its request, computed once.

    Everything here derives from request-side fields only, which the proxy no
    longer changes once the request envelope exists.  The session id and seq are
    not here: each event takes its own.
    """

    capture: CaptureSettings
    obfuscator: HeaderObfuscator  # the capture's, for the response headers too
    start_ns: int
    start: str
    path: str
    query: str
    upstream_url: str
    model: str | None
    is_stream: bool
    machine: str
    headers: JSONHeaders
    body: dict[str, Any]
    # The request event with no session: both events start as a copy of it (a
    # dict copy is several times cheaper than building its 25 entries again).
    request: dict[str, Any] = attrs.field(init=False)


def _request_side_of(record: ExchangeRecord, capture: CaptureSettings) -> _SharedRequestSide:
    return _request_side_and_json(record, capture)[0]


def _request_side_and_json(
    record: ExchangeRecord, capture: CaptureSettings
) -> tuple[_SharedRequestSide, dict[str, Any] | None]:
    """The request side, and the request body's JSON object when it is
    ``orjson.loads(record.request_body)`` exactly, else None."""
    headers = record.request_headers
    raw = record.request_body
    size = record.request_body_size
    limit = capture.request_body_bytes
    content_type, content_encoding = content_headers(headers)
    body = _captured_body_dict(
        raw,
        size=max(size, len(raw)),
        truncated=size > len(raw),
        content_type=content_type,
        content_encoding=content_encoding,
        limit=limit,
    )
    text = body["text"]
    obj, model, stream = _request_json(text)
    if obj is not None and (content_encoding is not None or not size <= len(raw) <= limit):
        # The text is not the whole body as sent (decoded, or cut): not its object.
        obj = None
    if text is not None:
        body["text"] = mask_body_keys(text, capture.mask_body_keys)
    start_ns = epoch_ns(record.started_at)
    obfuscator = HeaderObfuscator.for_names(capture.redact_headers)
    side = _SharedRequestSide(
        capture=capture,
        obfuscator=obfuscator,
        start_ns=start_ns,
        start=rfc3339_ns(start_ns),
        path=mask_userinfo(record.path),
        query=mask_query(record.query),
        upstream_url=mask_url(record.upstream_url),
        model=model,
        is_stream=stream,
        machine=record.machine or machine_id(),
        headers=obfuscator.obfuscate(headers),
        body=body,
    )
    side.request = _request_dict(record, side, None, None)
    return side, obj


# record -> its shared request side, for as long as the record lives.  Only
# envelopes use it: a record's two envelopes are built in any order, by any
# exporter, in different reactor turns.
_SHARED_SIDES: weakref.WeakKeyDictionary[ExchangeRecord, _SharedRequestSide] = (
    weakref.WeakKeyDictionary()
)


def _shared_request_side(record: ExchangeRecord, capture: CaptureSettings) -> _SharedRequestSide:
    side = _SHARED_SIDES.get(record)
    if side is None or side.capture is not capture:
        side = _SHARED_SIDES[record] = _request_side_of(record, capture)
    return side


def prepare_request(record: ExchangeRecord, capture: CaptureSettings) -> dict[str, Any] | None:
    """Compute now the request side ``record``'s envelopes share, and return the
    request body's JSON object when it is exactly ``orjson.loads(record.request_body)``
    (the whole body, not content-encoded, a JSON object), else None.

    For the capture pump, which hands the object to the session tracker: the
    tracker then does not parse the same body a second time.  The side does not
    depend on the session id and seq, so computing it before the tracker assigns
    them is safe.
    """
    side, obj = _request_side_and_json(record, capture)
    _SHARED_SIDES[record] = side
    return obj


def _request_dict(
    record: ExchangeRecord,
    side: _SharedRequestSide,
    session_id: str | None,
    seq: int | None,
) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "type": "request",
        "ts": side.start,
        "ts_ns": side.start_ns,
        "request_id": record.request_id,
        "session_id": session_id,
        "seq": seq,
        "start": side.start,
        "method": record.method,
        "path": side.path,
        "query": side.query,
        "route": record.route,
        "provider": record.provider,
        "upstream_host": record.upstream_host,
        "upstream_url": side.upstream_url,
        "model": side.model,
        "request_model": side.model,
        "is_stream": side.is_stream,
        "client_addr": record.client_addr,
        "machine": side.machine,
        "environment": record.environment,
        "token_id": record.token_id,
        "project": record.project,
        "request_headers": side.headers,
        "request_body": side.body,
    }


Summary = tuple[str | None, Usage | None, tuple[str, ...]]  # model, usage, finish reasons


@attrs.frozen
class _FastStream:
    texts: list[str]  # one per read: its decoded text
    offsets_ms: list[float]  # one per read: its arrival offset
    summary: Summary | None
    captured_bytes: int
    truncated: bool
    decode_error: str | None


def _fast_stream_capture(
    chunks: Sequence[tuple[float, bytes]],
    content_encoding: str | None,
    limit: int,
    with_summary: bool = True,
) -> _FastStream:
    """``_stream_capture`` without per-chunk machinery when nothing is encoded (as
    good as always: streams are rarely compressed), and the summary of the
    stream's facts.  ``with_summary=False``: the caller needs no summary of an
    unencoded stream (``summary`` is then None)."""
    if content_codings(content_encoding):
        stream = _stream_capture(chunks, content_encoding, limit)
        return _FastStream(
            texts=stream.texts,
            offsets_ms=stream.offsets_ms,
            summary=summary_from_sse_fields([(event.event, event.data) for event in stream.events]),
            captured_bytes=stream.captured_bytes,
            truncated=stream.truncated,
            decode_error=stream.decode_error,
        )
    try:
        # Every chunk valid UTF-8 on its own (nearly always: a server writes whole
        # events): each chunk's text is its strict decoding.  In one go, as
        # comprehensions, for a stream of a hundred chunks or more.
        texts = [raw.decode() for _, raw in chunks]
    except UnicodeDecodeError:
        pass
    else:
        return _FastStream(
            texts=texts,
            offsets_ms=ms3_each(map(_first, chunks)),
            summary=_text_summary(texts, chunks) if with_summary else None,
            captured_bytes=sum([len(raw) for _, raw in chunks]),
            truncated=False,
            decode_error=None,
        )
    texts = []
    captured = 0
    # Strict whole-chunk decoding is exact while chunks end on character
    # boundaries; from the first chunk that does not, the incremental decoder
    # (empty at that point) takes over, as in ``_stream_capture``.
    decoder: codecs.IncrementalDecoder | None = None
    for _, raw in chunks:
        captured += len(raw)
        if decoder is None:
            try:
                data = raw.decode()  # UTF-8, strict
            except UnicodeDecodeError:
                decoder = _Utf8Decoder("replace")
                data = decoder.decode(raw)
        else:
            data = decoder.decode(raw)
        texts.append(data)
    summary: Summary | None = None
    if decoder is not None:
        tail = decoder.decode(b"", final=True)
        if tail and texts:
            texts[-1] += tail
        if with_summary:
            summary = summary_from_sse_fields(sse_fields(b"".join([raw for _, raw in chunks])))
    elif with_summary:
        summary = _text_summary(texts, chunks)
    return _FastStream(
        texts=texts,
        offsets_ms=ms3_each(map(_first, chunks)),
        summary=summary,
        captured_bytes=captured,
        truncated=False,
        decode_error=None,
    )


def _text_summary(texts: list[str], chunks: Sequence[tuple[float, bytes]]) -> Summary:
    """The summary of a stream whose every chunk was valid UTF-8 on its own
    (``texts``, their decodings)."""
    # The parser is split-invariant: one parse of the whole gives the same
    # events.  Every chunk was valid UTF-8 on its own, so their texts joined are
    # the whole stream decoded: no second join and decode of the bytes.
    text = "".join(texts)
    if "\r" in text:
        return summary_from_sse_fields(sse_fields(b"".join([raw for _, raw in chunks])))
    return summary_from_sse_text(text)


def _response_dict(
    record: ExchangeRecord, capture: CaptureSettings, side: _SharedRequestSide
) -> dict[str, Any]:
    """The ``response`` event.  It carries only a summary of the response facts
    (model, usage, finish reasons), cheaper than the facts: no reply message, no
    merged response object."""
    headers = record.response_headers
    content_type, content_encoding = content_headers(headers)
    chunks = record.response_chunks
    if len(chunks) == 1:
        raw = chunks[0][1]
        captured_raw = len(raw)
    else:
        raw = b""
        captured_raw = sum([len(chunk) for _, chunk in chunks])
    size = max(record.response_body_size, captured_raw)
    truncated = record.response_truncated or size > captured_raw
    is_stream = media_type(content_type) == "text/event-stream"
    stream_chunks: list[str] | None = None
    stream_offsets: list[float] | None = None
    body: dict[str, Any]
    if is_stream:
        # The session tracker leaves the summary of an unencoded stream it read.
        summary = None if content_encoding else record.reply_summary
        stream = _fast_stream_capture(
            chunks, content_encoding, capture.response_body_bytes, summary is None
        )
        stream_chunks = stream.texts
        stream_offsets = stream.offsets_ms
        body = {
            "text": None,
            "base64": None,
            "size": size,
            "captured_bytes": stream.captured_bytes,
            "truncated": truncated or stream.truncated,
            "content_encoding": content_encoding.strip() if content_encoding else None,
            "decode_error": stream.decode_error,
        }
        # Without the tracker's, the stream's own (always there when asked for).
        summary = summary or stream.summary or (None, None, ())
        response_model, usage, finish_reasons = summary
    else:
        if len(chunks) != 1:
            raw = b"".join([chunk for _, chunk in chunks])
        body = _captured_body_dict(
            raw,
            size=size,
            truncated=truncated,
            content_type=content_type,
            content_encoding=content_encoding,
            limit=capture.response_body_bytes,
        )
        text = body["text"]
        if text is None or not _looks_like_json(text, content_type):
            response_model, usage, finish_reasons = None, None, ()
        elif record.reply_summary is not None:  # the session tracker parsed these bytes
            response_model, usage, finish_reasons = record.reply_summary
        else:
            response_model, usage, finish_reasons = summary_from_json(text)
    start_ns = side.start_ns
    ended_at = record.ended_at
    first_byte_at = record.first_byte_at
    if ended_at is None:
        ts_ns, ts, end = start_ns, side.start, None
    else:
        ts_ns = start_ns + round(ended_at * 1_000_000_000)
        ts = end = rfc3339_ns(ts_ns)
    first_byte = (
        None
        if first_byte_at is None
        else rfc3339_ns(start_ns + round(first_byte_at * 1_000_000_000))
    )
    error = record.error
    # The request's entries, in their order, then the response's own.
    event = side.request.copy()
    event["type"] = "response"
    event["ts"] = ts
    event["ts_ns"] = ts_ns
    event["session_id"] = record.session_id
    event["seq"] = record.seq
    event["model"] = response_model or side.model
    event["is_stream"] = is_stream
    event["first_byte"] = first_byte
    event["end"] = end
    event["duration_ms"] = None if ended_at is None else ms3(ended_at)
    event["ttfb_ms"] = None if first_byte_at is None else ms3(first_byte_at)
    event["status"] = record.status
    event["outcome"] = record.outcome
    masked = record.masked
    event["error"] = None if error is None else scrub_text(mask_values(error, masked))
    event["upstream_request_id"] = _masked_id(upstream_request_id(headers), masked)
    event["cache_status"] = record.cache_status
    event["cache_key"] = record.cache_key
    age = record.cache_age
    event["cache_age_s"] = None if age is None else s3(age)
    event["response_model"] = response_model
    event["usage"] = usage_dict(usage)
    event["cost"] = None
    event["finish_reasons"] = list(finish_reasons)
    response_headers = side.obfuscator.obfuscate(headers)
    if masked:
        text = body["text"]
        if text is not None:
            body["text"] = mask_values(text, masked)
        if stream_chunks is not None:
            stream_chunks = [mask_values(text, masked) for text in stream_chunks]
        _mask_header_values(response_headers, masked)
    event["response_headers"] = response_headers
    event["response_body"] = body
    event["response_chunks"] = stream_chunks
    event["response_chunk_offsets_ms"] = stream_offsets
    return event


def _response_facts(
    record: ExchangeRecord, capture: CaptureSettings, payload: dict[str, Any]
) -> ResponseFacts:
    """The facts ``build_response_event`` gives with the event, from the record and
    the ``response`` event built from it."""
    content_type, content_encoding = content_headers(record.response_headers)
    if payload["is_stream"]:
        chunks = record.response_chunks
        if content_codings(content_encoding):
            stream = _stream_capture(chunks, content_encoding, capture.response_body_bytes)
            return facts_from_sse(stream.events)
        return facts_from_sse_fields(sse_fields(b"".join([raw for _, raw in chunks])))
    text = payload["response_body"]["text"]
    if text is None or not _looks_like_json(text, content_type):
        return EMPTY_FACTS
    return facts_from_json(text)


def request_event(record: ExchangeRecord, capture: CaptureSettings) -> dict[str, Any]:
    """The ``request`` event dict of an exchange (request-side fields only)."""
    side = _request_side_of(record, capture)
    return _request_dict(record, side, record.session_id, record.seq)


def response_event(record: ExchangeRecord, capture: CaptureSettings) -> dict[str, Any]:
    """The ``response`` event dict of a finished exchange."""
    return _response_dict(record, capture, _request_side_of(record, capture))


# ---------------------------------------------------------------- reading events back


# ---------------------------------------------------------------- the envelope

# Per-chunk JSON overhead (a text's quotes and comma, its offset in the other list)
# and escaping, roughly: the recorded 100-chunk reply's line has ~41 bytes a read
# beyond its text, most of them the escaped quotes of the JSON in it.
_CHUNK_OVERHEAD = 40


# No on_setattr hooks: ``kind`` is validated once, in ``__init__``; the private
# fields are assigned as the payload is memoised, and hooks would tax every one.
@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
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
            record = self._record
            side = _shared_request_side(record, self._capture)
            if self.kind == "request":
                payload = side.request.copy()
                payload["session_id"] = self._session_id
                payload["seq"] = self._seq
                self._payload = payload
                self._facts = EMPTY_FACTS
            else:
                self._payload = _response_dict(record, self._capture, side)
        return self._payload

    def json(self) -> bytes:
        if self._encoded is None:
            self._encoded = orjson.dumps(self.payload())
        return self._encoded

    def facts(self) -> ResponseFacts:
        """The response facts of the exchange, memoised (empty for ``request``).

        Computed on the first call: the payload needs only a summary of them.
        """
        payload = self.payload()
        if self._facts is None:
            self._facts = _response_facts(self._record, self._capture, payload)
        return self._facts
