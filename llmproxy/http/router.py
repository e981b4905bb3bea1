"""Which upstream a request path goes to (tests: tests/unit/http/test_router.py).

Two forms: named routes (longest prefix wins; ``prefix = /`` serves plain
``/v1/...``) and the transparent ``/{provider}/{host}/{rest}`` form, which only
reaches hosts on the allowlist.  The allowlist is the SSRF guard: the host
segment must equal an allowed entry exactly, with no encoding, userinfo, dot
segments or port tricks.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import attrs

from llmproxy.config.model import PassthroughSettings, RouteSettings

__all__ = [
    "PROVIDERS",
    "Refusal",
    "Router",
    "Target",
]

PROVIDERS = frozenset({"openai", "anthropic"})
_DOT_SEGMENT = re.compile(rb"(^|/)\.{1,2}(/|$)|%2e|%2f|%5c|\\", re.IGNORECASE)
# Paths remembered with their Target (see Router.resolve); past this, start over.
_RESOLVED_MAX = 1024


@attrs.frozen
class Target:
    """Where to send one request."""

    route: str
    provider: str
    scheme: bytes
    host: bytes  # host[:port] for the Host header
    connect_host: str
    connect_port: int
    base_path: bytes  # upstream path prefix, no trailing slash
    rest: bytes  # path after the route prefix, starts with '/' (or is empty)
    settings: RouteSettings | None = None

    def url(self, query: bytes) -> bytes:
        path = self.base_path + (self.rest or b"/")
        url = self.scheme + b"://" + self.host + path
        return url + b"?" + query if query else url


@attrs.frozen
class Refusal:
    status: int
    message: str
    provider: str = ""
    host: str = ""


@attrs.frozen
class _Compiled:
    prefix: bytes
    target: Target


def _target_for(route: RouteSettings) -> Target:
    u = urlsplit(route.upstream)
    scheme = u.scheme.encode()
    port = u.port or (443 if u.scheme == "https" else 80)
    hostname = u.hostname or ""
    default = (u.scheme == "https" and port == 443) or (u.scheme == "http" and port == 80)
    host_hdr = u.netloc if not default else (f"[{hostname}]" if ":" in hostname else hostname)
    return Target(
        route=route.name,
        provider=route.provider,
        scheme=scheme,
        host=host_hdr.encode(),
        connect_host=hostname,
        connect_port=port,
        base_path=u.path.rstrip("/").encode(),
        rest=b"",
        settings=route,
    )


class Router:
    def __init__(self, routes: tuple[RouteSettings, ...], passthrough: PassthroughSettings):
        compiled = [_Compiled(r.prefix.rstrip("/").encode(), _target_for(r)) for r in routes]
        # Longest prefix first; the '/' route (empty prefix) last.
        self._routes = sorted(compiled, key=lambda c: len(c.prefix), reverse=True)
        self._passthrough = passthrough.enabled
        self._https_hosts = frozenset(h.encode() for h in passthrough.allowed_hosts)
        self._http_hosts = frozenset(h.encode() for h in passthrough.allowed_http_hosts)
        # A client sends the same few paths over and over: resolving one (the
        # dot-segment regex, the prefix scan, a new frozen Target) costs more
        # than the rest of the routing, and its answer depends only on the
        # path and this router's (immutable) settings.  Targets are frozen, so
        # one can serve every request for its path.  Refusals are not kept: a
        # scanner's 404s would only crowd out the real paths.
        self._resolved: dict[bytes, Target] = {}

    def resolve(self, path: bytes) -> Target | Refusal:
        """``path`` is the raw request path (no query), as the client sent it."""
        target = self._resolved.get(path)
        if target is not None:
            return target
        result = self._resolve(path)
        if isinstance(result, Target):
            if len(self._resolved) >= _RESOLVED_MAX:
                self._resolved.clear()
            self._resolved[path] = result
        return result

    def _resolve(self, path: bytes) -> Target | Refusal:
        if not path.startswith(b"/"):
            return Refusal(400, "request target must be an absolute path")
        if self._passthrough:
            parts = path.split(b"/", 3)
            if len(parts) >= 3 and parts[1].decode("latin-1") in PROVIDERS:
                host = parts[2]
                if _looks_like_host(host):
                    return self._passthrough_target(
                        parts[1], host, parts[3] if len(parts) > 3 else b""
                    )
        if _DOT_SEGMENT.search(path):
            return Refusal(400, "dot segments and encoded slashes are not allowed in paths")
        for c in self._routes:
            p = c.prefix
            if path.startswith(p) and (len(path) == len(p) or path[len(p)] == 0x2F or not p):
                return attrs.evolve(c.target, rest=path[len(p) :])
        return Refusal(404, f"no route for {path.decode('latin-1')[:200]}")

    def _passthrough_target(self, provider: bytes, host: bytes, rest: bytes) -> Target | Refusal:
        prov = provider.decode("latin-1")
        # A userinfo (user:SECRET@host) never reaches a message, the audit or an event.
        shown = host.decode("latin-1")
        if "@" in shown:
            shown = "****@" + shown.rpartition("@")[2]
        shown = shown[:255]
        if host in self._https_hosts:
            scheme, default_port = b"https", 443
        elif host in self._http_hosts:
            scheme, default_port = b"http", 80
        else:
            return Refusal(403, f"upstream host {shown!r} is not allowed", prov, shown)
        rest_path = b"/" + rest
        if _DOT_SEGMENT.search(rest_path):
            return Refusal(403, "dot segments and encoded slashes are not allowed", prov, shown)
        name, _, port = host.partition(b":")
        return Target(
            route="passthrough",
            provider=prov,
            scheme=scheme,
            host=host,
            connect_host=name.decode("ascii"),
            connect_port=int(port) if port else default_port,
            base_path=b"",
            rest=rest_path,
        )


def _looks_like_host(segment: bytes) -> bool:
    # 'v1' is an API path segment; anything with a dot, colon, bracket, '@' or
    # '%' or the name localhost is meant as a host, and must pass the allowlist.
    return bool(segment) and (
        any(c in segment for c in b".:[@%") or segment.lower() == b"localhost"
    )
