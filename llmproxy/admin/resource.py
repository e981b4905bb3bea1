"""The admin listener's resource: /health, /ready, /stats, /metrics, POST /cache/purge
(tests: tests/integration/test_admin.py, tests/unit/admin/test_resource.py,
tests/integration/test_cache.py).  Its site and limits: llmproxy/admin/site.py.

With ``server.admin_token`` set, every request needs ``Authorization: Bearer
<token>`` (compared in constant time); each refusal is written to the audit log.
The probes, ``GET /health`` and ``GET /ready``, are the exception while
``server.probes_public`` is on (the default): a load balancer or a Kubernetes
probe carries no secret, and they tell nothing but whether the process runs and
serves.  The site checks the token as soon as the headers are in, before any
body is read; the resource checks it again (for any other site it is served by).
``POST /cache/purge?key=K`` (or ``prefix=P``, or ``all=1``) deletes cached
responses, answers ``{"purged": N}`` and is written to the audit log.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from llmproxy.http.errors import error_body
from llmproxy.interfaces import Auditor

__all__ = ["AdminResource", "CachePurger"]

_PROBES = (b"/health", b"/ready")


class CachePurger(Protocol):
    def purge(
        self, *, key: str | None = None, prefix: str | None = None
    ) -> defer.Deferred[int]: ...


@attrs.define(eq=False, slots=False, kw_only=True)
class AdminResource(Resource):
    isLeaf = True

    _is_ready: Callable[[], bool]
    _stats: Callable[[], dict[str, Any]]
    _registry: CollectorRegistry
    _token: str = ""
    _probes_public: bool = True
    _audit: Auditor | None = None
    cache: CachePurger | None = None

    def __attrs_pre_init__(self) -> None:
        super().__init__()

    @property
    def needs_token(self) -> bool:
        return bool(self._token)

    def token_matches(self, authorization: bytes | None) -> bool:
        """Whether an ``Authorization`` value carries the admin token (constant time)."""
        return hmac.compare_digest(authorization or b"", b"Bearer " + self._token.encode())

    def audit_denied(self, client: str, method: bytes, path: bytes, sent: bool) -> None:
        """Write a refusal to the audit log: whether a token was sent, never any of it."""
        if self._audit is not None:
            self._audit.write(
                "admin_denied",
                client=client,
                method=method.decode("latin-1"),
                path=path.decode("latin-1")[:500],
                status=401,
                outcome="denied",
                reason="wrong_token" if sent else "missing",
            )

    def render(self, request: Request) -> bytes | int:
        path = request.path.rstrip(b"/") or b"/"
        if self._token and not (self.is_public(request.method, path) or self._authorized(request)):
            peer = request.getClientAddress()
            host = getattr(peer, "host", None)
            self.audit_denied(
                f"{host}:{getattr(peer, 'port', '')}" if host else "-",
                request.method,
                request.path,
                bool(request.getHeader(b"authorization")),
            )
            request.setHeader(b"www-authenticate", b'Bearer realm="llmproxy-admin"')
            return self._json(request, 401, error_body(401, "admin token required"))
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
        if path == b"/cache/purge":
            return self._purge(request)
        return self._json(request, 404, error_body(404, "unknown admin path"))

    def _purge(self, request: Request) -> bytes | int:
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return self._json(request, 405, error_body(405, "use POST /cache/purge"))
        if self.cache is None:
            return self._json(request, 404, error_body(404, "the response cache is not enabled"))
        args = request.args or {}
        key = args.get(b"key", [b""])[0].decode("utf-8", "replace")
        prefix = args.get(b"prefix", [b""])[0].decode("utf-8", "replace")
        everything = args.get(b"all", [b""])[0] in (b"1", b"true", b"yes")
        if bool(key) + bool(prefix) + everything != 1:
            message = "give exactly one of key=KEY, prefix=PREFIX or all=1"
            return self._json(request, 400, error_body(400, message))
        if everything:
            d = self.cache.purge(prefix="")
        elif key:
            d = self.cache.purge(key=key)
        else:
            d = self.cache.purge(prefix=prefix)
        peer = request.getClientAddress()
        host = getattr(peer, "host", None)
        fields = {
            "client": f"{host}:{getattr(peer, 'port', '')}" if host else "-",
            "key": key[:500] or None,
            "prefix": prefix[:500] or ("" if everything else None),
        }

        def done(n: int) -> None:
            if self._audit is not None:
                self._audit.write("cache_purged", **fields, purged=n, outcome="ok")
            self._finish(request, 200, orjson.dumps({"purged": n}))

        def failed(failure: Failure) -> None:
            reason = failure.getErrorMessage()[:300]
            if self._audit is not None:
                self._audit.write("cache_purged", **fields, outcome="error", reason=reason)
            self._finish(request, 503, error_body(503, "purge failed: " + reason))

        d.addCallbacks(done, failed)
        return NOT_DONE_YET

    def _finish(self, request: Request, status: int, body: bytes) -> None:
        if request._disconnected:
            return
        request.write(self._json(request, status, body))
        request.finish()

    def is_public(self, method: bytes, path: bytes) -> bool:
        """Whether this request is a probe that needs no token (``probes_public``);
        ``path``: without its query and trailing slash."""
        return self._probes_public and path in _PROBES and method in (b"GET", b"HEAD")

    def _authorized(self, request: Request) -> bool:
        return self.token_matches(request.getHeader(b"authorization"))

    @staticmethod
    def _json(request: Request, status: int, body: bytes) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return body
