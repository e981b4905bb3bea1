"""What the response cache may serve and store, for how long, and under which key
(tests: tests/unit/cache/test_policy.py).

Pure functions over methods, headers and bytes; nothing here touches a store,
a clock or a socket.

Requests (:func:`plan_request`): GET and HEAD are looked up; POST only when the
route says ``cache = on`` or the client opts in with ``Cache-Control: public``
and ``max-age``/``s-maxage``; any other method is a bypass (``fwd=method``).
``Cache-Control: no-store`` from the client bypasses the cache both ways;
``no-cache`` (or ``Pragma: no-cache``, or ``max-age=0``) skips the lookup and
stores the fresh answer (``fwd=request``).  Bodies above ``max_object_bytes``
and ``Range`` requests are bypassed.

Responses (:func:`judge_response`): only 2xx other than 206; never with
``no-store``, ``private`` or ``Vary: *``; never above ``max_object_bytes``.
TTL: the response's ``s-maxage``, then its ``max-age``, then the client's own
``s-maxage``/``max-age`` (the opt-in), then the route's ``cache_ttl``, then
``[cache] default_ttl``; less the ``Age`` the upstream reports.  A response
``no-cache`` is not honoured: LLM APIs send it on every stream to keep
intermediaries from buffering, not to forbid reuse.

Keys (:func:`cache_key`): ``ROUTE/NAMESPACE/METHOD/DIGEST``.  The digest is a
SHA-256 over the route and upstream URL, method, path, sorted query, the body's
SHA-256, the Accept trio, headers that change what a provider answers
(``OpenAI-Organization``, ``Anthropic-Version``, ...) and the full credential
namespace.  The namespace is the proxy token's project (``p-...``) or, on
passthrough routes, a SHA-256 over the credential headers the client sent
(``Authorization``, ``x-api-key``, ``api-key``; ``Cookie`` only without any of
them), shown as ``k-`` and its first 16 hex digits, or ``anon`` without any:
two different credentials never share an entry, and no credential ever appears
in a key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from urllib.parse import quote

import attrs
from twisted.web.http_headers import Headers

__all__ = [
    "ACCEPT_HEADERS",
    "CACHEABLE_METHODS",
    "CREDENTIAL_HEADERS",
    "SCOPE_HEADERS",
    "Namespace",
    "RequestPlan",
    "Storability",
    "cache_key",
    "delta_seconds",
    "http_date",
    "judge_response",
    "namespace_for",
    "not_modified",
    "parse_cache_control",
    "plan_request",
    "sorted_query",
    "vary_matches",
    "vary_values",
]

CACHEABLE_METHODS = frozenset({b"GET", b"HEAD"})
# Headers whose value decides who is asking: hashed into the namespace.  A
# cookie only when there is none of these (SDKs keep the upstream's load
# balancer cookies; with a key present, they say nothing about the tenant).
CREDENTIAL_HEADERS = (b"authorization", b"x-api-key", b"api-key")
# Headers that change what the provider answers for the same body.
SCOPE_HEADERS = (
    b"openai-organization",
    b"openai-project",
    b"openai-beta",
    b"anthropic-version",
    b"anthropic-beta",
)
ACCEPT_HEADERS = (b"accept", b"accept-encoding", b"accept-language")


def parse_cache_control(values: Iterable[bytes]) -> dict[str, str]:
    """``Cache-Control`` directives, lower-case names, '' for no argument."""
    out: dict[str, str] = {}
    for value in values:
        for part in value.decode("latin-1").split(","):
            name, _, arg = part.strip().partition("=")
            name = name.strip().lower()
            if name:
                out.setdefault(name, arg.strip().strip('"'))
    return out


def delta_seconds(text: str | None) -> float | None:
    """A ``max-age``-style argument as seconds; None when absent or malformed."""
    if text is None or not text.isdigit():
        return None
    return float(int(text))


def _first(headers: Headers, name: bytes) -> bytes | None:
    values = headers.getRawHeaders(name)
    return b", ".join(values) if values else None


# -- requests ------------------------------------------------------------------------


@attrs.frozen
class RequestPlan:
    """What to do with one request on a cached route."""

    action: str  # "lookup" | "revalidate" | "bypass"
    fwd: str = ""  # RFC 9211 fwd= when not a lookup: "method", "bypass", "request"
    detail: str = ""  # why, for Cache-Status
    max_age: float | None = None  # the oldest entry the client accepts
    ttl_hint: float | None = None  # the client's s-maxage/max-age (its opt-in)


def plan_request(
    method: bytes,
    headers: Headers,
    *,
    route_on: bool,
    body_size: int,
    max_object_bytes: int,
) -> RequestPlan:
    cc = parse_cache_control(headers.getRawHeaders(b"cache-control", ()))
    client_ttl = delta_seconds(cc.get("s-maxage")) or delta_seconds(cc.get("max-age"))
    if method not in CACHEABLE_METHODS:
        opted_in = "public" in cc and client_ttl is not None
        if method != b"POST" or not (route_on or opted_in):
            return RequestPlan("bypass", fwd="method", detail="method")
    if "no-store" in cc:
        return RequestPlan("bypass", fwd="bypass", detail="no-store")
    if headers.hasHeader(b"range"):
        return RequestPlan("bypass", fwd="bypass", detail="range")
    if body_size > max_object_bytes:
        return RequestPlan("bypass", fwd="bypass", detail="body-too-large")
    max_age = delta_seconds(cc.get("max-age"))
    no_cache = "no-cache" in cc or (
        not cc and b"no-cache" in (_first(headers, b"pragma") or b"").lower()
    )
    if no_cache or max_age == 0:
        return RequestPlan("revalidate", fwd="request", detail="no-cache", ttl_hint=client_ttl)
    return RequestPlan("lookup", max_age=max_age, ttl_hint=client_ttl)


# -- keys ------------------------------------------------------------------------------


@attrs.frozen
class Namespace:
    shown: str  # in the key, for purging by prefix: p-PROJECT | k-HEX16 | anon
    full: bytes  # hashed into the digest


def namespace_for(project: str, headers: Headers) -> Namespace:
    """The tenant a request belongs to: the token's project, else its credentials."""
    if project:
        return Namespace("p-" + quote(project, safe=""), b"p:" + project.encode())
    h = hashlib.sha256()
    seen = False
    for name in CREDENTIAL_HEADERS:
        for value in headers.getRawHeaders(name, ()):
            seen = True
            h.update(b"%s:%d:%s\n" % (name, len(value), value))
    if not seen:
        for value in headers.getRawHeaders(b"cookie", ()):
            seen = True
            h.update(b"cookie:%d:%s\n" % (len(value), value))
    if not seen:
        return Namespace("anon", b"anon")
    digest = h.hexdigest()
    return Namespace("k-" + digest[:16], b"k:" + digest.encode())


