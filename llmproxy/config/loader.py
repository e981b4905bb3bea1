"""Load the ini file and the environment into :class:`Settings`
(tests: tests/unit/config/test_loader.py).

The file and the ``LLMPROXY_<SECTION>_<KEY>`` variables become one tree of strings,
which the cattrs converter of :mod:`llmproxy.config.converter` structures into the
settings model; then ``env:NAME`` / ``file:PATH`` secrets are resolved and the
checks that span keys run.  Every problem is collected, not just the first, and
reported as one line ``section.key: reason (where)``, every one of them the same
way: ``where`` is the file (or ``$LLMPROXY_...`` variable) that set the key, else
the one that holds its section, else the file read.  A problem about a place
itself (the file cannot be read, a variable names no key) names it first instead.

This package checks what the settings say, not what the subsystems make of them:
the Redis URL, the cache's bounds and each sink's own rules are checked by those
packages, all together in :mod:`llmproxy.runtime.checks`, which is what daemon
start-up, reload and ``llmproxy check-config`` call, so they fail the same way.
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import attrs
from cattrs.errors import ClassValidationError

from llmproxy.config.converter import (
    Failed,
    KeyPath,
    failures,
    ini_converter,
    lenient_converter,
)
from llmproxy.config.model import NAMED_SECTIONS, SECRET, SECTIONS, Settings, ini_keys, kind_of

__all__ = [
    "LEGACY_LOKI_KEYS",
    "ConfigError",
    "default_config_text",
    "load_settings",
    "map_paths",
    "resolve_paths",
    "resolve_secret",
    "subject",
]

_ITEM_CLASSES = dict(NAMED_SECTIONS.values())
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# The Go llm-proxy's Loki settings -- a [loki] section and LLM_PROXY_LOKI_* variables --
# make an exporter named loki; their names -> its keys.
LEGACY_LOKI_KEYS = {
    "enabled": "enabled",
    "url": "url",
    "batch_size": "batch_size",
    "batch_wait": "flush_interval",
    "retry_max": "max_retries",
    "environment": "environment",
}

# section name -> key -> (value, where)
Sections = dict[str, dict[str, tuple[str, str]]]


class ConfigError(Exception):
    """One or more problems, each ``section.key: reason``.

    ``settings`` holds the settings as far as they could be read (a bad value left
    at its default, a section missing a required key left out), so that further
    checks (:mod:`llmproxy.runtime.checks`) can still report their own problems in
    the same run; never use them to run anything.
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


# -- reading: the file, the environment, the aliases ------------------------------------


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


def _env_overrides(env: Mapping[str, str], sections: Sections) -> None:
    """Apply LLMPROXY_<SECTION>_<KEY>, and the Go llm-proxy's variables, into ``sections``.

    A variable that names no section and key goes to the pseudo-section ``env``.
    """
    named_keys = {kind: set(ini_keys(cls)) for kind, (_, cls) in NAMED_SECTIONS.items()}
    plain = (*SECTIONS, "audit")
    for var, value in sorted(env.items()):
        where = f"${var}"
        if var.startswith("LLMPROXY_"):
            rest = var[len("LLMPROXY_") :].lower()
            kind = next((k for k in NAMED_SECTIONS if rest.startswith(k + "_")), None)
            if kind is not None:
                tail = rest[len(kind) + 1 :]
                for key in sorted(named_keys[kind], key=len, reverse=True):
                    if tail.endswith("_" + key) and len(tail) > len(key) + 1:
                        section = f"{kind}:{tail[: -len(key) - 1]}"
                        sections.setdefault(section, {})[key] = (value, where)
                        break
                else:
                    sections.setdefault("env", {})[var] = (value, where)
                continue
            sec = next((s for s in plain if rest.startswith(s + "_")), None)
            if sec is not None:
                sections.setdefault(sec, {})[rest[len(sec) + 1 :]] = (value, where)
            else:
                sections.setdefault("env", {})[var] = (value, where)
        elif var == "LLM_PROXY_EVENT_BUS":  # the Go llm-proxy's name; LLMPROXY_EVENTS_BUS wins
            events = sections.setdefault("events", {})
            if not events.get("bus", ("", ""))[1].startswith("$LLMPROXY_"):
                events["bus"] = (value, where)
        elif var.startswith("LLM_PROXY_LOKI_"):
            key = var[len("LLM_PROXY_LOKI_") :].lower()
            if key in LEGACY_LOKI_KEYS:
                sections.setdefault("loki", {})[key] = (value, where)


