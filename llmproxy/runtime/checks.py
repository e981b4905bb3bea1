"""Every subsystem's own check of the settings, after the config package's
(tests: tests/unit/runtime/test_checks.py).

:mod:`llmproxy.config` checks what the settings say (types, bounds, required
keys) and imports nothing else of llmproxy.  What a subsystem makes of them is
that subsystem's to judge: the Redis URL and stream names
(:func:`llmproxy.redis.connection.redis_problems`), the cache's bounds
(:func:`llmproxy.cache.cache_problems`), the shared state's
(:func:`llmproxy.state.state_problems`), each sink's rules (its factory raises
``ValueError``: Loki label names, Lunary's project id...).  :func:`check_settings`
runs them all; :func:`load_checked` is what start-up, reload, ``llmproxy
check-config`` and the dispatcher call, so a bad file fails all of them with the
same ``section.key: reason`` lines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.internet.task import Clock

from llmproxy.cache import cache_problems
from llmproxy.config.loader import load_settings
from llmproxy.config.model import ExporterSettings, Settings
from llmproxy.export.registry import build_sink
from llmproxy.pricing import price_problems
from llmproxy.redis.connection import redis_problems
from llmproxy.state import state_problems

__all__ = ["check_settings", "load_checked", "sink_problem"]


def check_settings(settings: Settings) -> list[str]:
    """The subsystems' problems with ``settings``, as ``section.key: reason`` lines."""
    problems = [f"redis.{problem}" for problem in redis_problems(settings.redis)]
    problems.extend(cache_problems(settings))
    problems.extend(state_problems(settings))
    problems.extend(price_problems(settings))
    for exporter in settings.exporters:
        why = sink_problem(exporter, settings)
        if why:
            problems.append(why)
    return problems


def sink_problem(exporter: ExporterSettings, settings: Settings) -> str | None:
    """Build the sink once (no I/O happens at construction) to surface its own
    checks at load time rather than after listening."""
    section = f"exporter:{exporter.name}"
    try:
        build_sink(
            exporter, clock=Clock(), http_client=_NoClient(), state_dir=settings.server.state_dir
        )
    except ValueError as e:
        why = str(e)
        return why if why.startswith(section) else f"{section}: {why}"
    return None


class _NoClient:
    def request(self, method: str, url: Any, **kwargs: Any) -> Any:
        raise RuntimeError("configuration check only")


def load_checked(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    text: str | None = None,
) -> Settings:
    """:func:`~llmproxy.config.loader.load_settings` with :func:`check_settings`;
    raises :class:`~llmproxy.config.loader.ConfigError` with every problem of both,
    each line saying where it comes from.  When the file itself has problems, the
    subsystems still check what could be read (``load_settings`` says how)."""
    return load_settings(path, env, text=text, checks=check_settings)
