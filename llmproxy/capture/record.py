"""What the request path records about one exchange (tests: tests/unit/test_events.py).

The proxy fills an ``ExchangeRecord`` while it forwards: plain assignments and
list appends, nothing else.  Everything that costs (header obfuscation, body
decoding, JSON parsing, token usage) happens later, in the exporters, when the
record is turned into canonical events by :mod:`llmproxy.capture.events`.
"""

from __future__ import annotations

from typing import Any

import attrs

Headers = list[tuple[bytes, bytes]]


@attrs.define(slots=True, eq=False)
class ExchangeRecord:
    request_id: str
    # Wall-clock epoch seconds (time.time()); offsets below are relative to it.
    started_at: float
    method: str
    path: str  # the path the client asked for, e.g. /openai/v1/chat/completions
    query: str  # raw query string without '?', '' when none
    route: str  # route name, or "passthrough"
    provider: str  # "openai" | "anthropic" | "" when unknown
    upstream_url: str  # full URL the proxy forwarded to ('' when rejected before)
    upstream_host: str
    client_addr: str
    request_headers: Headers
    # Request body bytes, already capped at capture.request_body_bytes.
    request_body: bytes = b""
    request_body_size: int = 0  # true size
    # Seconds after started_at; None until it happened.
    first_byte_at: float | None = None
    ended_at: float | None = None
    status: int | None = None
    response_headers: Headers = attrs.Factory(list)
    # Response body as it arrived: (offset seconds after started_at, bytes),
    # capped in total at capture.response_body_bytes (raw, maybe compressed).
    response_chunks: list[tuple[float, bytes]] = attrs.Factory(list)
    response_body_size: int = 0  # true size of everything received
    response_truncated: bool = False
    outcome: str = "ok"  # ok | upstream_error | timeout | client_disconnected | rejected
    error: str | None = None  # short human-readable reason when outcome != ok
    session_id: str | None = None
    seq: int | None = None
    cache_status: str | None = None  # hit | miss | bypass | stored | None (no cache)
    environment: str = ""
    machine: str = ""  # user@host
    # (model, usage, finish_reasons) of a JSON response body, when the session
    # tracker parsed it already: the response event reuses them (capture/events.py).
    reply_summary: tuple[Any, ...] | None = None

    @property
    def duration_ms(self) -> float | None:
        return None if self.ended_at is None else self.ended_at * 1000.0

    @property
    def ttfb_ms(self) -> float | None:
        return None if self.first_byte_at is None else self.first_byte_at * 1000.0
