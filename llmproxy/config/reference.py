"""The configuration reference, generated from the settings model (tests: tests/unit/test_docs.py).

``docs/configuration.md`` is this module's output: every section and key of
:mod:`llmproxy.config.model`, with its type and default as a user writes them in the
ini file, and its meaning from :data:`MEANINGS`.  A key added to the settings
without a meaning here fails the test, and so does a stale document.  Regenerate
with::

    python -m llmproxy.config.reference --write        # or: ... > docs/configuration.md

Types and defaults are derived the way :mod:`llmproxy.config.loader` parses them: an
``int`` named ``*bytes`` is a size (``64KiB``), a ``float`` a duration, a tuple of
strings a comma-separated list, of pairs a ``k=v`` list.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

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

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
REGENERATE = "python -m llmproxy.config.reference --write"

# Sections in the order of the document: (heading, meaning-table prefix, settings class).
SECTIONS: tuple[tuple[str, str, type], ...] = (
    ("[server]", "server", ServerSettings),
    ("[route:NAME]", "route", RouteSettings),
    ("[passthrough]", "passthrough", PassthroughSettings),
    ("[capture]", "capture", CaptureSettings),
    ("[events]", "events", EventsSettings),
    ("[redis]", "redis", RedisSettings),
    ("[sessions]", "sessions", SessionSettings),
    ("[cache]", "cache", CacheSettings),
)

# [exporter:NAME] keys by sink type; every other field is common to all sinks.
EXPORTER_GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("`file`:", "file", ("path", "fsync", "rotate_bytes", "rotate_keep")),
    (
        "`loki`:",
        "loki",
        (
            "url",
            "tenant",
            "username",
            "password",
            "bearer_token",
            "labels",
            "max_line_bytes",
            "gzip",
            "structured_metadata",
        ),
    ),
    ("`lunary`, `helicone`, `otlp`:", "http", ("endpoint", "api_key", "headers")),
    ("`sessions` (seed 001's session log; see operations, \"Session log\"):", "sessions",
     ("log_dir", "fsync")),
)  # fmt: skip

# -- one line of meaning per key ------------------------------------------------------
# "section.key"; exporter keys are "exporter.key" (common) or "exporter[GROUP].key".

MEANINGS: dict[str, str] = {
    # [server]
    "server.listen": (
        "Where the proxy listens: a Twisted server endpoint string (`tcp:PORT:interface=ADDR`, "
        "`unix:/path`, `systemd:domain=INET:index=0` for socket activation)."
    ),
    "server.admin_listen": (
        "The admin listener (`/health`, `/ready`, `/stats`, `/metrics`); `off` disables it. "
        "Keep it on loopback or protect it with `admin_token`."
    ),
    "server.admin_token": (
        "When set, admin requests need `Authorization: Bearer <token>` (compared in constant time)."
    ),
    "server.workers": (
        "Processes serving the proxy listener; `auto` = number of CPU cores. Changes need "
        "a restart."
    ),
    "server.state_dir": (
        "Spools, dead-letter files, the audit log, tokens, session state and the default "
        "event file live here."
    ),
    "server.environment": ("Recorded in every event and used as the Loki `environment` label."),
    "server.drain_timeout": (
        "On SIGTERM: in-flight exchanges may finish, then exporters flush, all within this; "
        "the rest is aborted and spooled. Keep the unit's `TimeoutStopSec` above it."
    ),
    "server.max_body_bytes": ("Request bodies above this get 413, checked while the body arrives."),
    "server.connect_timeout": (
        "Connecting to the upstream; a timeout gives 504, a refused connection 502."
    ),
    "server.first_byte_timeout": (
        "From sending the request to the upstream's response headers; 504 past it."
    ),
    "server.idle_timeout": (
        "The longest gap between two body chunks from the upstream (ends the stream), and "
        "the idle timeout of client connections (between requests, or a client that stops "
        "sending mid-request): the connection is closed."
    ),
    "server.max_connections": "Client connections past this are answered 503 and closed.",
    "server.max_header_count": (
        "Request headers per request; past it the client gets 431 (JSON error) and the "
        "connection closes."
    ),
    "server.max_header_bytes": (
        "Request line plus all headers; past it 431 and the connection closes (at least `1KiB`)."
    ),
    "server.pool_size": "Persistent upstream connections kept per host.",
    "server.pool_idle_timeout": (
        "How long an idle pooled upstream connection is kept; keep it below the upstream's "
        "keep-alive timeout."
    ),
    "server.access_log": (
        "Twisted's per-request access log line. Off by default: it costs more than "
        "proxying, and the events carry the same facts."
    ),
    # [route:NAME]
    "route.prefix": (
        "Requests whose path starts with this (whole segments) use the route; the rest of "
        "the path is appended to `upstream`. `/` serves plain `/v1/...`. Longest prefix wins."
    ),
    "route.upstream": ("Base URL, `https://` or `http://`, may carry a base path and port."),
    "route.provider": "How events parse bodies and usage.",
    "route.auth": (
        "`passthrough` forwards the client's own credentials. `token`: clients must present "
        "a proxy token (`Authorization: Bearer llmp_...`, or `x-api-key: llmp_...` for "
        "Anthropic-style clients); their credential headers are dropped and `api_key` is "
        'sent upstream instead. See operations, "Tokens and the audit log".'
    ),
    "route.api_key": (
        "The provider key sent upstream on an `auth = token` route (required there): as "
        "`Authorization: Bearer <key>` for `openai`, as `x-api-key: <key>` for `anthropic`. "
        "Accepts `env:NAME` and `file:PATH` (see Secrets). Resolved at start-up: a missing "
        "variable or file is a `route:NAME.api_key: ...` problem. Never logged, never in "
        "events."
    ),
    "route.cache": (
        "The response cache on this route. `default`: cached when `[cache] enabled`; GET "
        "and HEAD are looked up, POST only when the client opts in (`Cache-Control: public, "
        "max-age=N`). `on`: cached even with `enabled = false`, and POST bodies (chat "
        "completions) are cached without the client's opt-in. `off`: never cached, no cache "
        'headers. See operations, "Response cache".'
    ),
    "route.cache_ttl": (
        "This route's default TTL for cached responses, used when neither the response "
        "(`s-maxage`, `max-age`) nor the client's opt-in says; empty: `[cache] default_ttl`."
    ),
    # [passthrough]
    "passthrough.enabled": "Turn the transparent form on or off.",
    "passthrough.allowed_hosts": (
        "Hosts reachable over https, compared exactly (lower case, `host[:port]`)."
    ),
    "passthrough.allowed_http_hosts": (
        "Hosts reachable over plain http (local model servers, tests)."
    ),
    # [capture]
    "capture.request_body_bytes": (
        "How much of each request body the events keep (the true size is recorded too)."
    ),
    "capture.response_body_bytes": ("How much of each response body (or stream) the events keep."),
    "capture.redact_headers": (
        "Extra header names to obfuscate in events, beside `authorization`, `x-api-key`, "
        "`api-key`, `cookie`, `set-cookie`, `proxy-authorization`."
    ),
    # [events]
    "events.bus": (
        "The event bus; `memory` fans events out to every exporter of this process; "
        "`redis` publishes them to a Redis stream that `llmproxy dispatcher` processes "
        "deliver (see [redis]). Seed 002's `LLM_PROXY_EVENT_BUS` sets it too "
        "(`LLMPROXY_EVENTS_BUS` wins)."
    ),
    # [redis]
    "redis.url": (
        "`redis://[[user]:password@]host[:port][/db]`, `rediss://` for TLS, or "
        "`unix:///path/redis.sock?db=N`. Never logged with its password."
    ),
    "redis.stream": "The stream key.",
    "redis.maxlen": (
        "Retention: each `XADD` trims to about this many entries (`MAXLEN ~`). Size it "
        "above the worst dispatcher outage times the event rate: entries trimmed before a "
        "group read them are lost (counted and logged by the dispatcher)."
    ),
    "redis.group": (
        "The dispatchers' consumer group. Dispatchers of one group share the entries; every "
        "group gets every entry. A new group starts at the oldest retained entry."
    ),
    "redis.claim_idle": (
        "An entry pending this long on one consumer (a dead dispatcher) is claimed by "
        "another. Live dispatchers refresh what they hold every `claim_idle / 3`, so a slow "
        "sink is not taken for a dead consumer."
    ),
    "redis.consumer": (
        "The dispatcher's consumer name; empty: `<hostname>-<pid>`. A stable name (one per "
        "instance) lets a restarted dispatcher take its own pending entries back at once "
        "instead of after `claim_idle`."
    ),
    "redis.block": (
        "How long one blocking `XREADGROUP` waits for new entries (and so the longest a "
        "drain waits for the read in progress)."
    ),
    "redis.timeout": (
        "Connect and command timeout; a command without a reply in time drops the "
        "connection (it reconnects with backoff up to 2 s)."
    ),
    "redis.publish_buffer": (
        "Proxy: events held in memory waiting for their `XADD`; past it the oldest batch is "
        "spilled to the spool."
    ),
    "redis.batch_size": "Proxy: `XADD`s pipelined in one round trip.",
    "redis.flush_interval": "Proxy: a partial batch is sent after at most this long.",
    "redis.spool_interval": (
        "Proxy: while Redis is unreachable or refusing, what waits in memory goes to the spool "
        "this often (a `kill -9` during the outage loses at most this long's events)."
    ),
    "redis.spool_dir": (
        "Proxy: where events wait while Redis is unreachable (replayed oldest first when it "
        "returns, and after a restart)."
    ),
    "redis.spool_max_bytes": (
        "Proxy: the spool's bound; past it the oldest spooled events are discarded and counted."
    ),
    # [sessions]
    "sessions.enabled": (
        "Track sessions. On by default: every sink gets `session_id`/`seq` (Loki lines, "
        "Lunary, OTLP), not only a `sessions` exporter. It costs one JSON parse and one hash "
        "pass over the messages per conversation request, and nothing when no exporter is "
        "configured (events are off then)."
    ),
    "sessions.max_states": (
        "Conversation states (and, separately, sessions) kept in memory, least recently used "
        "first out. About 260 bytes a state (26 MB at the default). A conversation whose "
        "state was forgotten starts a new session on its next turn."
    ),
    "sessions.state_file": (
        "The tracker's journal, so conversations continue across restarts; appended once per "
        "`flush_interval`, compacted in a background thread when it holds over twice the live "
        "entries. Empty: memory only. Kept outside the `sessions` exporter's `log_dir`, so "
        "pruning old session logs never deletes it. Losing it only costs continuity."
    ),
    "sessions.flush_interval": (
        "How often the journal is appended to. A crash loses at most this much tracking."
    ),
    # [cache]
    "cache.enabled": (
        "Cache routes that say `cache = default`. Routes with `cache = on` are cached either "
        "way; with neither, no cache is built and the request path is unchanged."
    ),
    "cache.store": (
        "`memory`: per process, bounded by `max_bytes` (least recently used first out). "
        "`redis`: one cache shared by every process and host, entries expire in Redis with "
        "their TTL."
    ),
    "cache.max_bytes": (
        "The memory store's bound: body, headers and about 128 bytes of bookkeeping per "
        "entry. Not used by the Redis store (bound Redis with `maxmemory` and "
        "`maxmemory-policy volatile-lru` or `allkeys-lru`)."
    ),
    "cache.max_object_bytes": (
        "The largest response stored (checked from `Content-Length`, and again while the "
        "body arrives), and the largest request body looked up (larger ones are a bypass)."
    ),
    "cache.default_ttl": (
        "TTL when neither the response, the client's opt-in nor the route's `cache_ttl` says."
    ),
    "cache.lock_timeout": (
        "Concurrent identical misses wait for the first one's response at most this long, "
        "then go upstream themselves."
    ),
    "cache.redis_url": (
        "The Redis of the `redis` store, like `[redis] url` "
        "(`redis://[[user]:password@]host[:port][/db]`, `rediss://`, `unix:///path?db=N`); "
        "empty: `[redis] url`."
    ),
    "cache.redis_prefix": ("Prefix of every cache key in Redis; purging never touches other keys."),
    "cache.redis_timeout": (
        "Deadline of each Redis command (and of connecting): a Redis that is slow or down "
        "turns lookups into bypasses, never into waiting requests."
    ),
    # [audit]
    "audit.path": (
        "The audit log (JSONL, one fsynced line per security decision): auth failures, quota "
        "and rate-limit denials, refused upstream hosts, token creation and revocation, token "
        'reloads, config reloads, cache purges, admin access denied. See operations, "Tokens '
        'and the audit log".'
    ),
    # [exporter:NAME], common
    "exporter.type": "The sink.",
    "exporter.enabled": "A disabled exporter is skipped.",
    "exporter.buffer": "Events held in memory waiting for a batch.",
    "exporter.buffer_bytes": "The same bound in (estimated) bytes.",
    "exporter.batch_size": (
        "A batch is sent when it has this many events (encoding a batch is one reactor turn, "
        "so smaller batches keep the p99 down)..."
    ),
    "exporter.batch_bytes": "...or this many bytes of encoded events...",
    "exporter.flush_interval": "...or this much time has passed.",
    "exporter.max_in_flight": "Batches being delivered at once; 1 keeps order.",
    "exporter.timeout": "One delivery attempt.",
    "exporter.max_retries": (
        "Retries (408, 429, 5xx, connection errors, timeouts) before the batch goes to the spool."
    ),
    "exporter.backoff_min": (
        "Exponential backoff with full jitter between `backoff_min` and `backoff_max`, "
        "honouring `Retry-After`."
    ),
    "exporter.backoff_max": "The longest wait between two attempts (see `backoff_min`).",
    "exporter.spool_dir": (
        "The disk spool for batches that could not be delivered; replayed oldest first."
    ),
    "exporter.spool_max_bytes": (
        "Past this the oldest spooled batches are discarded (and counted); `0` disables the "
        "spool (undeliverable batches are dropped and counted)."
    ),
    "exporter.spool_interval": (
        "While the sink is failing (a retry pending, or it is down), what waits in memory is "
        "written to the spool this often, in batch-sized segments, off the reactor thread: a "
        "`kill -9` during an outage loses at most the events of the last interval. A healthy "
        "sink never touches the disk."
    ),
    "exporter.dead_letter_path": (
        "Events a sink refused permanently (e.g. HTTP 400), with the reason."
    ),
    # file
    "exporter[file].path": "JSONL, one event a line, appended.",
    "exporter[file].fsync": "When to fsync.",
    "exporter[file].rotate_bytes": "Rotate to `path.1`, `path.2`, ... past this size.",
    "exporter[file].rotate_keep": "Rotated files kept.",
    # loki
    "exporter[loki].url": (
        "Loki's base URL (`/loki/api/v1/push` is appended unless the URL ends with it)."
    ),
    "exporter[loki].tenant": (
        "Sent as `X-Scope-OrgID`; Loki's tenant-id rule: `A-Z a-z 0-9 ! - _ . * ' ( )`, "
        "at most 150, not `.` or `..`."
    ),
    "exporter[loki].username": "Basic auth user (with `password`).",
    "exporter[loki].password": "Basic auth password; accepts `env:NAME` and `file:PATH`.",
    "exporter[loki].bearer_token": (
        "Bearer auth (instead of basic); accepts `env:NAME` and `file:PATH`."
    ),
    "exporter[loki].labels": (
        "Static extra labels, low-cardinality only (`team=platform, region=eu`). The sink "
        "sets `app` (`llmproxy`, may be overridden here) and, from each event, `provider`, "
        "`environment`, `machine` and `log_type` (not allowed here)."
    ),
    "exporter[loki].max_line_bytes": (
        "Lines over this are shortened by truncating body fields (never by cutting JSON); "
        "at least `1KiB`."
    ),
    "exporter[loki].gzip": "Gzip the push body.",
    "exporter[loki].structured_metadata": (
        "Send `request_id`, `session_id` and `route` as Loki structured metadata."
    ),
    # lunary / helicone / otlp
    "exporter[http].endpoint": (
        "lunary: `https://api.lunary.ai` (`/v1/runs/ingest` is appended); helicone: "
        "`https://api.worker.helicone.ai` (the worker's base URL, or one of its log URLs: "
        "each exchange goes to `/oai/v1/log`, `/anthropic/v1/log` or `/custom/v1/log` by its "
        "provider; a self-hosted jawn's `/v1/trace/custom/v1/log` is used as given); "
        "otlp: `http://localhost:4318` — a base URL "
        "sends traces to `/v1/traces`, an endpoint ending in `/v1/logs` sends log records "
        "instead (two sections for both)."
    ),
    "exporter[http].api_key": (
        "Sent as `Authorization: Bearer`. Lunary: required, the project id (a UUID). "
        "Helicone: required. OTLP: optional (unless `headers` sets `Authorization`). Accepts "
        "`env:NAME` and `file:PATH`."
    ),
    "exporter[http].headers": (
        "Extra headers on every request (collector auth, Helicone properties)."
    ),
    # sessions
    "exporter[sessions].log_dir": (
        "One JSONL file per session: `{log_dir}/{upstream_host}/{YYYY-MM-DD}/{session_id}.jsonl`."
    ),
    "exporter[sessions].fsync": ("`batch` and `always` fsync each file a batch wrote, once."),
}

# Where the derived type is too vague: enumerations, URLs, endpoints.
TYPES: dict[str, str] = {
    "server.listen": "endpoint",
    "server.admin_listen": "endpoint",
    "server.workers": "int \\| `auto`",
    "route.prefix": "URL path",
    "route.upstream": "URL",
    "route.provider": "`openai` \\| `anthropic`",
    "route.auth": "`passthrough` \\| `token`",
    "route.cache": "`on` \\| `off` \\| `default`",
    "events.bus": "`memory` \\| `redis`",
    "redis.url": "URL",
    "cache.store": "`memory` \\| `redis`",
    "cache.redis_url": "URL",
    "exporter.type": ("`file` \\| `loki` \\| `sessions` \\| `lunary` \\| `helicone` \\| `otlp`"),
    "exporter[file].fsync": "`never` \\| `batch` \\| `always`",
    "exporter[sessions].fsync": "`never` \\| `batch` \\| `always`",
    "exporter[loki].url": "URL",
    "exporter[http].endpoint": "URL",
}

# Where the settings' default (None, empty) stands for a computed one.
DEFAULTS: dict[str, str] = {
    "route.prefix": "required",
    "route.upstream": "required",
    "exporter.type": "required",
    "redis.spool_dir": "`spool/redis-bus`",
    "exporter.spool_dir": "`spool/NAME`",
    "exporter.dead_letter_path": "`deadletter/NAME.jsonl`",
    "exporter[file].path": "`events.jsonl`",
    "exporter[loki].url": "required",
    "exporter[http].endpoint": "see meaning",
    "exporter[sessions].log_dir": "`sessions`",
}

# -- fixed prose ----------------------------------------------------------------------

INTRO = """\
# Configuration reference

