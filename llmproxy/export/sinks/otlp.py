"""The OpenTelemetry (OTLP/HTTP JSON) sink (tests: tests/unit/export/sinks/test_otlp.py).

``endpoint`` is the collector's base URL (``http://collector:4318``, the OTLP/HTTP
default port).  By default each batch is one ``POST {endpoint}/v1/traces`` with
an ``ExportTraceServiceRequest`` in OTLP's JSON encoding, one span per exchange
(``response`` events; the others are delivered trivially).  An endpoint whose
path ends in ``/v1/logs`` sends log records instead, one per event of any kind;
one ending in ``/v1/traces`` is used as given.

OTLP/JSON rules followed (opentelemetry-proto ``docs/specification.md``): field
names in lowerCamelCase; trace and span ids as hex strings (32 and 16 chars, not
base64); enums as integers (``kind`` 3 = CLIENT, status ``code`` 2 = ERROR);
64-bit integers (times in unix nanoseconds, ``intValue``) as decimal strings;
``Content-Type: application/json``; no empty envelopes.

Spans follow the OpenTelemetry GenAI semantic conventions (the attribute
registry, open-telemetry/semantic-conventions ``docs/registry/attributes/
gen-ai.md``, now kept in open-telemetry/semantic-conventions-genai): name
``{gen_ai.operation.name} {gen_ai.request.model}``, kind CLIENT, the exchange's
real start and end, and:

- ``gen_ai.operation.name``, one of the registry's well-known values, from the
  path: ``chat`` (``/chat/completions``, ``/messages``, ``/responses``),
  ``text_completion`` (``/completions``), ``embeddings`` (``/embeddings``,
  ``:embedContent``), ``generate_content`` (``:generateContent``).  Any other
  endpoint (models lists, token counting, files, audio...) is not a GenAI
  operation: its span has no operation name and is named by the HTTP method;
- ``gen_ai.provider.name`` (the route's provider) and, for backends that still
  read it, the deprecated ``gen_ai.system`` with the same value;
- ``gen_ai.request.model``, ``gen_ai.request.max_tokens`` (``max_tokens``,
  ``max_completion_tokens`` or ``max_output_tokens``),
  ``gen_ai.request.temperature``, ``gen_ai.request.top_p``;
- ``gen_ai.response.id``, ``gen_ai.response.model``,
  ``gen_ai.response.finish_reasons``, and for streams
  ``gen_ai.response.time_to_first_chunk`` (seconds to the upstream's first byte);
- ``gen_ai.usage.input_tokens`` (all input tokens, cached ones included, as the
  registry asks), ``gen_ai.usage.output_tokens``,
  ``gen_ai.usage.cache_read.input_tokens``,
  ``gen_ai.usage.cache_creation.input_tokens``;
- ``llmproxy.cost.usd`` / ``input_usd`` / ``output_usd`` (doubles) and
  ``llmproxy.cost.source`` / ``version``: what the answer cost (the event's
  ``cost``; the GenAI conventions have no cost attribute yet);
- ``gen_ai.conversation.id`` (the session);
- ``error.type`` and status ERROR when the exchange failed (outcome not ``ok``
  or HTTP status 400 and up);
- ``http.request.method``, ``http.response.status_code``, ``server.address``
  and ``server.port`` (the upstream's), ``client.address``, and ``llmproxy.*``
  (request id, the provider's ``upstream_request_id``, session id, route, the
  proxy token's ``token_id`` and ``project``, outcome, cache status...).

The resource says ``service.name=llmproxy``, ``host.name`` and
``deployment.environment.name``.

Ids are deterministic, so a span sent twice is the same span: the span id comes
from the request id; the trace id too, unless the client sent a W3C
``traceparent`` header — then the span joins the client's trace, as a child of
the client's span.  Log records carry the same ids, so logs and traces of an
exchange correlate.

Answers (OTLP/HTTP "Failures"): only 429, 502, 503 and 504 are retried,
honouring ``Retry-After``; every other non-2xx is permanent (the batch goes to
the dead-letter file with the collector's ``Status.message``).  A 200 with
``partialSuccess`` is never retried (the spec forbids it); the rejected count
and message are logged as a warning, and the batch counts as delivered, since
the collector does not say which spans it refused.

``headers`` (``name=value`` pairs) are sent on every request (collector or
vendor auth); ``api_key``, when set, is sent as ``Authorization: Bearer`` unless
``headers`` sets ``Authorization`` itself.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

import attrs
import orjson
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmproxy.config.model import ExporterSettings
from llmproxy.events.endpoints import endpoint_kind
from llmproxy.events.facts import facts_of
from llmproxy.export.sink import EncodedBatch, HTTPSink, checked_endpoint, parse_retry_after
from llmproxy.export.sinks import exchange
from llmproxy.export.sinks.exchange import (
    PlannedBatch,
    exchange_ns,
    nonempty_str,
    request_json,
)
from llmproxy.export.verdict import Delivered, Rejected, Retry, Verdict
from llmproxy.interfaces import HTTPClient

__all__ = [
    "DEFAULT_ENDPOINT",
    "LOGS_PATH",
    "MAX_STATUS_MESSAGE",
    "RETRYABLE",
    "SCOPE_NAME",
    "SERVICE_NAME",
    "SPAN_KIND_CLIENT",
    "STATUS_CODE_ERROR",
    "TRACES_PATH",
    "OTLPSink",
    "operation_name",
    "signal_url",
    "span_ids",
]

log = Logger()

DEFAULT_ENDPOINT = "http://localhost:4318"
TRACES_PATH = "/v1/traces"
LOGS_PATH = "/v1/logs"
# OTLP/HTTP: "All other 4xx or 5xx response status codes MUST NOT be retried."
RETRYABLE = frozenset({429, 502, 503, 504})
SPAN_KIND_CLIENT = 3
STATUS_CODE_ERROR = 2
# SeverityNumber values of the logs data model.
SEVERITY_INFO, SEVERITY_WARN, SEVERITY_ERROR = 9, 13, 17
SCOPE_NAME = "llmproxy"
SERVICE_NAME = "llmproxy"
MAX_STATUS_MESSAGE = 1000

try:
    VERSION = metadata.version("llmproxy")
except metadata.PackageNotFoundError:  # running from a source tree
    VERSION = "0"

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")


def signal_url(endpoint: str) -> tuple[str, str]:
    """``(url, signal)`` for an endpoint: a base URL sends traces; a URL ending in
    ``/v1/logs`` or ``/v1/traces`` names its signal."""
    base = endpoint.rstrip("/")
    if base.endswith(LOGS_PATH):
        return base, "logs"
    if base.endswith(TRACES_PATH):
        return base, "traces"
    return base + TRACES_PATH, "traces"


def span_ids(event: Mapping[str, Any]) -> tuple[str, str, str]:
    """``(trace id, span id, parent span id)`` of an exchange, as lowercase hex.

    The span id (8 bytes) and the default trace id (16 bytes) are derived from
    the request id; a valid ``traceparent`` request header gives the trace id and
    the parent.  The parent is ``""`` when there is none.
    """
    request_id = str(event.get("request_id") or "")
    digest = hashlib.sha256(b"llmproxy-otlp\0" + request_id.encode("utf-8", "replace")).digest()
    span = digest[16:24]
    if not any(span):  # an all-zero id is invalid
        span = span[:7] + b"\x01"
    parent = _traceparent(event.get("request_headers"))
    if parent is not None:
        return parent[0], span.hex(), parent[1]
    trace = digest[:16]
    if not any(trace):
        trace = trace[:15] + b"\x01"
    return trace.hex(), span.hex(), ""


def _traceparent(headers: Any) -> tuple[str, str] | None:
    if not isinstance(headers, dict):
        return None
    value = headers.get("traceparent")
    if isinstance(value, list):
        value = value[0] if value else None
    if not isinstance(value, str):
        return None
    match = _TRACEPARENT.match(value.strip().lower())
    if match is None:
        return None
    version, trace, parent = match.groups()
    if version == "ff" or trace == "0" * 32 or parent == "0" * 16:
        return None
    return trace, parent


# The GenAI semantic conventions' operation of each endpoint kind.
_OPERATIONS = {
    "chat": "chat",
    "responses": "chat",
    "messages": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "generate_content": "generate_content",
    "embed_content": "embeddings",
}


def operation_name(path: str) -> str | None:
    """``gen_ai.operation.name`` from the request path: a well-known value of the
    semantic conventions, or None for an endpoint that is no GenAI operation."""
    kind = endpoint_kind(path)
    return None if kind is None else _OPERATIONS[kind]


@attrs.frozen
class _Plan:
    """What a batch becomes: the encoded request (None when there is nothing to
    send) and the events that could not be encoded."""

    source: Sequence[dict[str, Any]]
    batch: EncodedBatch | None
    unencodable: Mapping[int, str]

    def verdict(self, answer: Verdict) -> Verdict:
        if isinstance(answer, Delivered) and self.unencodable:
            return Delivered(rejected={**answer.rejected, **self.unencodable})
        return answer


class _PlannedBatch(PlannedBatch[_Plan]):
    """A batch with its plan, so ``encode`` does not build it twice."""


@attrs.define(kw_only=True)
class OTLPSink(HTTPSink):
    """Exports exchanges as OTLP spans (or log records).  Build it with
    :meth:`from_settings`."""

    _authorization: str = attrs.field(default="", repr=False)
    _extra_headers: tuple[tuple[str, str], ...] = attrs.field(default=(), repr=False)
    _signal: str = attrs.field(default="traces", init=False)
    _headers: dict[str, str] = attrs.field(factory=dict, init=False, repr=False)
    _secrets: tuple[str, ...] = attrs.field(default=(), init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.url, self._signal = signal_url(self.url)
        headers = {"Content-Type": "application/json"}
        if self._authorization and not any(
            name.lower() == "authorization" for name, _ in self._extra_headers
        ):
            headers["Authorization"] = self._authorization
        headers.update(self._extra_headers)
        self._headers = headers
        self._secrets = exchange.secrets_to_mask(
            (self._authorization, self._authorization.partition(" ")[2]), self._extra_headers
        )

    @property
    def signal(self) -> str:
        """``traces`` or ``logs``."""
        return self._signal

    @classmethod
    def from_settings(
        cls, settings: ExporterSettings, *, client: HTTPClient, clock: IReactorTime
    ) -> OTLPSink:
        """A sink for one ``[exporter:NAME]`` section of ``type = otlp``."""
        where = f"exporter:{settings.name}"
        endpoint = checked_endpoint(
            where, settings.endpoint or DEFAULT_ENDPOINT, "an OTLP/HTTP receiver", "headers"
        )
        for name, _ in settings.headers:
            if not name or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"{where}: headers: {name!r} is not a valid header name")
        return cls.configured(
            settings,
            endpoint,
            client,
            clock,
            authorization=f"Bearer {settings.api_key}" if settings.api_key else "",
            extra_headers=tuple(settings.headers),
        )

    # -- deliver -----------------------------------------------------------------

    def deliver(self, events: Sequence[dict[str, Any]]) -> Deferred[Verdict]:
        try:
            plan = self._plan(events)
        except Exception:
            return fail()  # a bug here, not in one event: the exporter logs and retries
        if plan.batch is None:
            # OTLP: senders SHOULD NOT create empty envelopes.
            return succeed(Delivered(rejected=dict(plan.unencodable)))
        d = super().deliver(_PlannedBatch(plan))
        d.addCallback(plan.verdict)
        return d

    # -- encode ------------------------------------------------------------------

    def encode(self, events: Sequence[dict[str, Any]]) -> EncodedBatch:
        plan = events.plan if isinstance(events, _PlannedBatch) else self._plan(events)
        if plan.batch is None:
            raise ValueError("nothing to export in this batch")
        return plan.batch

    def _plan(self, events: Sequence[dict[str, Any]]) -> _Plan:
        logs = self._signal == "logs"
        now_ns = int(self._clock.seconds() * 1e9)  # type: ignore[misc]  # zope method
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        unencodable: dict[int, str] = {}
        count = 0
        for index, event in enumerate(events):
            if not logs and event.get("type") != "response":
                continue
            try:
                item = _log_record(event, now_ns) if logs else _span(event)
            except Exception as e:
                unencodable[index] = f"could not encode for OTLP ({type(e).__name__})"
                continue
            key = (str(event.get("environment") or ""), str(event.get("machine") or ""))
            groups.setdefault(key, []).append(item)
            count += 1
        if not count:
            return _Plan(events, None, unencodable)
        scope = {"name": SCOPE_NAME, "version": VERSION}
        resources = []
        for (environment, machine), items in groups.items():
            resource = {"attributes": _resource_attributes(environment, machine)}
            if logs:
                resources.append(
                    {"resource": resource, "scopeLogs": [{"scope": scope, "logRecords": items}]}
                )
            else:
                resources.append(
                    {"resource": resource, "scopeSpans": [{"scope": scope, "spans": items}]}
                )
        doc = {"resourceLogs": resources} if logs else {"resourceSpans": resources}
        body = orjson.dumps(doc)
        return _Plan(events, EncodedBatch(body=body, headers=dict(self._headers)), unencodable)

    # -- judge -------------------------------------------------------------------

    def judge(self, status: int, headers: dict[str, str], body: bytes) -> Verdict:
        if 200 <= status < 300:
            self._note_partial_success(body)
            return Delivered()
        message = self._redact(_status_message(headers, body))
        reason = f"HTTP {status}: {message}" if message else f"HTTP {status}"
        if status in RETRYABLE:
            now = self._clock.seconds()  # type: ignore[misc]  # zope method, no mypy-zope
            return Retry(reason, parse_retry_after(headers.get("retry-after"), now))
        return Rejected(reason)

    def _note_partial_success(self, body: bytes) -> None:
        try:
            doc = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return
        partial = doc.get("partialSuccess") if isinstance(doc, dict) else None
        if not isinstance(partial, dict):
            return
        field = "rejectedLogRecords" if self._signal == "logs" else "rejectedSpans"
        rejected = _int64(partial.get(field))
        message = self._redact(str(partial.get("errorMessage") or ""))[:MAX_STATUS_MESSAGE]
        if rejected:
            log.warn(
                "exporter {name}: the OTLP receiver refused {n} {what} of a batch (partial "
                "success, not retried): {message}",
                name=self.name,
                n=rejected,
                what="log records" if self._signal == "logs" else "spans",
                message=message or "(no message)",
            )
        elif message:
            log.info(
                "exporter {name}: OTLP receiver says: {message}", name=self.name, message=message
            )

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


# -- spans and log records -------------------------------------------------------------


def _span(event: dict[str, Any]) -> dict[str, Any]:
    trace_id, span_id, parent = span_ids(event)
    start_ns, end_ns = exchange_ns(event)
    operation = operation_name(str(event.get("path") or ""))
    model = nonempty_str(event.get("request_model")) or nonempty_str(event.get("model"))
    attributes = _exchange_attributes(event, operation)
    status = event.get("status")
    error = _error_type(event)
    if operation is None:
        # Not a GenAI operation: an HTTP client span, named by its method.
        name = nonempty_str(event.get("method")) or "HTTP"
    else:
        name = f"{operation} {model}" if model else operation
    span: dict[str, Any] = {
        "traceId": trace_id,
        "spanId": span_id,
        "name": name,
        "kind": SPAN_KIND_CLIENT,
        "startTimeUnixNano": str(start_ns),
        "endTimeUnixNano": str(end_ns),
        "attributes": attributes,
        "status": {},
    }
    if parent:
        span["parentSpanId"] = parent
    if error is not None:
        attributes.append(_kv("error.type", error))
        detail = nonempty_str(event.get("error"))
        message = f"HTTP {status}" if isinstance(status, int) and status >= 400 else error
        if detail:
            message = f"{message}: {detail}"
        span["status"] = {"code": STATUS_CODE_ERROR, "message": message[:MAX_STATUS_MESSAGE]}
    return span


def _log_record(event: dict[str, Any], now_ns: int) -> dict[str, Any]:
    trace_id, span_id, _ = span_ids(event)
    ts = event.get("ts_ns")
    time_ns = ts if isinstance(ts, int) and not isinstance(ts, bool) and ts >= 0 else now_ns
    kind = str(event.get("type") or "")
    severity, text = SEVERITY_INFO, "INFO"
    if kind == "response":
        error = _error_type(event)
        status = event.get("status")
        if error is not None:
            server_side = event.get("outcome") in ("upstream_error", "timeout") or (
                isinstance(status, int) and status >= 500
            )
            severity, text = (SEVERITY_ERROR, "ERROR") if server_side else (SEVERITY_WARN, "WARN")
    attributes = [_kv("llmproxy.type", kind)]
    if kind == "response":
        attributes.extend(_exchange_attributes(event, operation_name(str(event.get("path") or ""))))
    else:
        for field in ("request_id", "session_id", "route", "token_id", "project"):
            value = event.get(field)
            if value is not None and value != "":
                attributes.append(_kv(f"llmproxy.{field}", value))
    return {
        "timeUnixNano": str(time_ns),
        "observedTimeUnixNano": str(now_ns),
        "severityNumber": severity,
        "severityText": text,
        "body": {"stringValue": orjson.dumps(event, default=str).decode("utf-8")},
        "attributes": attributes,
        "traceId": trace_id,
        "spanId": span_id,
        "eventName": f"llmproxy.{kind}" if kind else "llmproxy.event",
    }


_USAGE_ATTRIBUTES = (
    ("gen_ai.usage.input_tokens", "input_tokens"),
    ("gen_ai.usage.output_tokens", "output_tokens"),
    ("gen_ai.usage.cache_read.input_tokens", "cache_read_tokens"),
    ("gen_ai.usage.cache_creation.input_tokens", "cache_creation_tokens"),
)
# No GenAI convention for cost yet: our own namespace, USD as doubles.
_COST_ATTRIBUTES = (
    ("llmproxy.cost.usd", "total"),
    ("llmproxy.cost.input_usd", "input"),
    ("llmproxy.cost.output_usd", "output"),
)
_COST_TEXT_ATTRIBUTES = (
    ("llmproxy.cost.source", "source"),
    ("llmproxy.cost.version", "version"),
)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _usd(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _fields(
    source: dict[str, Any],
    attributes: Sequence[tuple[str, str]],
    kept: Callable[[Any], Any | None],
) -> Iterator[dict[str, Any]]:
    """The attribute of each ``(key, field)`` whose value ``kept`` takes (not None)."""
    for key, field in attributes:
        value = kept(source.get(field))
        if value is not None:
            yield _kv(key, value)


def _exchange_attributes(event: dict[str, Any], operation: str | None) -> list[dict[str, Any]]:
    attributes = [] if operation is None else [_kv("gen_ai.operation.name", operation)]
    provider = nonempty_str(event.get("provider"))
    if provider:
        attributes.append(_kv("gen_ai.provider.name", provider))
        attributes.append(_kv("gen_ai.system", provider))  # deprecated; older backends
    model = nonempty_str(event.get("request_model"))
    if model:
        attributes.append(_kv("gen_ai.request.model", model))
    attributes.extend(_request_parameters(request_json(event)))
    response_id = _response_id(event)
    if response_id:
        attributes.append(_kv("gen_ai.response.id", response_id))
    model = nonempty_str(event.get("response_model"))
    if model:
        attributes.append(_kv("gen_ai.response.model", model))
    usage = event.get("usage")
    if isinstance(usage, dict):
        attributes.extend(_fields(usage, _USAGE_ATTRIBUTES, _count))
    cost = event.get("cost")
    if isinstance(cost, dict):
        attributes.extend(_fields(cost, _COST_ATTRIBUTES, _usd))
        attributes.extend(_fields(cost, _COST_TEXT_ATTRIBUTES, nonempty_str))
    reasons = event.get("finish_reasons")
    if isinstance(reasons, list) and reasons:
        attributes.append(_kv("gen_ai.response.finish_reasons", [str(r) for r in reasons]))
    ttfb = event.get("ttfb_ms")
    if event.get("is_stream") and isinstance(ttfb, int | float) and not isinstance(ttfb, bool):
        attributes.append(_kv("gen_ai.response.time_to_first_chunk", ttfb / 1000.0))
    session = nonempty_str(event.get("session_id"))
    if session:
        attributes.append(_kv("gen_ai.conversation.id", session))
    address, port = _server(event)
    if address:
        attributes.append(_kv("server.address", address))
        if port is not None:
            attributes.append(_kv("server.port", port))
    for key, field in (
        ("http.request.method", "method"),
        ("http.response.status_code", "status"),
        ("client.address", "client_addr"),
        ("llmproxy.request_id", "request_id"),
        ("llmproxy.upstream_request_id", "upstream_request_id"),
        ("llmproxy.session_id", "session_id"),
        ("llmproxy.seq", "seq"),
        ("llmproxy.route", "route"),
        ("llmproxy.token_id", "token_id"),
        ("llmproxy.project", "project"),
        ("llmproxy.outcome", "outcome"),
        ("llmproxy.cache_status", "cache_status"),
        ("llmproxy.cache_key", "cache_key"),
        ("llmproxy.cache_age_s", "cache_age_s"),
        ("llmproxy.stream", "is_stream"),
        ("llmproxy.ttfb_ms", "ttfb_ms"),
    ):
        value = event.get(field)
        if value is not None and value != "":
            attributes.append(_kv(key, value))
    return attributes


def _request_parameters(request: dict[str, Any] | None) -> list[dict[str, Any]]:
    """``gen_ai.request.max_tokens``, ``temperature`` and ``top_p`` from the request body."""
    if request is None:
        return []
    out = []
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = request.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            out.append(_kv("gen_ai.request.max_tokens", value))
            break
    for key in ("temperature", "top_p"):
        value = request.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out.append(_kv(f"gen_ai.request.{key}", float(value)))
    return out


def _response_id(event: dict[str, Any]) -> str | None:
    """``gen_ai.response.id``: the ``id`` of the response object (``chatcmpl-...``,
    ``msg_...``, ``resp_...``), streams included."""
    if event.get("type") != "response":
        return None
    merged = facts_of(event).merged_json
    value = merged.get("id") if merged is not None else None
    return value if isinstance(value, str) and value else None


def _server(event: dict[str, Any]) -> tuple[str | None, int | None]:
    """``server.address`` and ``server.port``: the upstream's host and port."""
    url = event.get("upstream_url")
    if isinstance(url, str) and url:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if parts is not None and parts.hostname:
            default = {"https": 443, "http": 80}.get(parts.scheme)
            return parts.hostname, port if port is not None else default
    host = nonempty_str(event.get("upstream_host"))
    if host is None:
        return None, None
    name, _, port_text = host.rpartition(":")
    if name and port_text.isdigit() and (":" not in name or name.startswith("[")):
        return name.strip("[]"), int(port_text)
    return host, None


