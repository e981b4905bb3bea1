"""The per-route access policy and rate limits, driven by a Clock (no reactor, no sockets)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from llmproxy.access.decision import Allow, Deny
from llmproxy.access.limits import RateLimiter, TokenBucket, retry_after_seconds
from llmproxy.access.policy import TokenAccess, build_access, presented_token
from llmproxy.access.tokens import Token, TokenFile, UsageFile, UsageLedger
from llmproxy.capture.record import ExchangeRecord
from llmproxy.config.model import PassthroughSettings, RouteSettings, ServerSettings, Settings
from llmproxy.http.router import Router, Target

NOW = 1_800_000_000.0
OPENAI_KEY = "sk-proj-UPSTREAM-openai-key-0123456789"
ANTHROPIC_KEY = "sk-ant-UPSTREAM-anthropic-key-0123456789"
ROUTES = (
    RouteSettings("secure", "/secure", "https://api.openai.com", auth="token", api_key=OPENAI_KEY),
    RouteSettings(
        "claude",
        "/claude",
        "https://api.anthropic.com",
        provider="anthropic",
        auth="token",
        api_key=ANTHROPIC_KEY,
    ),
    RouteSettings("open", "/open", "https://api.openai.com"),
)


class FakeAudit:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, action: str, **fields: Any) -> None:
        self.lines.append({"action": action, **fields})

    def actions(self) -> list[str]:
        return [line["action"] for line in self.lines]


@attrs.define
class World:
    clock: Clock
    audit: FakeAudit
    tokens: TokenFile
    usage: UsageFile
    access: TokenAccess
    router: Router = attrs.Factory(lambda: Router(ROUTES, PassthroughSettings()))

    def check(
        self, path: str = "/secure/v1/chat/completions", *, method: bytes = b"GET", **headers: str
    ) -> Allow | Deny:
        request = DummyRequest([b""])
        request.method = method
        request.client = IPv4Address("TCP", "10.1.2.3", 5555)
        for name, value in headers.items():
            request.requestHeaders.addRawHeader(name.replace("_", "-"), value.encode())
        target = self.router.resolve(path.encode())
        assert isinstance(target, Target)
        record = ExchangeRecord(
            request_id="req-1",
            started_at=self.clock.seconds(),
            method="POST",
            path=path,
            query="",
            route=target.route,
            provider=target.provider,
            upstream_url="",
            upstream_host="",
            client_addr="",
            request_headers=[],
        )
        return self.access.check(request, target, record)

    def bearer(self, secret: str, path: str = "/secure/v1/chat/completions") -> Allow | Deny:
        return self.check(path, authorization=f"Bearer {secret}")


def open_world(tmp_path: Path, now: float) -> World:
    """A started access policy over ``tmp_path`` on a Clock at ``now``."""
    clock = Clock()
    clock.advance(now)
    audit = FakeAudit()
    settings = Settings(server=ServerSettings(state_dir=tmp_path), routes=ROUTES)
    access = build_access(settings, audit, clock)
    access.start()
    return World(
        clock, audit, TokenFile.in_state_dir(tmp_path), UsageFile.in_state_dir(tmp_path), access
    )


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = open_world(tmp_path, NOW)
    yield w
    w.access.stop(0)


def make(world: World, **kw: Any) -> tuple[str, Token]:
    secret, token = world.tokens.create("proj-x", world.clock.seconds(), **kw)
    world.access.reload()
    return secret, token


def denied(decision: Allow | Deny, status: int) -> Deny:
    assert isinstance(decision, Deny), decision
    assert decision.status == status
    return decision


# -- passthrough ----------------------------------------------------------------------


def test_passthrough_routes_and_the_transparent_form_are_left_alone(world: World) -> None:
    assert world.check("/open/v1/models", authorization="Bearer sk-client-own") == Allow()
    target = world.router.resolve(b"/openai/api.openai.com/v1/models")
    assert isinstance(target, Target) and target.settings is None
    assert world.check("/openai/api.openai.com/v1/models") == Allow()
    assert world.audit.lines == []


# -- good tokens ----------------------------------------------------------------------


def test_bearer_token_injects_the_openai_key_and_drops_client_credentials(world: World) -> None:
    secret, _ = make(world)
    decision = world.bearer(secret)
    assert isinstance(decision, Allow)
    assert decision.set_headers == ((b"authorization", b"Bearer " + OPENAI_KEY.encode()),)
    assert {b"authorization", b"x-api-key", b"api-key"} <= decision.drop_headers


def test_x_api_key_token_injects_the_anthropic_key_as_x_api_key(world: World) -> None:
    secret, _ = make(world)
    decision = world.check("/claude/v1/messages", x_api_key=secret)
    assert isinstance(decision, Allow)
    assert decision.set_headers == ((b"x-api-key", ANTHROPIC_KEY.encode()),)
    assert b"authorization" in decision.drop_headers and b"x-api-key" in decision.drop_headers


def test_presented_token_prefers_bearer_then_x_api_key() -> None:
    request = DummyRequest([b""])
    assert presented_token(request) is None
    request.requestHeaders.addRawHeader(b"authorization", b"Basic dXNlcjpwYXNz")
    assert presented_token(request) is None
    request.requestHeaders.addRawHeader(b"x-api-key", b" llmp_from_header ")
    assert presented_token(request) == b"llmp_from_header"
    request.requestHeaders.setRawHeaders(b"authorization", [b"bearer   llmp_bearer"])
    assert presented_token(request) == b"llmp_bearer"


# -- 401 ------------------------------------------------------------------------------


def test_missing_token_is_401_and_audited(world: World) -> None:
    d = denied(world.check(), 401)
    assert world.access.stats()["denied"] == 1
    assert "proxy token is required" in d.message
    assert (b"www-authenticate", b'Bearer realm="llmproxy"') in d.headers
    (line,) = world.audit.lines
    assert line["action"] == "auth_failed" and line["reason"] == "missing"
    assert line["client"] == "10.1.2.3:5555" and line["request_id"] == "req-1"
    assert line["route"] == "secure" and line["outcome"] == "denied" and line["status"] == 401


def test_unknown_token_is_401_and_audited_by_fingerprint_only(world: World) -> None:
    make(world)
    guess = "llmp_" + "A" * 43
    d = denied(world.bearer(guess), 401)
    assert d.message == "invalid proxy token"
    line = world.audit.lines[-1]
    assert line["reason"] == "unknown" and line["token_id"].startswith("tok_")
    assert guess not in orjson.dumps(world.audit.lines).decode()
    assert "A" * 8 not in orjson.dumps(world.audit.lines).decode()


def test_overlong_credentials_are_unknown_without_hashing(world: World) -> None:
    d = denied(world.bearer("x" * 5000), 401)
    assert d.message == "invalid proxy token"
    assert world.audit.lines[-1]["token_id"] == "-"


def test_revoked_token_is_401(world: World) -> None:
    secret, token = make(world)
    world.tokens.revoke(token.id, world.clock.seconds())
    world.access.reload()
    d = denied(world.bearer(secret), 401)
    assert d.message == "proxy token revoked"
    line = world.audit.lines[-1]
    assert (line["reason"], line["token_id"], line["project"]) == ("revoked", token.id, "proj-x")


def test_token_expires_on_the_clock(world: World) -> None:
    secret, _ = make(world, expires=NOW + 60)
    assert isinstance(world.bearer(secret), Allow)
    world.clock.advance(60)
    assert denied(world.bearer(secret), 401).message == "proxy token expired"
    assert world.audit.lines[-1]["reason"] == "expired"


# -- 403 and 429 ------------------------------------------------------------------------


def test_quota_is_exact_then_403_and_audited(world: World) -> None:
    secret, token = make(world, max_requests=3)
    assert [isinstance(world.bearer(secret), Allow) for _ in range(5)] == [
        True,
        True,
        True,
        False,
        False,
    ]
    d = denied(world.bearer(secret), 403)
    assert "quota" in d.message and "3 requests" in d.message
    assert world.audit.actions()[-1] == "quota_exceeded"
    assert world.audit.lines[-1]["token_id"] == token.id
    assert world.usage.read() == {token.id: 3}


def test_rate_limit_is_429_with_retry_after_and_recovers_on_the_clock(world: World) -> None:
    secret, _ = make(world, rpm=2)
    assert isinstance(world.bearer(secret), Allow)
    assert isinstance(world.bearer(secret), Allow)
    d = denied(world.bearer(secret), 429)
    assert d.headers == ((b"retry-after", b"30"),)
    assert "2 requests per minute" in d.message
    assert world.audit.lines[-1]["action"] == "rate_limited"
    world.clock.advance(29)
    assert denied(world.bearer(secret), 429).headers == ((b"retry-after", b"1"),)
    world.clock.advance(1)
    assert isinstance(world.bearer(secret), Allow)


def test_rate_limited_requests_do_not_spend_the_quota(world: World) -> None:
    secret, token = make(world, rpm=1, max_requests=10)
    world.bearer(secret)
    for _ in range(5):
        denied(world.bearer(secret), 429)
    world.access.stop(0)
    assert world.usage.read() == {token.id: 1}


def test_a_spent_quota_answers_403_before_the_rate_limit(world: World) -> None:
    secret, _ = make(world, rpm=1, max_requests=1)
    world.bearer(secret)
    denied(world.bearer(secret), 403)


# -- live reload ---------------------------------------------------------------------------


def test_token_file_changes_are_seen_within_a_second(world: World) -> None:
    secret, token = world.tokens.create("late", world.clock.seconds())
    denied(world.bearer(secret), 401)  # checked the file just now: not yet looked again
    world.clock.advance(1)
    assert isinstance(world.bearer(secret), Allow)
    world.tokens.revoke(token.id, world.clock.seconds())
    world.clock.advance(1)
    assert denied(world.bearer(secret), 401).message == "proxy token revoked"
    reloads = [line for line in world.audit.lines if line["action"] == "tokens_reloaded"]
    assert [r["trigger"] for r in reloads] == ["file_change", "file_change"]


def test_reload_sighup_is_immediate_and_audited(world: World) -> None:
    secret, _ = world.tokens.create("now", world.clock.seconds())
    world.bearer(secret)
    world.access.reload()
    assert isinstance(world.bearer(secret), Allow)
    assert {"action": "tokens_reloaded", "trigger": "sighup", "tokens": 1, "active": 1} in (
        world.audit.lines
    )


def test_a_broken_token_file_keeps_the_previous_tokens(world: World) -> None:
    secret, _ = make(world)
    world.tokens.path.write_text("{ half written by hand")
    world.access.reload()
    assert isinstance(world.bearer(secret), Allow)


def test_deleting_the_token_file_refuses_every_token(world: World) -> None:
    secret, _ = make(world)
    world.tokens.path.unlink()
    world.access.reload()
    denied(world.bearer(secret), 401)


# -- usage persistence -------------------------------------------------------------------


def test_counts_are_flushed_on_the_clock_and_exactly_on_stop(world: World) -> None:
    secret, token = make(world)
    world.bearer(secret)
    world.bearer(secret)
    assert world.usage.read() == {}
    world.clock.advance(5)
    assert world.usage.read() == {token.id: 2}
    world.bearer(secret)
    world.access.stop(0)
    assert world.usage.read() == {token.id: 3}


def test_quota_counts_survive_a_restart(world: World, tmp_path: Path) -> None:
    secret, _ = make(world, max_requests=2)
    world.bearer(secret)
    world.access.stop(0)
    settings = Settings(server=ServerSettings(state_dir=tmp_path), routes=ROUTES)
    again = build_access(settings, world.audit, world.clock)
    again.start()
    world.access = again
    assert isinstance(world.bearer(secret), Allow)
    denied(world.bearer(secret), 403)


def test_a_policy_never_started_still_honours_persisted_counts(
    world: World, tmp_path: Path
) -> None:
    secret, token = make(world, max_requests=2)
    world.bearer(secret)
    world.bearer(secret)
    world.access.stop(0)
    settings = Settings(server=ServerSettings(state_dir=tmp_path), routes=ROUTES)
    world.access = build_access(settings, world.audit, world.clock)  # no start()
    assert denied(world.bearer(secret), 403)
    world.access.stop(0)
    assert world.usage.read() == {token.id: 2}


def test_no_token_routes_means_no_files_and_no_timers(tmp_path: Path) -> None:
    clock = Clock()
    settings = Settings(server=ServerSettings(state_dir=tmp_path), routes=ROUTES[2:])
    access = build_access(settings, FakeAudit(), clock)
    access.start()
    assert clock.getDelayedCalls() == []
    access.stop(0)
    assert list(tmp_path.iterdir()) == []


def test_the_ledger_is_the_one_given(tmp_path: Path) -> None:
    # TokenAccess takes its collaborators; build_access only picks the files.
    ledger = UsageLedger(UsageFile(tmp_path / "u.json"))
    access = TokenAccess(
        routes=ROUTES,
        tokens=TokenFile(tmp_path / "t.json"),
        usage=ledger,
        audit=FakeAudit(),
        clock=Clock(),
    )
    access.start()
    access.stop(0)
    assert UsageFile(tmp_path / "u.json").read() == {}


# -- the token bucket --------------------------------------------------------------------


def test_bucket_allows_a_burst_of_rpm_then_refills_steadily() -> None:
    bucket = TokenBucket.full(60, 0.0)
    assert [bucket.take(0.0) for _ in range(60)] == [0.0] * 60
    assert bucket.take(0.0) == pytest.approx(1.0)
    assert bucket.take(0.5) == pytest.approx(0.5)
    assert bucket.take(1.0) == 0.0


def test_bucket_survives_a_clock_stepping_back() -> None:
    bucket = TokenBucket.full(1, 100.0)
    assert bucket.take(100.0) == 0.0
    # No refill for the backward step, and refilling goes on from the new time
    # (not frozen until the clock is back at 100).
    assert bucket.take(50.0) == pytest.approx(60.0)
    assert bucket.take(110.0) == 0.0


def test_limiter_starts_a_new_bucket_when_rpm_changes() -> None:
    limiter = RateLimiter()
    assert limiter.take("t", 1, 0.0) == 0.0
    assert limiter.take("t", 1, 0.0) > 0
    assert limiter.take("t", 5, 0.0) == 0.0


@pytest.mark.parametrize(("wait", "header"), [(0.01, 1), (1.0, 1), (1.2, 2), (29.9, 30)])
def test_retry_after_rounds_up(wait: float, header: int) -> None:
    assert retry_after_seconds(wait) == header


# ---------------------------------------------------------------- paths, methods, scope

SCOPED_ROUTES = (
    RouteSettings(
        "secure",
        "/secure",
        "https://api.openai.com",
        auth="token",
        api_key=OPENAI_KEY,
        allowed_paths=("/v1/chat/completions", "/v1/models", "/v1/*/embeddings"),
        allowed_methods=("get", "POST"),
        openai_project="proj_operator",
    ),
    RouteSettings("open", "/open", "https://api.openai.com", allowed_paths=("/v1/models",)),
    RouteSettings(
        "scoped", "/scoped", "https://api.openai.com", auth="token", api_key=OPENAI_KEY,
        forward_openai_scope=True,
    ),
    RouteSettings("plain", "/plain", "https://api.openai.com"),
)  # fmt: skip


@pytest.fixture
def scoped(tmp_path: Path) -> Iterator[World]:
    clock = Clock()
    clock.advance(NOW)
    audit = FakeAudit()
    settings = Settings(server=ServerSettings(state_dir=tmp_path), routes=SCOPED_ROUTES)
    access = build_access(settings, audit, clock)
    access.start()
    w = World(
        clock,
        audit,
        TokenFile.in_state_dir(tmp_path),
        UsageFile.in_state_dir(tmp_path),
        access,
        Router(SCOPED_ROUTES, PassthroughSettings()),
    )
    yield w
    access.stop(0)


def check_as(world: World, method: bytes, path: str, secret: str | None) -> Allow | Deny:
    if secret is None:
        return world.check(path, method=method)
    return world.check(path, method=method, authorization=f"Bearer {secret}")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        (b"POST", "/secure/v1/chat/completions", True),
        (b"GET", "/secure/v1/models", True),
        (b"GET", "/secure/v1/models/gpt-4o", True),  # a prefix on whole segments
        (b"POST", "/secure/v1/abc/embeddings", True),  # a glob
        (b"GET", "/secure/v1/modelsx", False),
        (b"GET", "/secure/v1/files", False),
        (b"GET", "/secure/v1/%66iles", False),
        (b"GET", "/secure/v1/%6dodels", True),  # judged as the upstream reads it
        (b"DELETE", "/secure/v1/models/ft-mine", False),
        (b"GET", "/secure", False),
    ],
)
def test_a_routes_allowed_paths_and_methods_are_checked_before_the_token(
    scoped: World, method: bytes, path: str, allowed: bool
) -> None:
    secret, _ = make(scoped)
    decision = check_as(scoped, method, path, secret)
    if allowed:
        assert isinstance(decision, Allow)
        return
    deny = denied(decision, 403)
    assert "does not serve" in deny.message
    (line,) = scoped.audit.lines[-1:]
    assert line["action"] == "access_denied" and line["reason"].startswith("route_")
    # Refused before the token was even looked at: an unknown token gets the same 403.
    assert denied(check_as(scoped, method, path, "llmp_unknown"), 403)


def test_a_passthrough_routes_allowed_paths_hold_too(scoped: World) -> None:
    assert isinstance(check_as(scoped, b"GET", "/open/v1/models", None), Allow)
    denied(check_as(scoped, b"GET", "/open/v1/files", None), 403)


def test_a_tokens_own_allowed_paths_and_methods_narrow_the_route(scoped: World) -> None:
    secret, token = make(scoped, allowed_paths=("/v1/chat/completions",), allowed_methods=("POST",))
    assert isinstance(check_as(scoped, b"POST", "/secure/v1/chat/completions", secret), Allow)
    deny = denied(check_as(scoped, b"GET", "/secure/v1/models", secret), 403)
    assert deny.message == "this proxy token may not use the method GET"
    deny = denied(check_as(scoped, b"POST", "/secure/v1/a/embeddings", secret), 403)
    assert deny.message == "this proxy token may not use the path /v1/a/embeddings"
    assert [(a["reason"], a["token_id"]) for a in scoped.audit.lines[-2:]] == [
        ("token_method", token.id),
        ("token_path", token.id),
    ]


def test_client_openai_scope_headers_are_dropped_on_token_routes(scoped: World) -> None:
    secret, _ = make(scoped)
    allow = check_as(scoped, b"POST", "/secure/v1/chat/completions", secret)
    assert isinstance(allow, Allow)
    assert {b"openai-organization", b"openai-project"} <= allow.drop_headers
    assert (b"openai-project", b"proj_operator") in allow.set_headers
    assert allow.masked == (OPENAI_KEY,)
    forwarding = check_as(scoped, b"POST", "/scoped/v1/chat/completions", secret)
    assert isinstance(forwarding, Allow)
    assert b"openai-organization" not in forwarding.drop_headers
    plain = check_as(scoped, b"POST", "/plain/v1/chat/completions", None)
    assert plain == Allow()  # a passthrough route forwards the client's own


def test_token_allowlists_survive_the_token_file(tmp_path: Path) -> None:
    tokens = TokenFile.in_state_dir(tmp_path)
    _, token = tokens.create(
        "p", NOW, allowed_paths=("/v1/chat/completions", "/v1/*"), allowed_methods=("POST",)
    )
    (read,) = tokens.read()
    assert read == token
    assert read.allowed_paths == ("/v1/chat/completions", "/v1/*")