<!-- Generated by llmproxy/config/reference.py from llmproxy/config/model.py: do not edit by hand.
     Regenerate with: {regenerate} -->

llmproxy reads one ini file (`--config PATH`; without it, the embedded default
`llmproxy/config/default.ini`). `llmproxy check-config PATH` validates a file (and the
environment) and prints one line per problem, `section.key: reason (where)`; the
daemon refuses to start with the same lines and exit code 64.

## Types

- **duration**: seconds, floats allowed, or with a suffix: `500ms`, `5s`, `2m`,
  `1h`.
- **size**: bytes, or with a suffix: `64KiB`, `1MiB`, `1GiB` (powers of 1024),
  `64k`/`64kb`, `1MB`, `1GB` (powers of 1000).
- **bool**: `true`/`false`, `yes`/`no`, `on`/`off`, `1`/`0`.
- **list**: comma-separated (or one item a line, indented); `k=v` lists are
  `name=value` pairs (`name:value` also works).
- **path**: relative paths are relative to `server.state_dir`; `state_dir`
  itself is relative to the working directory.
- **URL**: `http://` or `https://`, no credentials, query or fragment (except
  where a key says otherwise). **endpoint**: a Twisted server endpoint string.

## Environment overrides

Every key can be overridden from the environment as `LLMPROXY_<SECTION>_<KEY>`
(upper case), e.g. `LLMPROXY_SERVER_DRAIN_TIMEOUT=10`; route and exporter
sections as `LLMPROXY_ROUTE_<NAME>_<KEY>` and `LLMPROXY_EXPORTER_<NAME>_<KEY>`
(e.g. `LLMPROXY_EXPORTER_LOKI_URL`; a section the file does not have is created,
so it needs its required keys too, e.g. `LLMPROXY_EXPORTER_LOKI_TYPE=loki`). The
environment wins over the file. An unknown variable with the
`LLMPROXY_` prefix is an error, so typos do not pass silently.

