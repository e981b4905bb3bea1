"""What the request path records about one exchange (tests: tests/unit/capture/test_events.py).

The proxy fills an ``ExchangeRecord`` while it forwards: plain assignments and
list appends, nothing else.  Everything that costs (header obfuscation, body
decoding, JSON parsing, token usage) happens later, in the exporters, when the
record is turned into canonical events by :mod:`llmproxy.capture.events`.

An answer from the response cache leaves the entry's chunks in ``replayed``
(one reference); the capture pump tees them into the capture a turn later
(:meth:`ExchangeRecord.capture_replayed`), as the relay tees a live body.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["ExchangeRecord", "Headers"]

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
    # ok | client_error | upstream_rate_limited | upstream_error | timeout |
    # client_disconnected | rejected (llmproxy/proxy/metrics.py says what each means)
    outcome: str = "ok"
    error: str | None = None  # short human-readable reason when outcome != ok
    session_id: str | None = None
    seq: int | None = None
    # hit | conditional-hit | miss | bypass | stored | None (no cache on the route)
    cache_status: str | None = None
    cache_key: str | None = None  # the entry's key, when one was derived
    cache_age: float | None = None  # seconds: the age of the entry a hit was answered from
    # The body chunks a cache hit sent the client, not yet in the capture.
    replayed: tuple[bytes, ...] | None = None
    environment: str = ""
    machine: str = ""  # user@host
    # Whose request this is, as the response cache's namespace has it: the proxy
    # token's project ('' on a passthrough route, where the client's credentials
    # say it); sessions are kept per tenant.
    tenant: str = ""
    # Values the proxy itself sent upstream that no event may show (the provider
    # key a token route injects): masked wherever an upstream echoes them.
    masked: tuple[str, ...] = ()
    # Who asked, when a proxy token was presented (set by the access policy): the
    # token's public id (tok_..., never the secret) and its project.
    token_id: str | None = None
    project: str | None = None
    # (model, usage, finish_reasons) of a JSON response body, when the session
    # tracker parsed it already: the response event reuses them (capture/events.py).
    reply_summary: tuple[Any, ...] | None = None

    def capture_replayed(self, limit: int) -> None:
        """Tee the body a cache hit sent into the capture, within ``limit`` bytes,
        as the relay tees a live body (every chunk went out at the first byte)."""
        chunks, self.replayed = self.replayed, None
        if not chunks:
            return
        offset = self.first_byte_at or 0.0
        captured = self.response_chunks
        left = limit
        for chunk in chunks:
            n = len(chunk)
            self.response_body_size += n
            if left > 0:
                piece = chunk if n <= left else chunk[:left]
                captured.append((offset, piece))
                left -= len(piece)
                if len(piece) < n:
                    self.response_truncated = True
            else:
                self.response_truncated = True

    @property
    def duration_ms(self) -> float | None:
        return None if self.ended_at is None else self.ended_at * 1000.0

    @property
    def ttfb_ms(self) -> float | None:
        return None if self.first_byte_at is None else self.first_byte_at * 1000.0
