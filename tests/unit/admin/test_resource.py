"""The admin listener's bearer token: refusals are audited, the token never is; the
probes answer without it while ``probes_public`` is on."""

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


def admin(audit: FakeAudit | None, probes_public: bool = True, ready: bool = True) -> AdminResource:
    return AdminResource(
        is_ready=lambda: ready,
        stats=lambda: {},
        registry=CollectorRegistry(),
        token=ADMIN_TOKEN,
        probes_public=probes_public,
        audit=audit,
    )


def get(
    resource: AdminResource,
    path: bytes,
    authorization: bytes | None = None,
    method: bytes = b"GET",
) -> DummyRequest:
    request = DummyRequest([path.lstrip(b"/")])
    request.method = method
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


def test_the_probes_answer_without_the_token_and_write_no_audit_line() -> None:
    audit = FakeAudit()
    for path, status in ((b"/health", 200), (b"/ready", 200), (b"/health/", 200)):
        request = get(admin(audit), path)
        assert request.responseCode == status, path
    draining = get(admin(audit, ready=False), b"/ready")
    assert draining.responseCode == 503
    assert orjson.loads(b"".join(draining.written)) == {"status": "draining"}
    assert get(admin(audit), b"/health", method=b"HEAD").responseCode == 200
    assert audit.lines == []


def test_everything_but_the_probes_stays_behind_the_token() -> None:
    audit = FakeAudit()
    resource = admin(audit)
    refused = [
        (b"GET", b"/stats"),
        (b"GET", b"/metrics"),
        (b"POST", b"/cache/purge"),
        (b"POST", b"/health"),  # a probe is a GET (or HEAD)
        (b"GET", b"/health/x"),
        (b"GET", b"/healthz"),
        (b"GET", b"//ready"),
    ]
    for method, path in refused:
        assert get(resource, path, method=method).responseCode == 401, (method, path)
    assert len(audit.lines) == len(refused)


def test_with_probes_public_off_the_probes_need_the_token_too() -> None:
    audit = FakeAudit()
    resource = admin(audit, probes_public=False)
    assert get(resource, b"/health").responseCode == 401
    assert get(resource, b"/ready").responseCode == 401
    assert get(resource, b"/ready", b"Bearer " + ADMIN_TOKEN.encode()).responseCode == 200
    assert [a["path"] for a in audit.lines] == ["/health", "/ready"]
