"""The admin listener's bearer token: refusals are audited, the token never is."""

from __future__ import annotations

from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.web.test.requesthelper import DummyRequest

from llmproxy.admin.resource import AdminResource

ADMIN_TOKEN = "admin-canary-7f3b9c2d1e"


class FakeAudit:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, action: str, **fields: Any) -> None:
        self.lines.append({"action": action, **fields})


def admin(audit: FakeAudit | None) -> AdminResource:
    return AdminResource(
        is_ready=lambda: True,
        stats=lambda: {},
        registry=CollectorRegistry(),
        token=ADMIN_TOKEN,
        audit=audit,
    )


def get(resource: AdminResource, path: bytes, authorization: bytes | None = None) -> DummyRequest:
    request = DummyRequest([path.lstrip(b"/")])
    request.path = path
    request.client = IPv4Address("TCP", "127.0.0.1", 40000)
    if authorization is not None:
        request.requestHeaders.addRawHeader(b"authorization", authorization)
    body = resource.render(request)
    request.write(body)
    return request


def test_missing_and_wrong_admin_tokens_are_401_and_audited() -> None:
    audit = FakeAudit()
    resource = admin(audit)
    missing = get(resource, b"/stats")
    wrong = get(resource, b"/metrics", b"Bearer not-" + ADMIN_TOKEN.encode())
    for request in (missing, wrong):
        assert request.responseCode == 401
        body = orjson.loads(b"".join(request.written))
        assert body["error"]["type"] == "authentication_error"
    assert [(a["action"], a["path"], a["reason"]) for a in audit.lines] == [
        ("admin_denied", "/stats", "missing"),
        ("admin_denied", "/metrics", "wrong_token"),
    ]
    assert all(a["client"] == "127.0.0.1:40000" and a["status"] == 401 for a in audit.lines)
    assert ADMIN_TOKEN not in orjson.dumps(audit.lines).decode()


def test_the_right_admin_token_is_not_audited() -> None:
    audit = FakeAudit()
    request = get(admin(audit), b"/health", b"Bearer " + ADMIN_TOKEN.encode())
    assert request.responseCode == 200
    assert audit.lines == []


def test_without_an_audit_log_refusals_still_work() -> None:
    assert get(admin(None), b"/stats").responseCode == 401