def _apply_legacy_loki(sections: Sections) -> None:
    """The legacy [loki] section (the Go llm-proxy's format) becomes [exporter:loki]."""
    legacy = sections.pop("loki", None)
    if not legacy:
        return
    target = sections.setdefault("exporter:loki", {})
    target.setdefault("type", ("loki", "[loki]"))
    for key, (value, source) in legacy.items():
        # A problem names the exporter's key; where says what the user wrote.
        where = source if source.startswith("$") else f"[loki] {key} in {source}"
        if key not in LEGACY_LOKI_KEYS:
            target[key] = (value, where)  # reported as unknown below, under exporter:loki
        elif key == "environment":
            sections.setdefault("server", {}).setdefault("environment", (value, where))
        else:
            target[LEGACY_LOKI_KEYS[key]] = (value, where)


# -- structuring: strings -> the model ------------------------------------------------


@attrs.frozen
class _Tree:
    """The strings to structure into :class:`Settings`, and where each came from."""

    raw: dict[str, Any]
    # "routes"/"exporters" -> the section name of each item, in order
    items: dict[str, list[str]]


def _tree(sections: Sections, where: str, problems: list[tuple[tuple[int, int], str]]) -> _Tree:
    raw: dict[str, Any] = {"source": where}
    items: dict[str, list[str]] = {field: [] for field, _ in NAMED_SECTIONS.values()}
    for index, (name, values) in enumerate(sections.items()):
        kind, _, sub = name.partition(":")
        strings = {key: value for key, (value, _) in values.items()}
        if kind in SECTIONS and not sub:
            raw[kind] = strings
        elif kind in NAMED_SECTIONS and sub:
            field, _ = NAMED_SECTIONS[kind]
            if "name" in strings:  # the section's suffix is its name
                order = list(values).index("name")
                problems.append(((index, order), f"{name}.name: unknown key"))
                del strings["name"]
            raw.setdefault(field, []).append({**strings, "name": sub})
            items[field].append(name)
        elif kind == "prices" and not sub:
            # Model names are the keys: no fixed set to check them against.
            raw["prices"] = strings
        elif kind == "audit" and not sub:
            for order, key in enumerate(values):
                if key != "path":
                    problems.append(((index, order), f"audit.{key}: unknown key"))
            if "path" in strings:
                raw["audit_path"] = strings["path"]
        else:
            problems.append(((index, -1), f"[{name}]: unknown section"))
    return _Tree(raw, items)


def _locate(path: KeyPath, tree: _Tree) -> tuple[str, str | None]:
    """(section name, key) of a path into the structured tree."""
    head, *rest = path
    if head == "audit_path":
        return "audit", "path"
    if head in tree.items and rest and isinstance(rest[0], int):
        section = tree.items[str(head)][rest[0]]
        rest = rest[1:]
    else:
        section = str(head)
    return section, (str(rest[0]) if rest else None)


def _structure(
    sections: Sections, where: str, problems: list[tuple[tuple[int, int], str]]
) -> Settings:
    """The settings the strings make.  Every failure becomes a problem, and the
    settings are rebuilt around the failures -- a bad value left at its default, a
    bad required one kept as written, a section missing a required key left out --
    so the checks across keys still see the rest."""
    tree = _tree(sections, where, problems)
    try:
        return ini_converter.structure(tree.raw, Settings)
    except ClassValidationError as e:
        found = list(failures(e))
    order = {name: index for index, name in enumerate(sections)}
    for failed in found:
        section, key = _locate(failed.path, tree)
        values = sections.get(section, {})
        label = section if key is None else f"{section}.{key}"
        line = f"{label}: {failed.reason}"
        position = list(values).index(key) if key in values else len(values)
        problems.append(((order.get(section, len(order)), position), line))
    try:
        return lenient_converter.structure(_without(tree.raw, found), Settings)
    except ClassValidationError:  # not expected: what is left structures leniently
        return Settings(source=where)


