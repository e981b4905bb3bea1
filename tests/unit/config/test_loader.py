"""The ini loader: types, defaults, environment overrides, aliases, one line per problem."""

from __future__ import annotations

import ast
from pathlib import Path

import attrs
import pytest

from llmproxy.config.converter import ini_converter, parse_duration, parse_size
from llmproxy.config.loader import ConfigError, load_settings
from llmproxy.config.model import (
    ExporterSettings,
    RouteSettings,
    ServerSettings,
    Settings,
    kind_of,
)

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


def test_the_go_proxys_loki_section_and_env_aliases_make_a_loki_exporter() -> None:
    s = load_settings(
        text="[loki]\nenabled = true\nurl = http://loki:3100\nbatch_wait = 2s\nretry_max = 4\n",
        env={"LLM_PROXY_LOKI_BATCH_SIZE": "50", "LLM_PROXY_LOKI_ENVIRONMENT": "staging"},
    )
    (e,) = s.exporters
    assert (e.name, e.type, e.url) == ("loki", "loki", "http://loki:3100")
    assert (e.flush_interval, e.max_retries, e.batch_size) == (2.0, 4, 50)
    assert s.server.environment == "staging"


def test_the_go_proxys_loki_section_disabled_gives_no_exporter() -> None:
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
    assert found == ["route:b.prefix: same prefix as route:a (<text>)"]


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
    assert found == ["exporter:o.api_key: environment variable NOPE is not set or empty (<text>)"]


def test_a_value_continued_onto_an_indented_line_is_refused() -> None:
    found = problems("[exporter:e]\ntype = file\npath = events.jsonl\n  fsync = never\n")
    assert len(found) == 1 and found[0].startswith("exporter:e.path: spans several lines")


# -- the cattrs path: each hook, good and bad values ------------------------------------

ROUTE = "[route:a]\nprefix = /a\nupstream = https://api.example\n"


def loaded(text: str, env: dict[str, str] | None = None) -> Settings:
    return load_settings(text=text, env=env or {}, resolve_secrets=False)


@pytest.mark.parametrize(
    ("key", "text", "value"),
    [
        ("drain_timeout", "1.5", 1.5),
        ("drain_timeout", "500ms", 0.5),
        ("drain_timeout", "2m", 120.0),
        ("drain_timeout", " 3s ", 3.0),
        ("max_body_bytes", "64KiB", 65536),
        ("max_body_bytes", "1MiB", 1048576),
        ("max_body_bytes", "2kb", 2000),
        ("access_log", "yes", True),
        ("access_log", "Off", False),
        ("max_connections", "12", 12),
        ("workers", "3", 3),
        ("listen", "unix:/tmp/llmproxy.sock", "unix:/tmp/llmproxy.sock"),
        ("admin_listen", "off", "off"),
        ("state_dir", "/srv/llmproxy", Path("/srv/llmproxy")),
        ("environment", "  staging  ", "staging"),
    ],
)
def test_server_values_are_structured_by_their_type(key: str, text: str, value: object) -> None:
    settings = loaded(f"[server]\n{key} = {text}\n")
    assert getattr(settings.server, key) == value


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (
            "drain_timeout = later",
            "server.drain_timeout: not a duration: 'later' "
            "(seconds, or with a suffix like 500ms, 5s) (<text>)",
        ),
        (
            "drain_timeout = 5 days",
            "server.drain_timeout: not a duration: '5 days' "
            "(seconds, or with a suffix like 500ms, 5s) (<text>)",
        ),
        (
            "max_body_bytes = lots",
            "server.max_body_bytes: not a size: 'lots' "
            "(bytes, or with a suffix like 64KiB, 1MiB) (<text>)",
        ),
        (
            "access_log = perhaps",
            "server.access_log: not a boolean: 'perhaps' "
            "(true/false, yes/no, on/off, 1/0) (<text>)",
        ),
        ("max_connections = many", "server.max_connections: not an integer: 'many' (<text>)"),
        ("workers = lots", "server.workers: not a number of processes or auto: 'lots' (<text>)"),
        (
            "listen = systemd:domain=INET",
            "server.listen: systemd endpoints need domain= and index= or name= (<text>)",
        ),
        ("colour = blue", "server.colour: unknown key (<text>)"),
    ],
)
def test_a_bad_server_value_is_one_line_with_key_reason_and_where(line: str, problem: str) -> None:
    assert problems(f"[server]\n{line}\n") == [problem]


def test_a_bad_endpoint_says_what_twisted_made_of_it() -> None:
    (line,) = problems("[server]\nadmin_listen = tcp:nope\n")
    assert line.startswith("server.admin_listen: not a valid endpoint (ValueError: ")
    assert line.endswith(" (<text>)")


