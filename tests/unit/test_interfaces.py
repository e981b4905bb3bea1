"""The declared seams (llmproxy/interfaces.py): the real components satisfy the
protocols the others take them as, capabilities included, and nothing that
lacks a capability claims it."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock

from llmproxy.access.audit import AuditLog
from llmproxy.access.policy import build_access
from llmproxy.capture.pump import CapturePump
from llmproxy.capture.sessions import SessionTracker
from llmproxy.config.loader import load_settings
from llmproxy.config.model import CaptureSettings, ExporterSettings
from llmproxy.export.bus import MemoryBus
from llmproxy.export.registry import build_exporter, build_sink
from llmproxy.interfaces import (
    Auditor,
    EventBus,
    EventSink,
    Lifecycle,
    LineSink,
    PreparingSink,
    ReopenableSink,
    Sink,
    Subscriber,
)
from llmproxy.proxy.client import UpstreamPool
from llmproxy.redis.stream import RedisStreamSink, build_redis_bus


def sink(tmp_path: Path, kind: str, **extra: str) -> Sink:
    settings = ExporterSettings(name=kind, type=kind, **extra)  # type: ignore[arg-type]
    return build_sink(settings, clock=Clock(), http_client=None, state_dir=tmp_path)  # type: ignore[arg-type]


def test_sinks_declare_exactly_the_capabilities_they_have(tmp_path: Path) -> None:
    file = sink(tmp_path, "file")
    loki = sink(tmp_path, "loki", url="http://127.0.0.1:3100")
    lunary = sink(tmp_path, "lunary", api_key="0b8e3c9e-6f8a-4a57-9b3f-4c1f2f1d2e3a")
    sessions = sink(tmp_path, "sessions")
    assert all(isinstance(s, Sink) for s in (file, loki, lunary, sessions))
    assert isinstance(file, LineSink) and isinstance(file, ReopenableSink)
    assert not isinstance(file, PreparingSink)
    assert isinstance(loki, PreparingSink) and not isinstance(loki, ReopenableSink)
    assert not isinstance(lunary, LineSink | PreparingSink | ReopenableSink)
    assert isinstance(sessions, ReopenableSink)


def test_the_long_lived_components_share_one_lifecycle(tmp_path: Path) -> None:
    clock = Clock()
    settings = load_settings(
        text=f"[server]\nstate_dir = {tmp_path}\n[events]\nbus = redis\n", env={}
    )
    audit = AuditLog(tmp_path / "audit.jsonl")
    exporter = build_exporter(
        ExporterSettings(name="f", type="file"),
        clock=clock,
        http_client=None,  # type: ignore[arg-type]
        state_dir=tmp_path,
    )
    bus = build_redis_bus(settings, clock)
    components = [
        exporter,
        bus,
        MemoryBus(),
        build_access(settings, audit, clock),
        SessionTracker(lambda envelope: None, None, 10, clock),
        CapturePump(MemoryBus(), CaptureSettings(), clock, enabled=True),
        UpstreamPool(clock, 1.0),
    ]
    for component in components:
        assert isinstance(component, Lifecycle), component
    assert isinstance(bus, EventBus) and isinstance(MemoryBus(), EventBus)
    assert isinstance(exporter, Subscriber)
    assert isinstance(RedisStreamSink(settings.redis, None), LineSink)  # type: ignore[arg-type]
    assert isinstance(audit, Auditor)
    assert isinstance(CapturePump(MemoryBus(), CaptureSettings(), clock, enabled=True), EventSink)


def test_the_shared_state_parts_declare_their_seams(tmp_path: Path) -> None:
    from llmproxy.cache.redis_store import RedisStore
    from llmproxy.cache.store import MemoryStore
    from llmproxy.interfaces import AccessPolicy, CacheStore, LockingStore, SharedSessionState
    from llmproxy.state import build_shared_state
    from llmproxy.state.health import StateHealth

    clock = Clock()
    settings = load_settings(
        text=f"[server]\nstate_dir = {tmp_path}\n[state]\nstore = redis\n", env={}
    )
    shared = build_shared_state(settings, clock, StateHealth(clock))
    assert shared is not None
    assert isinstance(shared, Lifecycle)
    assert isinstance(shared.sessions, SharedSessionState)
    redis_store = RedisStore(redis=shared.redis, clock=clock)
    assert isinstance(redis_store, LockingStore) and isinstance(redis_store, CacheStore)
    memory = MemoryStore(clock=clock, max_bytes=1024)
    assert isinstance(memory, CacheStore) and not isinstance(memory, LockingStore)
    access = build_access(settings, AuditLog(None), clock, shared=shared)
    assert isinstance(access, AccessPolicy) and isinstance(access, Lifecycle)
    assert build_shared_state(load_settings(env={}), clock, StateHealth(clock)) is None