def _without(raw: dict[str, Any], found: list[Failed]) -> dict[str, Any]:
    """``raw`` less the keys that failed, but for the required keys of a route or
    exporter (the lenient converter takes them as written); a route or exporter
    missing a required key is left out whole."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for list_field, _ in NAMED_SECTIONS.values():
        out[list_field] = [dict(item) for item in out.get(list_field, [])]
    left_out: dict[str, set[int]] = {}
    for failed in found:
        head, *rest = failed.path
        field = str(head)
        if field in out and isinstance(out[field], list) and rest:
            index, keys = int(rest[0]), rest[1:]
            cls = _ITEM_CLASSES[field]
            required = {f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING}
            if failed.missing or not keys:
                left_out.setdefault(field, set()).add(index)
            elif keys[0] not in required:
                out[field][index].pop(keys[0], None)
        elif rest and isinstance(out.get(field), dict):
            out[field].pop(rest[0], None)
        else:
            out.pop(field, None)
    for field, indexes in left_out.items():
        out[field] = [item for i, item in enumerate(out[field]) if i not in indexes]
    return out


# -- secrets ------------------------------------------------------------------------


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
    """Every ``Secret`` key of ``[server]``, the routes and the exporters, resolved."""
    base = settings.server.state_dir.expanduser().absolute()

    def resolved(item: Any, section: str) -> Any:
        changes: dict[str, str] = {}
        for key, field in ini_keys(type(item)).items():
            value = getattr(item, key)
            if kind_of(field.type) is not SECRET or not value:
                continue
            try:
                changes[key] = resolve_secret(value, env, base)
            except ValueError as e:
                problems.append(f"{section}.{key}: {e}")
        return attrs.evolve(item, **changes) if changes else item

    routes = []
    for r in settings.routes:
        before = len(problems)
        route = resolved(r, f"route:{r.name}")
        # The key goes into an HTTP header: no spaces, control or non-ASCII characters.
        if len(problems) == before and not all(33 <= ord(c) < 127 for c in route.api_key):
            problems.append(
                f"route:{r.name}.api_key: contains spaces, control or non-ASCII characters"
            )
        routes.append(route)
    exporters = tuple(resolved(e, f"exporter:{e.name}") for e in settings.exporters)
    server = resolved(settings.server, "server")
    return attrs.evolve(settings, server=server, routes=tuple(routes), exporters=exporters)


# -- checks across keys -------------------------------------------------------------


def _validate(settings: Settings, problems: list[str]) -> None:
    """What no single key's type says: bounds, required-with, duplicates."""
    s = settings.server
    positive = ("drain_timeout", "connect_timeout", "first_byte_timeout", "idle_timeout")
    for key in positive:
        if getattr(s, key) <= 0:
            problems.append(f"server.{key}: must be greater than 0")
    for key in ("max_body_bytes", "max_connections", "pool_size", "max_header_count"):
        if getattr(s, key) <= 0:
            problems.append(f"server.{key}: must be greater than 0")
    if s.header_timeout <= 0:
        problems.append("server.header_timeout: must be greater than 0")
    if s.max_connections_per_client < 0:
        problems.append("server.max_connections_per_client: must be 0 or more")
    if s.max_header_bytes < 1024:
        problems.append("server.max_header_bytes: must be at least 1KiB")
    if s.workers < 1:
        problems.append("server.workers: must be at least 1")
    if s.metrics_projects < 0:
        problems.append("server.metrics_projects: must be 0 or more")
    prefixes: dict[str, str] = {}
    for r in settings.routes:
        sec = f"route:{r.name}"
        if not _NAME_RE.match(r.name):
            problems.append(f"{sec}: route names are letters, digits, '_' and '-'")
        if r.prefix.rstrip("/") in prefixes:
            other = prefixes[r.prefix.rstrip("/")]
            problems.append(f"{sec}.prefix: same prefix as route:{other}")
        else:
            prefixes[r.prefix.rstrip("/")] = r.name
        if not r.upstream:
            problems.append(f"{sec}.upstream: missing (a base URL like https://api.openai.com)")
        for path in r.allowed_paths:
            if not path.startswith("/"):
                problems.append(f"{sec}.allowed_paths: {path!r} is not an absolute path (/v1/...)")
        for method in r.allowed_methods:
            if not re.fullmatch(r"[A-Za-z]+", method):
                problems.append(f"{sec}.allowed_methods: {method!r} is not an HTTP method")
        for key in ("openai_organization", "openai_project"):
            if not all(33 <= ord(c) < 127 for c in getattr(r, key)):
                problems.append(f"{sec}.{key}: contains spaces, control or non-ASCII characters")
        if r.auth == "token" and not r.api_key:
            problems.append(
                f"{sec}.api_key: required with auth = token "
                "(the provider key, env:NAME or file:PATH)"
            )
    for host in settings.passthrough.allowed_hosts + settings.passthrough.allowed_http_hosts:
        if not re.fullmatch(r"[a-z0-9.-]+(:\d{1,5})?|\[[0-9a-f:]+\](:\d{1,5})?", host):
            problems.append(f"passthrough.allowed_hosts: {host!r} is not a lower-case host[:port]")
    for key in ("max_states", "flush_interval"):
        if getattr(settings.sessions, key) <= 0:
            problems.append(f"sessions.{key}: must be greater than 0")
    names = set()
    for e in settings.exporters:
        sec = f"exporter:{e.name}"
        if e.name in names:
            problems.append(f"{sec}: defined twice")
        names.add(e.name)
        if e.type == "loki" and not e.url:
            problems.append(f"{sec}.url: required for a loki exporter")
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


