"""Header handling between client and upstream, per RFC 9110 section 7.6.1
(tests: tests/unit/http/test_headers.py).

Request ids: the proxy's own id for an exchange goes to the client as
``X-LLMProxy-Request-ID`` (taken from the client's ``X-LLMProxy-Request-ID`` or,
as before, ``X-Request-ID`` when sane, else made up) and upstream as
``X-Request-ID``.  The provider's ids (OpenAI's ``x-request-id``, Anthropic's
``request-id``) reach the client unchanged: an SDK reports them, and they are
what the provider's support asks for.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence

from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers

__all__ = [
    "HOP_BY_HOP",
    "PROXY_REQUEST_ID",
    "UPSTREAM_REQUEST_ID_HEADERS",
    "HttpDate",
    "client_request_id",
    "filter_headers",
    "request_id_from",
    "upstream_request_headers",
    "upstream_request_id",
]

# Connection-specific fields never forwarded, in either direction.  Names are
# lower-case bytes, as Twisted's Headers.getAllRawHeaders() yields them... in
# canonical case, so everything is compared lower-cased.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# The proxy's own id of an exchange, in both directions with the client.
PROXY_REQUEST_ID = b"x-llmproxy-request-id"
# Where providers put theirs, in the order they are looked for (OpenAI, Anthropic).
UPSTREAM_REQUEST_ID_HEADERS = (b"x-request-id", b"request-id")
# Set by the proxy for the upstream, or recomputed by Twisted.
_NOT_FORWARDED_UP = HOP_BY_HOP | {b"host", b"content-length", b"x-request-id", PROXY_REQUEST_ID}
# (The upstream's x-request-id goes through; the proxy's own id is set after copying.)
_NOT_FORWARDED_DOWN = HOP_BY_HOP | {PROXY_REQUEST_ID, b"date", b"server"}
_REQUEST_ID_RE = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


def _kept(
    raw: Sequence[tuple[bytes, Sequence[bytes]]], drop: frozenset[bytes]
) -> list[tuple[bytes, Sequence[bytes]]]:
    """The pairs of ``raw`` whose name is neither in ``drop`` (which holds
    ``connection``) nor listed in a ``Connection`` field.

    (A plain loop, a name lower-cased once: this runs twice per exchange.  The
    names a Connection field lists are nearly always hop-by-hop ones, dropped
    anyway: a second pass only when it names another.)
    """
    kept = []
    named: set[bytes] | None = None
    for pair in raw:
        low = pair[0].lower()
        if low not in drop:
            kept.append(pair)
        elif low == b"connection":
            if named is None:
                named = set()
            for v in pair[1]:
                named.update(t.strip().lower() for t in v.split(b",") if t.strip())
    if named:
        named -= drop
        if named:
            kept = [p for p in kept if p[0].lower() not in named]
    return kept


def filter_headers(
    raw: Sequence[tuple[bytes, Sequence[bytes]]], upstream: bool
) -> list[tuple[bytes, Sequence[bytes]]]:
    """Drop hop-by-hop fields (and any named in ``Connection``)."""
    return _kept(raw, _NOT_FORWARDED_UP if upstream else _NOT_FORWARDED_DOWN)


def upstream_request_headers(
    raw: Sequence[tuple[bytes, Sequence[bytes]]], drop: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes]]:
    """The client's request headers as they go upstream: ``filter_headers(raw,
    upstream=True)`` without the (lower-case) names in ``drop``, one
    ``(name, value)`` pair per value."""
    kept = _kept(raw, _NOT_FORWARDED_UP | drop if drop else _NOT_FORWARDED_UP)
    return [(n, v) for n, vs in kept for v in vs]


def request_id_from(value: bytes | None) -> str:
    """Keep a sane client-supplied request id, else make one (32 hex chars)."""
    if value is not None and _REQUEST_ID_RE.match(value):
        return value.decode("ascii")
    return os.urandom(16).hex()


def client_request_id(headers: Headers) -> str:
    """The exchange's id: the client's ``X-LLMProxy-Request-ID``, else its
    ``X-Request-ID`` (each when sane), else a new one."""
    for name in (PROXY_REQUEST_ID, b"x-request-id"):
        values = headers.getRawHeaders(name)
        if values and _REQUEST_ID_RE.match(values[0]):
            return values[0].decode("ascii")
    return os.urandom(16).hex()


def upstream_request_id(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The provider's id of a response (``x-request-id``, else ``request-id``), as sent."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        low = name.lower()
        if low in UPSTREAM_REQUEST_ID_HEADERS and low not in found:
            found[low] = value
    for name in UPSTREAM_REQUEST_ID_HEADERS:
        if name in found:
            return found[name].decode("latin-1")[:200]
    return None


class HttpDate:
    """The value of the ``Date`` response header, formatted at most once a second.

    Twisted formats it anew for every response (``datetimeToString()``, about
    2 us); its resolution is a second, so the last value serves until the
    second changes.  Same text as ``datetimeToString()`` for the same second.
    """

    __slots__ = ("_clock", "_second", "_value")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        second = int(self._clock())
        if second != self._second:
            self._value = datetimeToString(second)
            self._second = second
        return self._value