def sorted_query(query: bytes) -> bytes:
    return b"&".join(sorted(p for p in query.split(b"&") if p))


def cache_key(
    *,
    route: str,
    upstream: bytes,
    method: bytes,
    query: bytes,
    body: bytes,
    headers: Headers,
    namespace: Namespace,
) -> str:
    """``ROUTE/NAMESPACE/METHOD/DIGEST``; ``upstream`` is the URL without its query."""
    fields = [
        b"llmproxy-cache-1",
        route.encode(),
        upstream,
        method,
        sorted_query(query),
        hashlib.sha256(body).digest(),
        namespace.full,
    ]
    fields.extend(_first(headers, name) or b"\x00" for name in ACCEPT_HEADERS + SCOPE_HEADERS)
    # Each field length-prefixed: no two different inputs hash the same bytes.
    h = hashlib.sha256(b"".join(b"%d:%s" % (len(f), f) for f in fields))
    return f"{route}/{namespace.shown}/{method.decode('latin-1')}/{h.hexdigest()}"


# -- responses -------------------------------------------------------------------------


@attrs.frozen
class Storability:
    ttl: float  # > 0: store for this long (already less the upstream's Age)
    detail: str = ""  # why not, for Cache-Status
    age: float = 0.0  # the upstream's Age header
    vary: tuple[bytes, ...] = ()  # lower-case request header names the response varies on


def judge_response(
    status: int,
    headers: Sequence[tuple[bytes, Sequence[bytes]]],
    *,
    length: int | None,
    max_object_bytes: int,
    fallback_ttl: float,
) -> Storability:
    """May this upstream response be stored, and for how long?  ``headers`` raw, any case."""
    if not 200 <= status < 300 or status == 206:
        return Storability(0.0, "status")
    cc_values: list[bytes] = []
    vary: list[bytes] = []
    age = 0.0
    for name, values in headers:
        low = name.lower()
        if low == b"cache-control":
            cc_values.extend(values)
        elif low == b"vary":
            for v in values:
                vary.extend(t.strip().lower() for t in v.split(b",") if t.strip())
        elif low == b"age" and values:
            age = delta_seconds(values[0].decode("latin-1").strip()) or 0.0
    cc = parse_cache_control(cc_values)
    if "no-store" in cc:
        return Storability(0.0, "no-store")
    if "private" in cc:
        return Storability(0.0, "private")
    if b"*" in vary:
        return Storability(0.0, "vary")
    if length is not None and length > max_object_bytes:
        return Storability(0.0, "too-large")
    ttl = delta_seconds(cc.get("s-maxage"))
    if ttl is None:
        ttl = delta_seconds(cc.get("max-age"))
    if ttl is None:
        ttl = fallback_ttl
    ttl -= age
    if ttl <= 0:
        return Storability(0.0, "stale", age)
    return Storability(ttl, "", age, tuple(dict.fromkeys(vary)))


def vary_values(names: Iterable[bytes], headers: Headers) -> tuple[tuple[bytes, bytes], ...]:
    """The request's values for the headers a response varies on."""
    return tuple((n, _first(headers, n) or b"") for n in names)


def vary_matches(stored: Iterable[tuple[bytes, bytes]], headers: Headers) -> bool:
    return all((_first(headers, n) or b"") == v for n, v in stored)


# -- conditional requests --------------------------------------------------------------


def _etags(value: bytes) -> list[bytes]:
    return [t.strip().removeprefix(b"W/") for t in value.split(b",") if t.strip()]


def not_modified(
    headers: Headers, etag: bytes | None, last_modified: float | None, stored_at: float
) -> bool:
    """Does the client's ``If-None-Match``/``If-Modified-Since`` match the entry (RFC 9110 13)?

    ``If-None-Match`` uses the weak comparison and wins over ``If-Modified-Since``,
    which compares with ``Last-Modified`` or, without one, when the entry was stored.
    """
    inm = _first(headers, b"if-none-match")
    if inm is not None:
        tags = _etags(inm)
        if b"*" in tags:
            return True
        return etag is not None and etag.strip().removeprefix(b"W/") in tags
    ims = _first(headers, b"if-modified-since")
    if ims is None:
        return False
    since = http_date(ims)
    if since is None:
        return False
    changed = last_modified if last_modified is not None else stored_at
    return changed <= since


def http_date(value: bytes) -> float | None:
    from email.utils import parsedate_to_datetime

    try:
        return parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
