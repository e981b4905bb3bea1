"""The floor of capture: the least any design must do per exchange, measured in
the daemon in place of llmproxy's capture pump.

    .venv/bin/python benchmarks/ab.py --stream off=llmproxy-off file=llmproxy-file \\
        floor=llmproxy-file:PYTHONPATH=benchmarks/capture_floor

Python imports ``sitecustomize`` at start-up from ``PYTHONPATH``: this one swaps
:meth:`llmproxy.capture.pump.CapturePump.flush` for :func:`flush` below, in that
daemon only.  Everything else is the product as configured (relay, exporter,
file sink, ``fsync``); only what happens between a record and its encoded
events changes.  For each exchange the floor still builds and encodes both
events with the fields of the canonical event (docs/sinks.md) that an exchange
alone gives: ids, times, method, path, route, provider, upstream, status,
outcome, both header lists with their secrets masked, the request body, a
stream's reads decoded with their offsets or a JSON body's text, model and
token usage read from the body.  It publishes them to the same exporters.  It
leaves out what is llmproxy's beyond that: the session tracker (no
``session_start`` or ``fork``, no session id or seq), prices and spend, the
per-project token counts, the request body's secret keys masked, the JSON
parse of the request (model, stream flag), the cache's fields and the rest of
the schema.

So ``floor`` against ``file`` is what those features cost on the machine
measuring, and ``floor`` against ``off`` about what any capture of the same
events costs in this process (docs/performance.md, "What capture costs,
feature by feature").  Not for production: tests/unit/test_capture_floor.py
checks only that the events it writes are whole.
"""

from __future__ import annotations

from typing import Any

import orjson

from llmproxy.capture import pump
from llmproxy.capture.body import content_headers, media_type
from llmproxy.capture.obfuscate import ALWAYS_MASKED, mask_secret
from llmproxy.capture.record import ExchangeRecord, Headers
from llmproxy.events.envelope import StoredEvent
from llmproxy.events.time import ms3_each, rfc3339


def _headers(headers: Headers) -> dict[str, str]:
    out = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        # The product's rule for the headers it always masks (SPEC: never more
        # than 8 characters of a secret), cookies included as one value.
        out[name] = mask_secret(value) if name in ALWAYS_MASKED else value
    return out


def _common(record: ExchangeRecord, kind: str) -> dict[str, Any]:
    return {
        "schema": 1,
        "type": kind,
        "request_id": record.request_id,
        "start": rfc3339(record.started_at),
        "method": record.method,
        "path": record.path,
        "query": record.query,
        "route": record.route,
        "provider": record.provider,
        "upstream_host": record.upstream_host,
        "client": record.client_addr,
        "machine": record.machine,
        "environment": record.environment,
        "request_headers": _headers(record.request_headers),
        "request_body": record.request_body.decode("utf-8", "replace"),
        "request_body_size": record.request_body_size,
    }


def _model_and_usage(text: str, stream: bool) -> tuple[Any, Any]:
    """From the last ``data:`` line that has a usage (a stream), or the body."""
    if stream:
        at = text.rfind('"usage":{')
        if at < 0:
            return None, None
        start = text.rfind("data: ", 0, at) + 6
        end = text.find("\n", at)
        text = text[start : end if end >= 0 else len(text)]
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    return obj.get("model"), obj.get("usage")


def _response(record: ExchangeRecord) -> dict[str, Any]:
    event = _common(record, "response")
    chunks = record.response_chunks
    texts = [chunk.decode("utf-8", "replace") for _, chunk in chunks]
    content_type, _ = content_headers(record.response_headers)
    stream = media_type(content_type) == "text/event-stream"
    body = "".join(texts)
    model, usage = _model_and_usage(body, stream)
    event.update(
        {
            "end": rfc3339(record.started_at + (record.ended_at or 0.0)),
            "duration_ms": record.duration_ms,
            "ttfb_ms": record.ttfb_ms,
            "status": record.status,
            "outcome": record.outcome,
            "response_headers": _headers(record.response_headers),
            "response_body": None if stream else body,
            "response_body_size": record.response_body_size,
            "response_truncated": record.response_truncated,
            "response_chunks": texts if stream else None,
            "response_chunk_offsets_ms": (
                ms3_each([offset for offset, _ in chunks]) if stream else None
            ),
            "model": model,
            "usage": usage,
        }
    )
    return event


def flush(self: pump.CapturePump, budget: float | None = None) -> None:
    """What ``CapturePump.flush`` does, at its least: every queued entry becomes its
    event, encoded once and published (no budget: the floor's turns are short)."""
    queue = self._queue
    publish = self.bus.publish
    while queue:
        record, body = queue.popleft()
        self.flushed += 1
        event = _common(record, "request") if body is not None else _response(record)
        envelope = StoredEvent(event)
        envelope.json()
        publish(envelope)


pump.CapturePump.flush = flush  # type: ignore[method-assign]
