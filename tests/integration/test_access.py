"""Proxy tokens, the audit log and the limits, end to end: the real service on
127.0.0.1, real sockets both ways, a real upstream that records what it got."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool

from llmproxy.access.policy import TokenAccess, build_access
from llmproxy.access.tokens import Token, TokenFile
from llmproxy.capture.events import request_event, response_event
from llmproxy.cli import main as cli
from llmproxy.config.loader import load_settings
from llmproxy.config.model import CaptureSettings
from llmproxy.runtime.service import ProxyService
from llmproxy.testing import RecordingEventSink
from tests.fakes.upstream import FakeUpstream
from tests.integration.harness import Running, config_text, stop

pytestmark = pytest.mark.integration

# Canaries: random-looking, so any 8 characters of one found elsewhere is a leak.
OPENAI_KEY = "sk-proj-Q7vT9xKp2LmZ4rWb8NcY6hJd3FgS5aEu"
ANTHROPIC_KEY = "sk-ant-Hn4Rb7Yc2Wq9Ld6Kx3Mf8Tv5Pz1Gs0Je"
COOKIE_VALUE = "Zq8Wm3Xr6Kt1Vb9Nc4Ly7Hp2Fd5Gs0Aj"
ROUTES = """
[route:secure]
prefix = /secure
upstream = http://127.0.0.1:{port}
provider = openai
auth = token
api_key = env:TEST_UPSTREAM_OPENAI_KEY