def _error_type(event: dict[str, Any]) -> str | None:
    """``error.type`` of a failed exchange (the status code, else the outcome);
    None when it went well."""
    status = event.get("status")
    if isinstance(status, int) and not isinstance(status, bool) and status >= 400:
        return str(status)
    outcome = event.get("outcome")
    if outcome is not None and outcome != "ok":
        return str(outcome)
    return None


def _resource_attributes(environment: str, machine: str) -> list[dict[str, Any]]:
    attributes = [_kv("service.name", SERVICE_NAME), _kv("service.version", VERSION)]
    host = machine.rpartition("@")[2]
    if host:
        attributes.append(_kv("host.name", host))
    if environment:
        attributes.append(_kv("deployment.environment.name", environment))
    return attributes


def _kv(key: str, value: Any) -> dict[str, Any]:
    return {"key": key, "value": _any_value(value)}


def _any_value(value: Any) -> dict[str, Any]:
    """An OTLP ``AnyValue`` (proto3 JSON: int64 as a decimal string)."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        if -(1 << 63) <= value < 1 << 63:
            return {"intValue": str(value)}
        return {"stringValue": str(value)}
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return {"stringValue": str(value)}
        return {"doubleValue": value}
    if isinstance(value, list | tuple):
        return {"arrayValue": {"values": [_any_value(v) for v in value]}}
    return {"stringValue": str(value)}


def _status_message(headers: dict[str, str], body: bytes) -> str:
    """The receiver's ``Status.message`` (JSON), else the start of a text body."""
    if "protobuf" in headers.get("content-type", ""):
        return "(binary protobuf status)"
    text = body.decode("utf-8", errors="replace").strip()
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text[:500]
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        return str(doc["message"])[:MAX_STATUS_MESSAGE]
    return text[:500]


def _int64(value: Any) -> int:
    """A proto3 JSON int64: a number or a decimal string."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return 0
    return 0
