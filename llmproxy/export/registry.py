"""From an ``[exporter:NAME]`` section to a running exporter
(tests: tests/unit/export/test_registry.py).

``build_sink`` dispatches on ``type``; a new backend registers one factory in
``SINK_FACTORIES``.  ``build_exporter`` adds the core around the sink, with the
default places under ``server.state_dir``:

- spool: ``<state_dir>/spool/<name>/`` (``spool_max_bytes <= 0`` disables it);
- dead-letter file: ``<state_dir>/deadletter/<name>.jsonl``;
- file sink: ``<state_dir>/events.jsonl``;
- sessions sink: ``<state_dir>/sessions/``.

Relative paths in the settings are taken relative to ``state_dir``.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from pathlib import Path

import attrs
from twisted.internet.interfaces import IReactorTime

from llmproxy.config.model import EXPORTER_TYPES, ExporterSettings
from llmproxy.export.deadletter import DeadLetter
from llmproxy.export.exporter import BatchingExporter, run_here
from llmproxy.export.sink import Sink
from llmproxy.export.spool import Spool
from llmproxy.interfaces import HTTPClient, RunBlocking

__all__ = [
    "SINK_FACTORIES",
    "SinkContext",
    "SinkFactory",
    "build_exporter",
    "build_sink",
]


@attrs.frozen
class SinkContext:
    """What a sink factory may use besides its settings."""

    clock: IReactorTime
    http_client: HTTPClient
    state_dir: Path


SinkFactory = Callable[[ExporterSettings, SinkContext], Sink]


def _resolve(state_dir: Path, path: Path | None, default: Path) -> Path:
    chosen = default if path is None else path
    return chosen if chosen.is_absolute() else state_dir / chosen


def _build_file_sink(settings: ExporterSettings, context: SinkContext) -> Sink:
    from llmproxy.export.sinks.file import FSYNC_POLICIES, FileSink

    if settings.fsync not in FSYNC_POLICIES:
        raise ValueError(
            f"exporter:{settings.name}: fsync must be one of {', '.join(FSYNC_POLICIES)},"
            f" not {settings.fsync!r}"
        )
    return FileSink(
        name=settings.name,
        path=_resolve(context.state_dir, settings.path, Path("events.jsonl")),
        fsync=settings.fsync,
        rotate_bytes=settings.rotate_bytes,
        rotate_keep=settings.rotate_keep,
    )


def _build_loki_sink(settings: ExporterSettings, context: SinkContext) -> Sink:
    from llmproxy.export.sinks.loki import LokiSink

    return LokiSink.from_settings(settings, client=context.http_client, clock=context.clock)


def _build_lunary_sink(settings: ExporterSettings, context: SinkContext) -> Sink:
    from llmproxy.export.sinks.lunary import LunarySink

    return LunarySink.from_settings(settings, client=context.http_client, clock=context.clock)


def _build_helicone_sink(settings: ExporterSettings, context: SinkContext) -> Sink:
    from llmproxy.export.sinks.helicone import HeliconeSink

    return HeliconeSink.from_settings(settings, client=context.http_client, clock=context.clock)


def _build_otlp_sink(settings: ExporterSettings, context: SinkContext) -> Sink:
    from llmproxy.export.sinks.otlp import OTLPSink

    return OTLPSink.from_settings(settings, client=context.http_client, clock=context.clock)


def _build_sessions_sink(settings: ExporterSettings, context: SinkContext) -> Sink:
    from llmproxy.export.sinks.sessions import SessionsSink

    return SessionsSink(
        name=settings.name,
        log_dir=_resolve(context.state_dir, settings.log_dir, Path("sessions")),
        clock=context.clock,
        fsync=settings.fsync,
    )


# One factory per ``type =`` value of the settings model (``EXPORTER_TYPES``, the
# one list of sink types: the ini, the docs and ``llmproxy dispatcher --service``
# all read it).  Factories import their module lazily, so a backend that is not
# configured costs nothing at start.
SINK_FACTORIES: dict[str, SinkFactory] = {
    "file": _build_file_sink,
    "loki": _build_loki_sink,
    "sessions": _build_sessions_sink,
    "lunary": _build_lunary_sink,
    "helicone": _build_helicone_sink,
    "otlp": _build_otlp_sink,
}
if set(SINK_FACTORIES) != set(EXPORTER_TYPES):  # pragma: no cover - a programming error
    raise RuntimeError(f"sink factories {sorted(SINK_FACTORIES)} != types {EXPORTER_TYPES}")


def build_sink(
    settings: ExporterSettings,
    *,
    clock: IReactorTime,
    http_client: HTTPClient,
    state_dir: Path,
) -> Sink:
    """The sink for one exporter section; ``ValueError`` names an unknown type."""
    factory = SINK_FACTORIES.get(settings.type)
    if factory is None:
        known = ", ".join(sorted(SINK_FACTORIES))
        raise ValueError(
            f"exporter:{settings.name}: unknown type {settings.type!r} (known: {known})"
        )
    return factory(settings, SinkContext(clock, http_client, state_dir))


def build_exporter(
    settings: ExporterSettings,
    *,
    clock: IReactorTime,
    http_client: HTTPClient,
    state_dir: Path,
    random: Callable[[], float] = _random.random,
    run_blocking: RunBlocking = run_here,
) -> BatchingExporter:
    """The sink plus the core around it: spool, dead-letter file, defaults resolved.

    Recovers the spool from disk (its events count as accepted and recovered); the
    caller ``start()``s the exporter and ``close()``s it on shutdown.  Spool writes
    run through ``run_blocking`` (the daemon passes its thread pool).
    """
    sink = build_sink(settings, clock=clock, http_client=http_client, state_dir=state_dir)
    spool = None
    if settings.spool_max_bytes > 0:
        directory = _resolve(state_dir, settings.spool_dir, Path("spool") / settings.name)
        spool = Spool(directory, settings.spool_max_bytes)
    dead_letter_path = _resolve(
        state_dir, settings.dead_letter_path, Path("deadletter") / f"{settings.name}.jsonl"
    )
    return BatchingExporter(
        settings,
        sink,
        clock,
        spool,
        DeadLetter(dead_letter_path, settings.name),
        random,
        run_blocking=run_blocking,
    )
