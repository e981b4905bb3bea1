"""The dispatcher's pure parts: trimming arithmetic from XINFO replies, reply
parsing (llmproxy/redis/dispatcher.py), and how flags, environment and config become
a plan for ``llmproxy dispatcher`` (llmproxy/cli/dispatcher.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmproxy.cli.dispatcher import (
    SERVICES,
    DispatcherConfigError,
    add_dispatcher_command,
    dispatcher_plan,
)
from llmproxy.config.model import ExporterSettings, RedisSettings
from llmproxy.redis.dispatcher import (
    UNLIMITED_RETRIES,
    GroupState,
    _stream_entries,
    dispatch_exporter_settings,
    parse_group_state,
    trimmed_unread,
)

# Replies as redis-server 7.0 gives them (RESP2, raw bytes), see
# tests/integration/test_dispatcher.py for the same against the real server.
GROUPS = [
    [
        b"name", b"other", b"consumers", 0, b"pending", 0,
        b"last-delivered-id", b"0-0", b"entries-read", None, b"lag", 5,
    ],
    [
        b"name", b"g", b"consumers", 1, b"pending", 2,
        b"last-delivered-id", b"100-1", b"entries-read", 2, b"lag", 3,
    ],
]  # fmt: skip
STREAM = [
    b"length", 5, b"radix-tree-keys", 1, b"radix-tree-nodes", 2,
    b"last-generated-id", b"100-19", b"max-deleted-entry-id", b"0-0",
    b"entries-added", 20, b"recorded-first-entry-id", b"100-15", b"groups", 2,
    b"first-entry", [b"100-15", [b"event", b"{}"]],
    b"last-entry", [b"100-19", [b"event", b"{}"]],
]  # fmt: skip


def test_group_state_is_read_from_xinfo_replies() -> None:
    state = parse_group_state(GROUPS, STREAM, "g")
    assert state == GroupState(
        last_delivered="100-1",
        entries_read=2,
        lag=3,
        pending=2,
        length=5,
        entries_added=20,
        first_entry="100-15",
    )
    assert parse_group_state(GROUPS, STREAM, "absent") is None


def test_entries_trimmed_before_the_group_read_them_are_counted() -> None:
    # 20 added, 5 left: 15 trimmed; the group had read 2 of them.
    state = parse_group_state(GROUPS, STREAM, "g")
    assert state is not None
    assert trimmed_unread(state) == 13


def test_a_new_group_at_zero_missed_everything_trimmed() -> None:
    state = parse_group_state(GROUPS, STREAM, "other")
    assert state is not None and state.entries_read is None
    assert trimmed_unread(state) == 15


def test_no_gap_when_the_group_is_inside_the_stream() -> None:
    state = GroupState("100-16", 17, 3, 0, 5, 20, "100-15")
    assert trimmed_unread(state) == 0
    empty = GroupState("0-0", None, 0, 0, 0, 0, None)
    assert trimmed_unread(empty) == 0


def test_an_uncountable_gap_says_so() -> None:
    # Redis 6.2: no entries-added; the group's position is before the first entry.
    state = GroupState("100-1", None, None, 0, 5, None, "100-15")
    assert trimmed_unread(state) is None


@given(
    added=st.integers(1, 10_000),
    read=st.integers(0, 10_000),
    length=st.integers(1, 10_000),
)
def test_trimmed_unread_matches_a_simulated_stream(added: int, read: int, length: int) -> None:
    # Entries 1..added were added with ids (n, 0); the last ``length`` remain;
    # the group read the first ``read`` of them.
    length = min(length, added)
    read = min(read, added)
    first = added - length + 1
    state = GroupState(f"{read}-0", read, added - read, 0, length, added, f"{first}-0")
    assert trimmed_unread(state) == max(0, (first - 1) - read)


def test_stream_entries_of_an_xreadgroup_reply() -> None:
    reply = [[b"s", [[b"1-0", [b"event", b"{}"]], [b"2-0", None]]]]
    assert _stream_entries(reply) == [[b"1-0", [b"event", b"{}"]], [b"2-0", None]]
    assert _stream_entries(None) == []
    assert _stream_entries([]) == []


def test_the_dispatchers_exporter_never_spools_and_never_gives_up() -> None:
    settings = dispatch_exporter_settings(ExporterSettings(name="x", type="file"))
    assert settings.spool_max_bytes == 0
    assert settings.max_retries == UNLIMITED_RETRIES


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_dispatcher_command(sub)
    return parser.parse_args(["dispatcher", *argv])


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "llmproxy.ini"
    path.write_text(
        f"[server]\nstate_dir = {tmp_path / 'state'}\ndrain_timeout = 12\n"
        "[redis]\nurl = redis://127.0.0.1:7000/1\nstream = st\ngroup = gr\nclaim_idle = 30\n"
        "[exporter:loki]\ntype = loki\nurl = http://127.0.0.1:3100/loki/api/v1/push\n"
        "batch_size = 250\n" + extra
    )
    return path


def test_without_exporter_the_sink_is_a_file_with_the_command_defaults(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    plan = dispatcher_plan(parse(["--config", str(config), "--endpoint", "out.jsonl"]), {})
    assert plan.exporter.type == "file"
    assert plan.exporter.path == tmp_path / "state" / "out.jsonl"
    assert (plan.exporter.batch_size, plan.exporter.buffer) == (100, 1000)
    assert plan.redis.stream == "st" and plan.redis.group == "gr"
    assert plan.drain_timeout == 12
    assert "7000" in plan.describe()


def test_every_sink_type_is_a_service_and_sessions_take_a_log_directory(tmp_path: Path) -> None:
    from llmproxy.config.model import EXPORTER_TYPES
    from llmproxy.export.registry import SINK_FACTORIES

    assert set(SERVICES) == set(EXPORTER_TYPES) == set(SINK_FACTORIES)
    config = write_config(tmp_path)
    argv = ["--config", str(config), "--service", "sessions", "--endpoint", "conversations"]
    plan = dispatcher_plan(parse(argv), {"LLM_PROXY_API_KEY": "unused"})
    assert plan.exporter.type == "sessions"
    assert plan.exporter.log_dir == tmp_path / "state" / "conversations"
    assert plan.exporter.api_key == ""


def test_flags_override_the_config_and_the_environment_fills_gaps(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    env = {"LLM_PROXY_API_KEY": "k-env", "LLM_PROXY_ENDPOINT": "https://lunary.example"}
    argv = ["--config", str(config), "--service", "lunary", "--batch-size", "7", "--buffer", "70"]
    argv += ["--group", "other", "--consumer", "c1", "--claim-idle", "2s", "--drain-timeout", "3"]
    plan = dispatcher_plan(parse(argv), env)
    assert plan.exporter.type == "lunary"
    assert plan.exporter.endpoint == "https://lunary.example"
    assert plan.exporter.api_key == "k-env"
    assert (plan.exporter.batch_size, plan.exporter.buffer) == (7, 70)
    assert (plan.redis.group, plan.redis.consumer, plan.redis.claim_idle) == ("other", "c1", 2.0)
    assert plan.drain_timeout == 3


def test_the_api_key_flag_is_refused_without_echoing_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    argv = ["--config", str(config), "--service", "lunary", "--api-key", "k-flag-canary"]
    with pytest.raises(DispatcherConfigError) as raised:
        dispatcher_plan(parse(argv), {"LLM_PROXY_API_KEY": "k-env"})
    (problem,) = raised.value.problems
    assert problem.startswith("--api-key: deprecated and no longer read")
    assert "LLM_PROXY_API_KEY" in problem and "file:PATH" in problem
    assert "k-flag-canary" not in problem


def test_an_exporter_section_is_the_sink(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    plan = dispatcher_plan(parse(["--config", str(config), "--exporter", "loki"]), {})
    assert plan.exporter.name == "loki" and plan.exporter.batch_size == 250
    assert plan.exporter.url.endswith("/loki/api/v1/push")
    keyed = dispatcher_plan(
        parse(["--config", str(config), "--exporter", "loki"]), {"LLM_PROXY_API_KEY": "tok"}
    )
    assert keyed.exporter.bearer_token == "tok"


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--exporter", "nope"], "--exporter: no enabled [exporter:nope]"),
        (["--exporter", "loki", "--service", "file"], "contradicts exporter type loki"),
        (["--service", "loki"], "--endpoint: the Loki push URL is required"),
        (["--redis-url", "http://x"], "redis.url: must start with"),
        (["--group", "a b"], "redis.group: must be a non-empty name"),
    ],
)
def test_bad_flags_name_the_problem(tmp_path: Path, argv: list[str], problem: str) -> None:
    config = write_config(tmp_path)
    with pytest.raises(DispatcherConfigError) as e:
        dispatcher_plan(parse(["--config", str(config), *argv]), {})
    assert any(problem in p for p in e.value.problems), e.value.problems


def test_a_bad_config_file_is_reported_with_its_problems(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[redis2]\nx = 1\n")
    with pytest.raises(DispatcherConfigError) as e:
        dispatcher_plan(parse(["--config", str(config)]), {})
    assert any("[redis2]" in p for p in e.value.problems)


def test_the_cli_exits_64_on_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmproxy.cli.main import main

    config = write_config(tmp_path)
    assert main(["dispatcher", "--config", str(config), "--service", "loki"]) == 64
    assert "Loki push URL is required" in capsys.readouterr().err


def test_the_redis_settings_are_documented() -> None:
    doc = (Path(__file__).resolve().parents[3] / "docs" / "configuration.md").read_text()
    missing = [f.name for f in attrs.fields(RedisSettings) if f"`{f.name}`" not in doc]
    assert missing == []
    assert "## [redis]" in doc and "LLM_PROXY_EVENT_BUS" in doc


def test_the_llm_proxy_event_bus_variable_selects_the_bus() -> None:
    from llmproxy.config.loader import load_settings

    assert load_settings(text="", env={"LLM_PROXY_EVENT_BUS": "redis"}).events.bus == "redis"
    both: dict[str, Any] = {"LLM_PROXY_EVENT_BUS": "redis", "LLMPROXY_EVENTS_BUS": "memory"}
    assert load_settings(text="", env=both).events.bus == "memory"
    assert (
        load_settings(
            text="[events]\nbus = memory\n", env={"LLM_PROXY_EVENT_BUS": "redis"}
        ).events.bus
        == "redis"
    )
    env = {"LLMPROXY_REDIS_STREAM": "mine", "LLMPROXY_REDIS_CLAIM_IDLE": "5s"}
    redis = load_settings(text="", env=env).redis
    assert (redis.stream, redis.claim_idle) == ("mine", 5.0)
