"""Typed settings: what the ini file becomes, with each key's documentation
(tests: tests/unit/config/test_loader.py, tests/unit/config/test_reference.py).

Each attrs class is one ini section; field names are the ini keys.  A field's type
says how its text is read (``Duration`` is float seconds written ``1.5``, ``500ms``
or ``2m``; ``Size`` is int bytes written ``64KiB``; ``OneOf`` is a word from a
fixed set; relative paths are resolved against ``server.state_dir``), and its
metadata carries the key's meaning.  :mod:`llmproxy.config.loader` structures the
ini file and the environment into these classes with the cattrs converter of
:mod:`llmproxy.config.converter`; :mod:`llmproxy.config.reference` reads the same
types, defaults and meanings to write docs/configuration.md.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import attrs

__all__ = [
    "DURATION",
    "ENDPOINT",
    "EXPORTER_TYPES",
    "HTTP_URL",
    "NAMED_SECTIONS",
    "REDIS_URL",
    "SECRET",
    "SECTIONS",
    "SIZE",
    "SWITCHABLE_ENDPOINT",
    "URL_PATH",
    "WORKERS",
    "Bus",
    "CacheSettings",
    "CacheStore",
    "CaptureSettings",
    "Duration",
    "Endpoint",
    "EventsSettings",
    "ExporterSettings",
    "ExporterType",
    "Fsync",
    "HttpUrl",
    "Kind",
    "MiB",
    "OnUnavailable",
    "OneOf",
    "PassthroughSettings",
    "Provider",
    "RedisSettings",
    "RedisUrl",
    "RouteAuth",
    "RouteCache",
    "RouteSettings",
    "Secret",
    "ServerSettings",
    "SessionSettings",
    "Settings",
    "Size",
    "StateSettings",
    "StateStore",
    "SwitchableEndpoint",
    "UrlPath",
    "Workers",
    "documented",
    "ini_keys",
    "kind_of",
    "meaning",
    "one_of",
    "setting",
    "shown_default",
]

MiB = 1024 * 1024
_T = TypeVar("_T")

# -- what a value's text means ----------------------------------------------------


@attrs.frozen
class Kind:
    """Marks an ``Annotated`` type: which hook of the loader's converter reads the
    text (``name``) and how the reference names the type (``shown_as``)."""

    name: str
    shown_as: str


@attrs.frozen
class OneOf:
    """Marks an ``Annotated[str, ...]`` that takes one of a few words."""

    words: tuple[str, ...]


DURATION = Kind("duration", "duration")
SIZE = Kind("size", "size")
WORKERS = Kind("workers", "int | `auto`")
ENDPOINT = Kind("endpoint", "endpoint")
SWITCHABLE_ENDPOINT = Kind("endpoint or off", "endpoint")
HTTP_URL = Kind("http URL", "URL")
REDIS_URL = Kind("redis URL", "URL")  # checked by llmproxy.redis.connection
URL_PATH = Kind("URL path", "URL path")
SECRET = Kind("secret", "string")  # env:NAME / file:PATH, resolved by the loader

Duration = Annotated[float, DURATION]
Size = Annotated[int, SIZE]
Workers = Annotated[int, WORKERS]
Endpoint = Annotated[str, ENDPOINT]
SwitchableEndpoint = Annotated[str, SWITCHABLE_ENDPOINT]  # or off / none / empty
HttpUrl = Annotated[str, HTTP_URL]  # empty: not set
RedisUrl = Annotated[str, REDIS_URL]
UrlPath = Annotated[str, URL_PATH]
Secret = Annotated[str, SECRET]

Provider = Annotated[str, OneOf(("openai", "anthropic"))]
RouteAuth = Annotated[str, OneOf(("passthrough", "token"))]
RouteCache = Annotated[str, OneOf(("on", "off", "default"))]
Bus = Annotated[str, OneOf(("memory", "redis"))]
CacheStore = Annotated[str, OneOf(("memory", "redis"))]
StateStore = Annotated[str, OneOf(("local", "redis"))]
OnUnavailable = Annotated[str, OneOf(("fail_closed", "fail_open"))]
Fsync = Annotated[str, OneOf(("never", "batch", "always"))]
EXPORTER_TYPES = ("file", "loki", "sessions", "lunary", "helicone", "otlp")
# A str, not a Literal: the engine also runs the Redis stream target as type "redis".
ExporterType = Annotated[str, OneOf(EXPORTER_TYPES)]


def kind_of(tp: Any) -> Kind | None:
    """The :class:`Kind` an ``Annotated`` type carries, if any."""
    return next((m for m in _annotations(tp) if isinstance(m, Kind)), None)


def one_of(tp: Any) -> tuple[str, ...] | None:
    """The words an ``Annotated[str, OneOf(...)]`` takes, if it is one."""
    return next((m.words for m in _annotations(tp) if isinstance(m, OneOf)), None)


def _annotations(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) is Annotated:
        return tuple(tp.__metadata__)
    return ()


# -- each key's documentation -------------------------------------------------------

_MEANING = "llmproxy.meaning"
_MEANING_FOR = "llmproxy.meaning_for"
_SHOWN_DEFAULT = "llmproxy.shown_default"


def setting(
    default: _T,
    *,
    doc: str,
    doc_for: Mapping[str, str] | None = None,
    shown_default: str | None = None,
    repr: bool = True,
) -> _T:
    """An attrs field with a default and its meaning for the reference.

    ``doc_for`` gives other meanings per exporter type where a key means something
    else there (``fsync`` of ``sessions``); ``shown_default`` is what the reference
    shows where the default is computed elsewhere (``None`` standing for
    ``spool/NAME``).  ``repr=False`` keeps a credential out of the settings' repr.
    """
    return attrs.field(default=default, repr=repr, metadata=documented(doc, doc_for, shown_default))


def documented(
    doc: str, doc_for: Mapping[str, str] | None = None, shown_default: str | None = None
) -> dict[str, Any]:
    """Field metadata carrying a key's meaning: for a required key (no default),
    ``attrs.field(metadata=documented(...))``."""
    if not doc.strip():
        raise ValueError("a setting needs its meaning")
    return {_MEANING: doc, _MEANING_FOR: dict(doc_for or {}), _SHOWN_DEFAULT: shown_default}


def meaning(field: attrs.Attribute[Any], group: str = "") -> str:
    """The key's meaning (for exporter keys, as the sink type ``group`` reads it)."""
    return str(field.metadata.get(_MEANING_FOR, {}).get(group) or field.metadata.get(_MEANING, ""))