## Secrets

Keys that hold a credential — `route:NAME.api_key`, and the exporters'
`api_key`, `password` and `bearer_token` — accept two indirections, so the
secret need not be in the ini file:

- `env:NAME`: the value of the environment variable `NAME` (an error if it is
  unset or empty);
- `file:PATH`: the content of the file, surrounding whitespace dropped (relative
  to `state_dir`; an error if it is missing, unreadable or empty).

They are resolved at start-up and on reload; a problem is reported as
`section.key: ...` without quoting the secret. Secrets are never logged and
never in events.

## Example

```ini
[server]
listen = tcp:8080:interface=0.0.0.0
state_dir = /var/lib/llmproxy
environment = production
drain_timeout = 30s

[route:openai]
prefix = /openai
upstream = https://api.openai.com
provider = openai
auth = token
api_key = env:OPENAI_API_KEY

[route:anthropic]
prefix = /anthropic
upstream = https://api.anthropic.com
provider = anthropic

[capture]
request_body_bytes = 64KiB
response_body_bytes = 256KiB

[exporter:events]
type = file
path = events.jsonl
rotate_bytes = 100MiB

[exporter:loki]
type = loki
url = http://loki:3100
labels = team=platform
```

Per sink, complete examples are in [sinks.md](sinks.md).
"""

NOTES: dict[str, str] = {
    "passthrough": """\
