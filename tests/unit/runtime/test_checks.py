"""The subsystems' checks after loading: llmproxy/runtime/checks.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmproxy.config.loader import ConfigError, load_settings
from llmproxy.runtime.checks import check_settings, load_checked

LOKI = "[exporter:l]\ntype = loki\nurl = http://loki:3100\n"


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_checked(text=text, env=env or {})
    return exc.value.problems


def test_the_embedded_default_passes_every_check() -> None:
    assert check_settings(load_settings(env={})) == []
    assert load_checked(env={}).source == "<embedded default>"


def test_each_subsystem_reports_its_own_problems() -> None:
    found = problems(
        "[redis]\nurl = http://redis.example\n[cache]\nmax_bytes = 1KiB\n"
        + LOKI
        + "labels = __name__=x\n"
    )
    assert found == [
        "redis.url: must start with redis://, rediss:// or unix:// (<text>)",
        "cache.max_object_bytes: must not exceed max_bytes (<text>)",
        "exporter:l: loki label name '__name__' is reserved (names starting with __) (<text>)",
    ]


def test_the_loader_does_not_run_the_subsystems_checks() -> None:
    settings = load_settings(text="[redis]\nurl = http://redis.example\n", env={})
    assert settings.redis.url == "http://redis.example"


def test_the_subsystems_still_check_when_the_file_has_problems() -> None:
    found = problems("[server]\ndrain_timeout = later\n[redis]\nurl = http://redis.example\n")
    assert found == [
        "server.drain_timeout: not a duration: 'later' "
        "(seconds, or with a suffix like 500ms, 5s) (<text>)",
        "redis.url: must start with redis://, rediss:// or unix:// (<text>)",
    ]


def test_a_sink_is_not_built_from_a_section_the_loader_already_faulted() -> None:
    # The batch size stands at its default in what the loader read: building the sink
    # from that would judge values the user did not write.
    found = problems(LOKI + "labels = __name__=x\nbatch_size = many\n")
    assert found == ["exporter:l.batch_size: not an integer: 'many' (<text>)"]


def test_a_sink_problem_never_quotes_a_secret() -> None:
    secret = "pw-canary-71e2"
    found = problems(LOKI + "password = env:LOKI_PW\n", env={"LOKI_PW": secret})
    assert found == ["exporter:l: password is set but username is not (<text>)"]
    assert not any(secret in line for line in found)


def test_a_good_file_loads_checked() -> None:
    settings = load_checked(text=LOKI + "labels = team=platform\n", env={})
    assert [(e.name, e.type) for e in settings.exporters] == [("l", "loki")]


def test_the_shared_state_section_is_checked() -> None:
    found = problems("[state]\nstore = redis\ntimeout = 0\nsession_ttl = 0\nprefix = has space\n")
    assert found == [
        "state.timeout: must be greater than 0 (<text>)",
        "state.session_ttl: must be greater than 0 (<text>)",
        "state.prefix: must be a non-empty name without spaces (<text>)",
    ]
    assert "state.store" in problems("[state]\nstore = etcd\n")[0]
    assert "state.on_unavailable" in problems("[state]\non_unavailable = maybe\n")[0]
    settings = load_checked(
        text="[state]\nstore = redis\non_unavailable = fail_open\n[redis]\nurl = redis://r:6380/2\n",
        env={},
    )
    assert (settings.state.store, settings.state.on_unavailable) == ("redis", "fail_open")


def test_every_problem_line_says_where_it_comes_from(tmp_path: Path) -> None:
    # One problem of each kind: a value that does not parse, an unknown key and
    # section, a check across keys, a missing required key, a secret that is not
    # there, a subsystem's own check, and a key set by the environment.
    path = tmp_path / "llmproxy.ini"
    path.write_text(
        "[server]\ndrain_timeout = later\ncolour = blue\nworkers = 0\n"
        "[route:a]\nprefix = /a\n"
        "[route:b]\nprefix = /b\nupstream = https://b.example\nauth = token\napi_key = env:NOPE\n"
        "[redis]\nurl = http://redis.example\n"
        "[mystery]\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_checked(path, env={"LLMPROXY_SERVER_MAX_BODY_BYTES": "lots"})
    lines = exc.value.problems
    assert len(lines) == 8, lines
    for line in lines:
        assert line.endswith((f" ({path})", " ($LLMPROXY_SERVER_MAX_BODY_BYTES)")), line
    (from_env,) = [line for line in lines if "$LLMPROXY" in line]
    assert from_env.startswith("server.max_body_bytes: not a size: 'lots'")