def shown_default(field: attrs.Attribute[Any]) -> str | None:
    """The default the reference shows, where the field's own stands for another."""
    value = field.metadata.get(_SHOWN_DEFAULT)
    return None if value is None else str(value)


def ini_keys(cls: type) -> dict[str, attrs.Attribute[Any]]:
    """The ini keys of a section class, with their types resolved (``name`` of a
    ``[route:NAME]`` or ``[exporter:NAME]`` is the section's suffix, not a key)."""
    attrs.resolve_types(cls, include_extras=True)  # once per class; keeps Annotated kinds
    return {f.name: f for f in attrs.fields(cls) if f.name != "name"}


# -- the sections -------------------------------------------------------------------


@attrs.frozen
class ServerSettings:
    listen: Endpoint = setting(
        "tcp:8080:interface=127.0.0.1",
        doc="Where the proxy listens: a Twisted server endpoint string "
        "(`tcp:PORT:interface=ADDR`, `unix:/path`, `systemd:domain=INET:index=0` for "
        "socket activation).",
    )
    admin_listen: SwitchableEndpoint = setting(
        "tcp:9090:interface=127.0.0.1",
        doc="The admin listener (`/health`, `/ready`, `/stats`, `/metrics`); `off` disables "
        "it. Keep it on loopback or protect it with `admin_token`.",
    )
    admin_token: Secret = setting(
        "",
        doc="When set, admin requests need `Authorization: Bearer <token>` (compared in "
        "constant time, before any request body is read), but for the probes while "
        "`probes_public` is on. Accepts `env:NAME` and `file:PATH` (see Secrets).",
        repr=False,
    )
    probes_public: bool = setting(
        True,
        doc="`/health` and `/ready` answer without `admin_token`, so a load balancer or a "
        "Kubernetes probe needs no secret (they say only whether the process runs and "
        "serves); everything else on the admin listener stays behind the token. `false`: "
        "the probes need the token too.",
    )
    metrics_projects: int = setting(
        50,
        doc="How many proxy-token projects get their own `project` label in `/metrics` "
        "(`llmproxy_project_requests_total`, `llmproxy_project_tokens_total`): the first "
        "N seen keep their name for the life of the process, later ones count as `other`. "
        "Bounds the series a scrape carries; `0` counts every project as `other`.",
    )
    workers: Workers = setting(
        1,
        doc="Processes serving the proxy listener; `auto` = number of CPU cores. Changes "
        "need a restart.",
    )
    state_dir: Path = setting(
        Path("state"),
        doc="Spools, dead-letter files, the audit log, tokens, session state and the "
        "default event file live here.",
    )
    environment: str = setting(
        "development",
        doc="Recorded in every event and used as the Loki `environment` label.",
    )
    drain_timeout: Duration = setting(
        30.0,
        doc="On SIGTERM: in-flight exchanges may finish, then exporters flush, all within "
        "this; the rest is aborted and spooled. Keep the unit's `TimeoutStopSec` above it.",
    )
    max_body_bytes: Size = setting(
        32 * MiB,
        doc="Request bodies above this get 413, checked while the body arrives.",
    )
    connect_timeout: Duration = setting(
        10.0,
        doc="Connecting to the upstream; a timeout gives 504, a refused connection 502.",
    )
    first_byte_timeout: Duration = setting(
        300.0,
        doc="From sending the request to the upstream's response headers; 504 past it.",
    )
    idle_timeout: Duration = setting(
        120.0,
        doc="The longest gap between two body chunks from the upstream (ends the stream), "
        "and the idle timeout of client connections (between requests, or a client that "
        "stops sending mid-request): the connection is closed.",
    )
    max_connections: int = setting(
        10000,
        doc="Client connections past this are answered 503 and closed.",
    )
    max_connections_per_client: int = setting(
        256,
        doc="Open connections from one client address; past it the new connection is "
        "answered 429 and closed, so one address cannot take every `max_connections` slot. "
        "`0`: no cap (behind a load balancer or NAT every client may share one address: "
        "raise it or turn it off there).",
    )
    header_timeout: Duration = setting(
        10.0,
        doc="The whole request head (request line and headers) must arrive within this, "
        "counted from the connection's start or the first byte of a later request; past it "
        "408 and the connection closes. Trickling bytes do not extend it (unlike "
        "`idle_timeout`).",
    )
    min_body_rate: Size = setting(
        1024,
        doc="Bytes per second a request body must average once `header_timeout` has passed "
        "since its headers; a slower body gets 408 and the connection closes. `0`: no rate "
        "(only `idle_timeout` applies).",
    )
    max_header_count: int = setting(
        100,
        doc="Request headers per request; past it the client gets 431 (JSON error) and the "
        "connection closes.",
    )
    max_header_bytes: Size = setting(
        32 * 1024,
        doc="Request line plus all headers; past it 431 and the connection closes (at least "
        "`1KiB`).",
    )
    pool_size: int = setting(100, doc="Persistent upstream connections kept per host.")
    pool_idle_timeout: Duration = setting(
        50.0,  # below typical upstream keep-alive (60 s)
        doc="How long an idle pooled upstream connection is kept; keep it below the "
        "upstream's keep-alive timeout.",
    )
    access_log: bool = setting(
        False,
        doc="Twisted's per-request access log line. Off by default: it costs more than "
        "proxying, and the events carry the same facts.",
    )


