"""Load the ini file and the environment into :class:`Settings` (tests: tests/unit/test_config.py).

Every problem is collected, not just the first, and reported as one line
``section.key: reason`` (``where`` names the file or the environment variable).
This package checks what the settings say, not what the subsystems make of them:
the Redis URL, the cache's bounds and each sink's own rules are checked by those
packages, all together in :mod:`llmproxy.runtime.checks`, which is what daemon
start-up, reload and ``llmproxy check-config`` call, so they fail the same way.
"""

from __future__ import annotations

import configparser
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from llmproxy.config.model import (
    CacheSettings,
    CaptureSettings,
    EventsSettings,
    ExporterSettings,
    PassthroughSettings,
    RedisSettings,
    RouteSettings,
    ServerSettings,
    SessionSettings,
    Settings,
)

PROVIDERS = ("openai", "anthropic")
EXPORTER_TYPES = ("file", "loki", "sessions", "lunary", "helicone", "otlp")
_SIZE_SUFFIXES = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_DURATION_SUFFIXES = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Seed 001's [loki] section and LLM_PROXY_LOKI_* variables map onto an exporter.
_SEED_LOKI_KEYS = {
    "enabled": "enabled",
    "url": "url",
    "batch_size": "batch_size",
    "batch_wait": "flush_interval",
    "retry_max": "max_retries",
    "environment": "environment",
}


class ConfigError(Exception):
    """One or more problems, each ``section.key: reason``.

    ``settings`` holds the settings as far as they could be read (a bad value left
    at its default), so that further checks (:mod:`llmproxy.runtime.checks`) can
    still report their own problems in the same run; never use them to run anything.
    """

    def __init__(self, problems: list[str], settings: Settings | None = None) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.settings = settings


def subject(problem: str) -> str:
    """The ``section.key`` (or ``section``) a problem line is about."""
    return problem.split(": ", 1)[0]


def default_config_text() -> str:
    return resources.files("llmproxy.config").joinpath("default.ini").read_text("utf-8")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_SUFFIXES:
        raise ValueError(f"not a size: {text!r} (bytes, or with a suffix like 64KiB, 1MiB)")
    return int(float(m.group(1)) * _SIZE_SUFFIXES[m.group(2).lower()])


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _DURATION_SUFFIXES:
        raise ValueError(f"not a duration: {text!r} (seconds, or with a suffix like 500ms, 5s)")
    return float(m.group(1)) * _DURATION_SUFFIXES[m.group(2).lower()]


def parse_bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (true/false, yes/no, on/off, 1/0)")


def _parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"not an integer: {text!r}") from None


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in re.split(r"[,\n]", text) if p.strip())


def _parse_pairs(text: str) -> tuple[tuple[str, str], ...]:
    out = []
    for item in _parse_list(text):
        sep = "=" if "=" in item else ":"
        if sep not in item:
            raise ValueError(f"expected name=value pairs, got {item!r}")
        k, v = item.split(sep, 1)
        out.append((k.strip(), v.strip()))
    return tuple(out)


def parse_workers(text: str) -> int:
    """``server.workers``: a count, or ``auto`` for one per core."""
    if text.strip().lower() == "auto":
        return os.cpu_count() or 1
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"not a number of processes or auto: {text!r}") from None


def _converter(name: str, tp: Any) -> Callable[[str], Any]:
    if name == "workers":
        return parse_workers
    if tp is bool:
        return parse_bool
    if tp is int:
        if name.endswith("bytes") or name == "buffer_bytes":
            return parse_size
        return _parse_int
    if tp is float:
        return parse_duration
    if tp is str:
        return lambda s: s.strip()
    if tp is Path:
        return lambda s: Path(s.strip())
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        conv = _converter(name, inner)
        return lambda s: None if not s.strip() else conv(s)
    if origin is tuple and args and args[0] is str:
        return _parse_list
    if origin is tuple:
        return _parse_pairs
    raise TypeError(f"no converter for {name}: {tp!r}")


_SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "passthrough": PassthroughSettings,
    "capture": CaptureSettings,
    "events": EventsSettings,
    "redis": RedisSettings,
    "sessions": SessionSettings,
    "cache": CacheSettings,
}


def _fields(cls: type) -> dict[str, attrs.Attribute[Any]]:
    hints = typing.get_type_hints(cls)
    return {
        f.name: f.evolve(type=hints[f.name])  # type: ignore[arg-type]
        for f in attrs.fields(cls)
        if f.name != "name"
    }


def _read_ini(text: str, where: str, problems: list[str]) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=where)
    except configparser.Error as e:
        problems.append(f"{where}: {e.message if hasattr(e, 'message') else e}")
        # A half-read parser holds raw continuation lists: report, don't guess.
        return configparser.ConfigParser(interpolation=None)
    return parser


def _env_overrides(env: Mapping[str, str], sections: dict[str, dict[str, tuple[str, str]]]) -> None:
    """Apply LLMPROXY_<SECTION>_<KEY> and the seed aliases into ``sections``.

    ``sections`` maps section name -> key -> (value, where).
    """
    known_keys = {
        **{s: set(_fields(c)) for s, c in _SECTIONS.items()},
        "route": set(_fields(RouteSettings)),
        "exporter": set(_fields(ExporterSettings)),
        "audit": {"path"},
    }
    for var, value in sorted(env.items()):
        if var.startswith("LLMPROXY_"):
            rest = var[len("LLMPROXY_") :].lower()
            for kind in ("route", "exporter"):
                if rest.startswith(kind + "_"):
                    tail = rest[len(kind) + 1 :]
                    for key in sorted(known_keys[kind], key=len, reverse=True):
                        if tail.endswith("_" + key) and len(tail) > len(key) + 1:
                            name = tail[: -len(key) - 1]
                            section = f"{kind}:{name}"
                            sections.setdefault(section, {})[key] = (value, f"${var}")
                            break
                    else:
                        sections.setdefault("env", {})[var] = (value, f"${var}")
                    break
            else:
                plain: tuple[str, ...] = ("server", "passthrough", "capture", "events")
                plain += ("redis", "sessions", "audit")
                plain += ("cache",)
                for sec in plain:
                    if rest.startswith(sec + "_"):
                        key = rest[len(sec) + 1 :]
                        sections.setdefault(sec, {})[key] = (value, f"${var}")
                        break
                else:
                    sections.setdefault("env", {})[var] = (value, f"${var}")
        elif var == "LLM_PROXY_EVENT_BUS":  # seed 002's name; LLMPROXY_EVENTS_BUS wins
            events = sections.setdefault("events", {})
            if not events.get("bus", ("", ""))[1].startswith("$LLMPROXY_"):
                events["bus"] = (value, f"${var}")
        elif var.startswith("LLM_PROXY_LOKI_"):
            key = var[len("LLM_PROXY_LOKI_") :].lower()
            if key in _SEED_LOKI_KEYS:
                sections.setdefault("loki", {})[key] = (value, f"${var}")


def _apply_seed_loki(sections: dict[str, dict[str, tuple[str, str]]]) -> None:
    seed = sections.pop("loki", None)
    if not seed:
        return
    target = sections.setdefault("exporter:loki", {})
    target.setdefault("type", ("loki", "[loki]"))
    for key, (value, where) in seed.items():
        if key not in _SEED_LOKI_KEYS:
            target[key] = (value, where)  # reported as unknown below, under exporter.loki
        elif key == "environment":
            sections.setdefault("server", {}).setdefault("environment", (value, where))
        else:
            target[_SEED_LOKI_KEYS[key]] = (value, where)


