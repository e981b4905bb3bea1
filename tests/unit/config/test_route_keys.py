"""Config: route upstream keys from env:NAME / file:PATH, auth = token needs one, header limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmproxy.config.loader import ConfigError, load_settings

SECRET = "sk-proj-ROUTEKEY-canary-0123456789abcdef"


def ini(tmp_path: Path, route: str, server: str = "") -> str:
    return f"""
[server]
state_dir = {tmp_path}
{server}

[route:secure]
prefix = /secure
upstream = https://api.openai.com
{route}
"""


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_settings(text=text, env=env or {})
    return exc.value.problems


def test_api_key_from_an_environment_variable(tmp_path: Path) -> None:
    s = load_settings(
        text=ini(tmp_path, "auth = token\napi_key = env:OPENAI_KEY"), env={"OPENAI_KEY": SECRET}
    )
    assert s.routes[0].api_key == SECRET


def test_api_key_from_a_file_relative_to_state_dir(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "openai").write_text(SECRET + "\n")
    s = load_settings(text=ini(tmp_path, "auth = token\napi_key = file:keys/openai"), env={})
    assert s.routes[0].api_key == SECRET
    absolute = ini(tmp_path, f"auth = token\napi_key = file:{tmp_path / 'keys' / 'openai'}")
    assert load_settings(text=absolute, env={}).routes[0].api_key == SECRET


def test_a_literal_api_key_is_taken_as_written(tmp_path: Path) -> None:
    s = load_settings(text=ini(tmp_path, f"auth = token\napi_key = {SECRET}"), env={})
    assert s.routes[0].api_key == SECRET


def test_missing_variable_or_file_is_a_problem_naming_the_key(tmp_path: Path) -> None:
    assert problems(ini(tmp_path, "auth = token\napi_key = env:NOPE")) == [
        "route:secure.api_key: environment variable NOPE is not set or empty (<text>)"
    ]
    (line,) = problems(ini(tmp_path, "auth = token\napi_key = file:missing.key"))
    assert line.startswith("route:secure.api_key: cannot read ") and "missing.key" in line
    (tmp_path / "empty.key").write_text("\n")
    (line,) = problems(ini(tmp_path, "auth = token\napi_key = file:empty.key"))
    assert line.endswith("empty.key is empty (<text>)")


def test_auth_token_without_api_key_is_a_problem(tmp_path: Path) -> None:
    (line,) = problems(ini(tmp_path, "auth = token"))
    assert line.startswith("route:secure.api_key: required with auth = token")


def test_a_key_that_cannot_be_a_header_value_is_a_problem_without_quoting_it(
    tmp_path: Path,
) -> None:
    (line,) = problems(
        ini(tmp_path, "auth = token\napi_key = env:K"), env={"K": "sk-abc\r\nX-Evil: 1"}
    )
    assert line == "route:secure.api_key: contains spaces, control or non-ASCII characters (<text>)"


def test_route_keys_are_not_in_the_settings_repr(tmp_path: Path) -> None:
    s = load_settings(
        text=ini(tmp_path, "auth = token\napi_key = env:K", "admin_token = admin-canary-xyz"),
        env={"K": SECRET},
    )
    assert SECRET not in repr(s) and "admin-canary-xyz" not in repr(s)


def test_keys_can_stay_unresolved_for_the_token_commands(tmp_path: Path) -> None:
    s = load_settings(
        text=ini(tmp_path, "auth = token\napi_key = env:NOPE"), env={}, resolve_secrets=False
    )
    assert s.routes[0].api_key == "env:NOPE"


def test_header_limits_are_typed_and_checked(tmp_path: Path) -> None:
    s = load_settings(
        text=ini(tmp_path, "", "max_header_count = 50\nmax_header_bytes = 8KiB"), env={}
    )
    assert (s.server.max_header_count, s.server.max_header_bytes) == (50, 8192)
    assert problems(ini(tmp_path, "", "max_header_count = 0\nmax_header_bytes = 100")) == [
        "server.max_header_count: must be greater than 0 (<text>)",
        "server.max_header_bytes: must be at least 1KiB (<text>)",
    ]


def test_admin_token_accepts_env_and_file(tmp_path: Path) -> None:
    s = load_settings(text=ini(tmp_path, "", "admin_token = env:ADMIN_T"), env={"ADMIN_T": "a1"})
    assert s.server.admin_token == "a1"
    (tmp_path / "admin.token").write_text("from-file\n")
    s = load_settings(text=ini(tmp_path, "", "admin_token = file:admin.token"), env={})
    assert s.server.admin_token == "from-file"
    assert problems(ini(tmp_path, "", "admin_token = env:NOPE")) == [
        "server.admin_token: environment variable NOPE is not set or empty (<text>)"
    ]


def test_client_limits_and_route_allowlists_are_typed_and_checked(tmp_path: Path) -> None:
    s = load_settings(
        text=ini(
            tmp_path,
            "allowed_paths = /v1/chat/completions, /v1/*/files\nallowed_methods = GET, POST\n"
            "openai_organization = org-op\nforward_openai_scope = true",
            "header_timeout = 5s\nmin_body_rate = 2KiB\nmax_connections_per_client = 0",
        ),
        env={},
    )
    route = s.routes[0]
    assert route.allowed_paths == ("/v1/chat/completions", "/v1/*/files")
    assert route.allowed_methods == ("GET", "POST")
    assert (route.openai_organization, route.forward_openai_scope) == ("org-op", True)
    server = s.server
    assert (server.header_timeout, server.min_body_rate) == (5.0, 2048)
    assert server.max_connections_per_client == 0
    assert problems(
        ini(
            tmp_path,
            "allowed_paths = v1/chat\nallowed_methods = GET POST\nopenai_project = a b",
            "header_timeout = 0\nmin_body_rate = 0\nmax_connections_per_client = -2",
        )
    ) == [
        "server.header_timeout: must be greater than 0 (<text>)",
        "server.max_connections_per_client: must be 0 or more (<text>)",
        "route:secure.allowed_paths: 'v1/chat' is not an absolute path (/v1/...) (<text>)",
        "route:secure.allowed_methods: 'GET POST' is not an HTTP method (<text>)",
        "route:secure.openai_project: contains spaces, control or non-ASCII characters (<text>)",
    ]
