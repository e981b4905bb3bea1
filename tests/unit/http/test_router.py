"""Routing and the passthrough allowlist (the SSRF guard)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmproxy.config.model import PassthroughSettings, RouteSettings
from llmproxy.http.errors import error_body
from llmproxy.http.router import Refusal, Router, Target

ROUTES = (
    RouteSettings(name="openai", prefix="/openai", upstream="https://api.openai.com"),
    RouteSettings(
        name="claude", prefix="/claude/", upstream="https://api.anthropic.com", provider="anthropic"
    ),
    RouteSettings(name="local", prefix="/local", upstream="http://10.1.2.3:8000/base/"),
)
PASS = PassthroughSettings(allowed_hosts=("api.openai.com", "api.anthropic.com"))


def test_named_route_forwards_the_rest_of_the_path() -> None:
    t = Router(ROUTES, PASS).resolve(b"/openai/v1/chat/completions")
    assert isinstance(t, Target)
    assert t.route == "openai"
    assert t.url(b"") == b"https://api.openai.com/v1/chat/completions"
    assert t.url(b"a=1") == b"https://api.openai.com/v1/chat/completions?a=1"


def test_upstream_base_path_and_port_are_kept() -> None:
    t = Router(ROUTES, PASS).resolve(b"/local/v1/models")
    assert isinstance(t, Target)
    assert t.url(b"") == b"http://10.1.2.3:8000/base/v1/models"
    assert t.host == b"10.1.2.3:8000"


def test_prefix_matches_whole_segments_only() -> None:
    r = Router(ROUTES, PASS)
    assert isinstance(r.resolve(b"/openaiX/v1"), Refusal)
    assert r.resolve(b"/openaiX/v1").status == 404  # type: ignore[union-attr]


def test_root_route_serves_plain_paths_and_longest_prefix_wins() -> None:
    routes = (*ROUTES, RouteSettings(name="root", prefix="/", upstream="https://api.openai.com"))
    r = Router(routes, PASS)
    plain = r.resolve(b"/v1/chat/completions")
    assert isinstance(plain, Target) and plain.route == "root"
    assert plain.url(b"") == b"https://api.openai.com/v1/chat/completions"
    named = r.resolve(b"/claude/v1/messages")
    assert isinstance(named, Target) and named.route == "claude"


def test_passthrough_form_reaches_allowed_hosts_over_https() -> None:
    t = Router(ROUTES, PASS).resolve(b"/anthropic/api.anthropic.com/v1/messages")
    assert isinstance(t, Target)
    assert t.route == "passthrough" and t.provider == "anthropic"
    assert t.url(b"") == b"https://api.anthropic.com/v1/messages"


def test_passthrough_plain_http_only_for_hosts_allowed_so() -> None:
    p = PassthroughSettings(
        allowed_hosts=("api.openai.com",), allowed_http_hosts=("gw.local:8080",)
    )
    r = Router((), p)
    t = r.resolve(b"/openai/gw.local:8080/v1/models")
    assert isinstance(t, Target) and t.url(b"") == b"http://gw.local:8080/v1/models"
    assert isinstance(r.resolve(b"/openai/gw.local/v1/models"), Refusal)


@pytest.mark.parametrize(
    "host",
    [
        b"api.openai.com.evil.test",
        b"evil.test",
        b"127.0.0.1",
        b"[::1]",
        b"localhost",
        b"LOCALHOST",
        b"api.openai.com@evil.test",
        b"user:pw@api.openai.com",
        b"api%2eopenai%2ecom",
        b"api.openai.com%00",
        b"api.openai.com:443",
        b"api.openai.com.",
        b"API.OPENAI.COM",
        b"0x7f.0.0.1",
    ],
)
def test_passthrough_refuses_hosts_off_the_allowlist(host: bytes) -> None:
    res = Router(ROUTES, PASS).resolve(b"/openai/" + host + b"/v1/chat/completions")
    assert isinstance(res, Refusal) and res.status == 403


@pytest.mark.parametrize(
    "path",
    [
        b"/openai/api.openai.com/../../evil/v1",
        b"/openai/api.openai.com/v1/%2e%2e/admin",
        b"/openai/api.openai.com/v1/..",
        b"/openai/api.openai.com/v1%2fadmin",
    ],
)
def test_passthrough_refuses_dot_segments_and_encoded_slashes(path: bytes) -> None:
    res = Router(ROUTES, PASS).resolve(path)
    assert isinstance(res, Refusal) and res.status == 403


def test_named_routes_refuse_dot_segments_with_400() -> None:
    res = Router(ROUTES, PASS).resolve(b"/openai/v1/../admin")
    assert isinstance(res, Refusal) and res.status == 400


def test_passthrough_disabled_leaves_the_form_unrouted() -> None:
    res = Router(ROUTES, PassthroughSettings(enabled=False)).resolve(
        b"/anthropic/api.anthropic.com/v1"
    )
    assert isinstance(res, Refusal) and res.status == 404


@given(st.binary(max_size=60))
def test_any_passthrough_host_segment_reaches_only_allowed_hosts(segment: bytes) -> None:
    res = Router((), PASS).resolve(b"/openai/" + segment.replace(b"/", b"") + b"/v1/x")
    if isinstance(res, Target):
        assert res.host in (b"api.openai.com", b"api.anthropic.com")
        assert res.scheme == b"https"


def test_error_body_has_the_openai_shape() -> None:
    import json

    body = json.loads(error_body(413, "too big"))
    assert body == {
        "error": {
            "message": "too big",
            "type": "invalid_request_error",
            "code": "request_too_large",
        }
    }


_PATHS = st.lists(
    st.sampled_from(
        [
            b"/openai/v1/chat",
            b"/openai",
            b"/claude/v1/messages",
            b"/local/x",
            b"/nope",
            b"/a/../b",
            b"/openai/api.openai.com/v1",
            b"/anthropic/api.anthropic.com/v1/messages",
            b"v1",
        ]
    ),
    max_size=20,
)


@given(_PATHS)
def test_a_path_resolves_the_same_every_time(paths: list[bytes]) -> None:
    remembered = Router(ROUTES, PASS)
    for path in paths:
        assert remembered.resolve(path) == Router(ROUTES, PASS).resolve(path)


def test_remembered_paths_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmproxy.http import router

    monkeypatch.setattr(router, "_RESOLVED_MAX", 3)
    r = Router(ROUTES, PASS)
    for i in range(10):
        t = r.resolve(b"/openai/v%d" % i)
        assert isinstance(t, Target) and t.rest == b"/v%d" % i
        assert len(r._resolved) <= 3
    assert isinstance(r.resolve(b"/nope"), Refusal)
    assert b"/nope" not in r._resolved  # refusals are not kept