def _build(
    cls: type,
    section: str,
    values: dict[str, tuple[str, str]],
    problems: list[str],
    **fixed: Any,
) -> Any:
    fields = _fields(cls)
    kwargs: dict[str, Any] = dict(fixed)
    for key, (raw, where) in values.items():
        label = f"{section}.{key}"
        if key not in fields:
            problems.append(f"{label}: unknown key ({where})")
            continue
        if "\n" in raw.strip() and typing.get_origin(fields[key].type) is not tuple:
            # An indented next line is read as a continuation of this value.
            problems.append(f"{label}: spans several lines (is the next line indented?) ({where})")
            continue
        try:
            kwargs[key] = _converter(key, fields[key].type)(raw)
        except ValueError as e:
            problems.append(f"{label}: {e} ({where})")
    try:
        return cls(**kwargs)
    except TypeError as e:
        problems.append(f"{section}: {e}")
        return None


def check_endpoint(text: str) -> str | None:
    """Return why ``text`` is not a usable server endpoint string, or None."""
    from twisted.internet import endpoints
    from twisted.internet.testing import MemoryReactor

    kind = text.split(":", 1)[0]
    if kind == "systemd":
        # Parsing needs LISTEN_FDS at run time; check the syntax only.
        params = dict(p.split("=", 1) for p in text.split(":")[1:] if "=" in p)
        if "domain" not in params or not ({"index", "name"} & params.keys()):
            return "systemd endpoints need domain= and index= or name="
        return None
    try:
        endpoints.serverFromString(MemoryReactor(), text)
    except Exception as e:  # the parser raises a zoo of types
        return f"not a valid endpoint ({type(e).__name__}: {e})"
    return None