@attrs.frozen
class RouteSettings:
    name: str
    prefix: UrlPath = attrs.field(
        metadata=documented(
            "Requests whose path starts with this (whole segments) use the route; the rest "
            "of the path is appended to `upstream`. `/` serves plain `/v1/...`. Longest "
            "prefix wins."
        )
    )
    upstream: HttpUrl = attrs.field(
        metadata=documented("Base URL, `https://` or `http://`, may carry a base path and port.")
    )
    provider: Provider = setting("openai", doc="How events parse bodies and usage.")
    auth: RouteAuth = setting(
        "passthrough",
        doc="`passthrough` forwards the client's own credentials. `token`: clients must "
        "present a proxy token (`Authorization: Bearer llmp_...`, or `x-api-key: llmp_...` "
        "for Anthropic-style clients); their credential headers are dropped and `api_key` "
        'is sent upstream instead. See operations, "Tokens and the audit log".',
    )
    # The upstream key for auth = token, already resolved from env:NAME / file:PATH.
    api_key: Secret = setting(
        "",
        doc="The provider key sent upstream on an `auth = token` route (required there): as "
        "`Authorization: Bearer <key>` for `openai`, as `x-api-key: <key>` for `anthropic`. "
        "Accepts `env:NAME` and `file:PATH` (see Secrets). Resolved at start-up: a missing "
        "variable or file is a `route:NAME.api_key: ...` problem. Never logged, never in "
        "events.",
        repr=False,
    )
    cache: RouteCache = setting(
        "default",
        doc="The response cache on this route. `default`: cached when `[cache] enabled`; GET "
        "and HEAD are looked up, POST only when the client opts in (`Cache-Control: public, "
        "max-age=N`). `on`: cached even with `enabled = false`, and POST bodies (chat "
        "completions) are cached without the client's opt-in. `off`: never cached, no cache "
        'headers. See operations, "Response cache".',
    )
    allowed_paths: tuple[str, ...] = setting(
        (),
        doc="Upstream paths this route serves (the path after `prefix`, percent-decoded): a "
        "prefix on whole segments (`/v1/chat` also allows `/v1/chat/completions`), or a glob "
        "with `*`, `?`, `[...]` (`/v1/*/completions`; `*` crosses `/`). Anything else gets "
        "403 and never reaches the upstream. Empty: every path. Tokens can narrow it "
        "further (`llmproxy token create --allow-path`).",
    )
    allowed_methods: tuple[str, ...] = setting(
        (),
        doc="HTTP methods this route serves (`GET, POST`); others get 403. Empty: every method.",
    )
    openai_organization: str = setting(
        "",
        doc="Sent upstream as `OpenAI-Organization` on every request of this route "
        "(replacing the client's). On an `auth = token` route the client's own "
        "`OpenAI-Organization` and `OpenAI-Project` are dropped unless "
        "`forward_openai_scope = true`: a token holder must not choose which organization "
        "is billed.",
    )
    openai_project: str = setting(
        "", doc="Sent upstream as `OpenAI-Project` (see `openai_organization`)."
    )
    forward_openai_scope: bool = setting(
        False,
        doc="On an `auth = token` route: forward the client's `OpenAI-Organization` and "
        "`OpenAI-Project` headers (dropped by default). Passthrough routes always forward "
        "them (the client's own key decides what it may reach).",
    )
    cache_ttl: Duration | None = setting(
        None,  # None: [cache] default_ttl
        doc="This route's default TTL for cached responses, used when neither the response "
        "(`s-maxage`, `max-age`) nor the client's opt-in says; empty: `[cache] default_ttl`.",
    )
    price_input: str = setting(
        "",
        doc="A negotiated price for every model on this route: USD per million uncached "
        "input tokens. With `price_output` (required with it); wins over `[prices]` and the "
        'genai-prices table. Empty: not set. See operations, "Cost and budgets".',
    )
    price_output: str = setting(
        "", doc="USD per million output tokens on this route (with `price_input`)."
    )
    price_cache_read: str = setting(
        "",
        doc="USD per million cached input tokens read on this route; empty: `price_input`.",
    )
    price_cache_write: str = setting(
        "",
        doc="USD per million input tokens written to the provider's cache on this route; "
        "empty: `price_input`.",
    )


