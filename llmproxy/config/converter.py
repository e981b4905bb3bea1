"""The cattrs converter that turns ini text into the settings model (tests:
tests/unit/config/test_loader.py).

Every value of an ini file (or of an ``LLMPROXY_*`` variable) is a string; the
model's field types say what it becomes.  One structure hook per type: durations
(``1.5``, ``500ms``, ``2m``), sizes (``64KiB``, ``1MiB``), the ini words for
booleans, comma-separated lists, ``name=value`` pairs, paths, endpoint strings
(parsed by Twisted), URLs, ``OneOf`` words, secrets, and empty text as ``None`` for
optional values.  A hook raises ``ValueError`` with the reason alone (a secret's
hook never quotes the value); cattrs' detailed validation gathers them, with the
class and attribute or index of each in its notes, and :func:`failures` walks that
tree into ``(path, reason)`` pairs for the loader to turn into ``section.key: reason
(where)`` lines.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)

from llmproxy.config.model import (
    DURATION,
    ENDPOINT,
    HTTP_URL,
    REDIS_URL,
    SECRET,
    SIZE,
    SWITCHABLE_ENDPOINT,
    URL_PATH,
    WORKERS,
    Kind,
    kind_of,
    one_of,
)

__all__ = [
    "MISSING",
    "UNKNOWN_KEY",
    "Failed",
    "KeyPath",
    "check_endpoint",
    "check_url",
    "failures",
    "ini_converter",
    "lenient_converter",
    "make_converter",
    "parse_bool",
    "parse_duration",
    "parse_int",
    "parse_list",
    "parse_pairs",
    "parse_size",
    "parse_workers",
    "structure_value",
]

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
_NUMBER = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")

UNKNOWN_KEY = "unknown key"
MISSING = "missing"

# -- the values, one parser each ------------------------------------------------------


def parse_size(text: str) -> int:
    m = _NUMBER.fullmatch(text)
    if not m or m.group(2).lower() not in _SIZE_SUFFIXES:
        raise ValueError(f"not a size: {text!r} (bytes, or with a suffix like 64KiB, 1MiB)")
    return int(float(m.group(1)) * _SIZE_SUFFIXES[m.group(2).lower()])


def parse_duration(text: str) -> float:
    m = _NUMBER.fullmatch(text)
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


def parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"not an integer: {text!r}") from None


def parse_workers(text: str) -> int:
    """``server.workers``: a count, or ``auto`` for one per core."""
    if text.strip().lower() == "auto":
        return os.cpu_count() or 1
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"not a number of processes or auto: {text!r}") from None


def parse_list(text: str) -> tuple[str, ...]:
    """Comma-separated, or one item a line (an indented continuation)."""
    return tuple(p.strip() for p in re.split(r"[,\n]", text) if p.strip())


def parse_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """``name=value`` items of a list (``name:value`` also works)."""
    out = []
    for item in parse_list(text):
        sep = "=" if "=" in item else ":"
        if sep not in item:
            raise ValueError(f"expected name=value pairs, got {item!r}")
        k, v = item.split(sep, 1)
        out.append((k.strip(), v.strip()))
    return tuple(out)


def check_endpoint(text: str) -> str | None:
    """Why ``text`` is not a usable server endpoint string, or None."""
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


def check_url(url: str) -> str | None:
    """Why ``url`` is not a plain http(s) base URL, or None."""
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


# -- the hooks --------------------------------------------------------------------------


def _one_line(text: str) -> str:
    """The value stripped; an indented next line is read as a continuation of it."""
    value = text.strip()
    if "\n" in value:
        raise ValueError("spans several lines (is the next line indented?)")
    return value


def _endpoint(text: str) -> str:
    why = check_endpoint(text)
    if why:
        raise ValueError(why)
    return text


def _switchable_endpoint(text: str) -> str:
    return text if text in ("", "off", "none") else _endpoint(text)


def _http_url(text: str) -> str:
    why = check_url(text) if text else None
    if why:
        raise ValueError(why)
    return text


def _url_path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError("must start with '/'")
    return text


def _as_written(text: str) -> str:
    # A secret is resolved (env:NAME, file:PATH) after structuring; a Redis URL is
    # checked by llmproxy.redis.connection.  Neither is ever quoted here.
    return text


_KIND_PARSERS: dict[Kind, Callable[[str], Any]] = {
    DURATION: parse_duration,
    SIZE: parse_size,
    WORKERS: parse_workers,
    ENDPOINT: _endpoint,
    SWITCHABLE_ENDPOINT: _switchable_endpoint,
    HTTP_URL: _http_url,
    REDIS_URL: _as_written,
    URL_PATH: _url_path,
    SECRET: _as_written,
}


def _scalar(parse: Callable[[str], Any]) -> Callable[[Any, Any], Any]:
    return lambda text, _: parse(_one_line(text))


def _kind_hook(tp: Any) -> Callable[[Any, Any], Any]:
    kind = kind_of(tp)
    if kind not in _KIND_PARSERS:
        raise TypeError(f"no parser for {tp!r}")  # a Kind added to the model without one
    return _scalar(_KIND_PARSERS[kind])


def _one_of_hook(tp: Any) -> Callable[[Any, Any], Any]:
    words = one_of(tp) or ()

    def parse(text: str) -> str:
        if text not in words:
            raise ValueError(f"must be one of {', '.join(words)}")
        return text

    return _scalar(parse)


def _as_written_hook(tp: Any) -> Callable[[Any, Any], Any]:
    return lambda text, _: str(text).strip()


def _is_optional(tp: Any) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args


def _optional_hook_factory(converter: cattrs.Converter) -> Callable[[Any], Any]:
    def factory(tp: Any) -> Callable[[Any, Any], Any]:
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        hook = converter.get_structure_hook(inner)
        return lambda text, _: None if not text.strip() else hook(text, inner)

    return factory


def _is_checked_str(tp: Any) -> bool:
    return typing.get_origin(tp) is Annotated and tp.__origin__ is str


def make_converter(*, lenient: bool = False) -> cattrs.Converter:
    """A converter from ini text to the settings classes: unknown keys are errors
    (``ForbiddenExtraKeysError``), every error is gathered (detailed validation).

    ``lenient`` takes every string-typed value (endpoint, URL, ``OneOf`` word...) as
    written: the loader's second pass, which rebuilds the settings around the keys
    that failed so the checks across keys still see a section whose ``type`` or
    ``prefix`` was wrong.
    """
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(str, _scalar(str))
    converter.register_structure_hook(int, _scalar(parse_int))
    converter.register_structure_hook(bool, _scalar(parse_bool))
    converter.register_structure_hook(Path, _scalar(Path))
    converter.register_structure_hook_func(
        lambda tp: tp == tuple[str, ...], lambda text, _: parse_list(text)
    )
    converter.register_structure_hook_func(
        lambda tp: tp == tuple[tuple[str, str], ...], lambda text, _: parse_pairs(text)
    )
    # Factories registered later are tried first: these win over cattrs' own
    # handling of Annotated and Optional types.
    converter.register_structure_hook_factory(_is_optional, _optional_hook_factory(converter))
    converter.register_structure_hook_factory(lambda tp: kind_of(tp) is not None, _kind_hook)
    converter.register_structure_hook_factory(lambda tp: one_of(tp) is not None, _one_of_hook)
    if lenient:
        converter.register_structure_hook_factory(_is_checked_str, _as_written_hook)
    return converter


ini_converter = make_converter()
lenient_converter = make_converter(lenient=True)


def structure_value(text: str, tp: Any) -> object:
    """One value as the loader reads it for a field of type ``tp``."""
    return ini_converter.structure(text, tp)


# -- errors -----------------------------------------------------------------------------

KeyPath = tuple[str | int, ...]


@attrs.frozen
class Failed:
    """One key that did not structure: where in the tree, and why."""

    path: KeyPath  # attribute names and sequence indexes down to the key
    reason: str
    missing: bool = False  # a required key that is not there


def failures(
    error: BaseException, path: KeyPath = (), note: AttributeValidationNote | None = None
) -> Iterator[Failed]:
    """Each key that failed in a cattrs validation tree: the reason is the hook's
    message, ``unknown key`` (an unknown key's own name ends its path), or
    ``missing`` (with the words a ``OneOf`` key takes)."""
    if isinstance(error, ClassValidationError):
        attributes, others = error.group_exceptions()
        for sub, attribute in attributes:
            yield from failures(sub, (*path, attribute.name), attribute)
        for sub in others:
            yield from failures(sub, path)
    elif isinstance(error, IterableValidationError):
        items, others = error.group_exceptions()
        for sub, item in items:
            yield from failures(sub, (*path, item.index))
        for sub in others:
            yield from failures(sub, path)
    elif isinstance(error, ForbiddenExtraKeysError):
        for key in sorted(error.extra_fields):
            yield Failed((*path, key), UNKNOWN_KEY)
    elif isinstance(error, KeyError) and note is not None:
        # cattrs' generated code reads a required key as o['key']: absent, it raises this.
        words = one_of(note.type)
        reason = f"{MISSING} (one of {', '.join(words)})" if words else MISSING
        yield Failed(path, reason, missing=True)
    else:
        yield Failed(path, str(error))
