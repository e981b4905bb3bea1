"""A faithful fake of Grafana Loki's push endpoint (tests: tests/fakes/test_fake_loki.py).

``FakeLoki`` is a twisted.web resource implementing ``POST /loki/api/v1/push`` the
way Loki does, from its public docs and its source (repository grafana/loki:
``pkg/distributor/http.go``, ``pkg/distributor/distributor.go``,
``pkg/distributor/validator.go``, ``pkg/validation/validate.go``,
``pkg/validation/limits.go``, ``pkg/loghttp/push/push.go``,
``pkg/ingester/instance.go``, ``pkg/ingester/stream.go``, and the tenant rule of
``vendor/github.com/grafana/dskit/tenant/tenant.go``):

- ``X-Scope-OrgID`` names the tenant (``fake`` when absent, as with
  ``auth_enabled: false``; with ``require_tenant`` a missing one is 401 ``no org
  id``).  A tenant id outside dskit's rule — the characters ``A-Z a-z 0-9 ! - _
  . * ' ( )``, at most 150 of them, not ``.`` or ``..`` — is **400** with
  dskit's message (``tenant ID 'x' contains unsupported character '/'``).

- Body: ``Content-Type: application/json`` (anything else is Loki's default,
  snappy protobuf, which this fake does not implement: 400), optionally
  ``Content-Encoding: gzip`` or ``deflate`` (others: 400
  ``Content-Encoding "x" not supported``).
- Shape, checked while parsing, so a violation refuses the *whole* request with
  400 (Loki's JSON decoder fails the request): ``{"streams": [{"stream":
  {labels}, "values": [[ts, line] | [ts, line, {metadata}]]}]}``; ``ts`` a JSON
  string of a base-10 int64 of epoch nanoseconds ("you must send the timestamp as
  a string and not a number, otherwise the endpoint will return a 400"), ``line``
  a string, metadata an object of string values, label values strings.  A push
  without any stream (``{"streams": []}``, ``{}``) is **422** ``error at least
  one valid stream is required for ingestion``.
- Per stream (a bad stream is dropped, the others kept): at least one label
  (``missing_labels``), names matching ``[a-zA-Z_][a-zA-Z0-9_]*``
  (``invalid_labels``), at most ``max_label_names_per_series`` (15 since Loki
  3.0), name length 1024, value length 2048.
- Per entry (a bad entry is dropped, the others kept): ``reject_old_samples``
  (default true, max age 1 week), ``creation_grace_period`` (10 min into the
  future), ``max_line_size`` (256KB = 262144 bytes; ``len(line)`` in bytes),
  structured metadata allowed (Loki 3.x default), at most 64KB / 128 entries.
- After validation, the tenant's ingestion rate limiter (token bucket of
  ``ingestion_rate_mb`` = 4 MiB/s refill and ``ingestion_burst_size_mb`` = 6 MiB,
  counted on line + metadata bytes of the valid entries): when it refuses, the
  answer is **429** and *nothing* is stored.  Loki sends no ``Retry-After``
  (nor does this fake, unless a test asks with ``retry_after=True``).
- Then the ingester, stream by stream (``instance.Push``): a stream that does
  not exist yet is refused when the tenant already has
  ``max_global_streams_per_user`` (5000) streams; a stream whose entries exceed
  its own rate limiter (``per_stream_rate_limit`` 3 MB/s, burst 15 MB; with
  ``shard_streams`` on, Loki's default, the whole stream's entries at once) is
  refused.  The other streams of the push are stored, and the answer is **429**
  (``maximum active stream limit exceeded when trying to create stream ...``, or
  ``entry with timestamp ... ignored, reason: 'Per stream rate limit exceeded
  ...'``, ``user '...', total ignored: N out of M for stream: {...}``).
- Otherwise the valid entries are stored and the answer is 204, or **400** with
  the validation errors when some entries were dropped (Loki keeps the rest).
  The text is Loki's ``GroupedErrors``: identical messages counted (``2 errors
  like: ...``), different ones joined by ``; ``.  It names the stream (its
  labels) and, for timestamp errors, the entry's time to the second — never
  which entries of a stream were refused.
- In the ingester: identical (timestamp, line) pairs in a stream are stored once
  (as a query would show them); out-of-order entries are accepted
  (``unordered_writes``) unless older than ``max_chunk_age / 2`` (1 h) behind the
  newest entry of their stream.
- Loki has no authentication of its own; ``expected_authorization`` models the
  gateway in front of it (401 when the header differs).

For tests it records every request (headers, tenant, encoding, status), stores
entries per stream, and plays scripted failures first (``fail_next``): a status
(503, 500, 429 with ``Retry-After``…), a hang that never answers, a connection
reset.  Use it in memory with ``treq.testing.StubTreq(fake)`` or on a real port
with :func:`listen_fake_loki`.
"""