The transparent form `/{provider}/{host}/{rest}` (e.g.
`/anthropic/api.anthropic.com/v1/messages`) reaches only hosts listed here; any
other host, and any host segment with userinfo, percent-encoding, a port not
listed, or dot segments, is answered 403 and written to the audit log.
""",
    "redis": """\
The Redis Streams bus (`[events] bus = redis`) and its dispatchers; see
operations.md, "The Redis bus". Needs Redis 6.2 or newer (7.0 or newer to count
entries lost to trimming).
""",
    "sessions": """\
The session tracker: gives every conversation request (`POST` to a path ending
in `/chat/completions`, `/responses` or `/messages` with a JSON body) a
`session_id` and `seq`, from the client's id or from the conversation's
fingerprint, and publishes `session_start` and `fork` events. See operations,
"Session log". Changes take effect at the next restart.
""",
    "cache": """\
The HTTP response cache (see operations, "Response cache"). An answer from the
cache is an exchange like any other: it is recorded as `request` and `response`
events (`cache_status` `hit` or `conditional-hit`, with `cache_key` and
`cache_age_s`; see sinks.md, "Answers from the cache"). Changes take effect
at the next restart; the routes' `cache` and `cache_ttl` apply on reload.
""",
    "exporter": """\
One section per sink; several of one type may run at once. Events go to every
enabled exporter, each with its own bounded buffer. What each sink sends, with a
complete example each: [sinks.md](sinks.md).

