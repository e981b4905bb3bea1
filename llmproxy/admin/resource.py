"""The admin listener: /health, /ready, /stats, /metrics
(tests: tests/integration/test_admin.py, tests/unit/test_admin_audit.py).

With ``server.admin_token`` set, every request needs ``Authorization: Bearer
<token>`` (compared in constant time); each refusal is written to the audit log.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from twisted.web.resource import Resource
from twisted.web.server import Request

from llmproxy.proxy.errors import error_body


class Auditing(Protocol):
    def write(self, action: str, **fields: Any) -> None: ...


class AdminResource(Resource):
    isLeaf = True

    def __init__(
        self,
        *,
        is_ready: Callable[[], bool],
        stats: Callable[[], dict[str, Any]],
        registry: CollectorRegistry,
        token: str = "",
        audit: Auditing | None = None,
    ) -> None:
        super().__init__()
        self._is_ready = is_ready
        self._stats = stats
        self._registry = registry
        self._token = token.encode()
        self._audit = audit

    def render(self, request: Request) -> bytes:
        if self._token and not self._authorized(request):
            if self._audit is not None:
                peer = request.getClientAddress()
                host = getattr(peer, "host", None)
                self._audit.write(
                    "admin_denied",
                    client=f"{host}:{getattr(peer, 'port', '')}" if host else "-",
                    method=request.method.decode("latin-1"),
                    path=request.path.decode("latin-1")[:500],
                    status=401,
                    outcome="denied",
                    # Whether a token was sent at all; never any of it.
                    reason="wrong_token" if request.getHeader(b"authorization") else "missing",
                )
            request.setHeader(b"www-authenticate", b'Bearer realm="llmproxy-admin"')
            return self._json(request, 401, error_body(401, "admin token required"))
        path = request.path.rstrip(b"/") or b"/"
        if path == b"/health":
            return self._json(request, 200, b'{"status":"ok"}')
        if path == b"/ready":
            if self._is_ready():
                return self._json(request, 200, b'{"status":"ready"}')
            return self._json(request, 503, b'{"status":"draining"}')
        if path == b"/stats":
            return self._json(request, 200, orjson.dumps(self._stats(), option=orjson.OPT_INDENT_2))
        if path == b"/metrics":
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            return generate_latest(self._registry)
        return self._json(request, 404, error_body(404, "unknown admin path"))

    def _authorized(self, request: Request) -> bool:
        got = request.getHeader(b"authorization") or b""
        return hmac.compare_digest(got, b"Bearer " + self._token)

    @staticmethod
    def _json(request: Request, status: int, body: bytes) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return body