from __future__ import annotations

import gzip
import math
import re
import zlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
import orjson
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

# Endless, Hang, Reset, Scripted: re-exported, tests import them from here.
from tests.fakes._http import Endless as Endless
from tests.fakes._http import Hang as Hang
from tests.fakes._http import (
    ReceivedRequest,
    Respond,
    RunningFake,
    ScriptedResource,
    listen,
    read_request,
)
from tests.fakes._http import Reset as Reset
from tests.fakes._http import Scripted as Scripted

PUSH_PATH = b"/loki/api/v1/push"
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
INT64 = 1 << 63
MiB = 1 << 20
DEFAULT_TENANT = "fake"  # Loki's single-tenant id is "fake" too
# dskit's tenant.ValidTenantID.
TENANT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!-_.*'()")
MAX_TENANT_ID_LENGTH = 150
MISSING_STREAMS = "error at least one valid stream is required for ingestion"


@attrs.frozen
class LokiLimits:
    """Loki's ``limits_config`` defaults (Loki 3.x) that the push path enforces."""

    max_line_size: int = 256 * 1024
    ingestion_rate_mb: float = 4.0
    ingestion_burst_size_mb: float = 6.0
    max_label_names_per_series: int = 15
    max_label_name_length: int = 1024
    max_label_value_length: int = 2048
    reject_old_samples: bool = True
    reject_old_samples_max_age: float = 7 * 24 * 3600.0
    creation_grace_period: float = 600.0
    allow_structured_metadata: bool = True
    max_structured_metadata_size: int = 64 * 1024
    max_structured_metadata_entries_count: int = 128
    max_chunk_age: float = 2 * 3600.0
    max_global_streams_per_user: int = 5000
    per_stream_rate_limit: float = 3 * MiB
    per_stream_rate_limit_burst: float = 15 * MiB


@attrs.frozen
class StoredEntry:
    """One log entry as Loki stored it."""

    labels: Mapping[str, str]
    ts_ns: int
    line: str
    metadata: Mapping[str, str]
    tenant: str

    def json(self) -> Any:
        """The line decoded as JSON (our sink's lines are events)."""
        return orjson.loads(self.line)


class _InvalidPush(Exception):
    """The body could not be parsed: the whole request is refused (400)."""


@attrs.define
class _TokenBucket:
    rate: float  # bytes per second
    burst: float
    tokens: float
    last: float

    def allow(self, now: float, n: int) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if n > self.burst or n > self.tokens:
            return False
        self.tokens -= n
        return True

    def wait_for(self, n: int) -> float | None:
        """Seconds until ``n`` bytes would be allowed; None if never (over the burst)."""
        if n > self.burst:
            return None
        return max(0.0, (n - self.tokens) / self.rate)


def _labels_string(labels: Mapping[str, str]) -> str:
    """Prometheus' form, as Loki prints a stream in its errors: {a="1", b="2"}."""
    inner = ", ".join(
        f"{k}={orjson.dumps(v).decode()}" for k, v in sorted(labels.items(), key=lambda kv: kv[0])
    )
    return "{" + inner + "}"