Common keys (the exporter core):
""",
    "exporter[http]": """\
Only `response` events are sent to these three (they are self-contained); a
batch of only `request` events is acknowledged without a request. Lunary gets a
`start` and an `end`/`error` event per exchange with a `runId` derived from the
request id; per-event failures in Lunary's `results` are dead-lettered, the rest
counts as delivered. Helicone takes one exchange per POST: a batch is sent with
up to 4 POSTs in flight; a 4xx refuses that exchange alone; a 429/5xx or a
transport error retries the whole batch, skipping exchanges already accepted
(the `Helicone-Request-Id` is derived from the request id, so a re-sent log is
the same Helicone request). OTLP retries only 429, 502, 503 and 504; a partial
success is logged, not retried.
""",
    "exporter[sessions]": """\
Only events with a session id are written (conversation requests, see
`[sessions]`); files idle for 60 s are closed, at most 256 stay open.
""",
}

OUTRO = """\
## Seed-compatible aliases

A `[loki]` section with `enabled`, `url`, `batch_size`, `batch_wait`,
`retry_max`, `environment`, and the environment variables
`LLM_PROXY_LOKI_ENABLED`, `LLM_PROXY_LOKI_URL`, `LLM_PROXY_LOKI_BATCH_SIZE`,
`LLM_PROXY_LOKI_BATCH_WAIT`, `LLM_PROXY_LOKI_RETRY_MAX`,
`LLM_PROXY_LOKI_ENVIRONMENT` make an exporter named `loki` (`batch_wait` →
`flush_interval`, `retry_max` → `max_retries`, `environment` →
`server.environment`). `LLM_PROXY_EVENT_BUS` sets `[events] bus`.
"""

# -- derivation -----------------------------------------------------------------------

_KiB = 1024


@attrs.frozen
class KeyDoc:
    """One row of the reference."""

    key: str  # as written in the ini file
    ref: str  # the MEANINGS key
    type: str
    default: str
    meaning: str


def fields_of(cls: type) -> list[attrs.Attribute[Any]]:
    """The ini keys of a settings class (``name`` is the section's suffix), with
    resolved types."""
    hints = typing.get_type_hints(cls)
    return [f.evolve(type=hints[f.name]) for f in attrs.fields(cls) if f.name != "name"]  # type: ignore[arg-type]


def _is_size(name: str, tp: Any) -> bool:
    return tp is int and name.endswith("bytes")


def _optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def type_name(name: str, tp: Any) -> str:
    """The type as a user writes it, the way llmproxy.config.loader parses it."""
    tp = _optional(tp)
    if tp is bool:
        return "bool"
    if tp is int:
        return "size" if _is_size(name, tp) else "int"
    if tp is float:
        return "duration"
    if tp is Path:
        return "path"
    if tp is str:
        return "string"
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        return "list" if args and args[0] is str else "`k=v` list"
    raise TypeError(f"no documented type for {name}: {tp!r}")


def format_size(n: int) -> str:
    for unit, factor in (("GiB", _KiB**3), ("MiB", _KiB**2), ("KiB", _KiB)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def format_default(name: str, tp: Any, value: Any) -> str:
    """The default as a user writes it (empty for none)."""
    if value is attrs.NOTHING:
        return "required"
    if value is None or value == "" or value == ():
        return "empty"
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int) and _is_size(name, _optional(tp)):
        text = format_size(value)
    elif isinstance(value, float):
        text = str(value).removesuffix(".0")
    elif isinstance(value, tuple) and isinstance(value[0], tuple):
        text = ", ".join(f"{k}={v}" for k, v in value)
    elif isinstance(value, tuple):
        text = ", ".join(map(str, value))
    else:
        text = str(value)
    return f"`{text}`"


def _row(f: attrs.Attribute[Any], ref: str) -> KeyDoc:
    default: Any = f.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()
    return KeyDoc(
        key=f.name,
        ref=ref,
        type=TYPES.get(ref) or type_name(f.name, f.type),
        default=DEFAULTS.get(ref) or format_default(f.name, f.type, default),
        meaning=MEANINGS.get(ref, ""),
    )


def section_rows(prefix: str, cls: type) -> list[KeyDoc]:
    return [_row(f, f"{prefix}.{f.name}") for f in fields_of(cls)]


def audit_rows() -> list[KeyDoc]:
    f = next(a for a in attrs.fields(Settings) if a.name == "audit_path")
    hints = typing.get_type_hints(Settings)
    return [_row(f.evolve(name="path", type=hints["audit_path"]), "audit.path")]  # type: ignore[arg-type]


def exporter_groups() -> list[tuple[str, str, list[KeyDoc]]]:
    """(title, group id, rows): the common keys first, then per sink type."""
    by_name = {f.name: f for f in fields_of(ExporterSettings)}
    grouped = {name for _, _, names in EXPORTER_GROUPS for name in names}
    common = [_row(f, f"exporter.{n}") for n, f in by_name.items() if n not in grouped]
    out = [("", "exporter", common)]
    for title, group, names in EXPORTER_GROUPS:
        rows = [_row(by_name[n], f"exporter[{group}].{n}") for n in names if n in by_name]
        out.append((title, f"exporter[{group}]", rows))
    return out


def all_rows() -> list[KeyDoc]:
    rows: list[KeyDoc] = []
    for _, prefix, cls in SECTIONS:
        rows.extend(section_rows(prefix, cls))
    rows.extend(audit_rows())
    for _, _, group in exporter_groups():
        rows.extend(group)
    return rows


def undocumented() -> list[str]:
    """Settings keys without a meaning (the test requires none)."""
    return [r.ref for r in all_rows() if not r.meaning.strip()]


def unused_meanings() -> list[str]:
    """Meanings for keys the settings no longer have."""
    refs = {r.ref for r in all_rows()}
    return sorted(set(MEANINGS) - refs)


# -- rendering ------------------------------------------------------------------------


def _cell(text: str) -> str:
    """A table cell: a bare ``|`` would end it."""
    return re.sub(r"(?<!\\)\|", r"\\|", text)


def _table(rows: list[KeyDoc]) -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r.key}` | {r.type} | {r.default} | {_cell(r.meaning)} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    parts = [INTRO.format(regenerate=REGENERATE)]
    for heading, prefix, cls in SECTIONS:
        parts.append(f"## {heading}\n")
        if prefix in NOTES:
            parts.append(NOTES[prefix])
        parts.append(_table(section_rows(prefix, cls)))
    parts.append("## [audit]\n")
    parts.append(_table(audit_rows()))
    parts.append("## [exporter:NAME]\n")
    for title, group, rows in exporter_groups():
        if title:
            parts.append(title + "\n")
        elif group in NOTES:
            parts.append(NOTES[group])
        parts.append(_table(rows))
        if title and group in NOTES:
            parts.append(NOTES[group])
    parts.append(OUTRO)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmproxy.config.reference",
        description="Print (or --write) docs/configuration.md from the settings model.",
    )
    parser.add_argument("--write", action="store_true", help=f"write {DOC_PATH}")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the file differs from the output"
    )
    args = parser.parse_args(argv)
    missing = undocumented()
    if missing:
        print(f"keys without a meaning in {__file__}: {', '.join(missing)}", file=sys.stderr)
        return 1
    text = render()
    if args.check:
        current = DOC_PATH.read_text("utf-8") if DOC_PATH.exists() else ""
        if current != text:
            print(f"{DOC_PATH} is stale; regenerate: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    if args.write:
        DOC_PATH.write_text(text, "utf-8")
        print(f"wrote {DOC_PATH}", file=sys.stderr)
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