@attrs.frozen
class PassthroughSettings:
    enabled: bool = setting(True, doc="Turn the transparent form on or off.")
    allowed_hosts: tuple[str, ...] = setting(
        ("api.openai.com", "api.anthropic.com"),
        doc="Hosts reachable over https, compared exactly (lower case, `host[:port]`).",
    )
    allowed_http_hosts: tuple[str, ...] = setting(
        (), doc="Hosts reachable over plain http (local model servers, tests)."
    )


@attrs.frozen
class CaptureSettings:
    request_body_bytes: Size = setting(
        64 * 1024,
        doc="How much of each request body the events keep (the true size is recorded too).",
    )
    response_body_bytes: Size = setting(
        256 * 1024, doc="How much of each response body (or stream) the events keep."
    )
    redact_headers: tuple[str, ...] = setting(
        (),
        doc="Extra header names to obfuscate in events, beside `authorization`, "
        "`x-api-key`, `api-key`, `cookie`, `set-cookie`, `proxy-authorization` and every "
        "name with a part that says credential (`auth`, `token`, `key`, `secret`, "
        "`password`, `credential`, `signature`, ...: `X-Auth`, `X-Custom-Credential`).",
    )
    mask_body_keys: tuple[str, ...] = setting(
        ("api_key", "apiKey", "key", "secret", "password", "token", "access_token"),
        doc="JSON keys whose string values are masked in captured request and response "
        "bodies (at any depth, also inside JSON-encoded strings such as tool arguments), "
        "compared exactly. Empty: no body masking.",
    )