def _rfc3339(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeLoki(ScriptedResource):
    """The push endpoint of one Loki (all tenants).  See the module docstring."""

    def __init__(
        self,
        *,
        clock: IReactorTime | None = None,
        limits: LokiLimits | None = None,
        retry_after: bool = False,
        require_tenant: bool = False,
        expected_authorization: str | None = None,
    ) -> None:
        super().__init__(clock)
        self.limits = limits or LokiLimits()
        self._retry_after = retry_after
        self._require_tenant = require_tenant
        self._expected_authorization = expected_authorization
        self._streams: dict[tuple[str, frozenset[tuple[str, str]]], _Stream] = {}
        self._arrival = 0
        self._buckets: dict[str, _TokenBucket] = {}
        self._stream_buckets: dict[tuple[str, frozenset[tuple[str, str]]], _TokenBucket] = {}
        self.duplicates_dropped = 0

    # -- test helpers -------------------------------------------------------------

    @property
    def pending_script(self) -> int:
        return len(self._script)

    def entries(
        self, label_filter: Mapping[str, str] | None = None, *, tenant: str | None = None
    ) -> list[StoredEntry]:
        """Stored entries whose labels include ``label_filter``, oldest first
        (arrival order for equal timestamps), across streams."""
        found: list[tuple[int, int, StoredEntry]] = []
        for (stream_tenant, _), stream in self._streams.items():
            if tenant is not None and stream_tenant != tenant:
                continue
            if label_filter and any(stream.labels.get(k) != v for k, v in label_filter.items()):
                continue
            found.extend(stream.entries)
        found.sort(key=lambda t: (t[0], t[1]))
        return [e for _, _, e in found]

    def streams(self, *, tenant: str | None = None) -> list[Mapping[str, str]]:
        """The label sets of the stored streams."""
        return [
            s.labels
            for (t, _), s in self._streams.items()
            if (tenant is None or t == tenant) and s.entries
        ]

    # -- the endpoint -------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        headers, body, method, path = read_request(request)

        def record(status: int | None, reply: str = "") -> None:
            self.requests.append(ReceivedRequest(method, path, headers, len(body), status, reply))

        if request.path != PUSH_PATH:
            record(404, "404 page not found")
            return self._text(request, 404, "404 page not found")
        if request.method != b"POST":
            record(405)
            request.setResponseCode(405)
            return b""
        action = self.next_scripted()
        if action is not None:
            if not isinstance(action, Respond):
                record(None)
                return self._stall(request, action)
            if action.store:
                status, _, _ = self._push(headers, body)
                if status not in (204, 400):
                    raise AssertionError(f"Respond(store=True) but the push failed: {status}")
            record(action.status, action.body.decode("utf-8", "replace"))
            request.setResponseCode(action.status)
            for name, value in action.headers.items():
                request.setHeader(name, value)  # type: ignore[no-untyped-call]
            return action.body
        status, reply, extra = self._push(headers, body)
        record(status, reply)
        for name, value in extra.items():
            request.setHeader(name, value)  # type: ignore[no-untyped-call]
        if status == 204:
            request.setResponseCode(204)
            return b""
        return self._text(request, status, reply)

    @staticmethod
    def _text(request: Request, status: int, text: str) -> bytes:
        # As Go's http.Error: text/plain with a trailing newline.
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")  # type: ignore[no-untyped-call]
        request.setHeader(b"x-content-type-options", b"nosniff")  # type: ignore[no-untyped-call]
        return text.encode("utf-8") + b"\n"

    def _push(self, headers: Mapping[str, str], body: bytes) -> tuple[int, str, dict[str, str]]:
        """Loki's distributor: (status, reply text, extra headers)."""
        tenant = headers.get("x-scope-orgid", "")
        if not tenant:
            if self._require_tenant:
                return 401, "no org id", {}
            tenant = DEFAULT_TENANT
        problem = tenant_id_error(tenant)
        if problem is not None:
            return 400, problem, {}
        if (
            self._expected_authorization is not None
            and headers.get("authorization") != self._expected_authorization
        ):
            return 401, "unauthorized", {}
        try:
            streams = _parse(headers, body)
        except _InvalidPush as e:
            return 400, str(e), {}
        if not streams:
            return 422, MISSING_STREAMS, {}
        now_ns = int(self.now() * 1e9)
        errors: list[str] = []
        accepted: list[tuple[dict[str, str], list[tuple[int, str, dict[str, str]]]]] = []
        size = 0
        for labels, values in streams:
            if not values:
                continue
            error = self._validate_labels(labels)
            if error:
                errors.append(error)
                continue
            good = []
            for ts, line, meta in values:
                error = self._validate_entry(labels, ts, line, meta, now_ns)
                if error:
                    errors.append(error)
                    continue
                good.append((ts, line, meta))
                size += len(line.encode("utf-8")) + sum(
                    len(k.encode()) + len(v.encode()) for k, v in meta.items()
                )
            if good:
                accepted.append((labels, good))
        validation = _grouped(errors)
        if not accepted:
            return (400, validation, {}) if errors else (204, "", {})
        bucket = self._bucket(tenant)
        now = self.now()
        if not bucket.allow(now, size):
            lines = sum(len(v) for _, v in accepted)
            reply = (
                f"ingestion rate limit exceeded for user {tenant} (limit: {int(bucket.rate)} "
                f"bytes/sec) while attempting to ingest '{lines}' lines totaling '{size}' "
                "bytes, reduce log volume or contact your Loki administrator to see if the "
                "limit can be increased"
            )
            extra = {}
            wait = bucket.wait_for(size)
            if self._retry_after and wait is not None:
                extra["Retry-After"] = str(max(1, math.ceil(wait)))
            return 429, reply, extra
        limited: list[str] = []
        for labels, good in accepted:
            refusal = self._ingester_limits(tenant, labels, good)
            if refusal is not None:
                limited.append(refusal)
                continue
            errors.extend(self._store(tenant, labels, good))
        if limited:
            # The ingester's error wins over the distributor's validation errors.
            return 429, limited[-1], {}
        if errors:
            return 400, _grouped(errors), {}
        return 204, "", {}

    def _ingester_limits(
        self, tenant: str, labels: dict[str, str], good: list[tuple[int, str, dict[str, str]]]
    ) -> str | None:
        """The stream-count and per-stream rate limits: Loki's 429 text, or None."""
        key = (tenant, frozenset(labels.items()))
        limits = self.limits
        text = _labels_string(labels)
        if key not in self._streams:
            count = sum(1 for t, _ in self._streams if t == tenant)
            if limits.max_global_streams_per_user and count >= limits.max_global_streams_per_user:
                return (
                    f"maximum active stream limit exceeded when trying to create stream {text}, "
                    "reduce the number of active streams (reduce labels or reduce label values), "
                    "or contact your Loki administrator to see if the limit can be increased, "
                    f"user: '{tenant}'"
                )
        bucket = self._stream_buckets.get(key)
        now = self.now()
        if bucket is None:
            burst = limits.per_stream_rate_limit_burst
            bucket = _TokenBucket(limits.per_stream_rate_limit, burst, burst, now)
            self._stream_buckets[key] = bucket
        sizes = [
            len(line.encode()) + sum(len(k) + len(v) for k, v in m.items()) for _, line, m in good
        ]
        if bucket.allow(now, sum(sizes)):
            return None
        lines = [
            f"entry with timestamp {_go_time(ts)} ignored, reason: 'Per stream rate limit "
            f"exceeded (limit: {_byte_size(limits.per_stream_rate_limit)}/sec) while attempting "
            f"to ingest for stream '{text}' totaling {_byte_size(n)}, consider splitting a stream "
            "via additional labels or contact your Loki administrator to see if the limit can be "
            "increased',\n"
            for (ts, _, _), n in zip(good, sizes, strict=True)
        ]
        return (
            "".join(lines)
            + f"user '{tenant}', total ignored: {len(good)} out of {len(good)} for stream: {text}"
        )

    def _bucket(self, tenant: str) -> _TokenBucket:
        bucket = self._buckets.get(tenant)
        if bucket is None:
            burst = self.limits.ingestion_burst_size_mb * MiB
            bucket = _TokenBucket(self.limits.ingestion_rate_mb * MiB, burst, burst, self.now())
            self._buckets[tenant] = bucket
        return bucket

    def _validate_labels(self, labels: dict[str, str]) -> str | None:
        limits = self.limits
        text = _labels_string(labels)
        if not labels:
            return "error at least one label pair is required per stream"
        for name in labels:
            if not LABEL_NAME.match(name):
                return (
                    f"error parsing labels '{text}' with error: "
                    f"invalid label name {name!r}: must match [a-zA-Z_][a-zA-Z0-9_]*"
                )
        if len(labels) > limits.max_label_names_per_series:
            return (
                f"entry for stream '{text}' has {len(labels)} label names; "
                f"limit {limits.max_label_names_per_series}"
            )
        for name, value in sorted(labels.items()):
            if len(name.encode()) > limits.max_label_name_length:
                return f"stream '{text}' has label name too long: '{name}'"
            if len(value.encode()) > limits.max_label_value_length:
                return f"stream '{text}' has label value too long: '{value}'"
        return None

    def _validate_entry(
        self, labels: dict[str, str], ts: int, line: str, meta: dict[str, str], now_ns: int
    ) -> str | None:
        limits = self.limits
        text = _labels_string(labels)
        oldest = now_ns - int(limits.reject_old_samples_max_age * 1e9)
        if limits.reject_old_samples and ts < oldest:
            return (
                f"entry for stream '{text}' has timestamp too old: {_rfc3339(ts)}, "
                f"oldest acceptable timestamp is: {_rfc3339(oldest)}"
            )
        if ts > now_ns + int(limits.creation_grace_period * 1e9):
            return f"entry for stream '{text}' has timestamp too new: {_rfc3339(ts)}"
        length = len(line.encode("utf-8"))
        if limits.max_line_size and length > limits.max_line_size:
            return (
                f"max entry size '{limits.max_line_size}' bytes exceeded for stream '{text}' "
                f"while adding an entry with length '{length}' bytes"
            )
        if meta:
            if not limits.allow_structured_metadata:
                return (
                    f"stream '{text}' includes structured metadata, but this feature is "
                    "disallowed. Please see `limits_config.allow_structured_metadata` or "
                    "contact your Loki administrator to enable it"
                )
            meta_size = sum(len(k.encode()) + len(v.encode()) for k, v in meta.items())
            if meta_size > limits.max_structured_metadata_size:
                return (
                    f"stream '{text}' has structured metadata too large: '{meta_size}' bytes, "
                    f"limit: '{limits.max_structured_metadata_size}' bytes. Please see "
                    "`limits_config.max_structured_metadata_size` or contact your Loki "
                    "administrator to increase it"
                )
            if len(meta) > limits.max_structured_metadata_entries_count:
                return (
                    f"stream '{text}' has too many structured metadata labels: '{len(meta)}', "
                    f"limit: '{limits.max_structured_metadata_entries_count}'. Please see "
                    "`limits_config.max_structured_metadata_entries_count` or contact your "
                    "Loki administrator to increase it"
                )
        return None

    def _store(
        self, tenant: str, labels: dict[str, str], good: Iterable[tuple[int, str, dict[str, str]]]
    ) -> list[str]:
        """The ingester: dedupe, refuse entries too far behind, append."""
        key = (tenant, frozenset(labels.items()))
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(labels=dict(labels))
        errors = []
        window = int(self.limits.max_chunk_age / 2 * 1e9)
        for ts, line, meta in good:
            if (ts, line) in stream.seen:
                self.duplicates_dropped += 1
                continue
            if stream.newest is not None and ts < stream.newest - window:
                errors.append(
                    f"entry too far behind, entry timestamp is: {_rfc3339(ts)}, oldest "
                    f"acceptable timestamp is: {_rfc3339(stream.newest - window)}"
                )
                continue
            stream.seen.add((ts, line))
            stream.newest = ts if stream.newest is None else max(stream.newest, ts)
            self._arrival += 1
            entry = StoredEntry(stream.labels, ts, line, meta, tenant)
            stream.entries.append((ts, self._arrival, entry))
        return errors


def tenant_id_error(tenant: str) -> str | None:
    """dskit's ``tenant.TenantID`` for one tenant: its error text, or None."""
    for char in tenant:
        if char not in TENANT_CHARS:
            return f"tenant ID '{tenant}' contains unsupported character '{char}'"
    if len(tenant.encode()) > MAX_TENANT_ID_LENGTH:
        return f"tenant ID is too long: max {MAX_TENANT_ID_LENGTH} characters"
    if tenant in (".", ".."):
        return "tenant ID is '.' or '..'"
    return None


def _grouped(errors: list[str]) -> str:
    """Loki's ``GroupedErrors``: identical messages counted, the rest joined."""
    counts: dict[str, int] = {}
    for error in errors:
        counts[error] = counts.get(error, 0) + 1
    many = len(counts) > 1
    return "; ".join(
        f"{n} errors like: {error}" if many or n > 1 else error for error, n in counts.items()
    )


def _go_time(ts_ns: int) -> str:
    """Go's ``time.Time.String()`` in UTC."""
    whole = datetime.fromtimestamp(ts_ns // 1_000_000_000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    fraction = f"{ts_ns % 1_000_000_000:09d}".rstrip("0")
    return f"{whole}{'.' + fraction if fraction else ''} +0000 UTC"


def _byte_size(n: float) -> str:
    """dskit's ``flagext.ByteSize.String()`` (go-humanize IBytes)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


@attrs.define
class _Stream:
    labels: dict[str, str]
    entries: list[tuple[int, int, StoredEntry]] = attrs.Factory(list)
    seen: set[tuple[int, str]] = attrs.Factory(set)
    newest: int | None = None


def _decode_body(headers: Mapping[str, str], body: bytes) -> bytes:
    encoding = headers.get("content-encoding", "")
    try:
        if encoding == "":
            return body
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body, -zlib.MAX_WBITS)  # Go's compress/flate: raw
    except (OSError, EOFError, zlib.error) as e:
        raise _InvalidPush(f"{encoding}: invalid data ({e})") from None
    raise _InvalidPush(f'Content-Encoding "{encoding}" not supported')


def _parse(
    headers: Mapping[str, str], body: bytes
) -> list[tuple[dict[str, str], list[tuple[int, str, dict[str, str]]]]]:
    """Loki's JSON push decoder: any shape error refuses the whole request."""
    media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        # Loki decodes anything else as snappy-compressed protobuf.
        raise _InvalidPush(
            f"content type {media or '(none)'!r}: only application/json is implemented by "
            "this fake (Loki would expect snappy protobuf)"
        )
    data = _decode_body(headers, body)
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise _InvalidPush(f"loghttp.PushRequest: {e}") from None
    if not isinstance(doc, dict):
        raise _InvalidPush("loghttp.PushRequest: expect { or n, but found " + data[:1].decode())
    raw_streams = doc.get("streams")
    if raw_streams is None:
        return []
    if not isinstance(raw_streams, list):
        raise _InvalidPush("loghttp.PushRequest.Streams: expect [ or n")
    parsed = []
    for raw in raw_streams:
        if not isinstance(raw, dict):
            raise _InvalidPush("loghttp.PushRequest.Streams: expect { or n")
        labels = raw.get("stream") or {}
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise _InvalidPush("loghttp.Stream.Labels: label values must be strings")
        raw_values = raw.get("values") or []
        if not isinstance(raw_values, list):
            raise _InvalidPush("loghttp.Stream.Entries: expect [ or n")
        values = [_parse_entry(v) for v in raw_values]
        parsed.append((labels, values))
    return parsed


_INT = re.compile(r"[+-]?[0-9]+\Z")


def _parse_entry(raw: Any) -> tuple[int, str, dict[str, str]]:
    if not isinstance(raw, list) or len(raw) not in (2, 3):
        raise _InvalidPush("error reading entry: array must contain 2 or 3 values")
    ts_text, line = raw[0], raw[1]
    if not isinstance(ts_text, str):
        raise _InvalidPush(
            "error reading entry timestamp: the timestamp must be a string, not a number"
        )
    if not _INT.match(ts_text) or not -INT64 <= int(ts_text) < INT64:
        raise _InvalidPush(
            f'error reading entry timestamp: strconv.ParseInt: parsing "{ts_text}": invalid syntax'
        )
    if not isinstance(line, str):
        raise _InvalidPush("error reading entry: the log line must be a string")
    meta: dict[str, str] = {}
    if len(raw) == 3:
        if not isinstance(raw[2], dict) or not all(isinstance(v, str) for v in raw[2].values()):
            raise _InvalidPush(
                "error reading entry: structured metadata must be an object of strings"
            )
        meta = raw[2]
    return int(ts_text), line, meta


# -- on a real port -------------------------------------------------------------------


class RunningFakeLoki(RunningFake[FakeLoki]):
    """A ``FakeLoki`` listening on 127.0.0.1; ``stop()`` when done."""

    @property
    def push_url(self) -> str:
        return self.url + PUSH_PATH.decode()


def listen_fake_loki(fake: FakeLoki, reactor: Any = None) -> RunningFakeLoki:
    """Serve ``fake`` on an OS-chosen port of 127.0.0.1 (for end-to-end tests)."""
    return listen(RunningFakeLoki, fake, reactor)
