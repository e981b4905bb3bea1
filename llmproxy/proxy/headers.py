"""Header handling between client and upstream, per RFC 9110 section 7.6.1
(tests: tests/unit/test_headers.py)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

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
# Set by the proxy for the upstream, or recomputed by Twisted.
_NOT_FORWARDED_UP = HOP_BY_HOP | {b"host", b"content-length", b"x-request-id"}
_NOT_FORWARDED_DOWN = HOP_BY_HOP | {b"x-request-id", b"date", b"server"}
_REQUEST_ID_RE = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


def _connection_tokens(headers: Iterable[tuple[bytes, Sequence[bytes]]]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, values in headers:
        if name.lower() == b"connection":
            for v in values:
                tokens.update(t.strip().lower() for t in v.split(b",") if t.strip())
    return frozenset(tokens)


def filter_headers(
    raw: Sequence[tuple[bytes, Sequence[bytes]]], upstream: bool
) -> list[tuple[bytes, Sequence[bytes]]]:
    """Drop hop-by-hop fields (and any named in ``Connection``)."""
    drop = _NOT_FORWARDED_UP if upstream else _NOT_FORWARDED_DOWN
    extra = _connection_tokens(raw)
    return [(n, v) for n, v in raw if (low := n.lower()) not in drop and low not in extra]


def request_id_from(value: bytes | None) -> str:
    """Keep a sane client X-Request-ID, else make one (32 hex chars)."""
    if value is not None and _REQUEST_ID_RE.match(value):
        return value.decode("ascii")
    return os.urandom(16).hex()
