"""``llmproxy plugin-cache``: write Twisted's plugin caches at install time
(tests: tests/integration/test_plugin_cache.py).

``twistd`` finds the ``llmproxy`` plugin through ``twisted/plugins/dropin.cache``
files, one in every ``twisted/plugins`` directory on the path.  When a cache is
missing or older than a plugin module beside it, Twisted imports the modules and
rewrites the cache on the next ``getPlugins`` call; a hardened unit
(``ProtectSystem=strict``) cannot, so every start would log "Unable to write to
plugin cache".  Run this once after installing, while site-packages is writable:
it regenerates the caches, then checks each one is a file newer than every plugin
module beside it and lists the plugins, so the next run reads it and never writes.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import attrs
from twisted.logger import ILogObserver
from zope.interface import implementer

from llmproxy.cli.args import Subcommands

__all__ = [
    "CACHE_NAME",
    "TAPNAME",
    "PluginCacheError",
    "PluginDir",
    "add_plugin_cache_command",
    "plugin_dirs",
    "regenerate",
    "stale_reason",
]

TAPNAME = "llmproxy"
CACHE_NAME = "dropin.cache"


class PluginCacheError(Exception):
    """The caches could not be written or are not what ``twistd`` needs."""


@attrs.frozen
class PluginDir:
    """One ``twisted/plugins`` directory holding plugin modules."""

    path: Path
    modules: dict[str, Path]  # plugin key (module name) -> source file

    @property
    def cache(self) -> Path:
        return self.path / CACHE_NAME


def plugin_dirs() -> list[PluginDir]:
    """The directories Twisted's ``getCache`` checks, with their plugin modules
    (the same walk: immediate children of ``twisted.plugins``, grouped by folder)."""
    from twisted.python.modules import getModule

    dirs: dict[Path, dict[str, Path]] = {}
    for module in getModule("twisted.plugins").iterModules():
        source = Path(module.filePath.path)
        key = module.name.rsplit(".", 1)[-1]
        dirs.setdefault(source.parent, {})[key] = source
    return [PluginDir(path, modules) for path, modules in sorted(dirs.items())]


def stale_reason(directory: PluginDir) -> str | None:
    """Why Twisted would (try to) rewrite this directory's cache, or None."""
    cache = directory.cache
    if not cache.is_file():
        return f"{cache} is missing"
    cached_at = cache.stat().st_mtime
    try:
        with cache.open("rb") as f:
            entries: Any = pickle.load(f)
    except Exception as e:  # a torn or foreign file: Twisted treats it as empty
        return f"{cache} is unreadable ({type(e).__name__})"
    if not isinstance(entries, dict):
        return f"{cache} does not hold a plugin table"
    for key, source in sorted(directory.modules.items()):
        if key not in entries:
            return f"{cache} does not list {source.name}"
        # Twisted rewrites when a module's mtime is >= the cache's.
        if source.stat().st_mtime >= cached_at:
            return f"{cache} is older than {source.name}"
    if set(entries) - set(directory.modules):
        return f"{cache} lists plugins that are gone"
    return None


def _make_newer(directory: PluginDir) -> None:
    """A cache written in the same clock tick as a module (coarse file system
    timestamps, or a module with a future mtime) looks stale to Twisted: move its
    mtime just past the newest module's."""
    cache = directory.cache
    if not cache.is_file() or not directory.modules:
        return
    newest = max(source.stat().st_mtime_ns for source in directory.modules.values())
    current = cache.stat().st_mtime_ns
    if current <= newest:
        later = newest + 1_000_000_000
        os.utime(cache, ns=(later, later))


@implementer(ILogObserver)
class _WriteFailures:
    """Collects Twisted's "Unable to write to plugin cache" messages."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        from twisted.logger import formatEvent

        text = formatEvent(event)
        if "plugin cache" in text or event.get("log_failure") is not None:
            self.messages.append(text)


def regenerate() -> list[Path]:
    """Write every plugin cache, check them, and return their paths.

    Raises :class:`PluginCacheError` naming the cache that could not be written
    (with Twisted's reason) or the check that failed.
    """
    from twisted.application.service import IServiceMaker
    from twisted.logger import globalLogPublisher
    from twisted.plugin import IPlugin, getPlugins

    failures = _WriteFailures()
    globalLogPublisher.addObserver(failures)
    try:
        list(getPlugins(IPlugin))
        tapnames = sorted(p.tapname for p in getPlugins(IServiceMaker))
    finally:
        globalLogPublisher.removeObserver(failures)
    dirs = plugin_dirs()
    problems: list[str] = []
    for directory in dirs:
        try:
            _make_newer(directory)
        except OSError as e:
            problems.append(f"{directory.cache}: cannot update its mtime ({e.strerror})")
        why = stale_reason(directory)
        if why:
            problems.append(why)
    if TAPNAME not in tapnames:
        problems.append(
            f"the {TAPNAME!r} twistd plugin was not found "
            f"(found: {', '.join(tapnames) or 'none'}); "
            "is llmproxy installed (non-editable, or editable_mode=compat)?"
        )
    if problems:
        raise PluginCacheError("\n".join(problems + failures.messages))
    return [d.cache for d in dirs]


def _plugin_cache_command(args: argparse.Namespace) -> int:
    try:
        paths = regenerate()
    except PluginCacheError as e:
        for line in str(e).splitlines():
            print(f"llmproxy plugin-cache: {line}", file=sys.stderr)
        print(
            "llmproxy plugin-cache: could not write the twistd plugin cache; run this as the "
            "user who owns the installation (site-packages must be writable now, not at run time)",
            file=sys.stderr,
        )
        return 1
    for path in paths:
        print(f"fresh: {path}")
    return 0


def add_plugin_cache_command(sub: Subcommands) -> None:
    """Register ``llmproxy plugin-cache``."""
    p = sub.add_parser(
        "plugin-cache",
        help="write twistd's plugin cache (run once at install time, as the installation's owner)",
    )
    p.set_defaults(func=_plugin_cache_command)