@attrs.frozen
class EventsSettings:
    bus: Bus = setting(
        "memory",
        doc="The event bus; `memory` fans events out to every exporter of this process; "
        "`redis` publishes them to a Redis stream that `llmproxy dispatcher` processes "
        "deliver (see [redis]). `LLM_PROXY_EVENT_BUS`, the Go llm-proxy's variable, sets it "
        "too (`LLMPROXY_EVENTS_BUS` wins).",
    )


@attrs.frozen
class RedisSettings:
    """[redis]: the Redis Streams bus (llmproxy/redis/stream.py) and its dispatchers
    (llmproxy/redis/dispatcher.py)."""

    url: RedisUrl = setting(
        "redis://127.0.0.1:6379/0",
        doc="`redis://[[user]:password@]host[:port][/db]`, `rediss://` for TLS, or "
        "`unix:///path/redis.sock?db=N`. Never logged with its password.",
        repr=False,
    )
    stream: str = setting("llmproxy:events", doc="The stream key.")
    maxlen: int = setting(
        1_000_000,
        doc="Retention: each `XADD` trims to about this many entries (`MAXLEN ~`). Size it "
        "above the worst dispatcher outage times the event rate: entries trimmed before a "
        "group read them are lost (counted and logged by the dispatcher).",
    )
    group: str = setting(
        "llmproxy",
        doc="The dispatchers' consumer group. Dispatchers of one group share the entries; "
        "every group gets every entry. A new group starts at the oldest retained entry.",
    )
    claim_idle: Duration = setting(
        60.0,
        doc="An entry pending this long on one consumer (a dead dispatcher) is claimed by "
        "another. Live dispatchers refresh what they hold every `claim_idle / 3`, so a slow "
        "sink is not taken for a dead consumer.",
    )
    consumer: str = setting(
        "",
        doc="The dispatcher's consumer name; empty: `<hostname>-<pid>`. A stable name (one "
        "per instance) lets a restarted dispatcher take its own pending entries back at "
        "once instead of after `claim_idle`.",
    )
    block: Duration = setting(
        1.0,
        doc="How long one blocking `XREADGROUP` waits for new entries (and so the longest a "
        "drain waits for the read in progress).",
    )
    timeout: Duration = setting(
        5.0,
        doc="Connect and command timeout; a command without a reply in time drops the "
        "connection (it reconnects with backoff up to 2 s).",
    )
    publish_buffer: int = setting(
        10000,
        doc="Proxy: events held in memory waiting for their `XADD`; past it the oldest batch "
        "is spilled to the spool.",
    )
    batch_size: int = setting(
        100,
        doc=(
            "Proxy: the most events sent in one round trip (one `EVAL` of a script running "
            "their `XADD`s), and the events per spool file while Redis is down. A batch goes "
            "as soon as 10 events wait (or at `flush_interval`) and takes up to this many, so "
            "batches grow with the backlog built while the one before was in flight (one batch "
            "is in flight at a time, in publish order): small at low rates, which keeps every "
            "reactor turn short (the c1 p99, see performance.md), and large at high rates or "
            "where Redis is far away."
        ),
    )
    flush_interval: Duration = setting(
        0.1, doc="Proxy: a partial batch is sent after at most this long."
    )
    spool_dir: Path | None = setting(
        None,
        doc="Proxy: where events wait while Redis is unreachable (replayed oldest first when "
        "it returns, and after a restart).",
        shown_default="`spool/redis-bus`",
    )
    spool_max_bytes: Size = setting(
        1024 * MiB,
        doc="Proxy: the spool's bound; past it the oldest spooled events are discarded and "
        "counted.",
    )
    spool_interval: Duration = setting(
        1.0,
        doc="Proxy: while Redis is unreachable or refusing, each full batch goes to the spool "
        "as it fills up and what else waits in memory this often (a `kill -9` during the "
        "outage loses at most this long's events).",
    )