# -- the entry point ----------------------------------------------------------------


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    text: str | None = None,
    resolve_secrets: bool = True,
    checks: Callable[[Settings], list[str]] | None = None,
) -> Settings:
    """Read ``path`` (or ``text``, or the embedded default) plus ``env``.

    ``resolve_secrets=False`` leaves ``env:``/``file:`` values as written: for
    commands (``llmproxy token``) that need the state directory, not the keys.
    ``checks`` are more checks of the settings (the subsystems' own,
    :func:`llmproxy.runtime.checks.load_checked` passes them), whose problem lines
    are placed like the loader's.  When the file itself has problems, they still
    check what could be read, leaving out what the loader already reported: a line
    about a key it named, and an exporter section it named (its sink would only
    see the defaults standing in for the bad values).
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
    sections: Sections = {}
    for name in parser.sections():
        sections[name] = {k: (v, where) for k, v in parser.items(name)}
    _env_overrides(env, sections)
    _apply_legacy_loki(sections)
    for var in sorted(sections.pop("env", {})):
        problems.append(f"{var}: does not name a known section and key")

    placed: list[tuple[tuple[int, int], str]] = []
    settings = _structure(sections, where, placed)
    problems.extend(line for _, line in sorted(placed, key=lambda p: p[0]))
    settings = attrs.evolve(settings, exporters=tuple(e for e in settings.exporters if e.enabled))
    later: list[str] = []
    if resolve_secrets:
        settings = _resolve_secrets(settings, env, later)
    _validate(settings, later)
    # A key already reported stands at its default now: what follows from that is noise.
    reported = {subject(line) for line in problems}
    problems.extend(line for line in later if subject(line) not in reported)
    if problems:
        if checks is not None:
            problems.extend(_checks_despite(checks, settings, problems))
        raise ConfigError(_placed(problems, sections, where), settings)
    resolved = resolve_paths(settings)
    more = checks(resolved) if checks is not None else []
    if more:
        raise ConfigError(_placed(more, sections, where), resolved)
    return resolved


def _checks_despite(
    checks: Callable[[Settings], list[str]], settings: Settings, problems: list[str]
) -> list[str]:
    """What ``checks`` find in settings the loader already found problems in."""
    reported = {subject(line) for line in problems}
    named = {name.split(".", 1)[0] for name in reported}
    unnamed = tuple(e for e in settings.exporters if f"exporter:{e.name}" not in named)
    partial = attrs.evolve(settings, exporters=unnamed)
    return [line for line in checks(partial) if subject(line) not in reported]


def _placed(problems: list[str], sections: Sections, where: str) -> list[str]:
    """Each problem line with where it comes from (the module docstring)."""
    places = {where}
    places.update(source for values in sections.values() for _, source in values.values())
    out = []
    for line in problems:
        about = subject(line)
        if about in places or about.isupper():  # the file itself, an LLMPROXY_ variable
            out.append(line)
            continue
        if about.startswith("[") and about.endswith("]"):
            section, key = about[1:-1], ""
        elif "." in about:
            section, _, key = about.rpartition(".")
        else:
            section, key = about, ""
        values = sections.get(section, {})
        if key in values:
            source = values[key][1]
        elif values:
            source = next(iter(values.values()))[1]
        else:
            source = where
        out.append(f"{line} ({source})")
    return out


# -- paths --------------------------------------------------------------------------


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
