"""Typed settings: what the ini file becomes (tests: tests/unit/test_config.py).

Each attrs class is one ini section; field names are the ini keys.  The loader in
:mod:`llmproxy.config.loader` fills them from the file and the environment and reports
every bad value as ``section.key: reason``.  Durations are float seconds, sizes
are int bytes, relative paths are resolved against ``server.state_dir``.
"""

from __future__ import annotations

from pathlib import Path

import attrs

MiB = 1024 * 1024


@attrs.frozen
class ServerSettings:
    listen: str = "tcp:8080:interface=127.0.0.1"
    admin_listen: str = "tcp:9090:interface=127.0.0.1"
    admin_token: str = attrs.field(default="", repr=False)
    workers: int = 1
    state_dir: Path = Path("state")
    environment: str = "development"
    drain_timeout: float = 30.0
    max_body_bytes: int = 32 * MiB
    connect_timeout: float = 10.0
    first_byte_timeout: float = 300.0
    idle_timeout: float = 120.0
    max_connections: int = 10000
    max_header_count: int = 100  # request headers per request; 431 past it
    max_header_bytes: int = 32 * 1024  # request line + headers; 431 past it
    pool_size: int = 100  # persistent upstream connections kept per host
    pool_idle_timeout: float = 50.0  # below typical upstream keep-alive (60 s)
    access_log: bool = False


@attrs.frozen
class RouteSettings:
    name: str
    prefix: str
    upstream: str
    provider: str = "openai"
    auth: str = "passthrough"
    # The upstream key for auth = token, already resolved from env:NAME / file:PATH.
    api_key: str = attrs.field(default="", repr=False)
    cache: str = "default"
    cache_ttl: float | None = None  # this route's default TTL; None: [cache] default_ttl


@attrs.frozen
class PassthroughSettings:
    enabled: bool = True
    allowed_hosts: tuple[str, ...] = ("api.openai.com", "api.anthropic.com")
    # Hosts reachable over plain http (tests, local model servers).  Empty by default.
    allowed_http_hosts: tuple[str, ...] = ()


@attrs.frozen
class CaptureSettings:
    request_body_bytes: int = 64 * 1024
    response_body_bytes: int = 256 * 1024
    redact_headers: tuple[str, ...] = ()


@attrs.frozen
class EventsSettings:
    bus: str = "memory"


@attrs.frozen
class RedisSettings:
    """[redis]: the Redis Streams bus (llmproxy/redis/stream.py) and its dispatchers
    (llmproxy/redis/dispatcher.py)."""

    # redis://[[user]:password@]host[:port][/db], rediss:// (TLS), unix:///path[?db=N]
    url: str = attrs.field(default="redis://127.0.0.1:6379/0", repr=False)
    stream: str = "llmproxy:events"
    maxlen: int = 1_000_000  # XADD ... MAXLEN ~ maxlen: retention, in entries
    group: str = "llmproxy"  # the dispatchers' consumer group
    claim_idle: float = 60.0  # pending this long on a consumer: another one claims it
    consumer: str = ""  # dispatcher's consumer name; empty: <hostname>-<pid>
    block: float = 1.0  # dispatcher: how long one XREADGROUP waits for entries
    timeout: float = 5.0  # connect and command timeout
    # proxy side
    publish_buffer: int = 10000  # events held in memory waiting for XADD
    batch_size: int = 100  # events per round trip (one EVAL running their XADDs)
    flush_interval: float = 0.1
    spool_dir: Path | None = None  # None: <state_dir>/spool/redis-bus
    spool_max_bytes: int = 1024 * MiB
    spool_interval: float = 1.0  # while Redis is away, memory goes to the spool this often


@attrs.frozen
class CacheSettings:
    """[cache]: the HTTP response cache (llmproxy/cache/)."""

    enabled: bool = False  # for routes with cache = default; cache = on/off override it
    store: str = "memory"  # memory | redis
    max_bytes: int = 256 * MiB  # the memory store's bound (LRU)
    max_object_bytes: int = 1 * MiB  # largest response (and request body) cached
    default_ttl: float = 300.0  # when neither the response nor the route says
    lock_timeout: float = 30.0  # identical misses wait this long for the first one
    redis_url: str = attrs.field(default="", repr=False)  # empty: [redis] url
    redis_prefix: str = "llmproxy:cache:"
    redis_timeout: float = 0.5  # per command: a slow Redis turns into a bypass


@attrs.frozen
class SessionSettings:
    """[sessions]: the session tracker (llmproxy/capture/sessions.py)."""

    enabled: bool = True
    max_states: int = 100_000  # conversation states (and sessions) kept in memory, LRU
    # The tracker's journal; empty: memory only (continuity is lost on restart).
    state_file: Path | None = Path("session-state.jsonl")
    flush_interval: float = 1.0  # how often the journal is appended to


@attrs.frozen
class ExporterSettings:
    name: str
    type: str
    enabled: bool = True
    # common to every sink (the exporter core)
    buffer: int = 10000  # events queued in memory
    buffer_bytes: int = 64 * MiB
    batch_size: int = 100  # small batches keep each reactor turn short (p99)
    batch_bytes: int = 1 * MiB
    flush_interval: float = 1.0
    max_in_flight: int = 1
    timeout: float = 10.0
    max_retries: int = 5
    backoff_min: float = 0.5
    backoff_max: float = 60.0
    spool_dir: Path | None = None  # None: <state_dir>/spool/<name>
    spool_max_bytes: int = 1024 * MiB
    # While the sink is failing, what waits in memory goes to the spool this often:
    # a kill -9 during an outage loses at most this long's events.
    spool_interval: float = 1.0
    dead_letter_path: Path | None = None  # None: <state_dir>/deadletter/<name>.jsonl
    # file
    path: Path | None = None
    fsync: str = "batch"  # never | batch | always
    rotate_bytes: int = 100 * MiB
    rotate_keep: int = 5
    # loki
    url: str = ""
    tenant: str = ""
    username: str = ""
    password: str = ""
    bearer_token: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    max_line_bytes: int = 256 * 1024
    gzip: bool = True
    structured_metadata: bool = False
    # sessions
    log_dir: Path | None = None
    # lunary / helicone / otlp
    endpoint: str = ""
    api_key: str = ""
    headers: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class Settings:
    server: ServerSettings = ServerSettings()
    routes: tuple[RouteSettings, ...] = ()
    passthrough: PassthroughSettings = PassthroughSettings()
    capture: CaptureSettings = CaptureSettings()
    events: EventsSettings = EventsSettings()
    redis: RedisSettings = RedisSettings()
    sessions: SessionSettings = SessionSettings()
    cache: CacheSettings = CacheSettings()
    exporters: tuple[ExporterSettings, ...] = ()
    audit_path: Path | None = Path("audit.jsonl")  # [audit] path
    source: str = "<defaults>"  # where the settings came from, for messages
