"""The ini loader: types, defaults, environment overrides, aliases, one line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmproxy.config.loader import ConfigError, load_settings, parse_duration, parse_size

GOOD = """
[server]
listen = tcp:8081:interface=127.0.0.1
state_dir = /var/lib/llmproxy
drain_timeout = 12.5
max_body_bytes = 2MiB

[route:openai]
prefix = /openai
upstream = https://api.openai.com
provider = openai

[passthrough]
allowed_hosts = api.openai.com, api.anthropic.com

[exporter:events]
type = file
path = events/all.jsonl
flush_interval = 250ms
"""


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_settings(text=text, env=env or {})
    return exc.value.problems


def test_embedded_default_is_valid_and_needs_no_external_service() -> None:
    s = load_settings(env={})
    assert s.server.listen == "tcp:8080:interface=127.0.0.1"
    assert s.server.admin_listen == "tcp:9090:interface=127.0.0.1"
    assert {r.name for r in s.routes} == {"openai", "anthropic"}
    assert [(e.name, e.type) for e in s.exporters] == [("events", "file")]


def test_values_are_typed_and_paths_resolved_against_state_dir() -> None:
    s = load_settings(text=GOOD, env={})
    assert s.server.drain_timeout == 12.5
    assert s.server.max_body_bytes == 2 * 1024 * 1024
    assert s.passthrough.allowed_hosts == ("api.openai.com", "api.anthropic.com")
    (e,) = s.exporters
    assert e.flush_interval == 0.25
    assert e.path == Path("/var/lib/llmproxy/events/all.jsonl")
    assert s.audit_path == Path("/var/lib/llmproxy/audit.jsonl")


def test_environment_overrides_file_values() -> None:
    s = load_settings(
        text=GOOD,
        env={
            "LLMPROXY_SERVER_DRAIN_TIMEOUT": "3",
            "LLMPROXY_ROUTE_OPENAI_UPSTREAM": "http://127.0.0.1:9999",
            "LLMPROXY_EXPORTER_EVENTS_BATCH_SIZE": "7",
            "LLMPROXY_PASSTHROUGH_ENABLED": "no",
        },
    )
    assert s.server.drain_timeout == 3.0
    assert s.routes[0].upstream == "http://127.0.0.1:9999"
    assert s.exporters[0].batch_size == 7
    assert s.passthrough.enabled is False


def test_every_problem_is_reported_with_section_key_and_reason() -> None:
    found = problems(
        """
[server]
listen = tcp:nope
drain_timeout = later
colour = blue
[route:a]
prefix = a
upstream = https://
provider = mistral
[route:b]
prefix = /b
[exporter:x]
type = carrier-pigeon
batch_size = -1
[mystery]
"""
    )
    expected = [
        "server.listen: not a valid endpoint",
        "server.drain_timeout: not a duration",
        "server.colour: unknown key",
        "route:a.prefix: must start with '/'",
        "route:a.upstream: has no host",
        "route:a.provider: must be one of",
        "route:b.upstream: missing",
        "exporter:x.type: must be one of",
        "exporter:x.batch_size: must be greater than 0",
        "[mystery]: unknown section",
    ]
    for want in expected:
        assert any(p.startswith(want) for p in found), (want, found)


def test_unknown_environment_variable_is_a_problem_naming_it() -> None:
    found = problems(GOOD, env={"LLMPROXY_SERVR_LISTEN": "tcp:1"})
    assert found == ["LLMPROXY_SERVR_LISTEN: does not name a known section and key"]


def test_bad_environment_value_names_the_variable() -> None:
    found = problems(GOOD, env={"LLMPROXY_SERVER_MAX_BODY_BYTES": "lots"})
    assert len(found) == 1
    assert found[0].startswith("server.max_body_bytes: not a size")
    assert "$LLMPROXY_SERVER_MAX_BODY_BYTES" in found[0]


def test_systemd_endpoints_are_accepted_without_listen_fds() -> None:
    s = load_settings(text="[server]\nlisten = systemd:domain=INET6:name=http\n", env={})
    assert s.server.listen.startswith("systemd:")
    assert problems("[server]\nlisten = systemd:domain=INET\n")[0].startswith("server.listen")


def test_seed_loki_section_and_env_aliases_make_a_loki_exporter() -> None:
    s = load_settings(
        text="[loki]\nenabled = true\nurl = http://loki:3100\nbatch_wait = 2s\nretry_max = 4\n",
        env={"LLM_PROXY_LOKI_BATCH_SIZE": "50", "LLM_PROXY_LOKI_ENVIRONMENT": "staging"},
    )
    (e,) = s.exporters
    assert (e.name, e.type, e.url) == ("loki", "loki", "http://loki:3100")
    assert (e.flush_interval, e.max_retries, e.batch_size) == (2.0, 4, 50)
    assert s.server.environment == "staging"


def test_seed_loki_disabled_gives_no_exporter() -> None:
    s = load_settings(
        text="", env={"LLM_PROXY_LOKI_ENABLED": "false", "LLM_PROXY_LOKI_URL": "http://l"}
    )
    assert s.exporters == ()


def test_unreadable_file_is_one_clear_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(tmp_path / "missing.ini", env={})
    assert "cannot read" in exc.value.problems[0]


def test_duplicate_prefixes_are_refused() -> None:
    found = problems(
        "[route:a]\nprefix = /x\nupstream = https://a.example\n"
        "[route:b]\nprefix = /x/\nupstream = https://b.example\n"
    )
    assert found == ["route:b.prefix: same prefix as route:a"]


@pytest.mark.parametrize(
    ("text", "value"), [("512", 512), ("64KiB", 65536), ("1MiB", 1048576), ("2kb", 2000)]
)
def test_sizes_take_suffixes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "value"), [("5", 5.0), ("0.5", 0.5), ("250ms", 0.25), ("2m", 120.0)]
)
def test_durations_take_suffixes(text: str, value: float) -> None:
    assert parse_duration(text) == value


def test_a_duplicate_key_is_one_clear_problem() -> None:
    found = problems("[exporter:a]\ntype = file\ntimeout = 1\ntimeout = 2\n")
    assert len(found) == 1
    assert "'timeout'" in found[0] and "already exists" in found[0]


def test_exporter_secrets_come_from_the_environment_or_a_file(tmp_path: Path) -> None:
    (tmp_path / "loki.pw").write_text("hunter2-from-file\n")
    s = load_settings(
        text=f"[server]\nstate_dir = {tmp_path}\n"
        "[exporter:l]\ntype = loki\nurl = http://loki:3100\nusername = u\n"
        "password = file:loki.pw\n"
        "[exporter:o]\ntype = otlp\napi_key = env:OTLP_KEY\n",
        env={"OTLP_KEY": "k-from-env"},
    )
    by_name = {e.name: e for e in s.exporters}
    assert by_name["l"].password == "hunter2-from-file"
    assert by_name["o"].api_key == "k-from-env"


def test_missing_exporter_secret_is_a_problem_naming_the_key() -> None:
    found = problems("[exporter:o]\ntype = otlp\napi_key = env:NOPE\n")
    assert found == ["exporter:o.api_key: environment variable NOPE is not set or empty"]


def test_a_value_continued_onto_an_indented_line_is_refused() -> None:
    found = problems("[exporter:e]\ntype = file\npath = events.jsonl\n  fsync = never\n")
    assert len(found) == 1 and found[0].startswith("exporter:e.path: spans several lines")