def _check_url(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "has no host"
    if parts.username or parts.password:
        return "must not carry credentials (use the api_key or auth keys)"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    try:
        _ = parts.port
    except ValueError:
        return "has a bad port"
    return None


def _validate(settings: Settings, problems: list[str]) -> None:
    s = settings.server
    for key in ("listen", "admin_listen"):
        value = getattr(s, key)
        if key == "admin_listen" and value in ("", "off", "none"):
            continue
        why = check_endpoint(value)
        if why:
            problems.append(f"server.{key}: {why}")
    positive = ("drain_timeout", "connect_timeout", "first_byte_timeout", "idle_timeout")
    for key in positive:
        if getattr(s, key) <= 0:
            problems.append(f"server.{key}: must be greater than 0")
    for key in ("max_body_bytes", "max_connections", "pool_size", "max_header_count"):
        if getattr(s, key) <= 0:
            problems.append(f"server.{key}: must be greater than 0")
    if s.max_header_bytes < 1024:
        problems.append("server.max_header_bytes: must be at least 1KiB")
    if s.workers < 1:
        problems.append("server.workers: must be at least 1")
    prefixes: dict[str, str] = {}
    for r in settings.routes:
        sec = f"route:{r.name}"
        if not _NAME_RE.match(r.name):
            problems.append(f"{sec}: route names are letters, digits, '_' and '-'")
        if not r.prefix.startswith("/"):
            problems.append(f"{sec}.prefix: must start with '/'")
        elif r.prefix.rstrip("/") in prefixes:
            other = prefixes[r.prefix.rstrip("/")]
            problems.append(f"{sec}.prefix: same prefix as route:{other}")
        else:
            prefixes[r.prefix.rstrip("/")] = r.name
        if not r.upstream:
            problems.append(f"{sec}.upstream: missing (a base URL like https://api.openai.com)")
        else:
            why = _check_url(r.upstream)
            if why:
                problems.append(f"{sec}.upstream: {why}")
        if r.provider not in PROVIDERS:
            problems.append(f"{sec}.provider: must be one of {', '.join(PROVIDERS)}")
        if r.auth not in ("passthrough", "token"):
            problems.append(f"{sec}.auth: must be passthrough or token")
        if r.auth == "token" and not r.api_key:
            problems.append(
                f"{sec}.api_key: required with auth = token "
                "(the provider key, env:NAME or file:PATH)"
            )
        if r.cache not in ("on", "off", "default"):
            problems.append(f"{sec}.cache: must be on, off or default")
    for host in settings.passthrough.allowed_hosts + settings.passthrough.allowed_http_hosts:
        if not re.fullmatch(r"[a-z0-9.-]+(:\d{1,5})?|\[[0-9a-f:]+\](:\d{1,5})?", host):
            problems.append(f"passthrough.allowed_hosts: {host!r} is not a lower-case host[:port]")
    if settings.events.bus not in ("memory", "redis"):
        problems.append("events.bus: must be memory or redis")
    for key in ("max_states", "flush_interval"):
        if getattr(settings.sessions, key) <= 0:
            problems.append(f"sessions.{key}: must be greater than 0")
    names = set()
    for e in settings.exporters:
        sec = f"exporter:{e.name}"
        if e.name in names:
            problems.append(f"{sec}: defined twice")
        names.add(e.name)
        if e.type not in EXPORTER_TYPES:
            problems.append(f"{sec}.type: must be one of {', '.join(EXPORTER_TYPES)}")
        if e.type == "loki":
            if not e.url:
                problems.append(f"{sec}.url: required for a loki exporter")
            else:
                why = _check_url(e.url)
                if why:
                    problems.append(f"{sec}.url: {why}")
        if e.fsync not in ("never", "batch", "always"):
            problems.append(f"{sec}.fsync: must be never, batch or always")
        for key in ("buffer", "batch_size", "max_in_flight", "batch_bytes", "buffer_bytes"):
            if getattr(e, key) <= 0:
                problems.append(f"{sec}.{key}: must be greater than 0")
        for key in ("flush_interval", "spool_interval"):
            if getattr(e, key) <= 0:
                problems.append(f"{sec}.{key}: must be greater than 0")
        if e.backoff_min <= 0 or e.backoff_max < e.backoff_min:
            problems.append(f"{sec}.backoff_max: must be >= backoff_min > 0")
        if e.max_retries < 0:
            problems.append(f"{sec}.max_retries: must be 0 or more")


def resolve_secret(value: str, env: Mapping[str, str], base: Path) -> str:
    """``env:NAME`` -> the variable, ``file:PATH`` -> the file's content (stripped),
    anything else as written.  Raises ValueError saying what is missing, never
    quoting the secret."""
    kind, sep, ref = value.partition(":")
    if not sep or kind not in ("env", "file"):
        return value
    ref = ref.strip()
    if kind == "env":
        found = env.get(ref, "").strip()
        if not found:
            raise ValueError(f"environment variable {ref} is not set or empty")
        return found
    path = Path(ref).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        found = path.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise ValueError(f"cannot read {path} ({reason})") from None
    if not found:
        raise ValueError(f"{path} is empty")
    return found


def _resolve_secrets(settings: Settings, env: Mapping[str, str], problems: list[str]) -> Settings:
    base = settings.server.state_dir.expanduser().absolute()
    routes = []
    for r in settings.routes:
        if not r.api_key:
            routes.append(r)
            continue
        try:
            key = resolve_secret(r.api_key, env, base)
        except ValueError as e:
            problems.append(f"route:{r.name}.api_key: {e}")
            routes.append(r)
            continue
        # The key goes into an HTTP header: no spaces, control or non-ASCII characters.
        if not all(33 <= ord(c) < 127 for c in key):
            problems.append(
                f"route:{r.name}.api_key: contains spaces, control or non-ASCII characters"
            )
        routes.append(attrs.evolve(r, api_key=key))
    exporters = []
    for exporter in settings.exporters:
        changes: dict[str, Any] = {}
        for key in ("api_key", "password", "bearer_token"):
            value = getattr(exporter, key)
            if not value:
                continue
            try:
                changes[key] = resolve_secret(value, env, base)
            except ValueError as err:
                problems.append(f"exporter:{exporter.name}.{key}: {err}")
        exporters.append(attrs.evolve(exporter, **changes) if changes else exporter)
    return attrs.evolve(settings, routes=tuple(routes), exporters=tuple(exporters))


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    text: str | None = None,
    resolve_secrets: bool = True,
) -> Settings:
    """Read ``path`` (or ``text``, or the embedded default) plus ``env``.

    ``resolve_secrets=False`` leaves ``env:``/``file:`` values as written: for
    commands (``llmproxy token``) that need the state directory, not the keys.
    Raises :class:`ConfigError` listing every problem.
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    if text is None:
        if path is None:
            text, where = default_config_text(), "<embedded default>"
        else:
            where = str(path)
            try:
                text = Path(path).read_text("utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError([f"{where}: cannot read ({e})"]) from None
    else:
        where = str(path) if path is not None else "<text>"
    parser = _read_ini(text, where, problems)
    sections: dict[str, dict[str, tuple[str, str]]] = {}
    for name in parser.sections():
        sections[name] = {k: (v, where) for k, v in parser.items(name)}
    _env_overrides(env, sections)
    _apply_seed_loki(sections)

    for var in sorted(sections.pop("env", {})):
        problems.append(f"{var}: does not name a known section and key")
    kwargs: dict[str, Any] = {"source": where}
    routes = []
    exporters = []
    for name, values in sections.items():
        kind, _, sub = name.partition(":")
        if kind in _SECTIONS and not sub:
            kwargs[kind] = _build(_SECTIONS[kind], kind, values, problems)
        elif kind == "route" and sub:
            missing = [k for k in ("prefix", "upstream") if k not in values]
            for k in missing:
                problems.append(f"route:{sub}.{k}: missing")
            if not missing:
                routes.append(_build(RouteSettings, name, values, problems, name=sub))
        elif kind == "exporter" and sub:
            if "type" not in values:
                problems.append(
                    f"exporter:{sub}.type: missing (one of {', '.join(EXPORTER_TYPES)})"
                )
            else:
                exporters.append(_build(ExporterSettings, name, values, problems, name=sub))
        elif kind == "audit" and not sub:
            for key in values:
                if key != "path":
                    problems.append(f"audit.{key}: unknown key")
            kwargs["audit_path"] = Path(values["path"][0]) if "path" in values else None
        else:
            problems.append(f"[{name}]: unknown section")
    audit_path = kwargs.pop("audit_path", None)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    settings = Settings(
        routes=tuple(r for r in routes if r is not None),
        exporters=tuple(e for e in exporters if e is not None and e.enabled),
        **kwargs,
    )
    if audit_path is not None:
        settings = attrs.evolve(settings, audit_path=audit_path)
    if resolve_secrets:
        settings = _resolve_secrets(settings, env, problems)
    _validate(settings, problems)
    if problems:
        raise ConfigError(problems, settings)
    return resolve_paths(settings)


def resolve_paths(settings: Settings) -> Settings:
    """Make relative paths absolute: state_dir against the cwd, the rest against state_dir."""
    state = settings.server.state_dir.expanduser().absolute()

    def under(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else state / p)

    moved = map_paths(settings, state_dir=state, file=under, directory=under)
    return attrs.evolve(moved, audit_path=under(settings.audit_path))


def map_paths(
    settings: Settings,
    *,
    state_dir: Path,
    file: Callable[[Path | None], Path | None],
    directory: Callable[[Path | None], Path | None],
) -> Settings:
    """``settings`` with ``state_dir`` replaced and ``file``/``directory`` applied
    to every file and directory path kept under it (spools, dead letters, event
    files, session logs and state).  The audit log is the caller's to place."""
    exporters = tuple(
        attrs.evolve(
            e,
            spool_dir=directory(e.spool_dir),
            dead_letter_path=file(e.dead_letter_path),
            path=file(e.path),
            log_dir=directory(e.log_dir),
        )
        for e in settings.exporters
    )
    return attrs.evolve(
        settings,
        server=attrs.evolve(settings.server, state_dir=state_dir),
        exporters=exporters,
        sessions=attrs.evolve(settings.sessions, state_file=file(settings.sessions.state_file)),
        redis=attrs.evolve(settings.redis, spool_dir=directory(settings.redis.spool_dir)),
    )