@pytest.mark.parametrize(
    ("upstream", "reason"),
    [
        ("ftp://api.example", "must be an http:// or https:// URL"),
        ("https://", "has no host"),
        (
            "https://user:pw@api.example",
            "must not carry credentials (use the api_key or auth keys)",
        ),
        ("https://api.example/?x=1", "must not have a query or fragment"),
        ("https://api.example:99999", "has a bad port"),
    ],
)
def test_urls_are_http_base_urls(upstream: str, reason: str) -> None:
    found = problems(f"[route:a]\nprefix = /a\nupstream = {upstream}\n")
    assert found == [f"route:a.upstream: {reason} (<text>)"]
    assert "user:pw" not in found[0]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("provider = mistral", "route:a.provider: must be one of openai, anthropic (<text>)"),
        ("auth = basic", "route:a.auth: must be one of passthrough, token (<text>)"),
        ("cache = sometimes", "route:a.cache: must be one of on, off, default (<text>)"),
        (
            "cache_ttl = a while",
            "route:a.cache_ttl: not a duration: 'a while' "
            "(seconds, or with a suffix like 500ms, 5s) (<text>)",
        ),
        ("name = other", "route:a.name: unknown key (<text>)"),
    ],
)
def test_a_bad_route_value_names_the_route(line: str, problem: str) -> None:
    assert problems(ROUTE + line + "\n") == [problem]


def test_a_prefix_is_a_url_path() -> None:
    assert problems("[route:a]\nprefix = a\nupstream = https://api.example\n") == [
        "route:a.prefix: must start with '/' (<text>)"
    ]


def test_an_optional_value_left_empty_is_none() -> None:
    s = loaded(ROUTE + "cache_ttl =\n[sessions]\nstate_file =\n[audit]\npath =\n")
    assert s.routes[0].cache_ttl is None
    assert s.sessions.state_file is None
    assert s.audit_path is None
    assert loaded(ROUTE + "cache_ttl = 30s\n").routes[0].cache_ttl == 30.0


def test_lists_are_comma_separated_or_one_item_a_line() -> None:
    s = loaded(
        "[passthrough]\nallowed_hosts = a.example, b.example,\n"
        "allowed_http_hosts =\n  127.0.0.1:8000\n  localhost:11434\n"
    )
    assert s.passthrough.allowed_hosts == ("a.example", "b.example")
    assert s.passthrough.allowed_http_hosts == ("127.0.0.1:8000", "localhost:11434")


def test_pairs_are_name_value_items() -> None:
    s = loaded(
        "[exporter:l]\ntype = loki\nurl = http://loki:3100\nlabels = team=platform, region:eu\n"
    )
    assert s.exporters[0].labels == (("team", "platform"), ("region", "eu"))
    assert problems("[exporter:l]\ntype = file\nheaders = a=1, b\n") == [
        "exporter:l.headers: expected name=value pairs, got 'b' (<text>)"
    ]


def test_an_exporter_type_outside_the_list_says_which_are_allowed() -> None:
    assert problems("[exporter:x]\ntype = carrier-pigeon\n") == [
        "exporter:x.type: must be one of file, loki, sessions, lunary, helicone, otlp (<text>)"
    ]
    assert problems("[exporter:x]\npath = x.jsonl\n") == [
        "exporter:x.type: missing (one of file, loki, sessions, lunary, helicone, otlp) (<text>)"
    ]


def test_an_unknown_audit_key_is_named_with_where() -> None:
    assert problems("[audit]\npath = audit.jsonl\nrotate = daily\n") == [
        "audit.rotate: unknown key (<text>)"
    ]


def test_every_problem_of_a_file_comes_at_once_in_file_order() -> None:
    found = problems(
        "[server]\ncolour = blue\ndrain_timeout = later\n"
        "[route:a]\nprovider = mistral\nprefix = a\n"
        "[exporter:e]\ntype = file\nbatch_size = 0\nfsync = sometimes\n"
        "[mystery]\n"
    )
    assert found == [
        "server.colour: unknown key (<text>)",
        "server.drain_timeout: not a duration: 'later' "
        "(seconds, or with a suffix like 500ms, 5s) (<text>)",
        "route:a.provider: must be one of openai, anthropic (<text>)",
        "route:a.prefix: must start with '/' (<text>)",
        "route:a.upstream: missing (<text>)",
        "exporter:e.fsync: must be one of never, batch, always (<text>)",
        "[mystery]: unknown section (<text>)",
        "exporter:e.batch_size: must be greater than 0 (<text>)",
    ]


def test_a_section_with_a_bad_required_value_is_still_checked_across_keys() -> None:
    found = problems(
        "[route:a]\nprefix = /x\nupstream = ftp://a.example\n"
        "[route:b]\nprefix = /x\nupstream = https://b.example\n"
    )
    assert found == [
        "route:a.upstream: must be an http:// or https:// URL (<text>)",
        "route:b.prefix: same prefix as route:a (<text>)",
    ]