@attrs.frozen
class CacheSettings:
    """[cache]: the HTTP response cache (llmproxy/cache/)."""

    enabled: bool = setting(
        False,
        doc="Cache routes that say `cache = default`. Routes with `cache = on` are cached "
        "either way; with neither, no cache is built and the request path is unchanged.",
    )
    store: CacheStore = setting(
        "memory",
        doc="`memory`: per process, bounded by `max_bytes` (least recently used first out). "
        "`redis`: one cache shared by every process and host, entries expire in Redis with "
        "their TTL.",
    )
    max_bytes: Size = setting(
        256 * MiB,
        doc="The memory store's bound: body, headers and about 128 bytes of bookkeeping per "
        "entry. Not used by the Redis store (bound Redis with `maxmemory` and "
        "`maxmemory-policy volatile-lru` or `allkeys-lru`).",
    )
    max_object_bytes: Size = setting(
        1 * MiB,
        doc="The largest response stored (checked from `Content-Length`, and again while the "
        "body arrives), and the largest request body looked up (larger ones are a bypass).",
    )
    default_ttl: Duration = setting(
        300.0,
        doc="TTL when neither the response, the client's opt-in nor the route's `cache_ttl` says.",
    )
    lock_timeout: Duration = setting(
        30.0,
        doc="Concurrent identical misses wait for the first one's response at most this "
        "long, then go upstream themselves (with `store = redis`, across processes too: "
        "also how long the first one's lock key lives).",
    )
    redis_url: RedisUrl = setting(
        "",
        doc="The Redis of the `redis` store, like `[redis] url` "
        "(`redis://[[user]:password@]host[:port][/db]`, `rediss://`, `unix:///path?db=N`); "
        "empty: `[redis] url`.",
        repr=False,
    )
    redis_prefix: str = setting(
        "llmproxy:cache:",
        doc="Prefix of every cache key in Redis; purging never touches other keys.",
    )
    redis_timeout: Duration = setting(
        0.5,
        doc="Deadline of each Redis command (and of connecting): a Redis that is slow or down "
        "turns lookups into bypasses, never into waiting requests.",
    )


@attrs.frozen
class SessionSettings:
    """[sessions]: the session tracker (llmproxy/capture/sessions.py)."""

    enabled: bool = setting(
        True,
        doc="Track sessions. On by default: every sink gets `session_id`/`seq` (Loki lines, "
        "Lunary, OTLP), not only a `sessions` exporter. It costs one JSON parse and one "
        "hash pass over the messages per conversation request, and nothing when no exporter "
        "is configured (events are off then).",
    )
    max_states: int = setting(
        100_000,
        doc="Conversation states (and, separately, sessions) kept in memory, least recently "
        "used first out. About 260 bytes a state (26 MB at the default). A conversation "
        "whose state was forgotten starts a new session on its next turn.",
    )
    state_file: Path | None = setting(
        Path("session-state.jsonl"),
        doc="The tracker's journal, so conversations continue across restarts; appended once "
        "per `flush_interval`, compacted in a background thread when it holds over twice "
        "the live entries. Empty: memory only. Kept outside the `sessions` exporter's "
        "`log_dir`, so pruning old session logs never deletes it. Losing it only costs "
        "continuity.",
    )
    flush_interval: Duration = setting(
        1.0,
        doc="How often the journal is appended to. A crash loses at most this much tracking.",
    )
    max_body_bytes: Size = setting(
        2 * MiB,
        doc="Conversation request bodies above this are not parsed or fingerprinted (the "
        "work is on the event loop, and one huge conversation must not stall every other "
        "request): they get a session only from an `X-Session-ID` header, else none "
        "(counted as `too_large` in `/stats`).",
    )


@attrs.frozen
class StateSettings:
    """[state]: what the proxy processes share (llmproxy/state/)."""

    store: StateStore = setting(
        "local",
        doc="`local`: each process counts token quotas and rate limits and tracks sessions "
        "on its own (exact for one process). `redis`: every worker and host shares them "
        "through `[redis] url`: quotas exact, one rate bucket per token, the token set "
        "(creation, revocation) seen everywhere within 1 s, one session per conversation "
        "whichever process serves a turn. See workers.md.",
    )
    on_unavailable: OnUnavailable = setting(
        "fail_closed",
        doc="With `store = redis`, while Redis does not answer: `fail_closed` answers "
        "requests on token routes 503; `fail_open` lets them through on the token set last "
        "read, and adds them to the shared counts once Redis is back (rate limits are not "
        "applied meanwhile). Sessions and cache coalescing always carry on within the "
        "process.",
    )
    timeout: Duration = setting(
        0.5,
        doc="Deadline of each shared-state command (and of connecting); a command without "
        "a reply in time counts as Redis not answering.",
    )
    prefix: str = setting("llmproxy:state:", doc="Prefix of every shared-state key in Redis.")
    session_ttl: Duration = setting(
        7 * 86400.0,
        doc="A conversation state or session head unused this long is dropped from Redis "
        "(its conversation then starts a new session). About 200 bytes a state.",
    )
    continuation_wait: Duration = setting(
        1.0,
        doc="A turn whose history no process has recorded yet (the previous reply, served "
        "by another process, is recorded once it has ended) waits up to this long for that "
        "record before it starts a new session; asked again after 50 ms, then twice as "
        "long each time up to 200 ms, in the batches going to Redis anyway. Only its "
        "session event and its own events wait, never the request. 0: a new session at "
        "once.",
    )
    spend_rows: int = setting(
        1000,
        doc="How many (project, model) rows the spend that `llmproxy spend` reads keeps per "
        "window: per UTC day in each process's `token-spend.json`, and with `store = redis` "
        "per day, month and in total in Redis (exactly, across every process). A model first "
        "seen after that, or whose name is over 128 characters or not printable, counts "
        "as model `other` of its project. Bounds what a client or upstream naming endless "
        "models can make the proxy keep.",
    )


