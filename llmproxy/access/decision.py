"""What access control answers for one request: forward it (``Allow``, with the
upstream headers to set or drop) or answer it (``Deny``)
(tests: tests/unit/access/test_policy.py).

The proxy (llmproxy/proxy/forward.py) asks an ``AccessPolicy``
(llmproxy.interfaces) and acts on the answer; ``PassthroughAccess`` is the
policy of a proxy without tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from twisted.web.server import Request

    from llmproxy.capture.record import ExchangeRecord
    from llmproxy.http.router import Target

__all__ = ["ALLOW", "Allow", "Deny", "PassthroughAccess"]


@attrs.frozen
class Allow:
    """Forward the request; rewrite these upstream headers (e.g. inject the route's key)."""

    set_headers: tuple[tuple[bytes, bytes], ...] = ()
    drop_headers: frozenset[bytes] = frozenset()  # lower-case names
    # Whose request this is, for the response cache: the proxy token's project.
    # Empty: the cache hashes the client's own credentials instead.
    namespace: str = ""
    # Values in set_headers no event may show (the injected provider key).
    masked: tuple[str, ...] = ()


@attrs.frozen
class Deny:
    """Answer the client with an error; the upstream is never contacted."""

    status: int
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()
    code: str | None = None  # the error's ``code``; None: the status's own


ALLOW = Allow()


class PassthroughAccess:
    """Every route forwards the client's own credentials; nothing to check."""

    def check(self, request: Request, target: Target, record: ExchangeRecord) -> Allow | Deny:
        return ALLOW

    def finished(self, record: ExchangeRecord) -> None:
        pass