def test_the_error_carries_the_settings_as_far_as_they_were_read() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(
            text="[server]\ndrain_timeout = later\nenvironment = staging\n" + ROUTE, env={}
        )
    partial = exc.value.settings
    assert partial is not None
    assert partial.server.environment == "staging"
    assert partial.server.drain_timeout == ServerSettings().drain_timeout
    assert [r.name for r in partial.routes] == ["a"]


# -- the environment -------------------------------------------------------------------


def test_a_bad_environment_value_names_the_variable_as_where() -> None:
    found = problems(
        ROUTE,
        env={
            "LLMPROXY_ROUTE_A_UPSTREAM": "ftp://elsewhere",
            "LLMPROXY_EXPORTER_NEW_BATCH_SIZE": "ten",
        },
    )
    assert found == [
        "route:a.upstream: must be an http:// or https:// URL ($LLMPROXY_ROUTE_A_UPSTREAM)",
        "exporter:new.batch_size: not an integer: 'ten' ($LLMPROXY_EXPORTER_NEW_BATCH_SIZE)",
        # Missing: where the section comes from, the variable that made it.
        "exporter:new.type: missing (one of file, loki, sessions, lunary, helicone, otlp) "
        "($LLMPROXY_EXPORTER_NEW_BATCH_SIZE)",
    ]


def test_an_unknown_key_from_the_environment_names_the_variable() -> None:
    assert problems("", env={"LLMPROXY_SERVER_COLOUR": "blue"}) == [
        "server.colour: unknown key ($LLMPROXY_SERVER_COLOUR)"
    ]


def test_legacy_loki_values_say_what_the_user_wrote() -> None:
    found = problems(
        "[loki]\nurl = http://loki:3100\nbatch_wait = soon\nflavour = x\n",
        env={"LLM_PROXY_LOKI_RETRY_MAX": "often"},
    )
    assert found == [
        "exporter:loki.flush_interval: not a duration: 'soon' "
        "(seconds, or with a suffix like 500ms, 5s) ([loki] batch_wait in <text>)",
        "exporter:loki.flavour: unknown key ([loki] flavour in <text>)",
        "exporter:loki.max_retries: not an integer: 'often' ($LLM_PROXY_LOKI_RETRY_MAX)",
    ]


def test_the_go_proxy_event_bus_variable_loses_to_ours() -> None:
    env = {"LLM_PROXY_EVENT_BUS": "redis"}
    assert loaded("", env=env).events.bus == "redis"
    assert loaded("", env={**env, "LLMPROXY_EVENTS_BUS": "memory"}).events.bus == "memory"
    assert problems("", env={"LLM_PROXY_EVENT_BUS": "kafka"}) == [
        "events.bus: must be one of memory, redis ($LLM_PROXY_EVENT_BUS)"
    ]


# -- secrets ---------------------------------------------------------------------------

SECRET = "sk-canary-5f3c9e"


def test_a_secret_value_is_never_in_a_problem_or_the_repr(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(SECRET)
    text = (
        f"[server]\nstate_dir = {tmp_path}\n"
        "[route:a]\nprefix = /a\nupstream = https://api.example\nauth = token\n"
        f"api_key = {SECRET}\n  {SECRET}\n"
        "[exporter:l]\ntype = loki\nurl = http://loki:3100\nusername = u\n"
        "password = file:pw\nbearer_token = env:NOT_SET\n"
        f"[exporter:o]\ntype = otlp\napi_key = {SECRET} x\n"
    )
    found = problems(text)
    assert found == [
        "route:a.api_key: spans several lines (is the next line indented?) (<text>)",
        "exporter:l.bearer_token: environment variable NOT_SET is not set or empty (<text>)",
    ]
    assert not any(SECRET in line for line in found)
    settings = load_settings(text=text.replace(f"\n  {SECRET}", ""), env={"NOT_SET": SECRET})
    assert settings.exporters[0].password == SECRET
    assert SECRET not in repr(settings)


def test_a_bad_character_in_a_secret_is_named_without_the_secret() -> None:
    found = problems(ROUTE + "auth = token\napi_key = env:K\n", env={"K": f"{SECRET}\x00"})
    assert found == ["route:a.api_key: contains spaces, control or non-ASCII characters (<text>)"]


# -- the seams -------------------------------------------------------------------------


def test_the_config_package_imports_nothing_else_of_llmproxy() -> None:
    package = Path(__file__).resolve().parents[3] / "llmproxy" / "config"
    for module in package.glob("*.py"):
        tree = ast.parse(module.read_text("utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("llmproxy"):
                    assert name.startswith("llmproxy.config"), (module.name, name)


def test_every_kind_in_the_model_has_a_hook() -> None:
    for cls in (ServerSettings, RouteSettings, ExporterSettings, Settings):
        for field in attrs.fields(cls):
            if kind_of(field.type) is not None:
                ini_converter.get_structure_hook(field.type)  # raises for a Kind without one