@attrs.frozen
class ExporterSettings:
    """[exporter:NAME]: one sink and the exporter core around it.  Keys of one sink
    type say so in their meaning's group (``doc_for``) or in the reference's grouping."""

    name: str
    type: ExporterType = attrs.field(metadata=documented("The sink."))
    enabled: bool = setting(True, doc="A disabled exporter is skipped.")
    # common to every sink (the exporter core)
    buffer: int = setting(10000, doc="Events held in memory waiting for a batch.")
    buffer_bytes: Size = setting(64 * MiB, doc="The same bound in (estimated) bytes.")
    batch_size: int = setting(
        100,
        doc="A batch is sent when it has this many events (encoding a batch is one reactor "
        "turn, so smaller batches keep the p99 down)...",
    )
    batch_bytes: Size = setting(1 * MiB, doc="...or this many bytes of encoded events...")
    flush_interval: Duration = setting(1.0, doc="...or this much time has passed.")
    max_in_flight: int = setting(1, doc="Batches being delivered at once; 1 keeps order.")
    timeout: Duration = setting(10.0, doc="One delivery attempt.")
    max_retries: int = setting(
        5,
        doc="Retries (408, 429, 5xx, connection errors, timeouts) before the batch goes to "
        "the spool.",
    )
    backoff_min: Duration = setting(
        0.5,
        doc="Exponential backoff with full jitter between `backoff_min` and `backoff_max`, "
        "honouring `Retry-After`.",
    )
    backoff_max: Duration = setting(
        60.0, doc="The longest wait between two attempts (see `backoff_min`)."
    )
    spool_dir: Path | None = setting(
        None,
        doc="The disk spool for batches that could not be delivered; replayed oldest first.",
        shown_default="`spool/NAME`",
    )
    spool_max_bytes: Size = setting(
        1024 * MiB,
        doc="Past this the oldest spooled batches are discarded (and counted); `0` disables "
        "the spool (undeliverable batches are dropped and counted).",
    )
    spool_interval: Duration = setting(
        1.0,
        doc="While the sink is failing (a retry pending, or it is down), each full batch is "
        "written to the spool as it fills up and what else waits in memory this often, in "
        "batch-sized segments, off the reactor thread: a `kill -9` during an outage loses at "
        "most the events of the last interval. A healthy sink never touches the disk.",
    )
    dead_letter_path: Path | None = setting(
        None,
        doc="Events a sink refused permanently (e.g. HTTP 400), with the reason.",
        shown_default="`deadletter/NAME.jsonl`",
    )
    # file
    path: Path | None = setting(
        None, doc="JSONL, one event a line, appended.", shown_default="`events.jsonl`"
    )
    fsync: Fsync = setting(
        "batch",
        doc="When to fsync.",
        doc_for={"sessions": "`batch` and `always` fsync each file a batch wrote, once."},
    )
    rotate_bytes: Size = setting(100 * MiB, doc="Rotate to `path.1`, `path.2`, ... past this size.")
    rotate_keep: int = setting(5, doc="Rotated files kept.")
    # loki
    url: HttpUrl = setting(
        "",
        doc="Loki's base URL (`/loki/api/v1/push` is appended unless the URL ends with it).",
        shown_default="required",
    )
    tenant: str = setting(
        "",
        doc=(
            "Sent as `X-Scope-OrgID`; Loki's tenant-id rule: `A-Z a-z 0-9 ! - _ . * ' ( )`, "
            "at most 150, not `.` or `..`."
        ),
    )
    username: str = setting("", doc="Basic auth user (with `password`).")
    password: Secret = setting(
        "", doc="Basic auth password; accepts `env:NAME` and `file:PATH`.", repr=False
    )
    bearer_token: Secret = setting(
        "", doc="Bearer auth (instead of basic); accepts `env:NAME` and `file:PATH`.", repr=False
    )
    labels: tuple[tuple[str, str], ...] = setting(
        (),
        doc="Static extra labels, low-cardinality only (`team=platform, region=eu`). The sink "
        "sets `app` (`llmproxy`, may be overridden here) and, from each event, `provider`, "
        "`environment`, `machine` and `log_type` (not allowed here).",
    )
    max_line_bytes: Size = setting(
        256 * 1024,
        doc="Lines over this are shortened by truncating body fields (never by cutting JSON); "
        "at least `1KiB`.",
    )
    gzip: bool = setting(True, doc="Gzip the push body.")
    structured_metadata: bool = setting(
        False,
        doc="Send `request_id`, `session_id`, `route`, and the proxy token's `token_id` and "
        "`project` (when one was used) as Loki structured metadata.",
    )
    # sessions
    log_dir: Path | None = setting(
        None,
        doc="One JSONL file per session: "
        "`{log_dir}/{upstream_host}/{YYYY-MM-DD}/{session_id}.jsonl`.",
        shown_default="`sessions`",
    )
    # lunary / helicone / otlp
    endpoint: HttpUrl = setting(
        "",
        doc="lunary: `https://api.lunary.ai` (`/v1/runs/ingest` is appended); helicone: "
        "`https://api.worker.helicone.ai` (the worker's base URL, or one of its log URLs: "
        "each exchange goes to `/oai/v1/log`, `/anthropic/v1/log` or `/custom/v1/log` by its "
        "provider; a self-hosted jawn's `/v1/trace/custom/v1/log` is used as given); "
        "otlp: `http://localhost:4318` — a base URL "
        "sends traces to `/v1/traces`, an endpoint ending in `/v1/logs` sends log records "
        "instead (two sections for both).",
        shown_default="see meaning",
    )
    api_key: Secret = setting(
        "",
        doc="Sent as `Authorization: Bearer`. Lunary: required, the project id (a UUID). "
        "Helicone: required. OTLP: optional (unless `headers` sets `Authorization`). Accepts "
        "`env:NAME` and `file:PATH`.",
        repr=False,
    )
    headers: tuple[tuple[str, str], ...] = setting(
        (), doc="Extra headers on every request (collector auth, Helicone properties)."
    )


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
    state: StateSettings = StateSettings()
    exporters: tuple[ExporterSettings, ...] = ()
    audit_path: Path | None = setting(  # [audit] path
        Path("audit.jsonl"),
        doc="The audit log (JSONL, one fsynced line per security decision): auth failures, "
        "quota and rate-limit denials, refused upstream hosts, token creation and "
        "revocation, token reloads, config reloads, cache purges, admin access denied. "
        'Empty: no audit log. See operations, "Tokens and the audit log".',
    )
    prices: dict[str, str] = setting(  # the [prices] section: model -> price line
        attrs.Factory(dict),
        doc="`MODEL = input 2.5, output 10, cache_read 1.25, cache_write 3.75`: USD per "
        "million tokens for answers of `MODEL` (case-insensitive; a trailing `*` matches "
        "every model whose name starts with the rest; a name with `:`, which ends an ini "
        "key, is written as its prefix and `*`: `ft*`), on every route without `price_*` "
        "keys. `input` and `output` are required, the cache prices default to `input`. "
        "Overrides the genai-prices table, which prices everything else. "
        'See operations, "Cost and budgets".',
    )
    source: str = "<defaults>"  # where the settings came from, for messages


# The ini's plain sections: [name] -> the Settings field of that name (in the
# reference's order), and its named ones: [kind:NAME] -> (the Settings field
# holding them, their class).  The loader and the reference read these.
SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "passthrough": PassthroughSettings,
    "capture": CaptureSettings,
    "events": EventsSettings,
    "redis": RedisSettings,
    "sessions": SessionSettings,
    "cache": CacheSettings,
    "state": StateSettings,
}
NAMED_SECTIONS: dict[str, tuple[str, type]] = {
    "route": ("routes", RouteSettings),
    "exporter": ("exporters", ExporterSettings),
}

# The types above are strings until resolved (PEP 563); resolve them once, keeping
# the Annotated kinds, so every reader of attrs.fields() sees the same types.
for _cls in (*SECTIONS.values(), *(cls for _, cls in NAMED_SECTIONS.values()), Settings):
    attrs.resolve_types(_cls, include_extras=True)
del _cls