[route:claude]
prefix = /claude
upstream = http://127.0.0.1:{port}
provider = anthropic
auth = token
api_key = file:anthropic.key
"""
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@attrs.define
class Secured:
    env: Running
    access: TokenAccess
    tokens: TokenFile
    events: RecordingEventSink
    config_path: Path
    log_lines: list[str]
    log_observer: Callable[[dict[str, Any]], None]

    @property
    def audit_path(self) -> Path:
        path = self.env.service.settings.audit_path
        assert path is not None
        return path

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [orjson.loads(line) for line in self.audit_path.read_bytes().splitlines()]

    def create(self, **kw: Any) -> tuple[str, Token]:
        return self.tokens.create("proj-int", time.time(), **kw)

    async def chat(self, secret: str | None, path: str = "/secure/v1/chat/completions") -> Any:
        headers = {"authorization": f"Bearer {secret}"} if secret else {}
        resp = await self.env.client.post(self.env.url(path), json=CHAT, headers=headers)
        resp.body = await resp.content()
        return resp


def _start(tmp_path: Path, server: str = "") -> Secured:
    state = tmp_path / "state"
    state.mkdir()
    (state / "anthropic.key").write_text(ANTHROPIC_KEY + "\n")
    upstream = FakeUpstream(reactor)
    port = upstream.listen()
    text = config_text(port, str(state), ROUTES.format(port=port), server)
    config_path = tmp_path / "llmproxy.ini"
    config_path.write_text(text)
    settings = load_settings(text=text, env={"TEST_UPSTREAM_OPENAI_KEY": OPENAI_KEY})
    log_lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        # The whole event (format string and every field), not only the text.
        log_lines.append(repr(event))

    globalLogPublisher.addObserver(observe)
    service = ProxyService(settings, reactor)
    events = RecordingEventSink()
    service.proxy.events = events
    # The service's own policy, but checking the token file on every request so
    # live changes show without waiting for the 1 s reload interval.
    access = build_access(settings, service.audit, reactor, reload_interval=0.0)
    service.access = service.proxy.access = access
    service.startService()
    assert service.port is not None and service.admin_port is not None
    base = f"http://127.0.0.1:{service.port.getHost().port}"  # type: ignore[attr-defined]
    admin = f"http://127.0.0.1:{service.admin_port.getHost().port}"  # type: ignore[attr-defined]
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory.noisy = False  # type: ignore[attr-defined]
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))  # type: ignore[attr-defined]
    env = Running(service, upstream, base, admin, client, pool)
    return Secured(
        env, access, TokenFile.in_state_dir(state), events, config_path, log_lines, observe
    )


def _stop(s: Secured) -> None:
    stop(s.env)
    s.access.stop(0)
    globalLogPublisher.removeObserver(s.log_observer)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    s = _start(tmp_path)
    try:
        yield s
    finally:
        _stop(s)


def _error(resp: Any) -> dict[str, Any]:
    assert resp.headers.getRawHeaders(b"content-type") == [b"application/json"]
    body = orjson.loads(resp.body)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}
    error: dict[str, Any] = body["error"]
    return error


# -- forwarding with a token ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_valid_token_reaches_the_upstream_with_the_route_key_only(
    secured: Secured,
) -> None:
    secret, _ = secured.create()
    resp = await secured.chat(secret)
    assert resp.code == 200
    seen = secured.env.upstream.requests[-1]["headers"]
    assert seen["authorization"] == [f"Bearer {OPENAI_KEY}"]
    assert "x-api-key" not in seen
    # Sent as x-api-key instead: dropped, and the route key still goes as a bearer.
    resp = await secured.env.client.post(
        secured.env.url("/secure/v1/chat/completions"), json=CHAT, headers={"x-api-key": secret}
    )
    assert resp.code == 200
    await resp.content()
    seen = secured.env.upstream.requests[-1]["headers"]
    assert seen["authorization"] == [f"Bearer {OPENAI_KEY}"]
    assert "x-api-key" not in seen
    assert all(
        secret not in orjson.dumps(r["headers"]).decode() for r in secured.env.upstream.requests
    )


@pytest_twisted.ensureDeferred
async def test_anthropic_clients_send_the_token_as_x_api_key(secured: Secured) -> None:
    secret, _ = secured.create()
    resp = await secured.env.client.post(
        secured.env.url("/claude/v1/chat/completions"),
        json=CHAT,
        headers={"x-api-key": secret, "anthropic-version": "2023-06-01"},
    )
    assert resp.code == 200
    await resp.content()
    seen = secured.env.upstream.requests[-1]["headers"]
    assert seen["x-api-key"] == [ANTHROPIC_KEY]
    assert "authorization" not in seen
    assert seen["anthropic-version"] == ["2023-06-01"]


@pytest_twisted.ensureDeferred
async def test_passthrough_routes_still_forward_the_clients_own_key(secured: Secured) -> None:
    resp = await secured.env.client.post(
        secured.env.url("/mock/v1/chat/completions"),
        json=CHAT,
        headers={"authorization": "Bearer sk-client-own-key"},
    )
    assert resp.code == 200
    await resp.content()
    assert secured.env.upstream.requests[-1]["headers"]["authorization"] == [
        "Bearer sk-client-own-key"
    ]


# -- the answers ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_missing_unknown_revoked_and_expired_tokens_get_401(secured: Secured) -> None:
    revoked, token = secured.create()
    secured.tokens.revoke(token.id, time.time())
    expired, _ = secured.create(expires=time.time() - 1)
    cases = [
        (None, "missing"),
        ("llmp_" + "Z" * 43, "unknown"),
        (revoked, "revoked"),
        (expired, "expired"),
    ]
    for secret, reason in cases:
        resp = await secured.chat(secret)
        assert resp.code == 401, reason
        error = _error(resp)
        assert error["type"] == "authentication_error"
        assert resp.headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="llmproxy"']
        assert resp.headers.getRawHeaders(b"x-llmproxy-request-id")
    assert secured.env.upstream.requests == []
    failures = [a for a in secured.audit() if a["action"] == "auth_failed"]
    assert [a["reason"] for a in failures] == [reason for _, reason in cases]
    assert all(a["client"].startswith("127.0.0.1:") and a["request_id"] for a in failures)
    assert failures[2]["token_id"] == token.id


@pytest_twisted.ensureDeferred
async def test_over_the_rate_limit_is_429_with_retry_after(secured: Secured) -> None:
    secret, token = secured.create(rpm=2)
    codes = [(await secured.chat(secret)).code for _ in range(2)]
    resp = await secured.chat(secret)
    assert codes == [200, 200] and resp.code == 429
    assert _error(resp)["type"] == "rate_limit_error"
    (after,) = resp.headers.getRawHeaders(b"retry-after")
    assert 29 <= int(after) <= 30
    line = secured.audit()[-1]
    assert (line["action"], line["token_id"], line["status"]) == ("rate_limited", token.id, 429)


@pytest_twisted.ensureDeferred
async def test_a_spent_quota_is_403(secured: Secured) -> None:
    secret, _ = secured.create(max_requests=2)
    codes = [(await secured.chat(secret)).code for _ in range(2)]
    resp = await secured.chat(secret)
    assert codes == [200, 200] and resp.code == 403
    assert _error(resp)["type"] == "permission_error"
    assert len(secured.env.upstream.requests) == 2
    assert secured.audit()[-1]["action"] == "quota_exceeded"


@pytest_twisted.ensureDeferred
async def test_a_refused_upstream_host_is_403_and_audited(secured: Secured) -> None:
    resp = await secured.chat(None, "/openai/evil.example/v1/chat/completions")
    assert resp.code == 403 and _error(resp)["code"] == "forbidden"
    line = secured.audit()[-1]
    assert (line["action"], line["host"]) == ("upstream_refused", "evil.example")


@pytest_twisted.ensureDeferred
async def test_quota_is_exact_under_100_concurrent_requests(secured: Secured) -> None:
    secret, _ = secured.create(max_requests=50)
    responses = await defer.gatherResults(
        [defer.ensureDeferred(secured.chat(secret)) for _ in range(100)]
    )
    codes = sorted(r.code for r in responses)
    assert codes == [200] * 50 + [403] * 50
    assert len(secured.env.upstream.requests) == 50
    assert sum(1 for a in secured.audit() if a["action"] == "quota_exceeded") == 50


# -- live changes --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tokens_created_and_revoked_with_the_cli_apply_without_restart(
    secured: Secured, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(secured.config_path)
    assert cli.main(["token", "create", "--config", config, "--project", "live"]) == 0
    secret = capsys.readouterr().out.strip()
    assert (await secured.chat(secret)).code == 200
    (token,) = secured.tokens.read()
    assert cli.main(["token", "revoke", "--config", config, token.id]) == 0
    resp = await secured.chat(secret)
    assert resp.code == 401 and _error(resp)["message"] == "proxy token revoked"
    actions = [a["action"] for a in secured.audit()]
    assert actions[:1] == ["token_created"] and "token_revoked" in actions
    assert actions.count("tokens_reloaded") == 2


@pytest_twisted.ensureDeferred
async def test_a_token_created_with_allowlists_by_the_cli_reaches_only_those_paths(
    secured: Secured, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(secured.config_path)
    create = ["token", "create", "--config", config, "--project", "narrow"]
    assert cli.main([*create, "--allow-path", "v1/chat"]) == 2
    assert "--allow-path: 'v1/chat' is not an absolute path" in capsys.readouterr().err
    assert secured.tokens.read() == ()
    narrow = ["--allow-path", "/v1/chat/completions", "--allow-method", "post"]
    assert cli.main([*create, *narrow]) == 0
    secret = capsys.readouterr().out.strip()
    assert (await secured.chat(secret)).code == 200
    resp = await secured.chat(secret, "/secure/v1/embeddings")
    assert resp.code == 403 and _error(resp)["type"] == "permission_error"
    assert len(secured.env.upstream.requests) == 1
    assert cli.main(["token", "list", "--config", config, "--json"]) == 0
    (listed,) = orjson.loads(capsys.readouterr().out)
    assert (listed["allowed_paths"], listed["allowed_methods"]) == (
        ["/v1/chat/completions"],
        ["POST"],
    )
    created = [a for a in secured.audit() if a["action"] == "token_created"]
    assert [(a["allowed_paths"], a["allowed_methods"]) for a in created] == [
        (["/v1/chat/completions"], ["POST"])
    ]


@pytest_twisted.ensureDeferred
async def test_sighup_reload_is_audited(secured: Secured) -> None:
    secured.access.reload()
    assert secured.audit()[-1]["action"] == "tokens_reloaded"
    assert secured.audit()[-1]["trigger"] == "sighup"


# -- secrets stay secret -------------------------------------------------------------------------


def _fragments(secret: str, size: int = 8) -> set[str]:
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


@pytest_twisted.ensureDeferred
async def test_canary_secrets_never_reach_events_audit_or_logs(secured: Secured) -> None:
    secret, _ = secured.create(max_requests=3, rpm=100)
    headers = {"authorization": f"Bearer {secret}", "cookie": f"session={COOKIE_VALUE}"}
    for _ in range(4):  # three forwarded, one over the quota
        resp = await secured.env.client.post(
            secured.env.url("/secure/v1/chat/completions"), json=CHAT, headers=headers
        )
        await resp.content()
    resp = await secured.chat("llmp_" + secret[5:][::-1])  # unknown, looks real
    await resp.content()
    assert len(secured.env.upstream.requests) == 3
    # The upstream does see the provider key (and the cookie): that is its job.
    assert secured.env.upstream.requests[0]["headers"]["authorization"] == [f"Bearer {OPENAI_KEY}"]

    capture = CaptureSettings()
    events = [request_event(r, capture) for r in secured.events.started] + [
        response_event(r, capture) for r in secured.events.finished
    ]
    assert len(events) == 3 + 5
    event_text = orjson.dumps(events).decode()
    assert "Bearer ****" in event_text and "session=****" in event_text
    audit_text = secured.audit_path.read_text()
    assert audit_text.count("\n") >= 2
    log_text = "\n".join(secured.log_lines)
    for name, text in (("events", event_text), ("audit", audit_text), ("log", log_text)):
        for canary in (secret, OPENAI_KEY, ANTHROPIC_KEY, COOKIE_VALUE):
            leaked = [f for f in _fragments(canary) if f in text]
            assert leaked == [], f"{name} carries part of a secret: {leaked[:3]}"


# -- limits ------------------------------------------------------------------------------------


class RawClient(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.answered: defer.Deferred[bytes] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\r\n\r\n" in self.data and not self.answered.called:
            self.answered.callback(self.data)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.answered.called:
            self.answered.callback(self.data)
        self.closed.callback(None)


async def _connect(env: Running) -> RawClient:
    port = env.service.port.getHost().port  # type: ignore[union-attr]
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    client = RawClient()
    await endpoints.connectProtocol(endpoint, client)
    return client


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await task.deferLater(reactor, 0.01, lambda: None)


async def _raw(env: Running, head: bytes) -> bytes:
    client = await _connect(env)
    client.transport.write(head)  # type: ignore[union-attr]
    await client.closed.addTimeout(5, reactor)
    return client.data


def _json_answer(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"Content-Type: application/json" in head
    return status, orjson.loads(body)


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Secured]:
    s = _start(
        tmp_path,
        server="max_header_count = 20\nmax_header_bytes = 2KiB\nmax_connections = 2\n"
        "idle_timeout = 0.5\n",
    )
    try:
        yield s
    finally:
        _stop(s)


@pytest_twisted.ensureDeferred
async def test_too_many_headers_is_431(limited: Secured) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(25))
    raw = await _raw(limited.env, b"GET /status/204 HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    status, body = _json_answer(raw)
    assert status == 431 and "max_header_count" in body["error"]["message"]
    assert limited.env.service.metrics.requests[("-", 431, "rejected")] == 1
    await _until(lambda: limited.env.service.metrics.connections == 0)


@pytest_twisted.ensureDeferred
async def test_headers_over_the_size_limit_are_431(limited: Secured) -> None:
    raw = await _raw(
        limited.env, b"GET /status/204 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n"
    )
    status, body = _json_answer(raw)
    assert status == 431 and "max_header_bytes" in body["error"]["message"]
    await _until(lambda: limited.env.service.metrics.connections == 0)


@pytest_twisted.ensureDeferred
async def test_a_malformed_request_is_a_json_400(limited: Secured) -> None:
    raw = await _raw(limited.env, b"GET /status/204 HTTP/1.1\r\nno colon here\r\n\r\n")
    status, body = _json_answer(raw)
    assert status == 400 and body["error"]["code"] == "bad_request"


@pytest_twisted.ensureDeferred
async def test_connections_past_max_connections_get_503_and_the_rest_keep_working(
    limited: Secured,
) -> None:
    env = limited.env
    held = [await _connect(env), await _connect(env)]
    for c in held:
        c.transport.write(b"GET /status/204 HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[union-attr]
        assert b" 204 " in (await c.answered.addTimeout(5, reactor)).split(b"\r\n")[0]
    third = await _connect(env)
    await third.closed.addTimeout(5, reactor)
    status, body = _json_answer(third.data)
    assert status == 503 and "max_connections" in body["error"]["message"]
    assert env.service.metrics.requests[("-", 503, "rejected")] == 1
    for c in held:
        c.transport.loseConnection()  # type: ignore[union-attr]
        await c.closed
    await _until(lambda: env.service.metrics.connections == 0)
    resp = await env.client.get(env.url("/status/204"))
    assert resp.code == 204


@pytest_twisted.ensureDeferred
async def test_an_idle_client_connection_is_closed_after_idle_timeout(limited: Secured) -> None:
    started = time.monotonic()
    client = await _connect(limited.env)
    await client.closed.addTimeout(5, reactor)
    assert time.monotonic() - started >= 0.4
    assert client.data == b""
    await _until(lambda: limited.env.service.metrics.connections == 0)


ADMIN_TOKEN = "admin-Tz5Qw8Lk3Rv6Nm1Xb4Hc"


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[Secured]:
    s = _start(tmp_path, server=f"admin_token = {ADMIN_TOKEN}\n")
    try:
        yield s
    finally:
        _stop(s)


@pytest_twisted.ensureDeferred
async def test_admin_access_denied_is_audited(locked: Secured) -> None:
    for headers in ({}, {"authorization": "Bearer wrong"}):
        resp = await locked.env.client.get(locked.env.admin + "/stats", headers=headers)
        assert resp.code == 401
        await resp.content()
    resp = await locked.env.client.get(
        locked.env.admin + "/health", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert resp.code == 200
    await resp.content()
    denials = [(a["action"], a["reason"], a["path"]) for a in locked.audit()]
    assert denials == [
        ("admin_denied", "missing", "/stats"),
        ("admin_denied", "wrong_token", "/stats"),
    ]
    assert not _fragments(ADMIN_TOKEN) & _fragments(locked.audit_path.read_text())
