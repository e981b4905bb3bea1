"""The Grafana Loki sink (tests: tests/unit/export/sinks/test_loki.py).

One batch becomes one ``POST /loki/api/v1/push`` with a JSON body (gzipped by
default)::

    {"streams": [{"stream": {labels}, "values": [["<ts ns>", "<line>", {meta}?], ...]}]}

Labels are low-cardinality only — ``app``, ``provider``, ``environment``,
``machine``, ``log_type`` and the configured static ones — because every distinct
label set is a separate stream in Loki's index; request and session ids go into
the line, and optionally into structured metadata (with the answer's cost,
``cost_usd``), never into labels.  The log
line is the canonical event as JSON.  A line over ``max_line_bytes`` (Loki's
``max_line_size``, 256 KiB by default) would be refused, so it is shortened by
truncating its bulky fields (bodies, then stream chunks, then headers) and
re-encoding: the line stays valid JSON, marked as truncated, never cut mid-way.
A stream's chunk texts lose their tail together with their arrival offsets
(``response_chunk_offsets_ms``), so the two lists of a shortened event still
pair up.

Loki answers 204.  A 400 means Loki refused some entries for good and stored
the valid rest of the batch, so it is not retried.  Its text
(``pkg/util/errors.GroupedErrors`` in grafana/loki) counts identical messages
and names streams, and for timestamp errors the second of the entry, never the
entries themselves; so the whole batch is dead-lettered, with Loki's text, and
the dead-letter file may hold entries that Loki also kept.  429 (the tenant's
ingestion rate, a stream's own rate, the stream limit; the last two store the
rest of the push, which a retry sends again and Loki shows once) and 5xx are
retried, honouring ``Retry-After`` (Loki sends none: the exporter's backoff
applies).

``tenant`` (``X-Scope-OrgID``) must be a tenant id Loki takes (dskit's
``tenant.ValidTenantID``: the characters ``A-Z a-z 0-9 ! - _ . * ' ( )``, at
most 150, not ``.`` or ``..``); anything else is a configuration error, as Loki
would answer 400 to every push.  An empty batch is not sent (Loki answers 422
to a push without streams).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from operator import itemgetter
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import attrs
import orjson
from isal import isal_zlib
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from llmproxy.config.model import ExporterSettings
from llmproxy.export.sink import EncodedBatch, HTTPSink
from llmproxy.export.sinks.exchange import json_default, parse_ns
from llmproxy.export.verdict import Delivered, Rejected, Retry, Verdict
from llmproxy.interfaces import HTTPClient

__all__ = [
    "APP",
    "BODY_KEYS",
    "CHUNK_KEYS",
    "EVENT_LABELS",
    "HEADER_KEYS",
    "IDENTITY_FIELDS",
    "LABEL_NAME",
    "MAX_LABEL_NAMES",
    "MAX_LABEL_VALUE_BYTES",
    "MAX_TENANT_BYTES",
    "METADATA_FIELDS",
    "MIN_LINE_BYTES",
    "PAIRED_LISTS",
    "PARTLY_REFUSED",
    "PUSH_PATH",
    "TENANT_CHARS",
    "TRUNCATION_MARK",
    "LokiSink",
    "check_tenant",
    "push_url",
    "shorten_line",
]

PUSH_PATH = "/loki/api/v1/push"

# Loki validates label names with Prometheus' rule.
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# Loki's defaults (limits_config): max_label_names_per_series 15 (Loki 3.x),
# max_label_value_length 2048.
MAX_LABEL_NAMES = 15
MAX_LABEL_VALUE_BYTES = 2048
# Below this a shortened line could not even hold its identifying fields.
MIN_LINE_BYTES = 1024

APP = "llmproxy"
# The start of a 400's reason (module docstring).
PARTLY_REFUSED = (
    "Loki refused some entries of this batch and stored the others; it does not say which "
    "(HTTP 400)"
)
# dskit's tenant.ValidTenantID (vendor/github.com/grafana/dskit/tenant/tenant.go).
TENANT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!-_.*'()")
MAX_TENANT_BYTES = 150
# The per-event labels; a static label may not take these names, or every stream
# of the batch would collapse into one with a wrong value.
EVENT_LABELS = ("provider", "environment", "machine", "log_type")
METADATA_FIELDS = ("request_id", "session_id", "route", "token_id", "project")

# What is given up first when a line is too long, in order.  Each tier names the
# keys whose whole subtree may be shortened.
# (The canonical event's names, see llmproxy/capture/events.py, plus the generic ones.)
BODY_KEYS = frozenset({"request_body", "response_body", "body"})
CHUNK_KEYS = frozenset({"response_chunks", "chunks"})
# A chunk list whose entries pair up, index by index, with those of a list beside
# it: a stream's texts and their arrival offsets.  Dropping the tail of one drops
# the same tail of the other, so a shortened event's two lists still pair up.
# (Events of the older shape, a dict per read, carry each offset with its text.)
PAIRED_LISTS = {"response_chunks": "response_chunk_offsets_ms"}
HEADER_KEYS = frozenset({"request_headers", "response_headers", "headers"})
TRUNCATION_MARK = "loki_truncated"
IDENTITY_FIELDS = (
    "schema",
    "type",
    "ts",
    "ts_ns",
    "request_id",
    "session_id",
    "seq",
    "route",
    "token_id",
    "project",
    "provider",
    "environment",
    "machine",
    "status",
    "outcome",
    "cache_status",
    "model",
)


def push_url(url: str) -> str:
    """The push endpoint for a Loki base URL (``http://loki:3100``), unless the URL
    already names it."""
    base = url.rstrip("/")
    if base.endswith(PUSH_PATH):
        return base
    return base + PUSH_PATH


def check_tenant(tenant: str) -> None:
    """Refuse a tenant id Loki would refuse (``ValueError`` saying why)."""
    bad = sorted({c for c in tenant if c not in TENANT_CHARS})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ValueError(
            f"tenant {tenant!r} has characters Loki refuses ({shown}); a tenant id is made "
            "of A-Z a-z 0-9 ! - _ . * ' ( )"
        )
    if len(tenant.encode()) > MAX_TENANT_BYTES:
        raise ValueError(f"tenant is longer than Loki's {MAX_TENANT_BYTES} characters")
    if tenant in (".", ".."):
        raise ValueError(f"tenant {tenant!r} is refused by Loki ('.' and '..' are not tenant ids)")


def _check_label(name: str, value: str) -> None:
    if not LABEL_NAME.match(name):
        raise ValueError(
            f"loki label name {name!r} is invalid: it must match [a-zA-Z_][a-zA-Z0-9_]*"
        )
    if name.startswith("__"):
        raise ValueError(f"loki label name {name!r} is reserved (names starting with __)")
    if name in EVENT_LABELS:
        raise ValueError(f"loki label name {name!r} is set from each event; pick another name")
    if len(value.encode("utf-8")) > MAX_LABEL_VALUE_BYTES:
        raise ValueError(f"loki label {name!r}: value longer than {MAX_LABEL_VALUE_BYTES} bytes")


def _label_value(value: Any) -> str:
    """A label value from an event field: a string, at most Loki's 2048 bytes."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_LABEL_VALUE_BYTES // 4:  # only long values can be over in bytes
        raw = text.encode("utf-8")
        if len(raw) > MAX_LABEL_VALUE_BYTES:
            text = raw[:MAX_LABEL_VALUE_BYTES].decode("utf-8", errors="ignore")
    return text


@attrs.define(kw_only=True)
class LokiSink(HTTPSink):
    """Pushes batches of canonical events to Loki as labelled streams.

    Build it with :meth:`from_settings`.  ``labels`` are the static extra labels;
    a bad label name is a configuration error (``ValueError`` naming it).
    """

    _tenant: str = ""
    _authorization: str = attrs.field(default="", repr=False)
    _labels: tuple[tuple[str, str], ...] = ()
    _max_line_bytes: int = 256 * 1024
    _gzip: bool = True
    _structured_metadata: bool = False
    # Secrets that must never appear in a verdict's reason (filled in post-init).
    _secrets: tuple[str, ...] = attrs.field(default=(), init=False, repr=False)
    _base_labels: dict[str, str] = attrs.field(factory=dict, init=False, repr=False)
    _headers: dict[str, str] = attrs.field(factory=dict, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.url = push_url(self.url)
        if self._tenant:
            check_tenant(self._tenant)
        if self._max_line_bytes < MIN_LINE_BYTES:
            raise ValueError(f"loki max_line_bytes must be at least {MIN_LINE_BYTES}")
        base = {"app": APP}
        for name, value in self._labels:
            _check_label(name, value)
            if value:
                base[name] = value
        if len(base) + len(EVENT_LABELS) > MAX_LABEL_NAMES:
            raise ValueError(
                f"loki labels: {len(base) + len(EVENT_LABELS)} label names per stream, "
                f"Loki's default limit is {MAX_LABEL_NAMES}"
            )
        self._base_labels = base
        headers = {"Content-Type": "application/json"}
        if self._gzip:
            headers["Content-Encoding"] = "gzip"
        if self._tenant:
            headers["X-Scope-OrgID"] = self._tenant
        if self._authorization:
            headers["Authorization"] = self._authorization
        self._headers = headers
        secrets = {self._authorization}
        scheme, _, credential = self._authorization.partition(" ")
        if credential:
            secrets.add(credential)
            if scheme.lower() == "basic":
                try:
                    decoded = base64.b64decode(credential).decode("utf-8", "replace")
                except ValueError:  # not base64 after all: the credential is the secret
                    decoded = ""
                secrets.update({decoded, decoded.partition(":")[2]})
        self._secrets = tuple(sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True))

    @classmethod
    def from_settings(
        cls, settings: ExporterSettings, *, client: HTTPClient, clock: IReactorTime
    ) -> LokiSink:
        """A sink for one ``[exporter:NAME]`` section of ``type = loki``.

        Credentials in the URL (``http://user:pass@loki:3100``) are taken out of it
        and sent as basic auth, so they never travel in a URL that could be logged.
        """
        where = f"exporter:{settings.name}"
        if not settings.url:
            raise ValueError(f"{where}: url is required for a loki sink")
        parts = urlsplit(settings.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{where}: url must be an http(s) URL of the Loki server")
        username, password = settings.username, settings.password
        if parts.username is not None:
            if username:
                raise ValueError(f"{where}: credentials both in url and in username")
            username, password = unquote(parts.username), unquote(parts.password or "")
            netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
            url = urlunsplit(parts._replace(netloc=netloc))
        else:
            url = settings.url
        if password and not username:
            raise ValueError(f"{where}: password is set but username is not")
        if username and settings.bearer_token:
            raise ValueError(f"{where}: set either username/password or bearer_token, not both")
        authorization = ""
        if username:
            pair = f"{username}:{password}".encode()
            authorization = "Basic " + base64.b64encode(pair).decode("ascii")
        elif settings.bearer_token:
            authorization = "Bearer " + settings.bearer_token
        try:
            return cls.configured(
                settings,
                url,
                client,
                clock,
                tenant=settings.tenant,
                authorization=authorization,
                labels=tuple(settings.labels),
                max_line_bytes=settings.max_line_bytes,
                gzip=settings.gzip,
                structured_metadata=settings.structured_metadata,
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    # -- encode ------------------------------------------------------------------

    def encode(
        self, events: Sequence[dict[str, Any]], lines: Sequence[bytes] | None = None
    ) -> EncodedBatch:
        """One push body for ``events``; ``lines``, when given, are their JSON
        already encoded (``orjson.dumps(event)``: the exporter's), so each event is
        not encoded a second time."""
        if lines is None:
            return self._assemble([self.prepare(e, _dumps_event(e)) for e in events])
        return self._assemble(
            [self.prepare(e, line) for e, line in zip(events, lines, strict=True)]
        )

    def prepare(self, event: dict[str, Any], line: bytes) -> _Prepared:
        """The per-event part of encoding: the event's stream, its timestamp and its
        entry as JSON.  The exporter calls it when the event is published, so
        sending a batch only sorts, joins and compresses (``deliver_prepared``)."""
        get = event.get
        key = (get("provider"), get("environment"), get("machine"), get("type"))
        ts = get("ts_ns")
        if type(ts) is not int or not 0 <= ts < 1 << 63:
            ts = _timestamp_ns(event, self._clock)
        if len(line) > self._max_line_bytes:
            line = shorten_line(event, line, self._max_line_bytes)
        entry: list[Any] = [str(ts), line.decode("utf-8")]
        if self._structured_metadata:
            meta = {
                f: v if isinstance(v, str) else str(v)
                for f in METADATA_FIELDS
                if (v := get(f)) is not None and v != ""
            }
            cost = get("cost")
            if isinstance(cost, dict) and isinstance(cost.get("total"), int | float):
                meta["cost_usd"] = f"{cost['total']:.9f}".rstrip("0").rstrip(".")
            if meta:
                entry.append(meta)
        return key, ts, orjson.dumps(entry)

    def deliver(self, events: Sequence[dict[str, Any]]) -> Deferred[Verdict]:
        if not events:
            return succeed(Delivered())  # Loki answers 422 to a push without streams
        return super().deliver(events)

    def deliver_lines(
        self, events: Sequence[dict[str, Any]], lines: Sequence[bytes]
    ) -> Deferred[Verdict]:
        """``deliver`` for an exporter that holds each event's JSON already."""
        return self.deliver_prepared(events, lines, [None] * len(events))

    def deliver_prepared(
        self,
        events: Sequence[dict[str, Any]],
        lines: Sequence[bytes],
        prepared: Sequence[_Prepared | None],
    ) -> Deferred[Verdict]:
        """``deliver`` with what :meth:`prepare` gave for each event (None: not
        prepared yet, e.g. replayed from the spool)."""
        if not events:
            return succeed(Delivered())
        try:
            batch = self._assemble(
                [
                    p if p is not None else self.prepare(e, line)
                    for e, line, p in zip(events, lines, prepared, strict=True)
                ]
            )
        except Exception:
            return fail()  # a bug in the encoder: the exporter retries and logs it
        return self.post(batch)

    def _assemble(self, prepared: Sequence[_Prepared]) -> EncodedBatch:
        """``{"streams": [{"stream": labels, "values": [entry, ...]}, ...]}``, each
        stream's entries in time order (ties in batch order), gzipped."""
        streams: dict[tuple[Any, ...], list[tuple[int, bytes]]] = {}
        for key, ts, entry in prepared:
            values = streams.get(key)
            if values is None:
                values = streams[key] = []
            values.append((ts, entry))
        parts = []
        for key, values in streams.items():
            labels = dict(self._base_labels)
            for name, value in zip(EVENT_LABELS, key, strict=True):
                if value is not None and value != "":
                    labels[name] = _label_value(value)
            values.sort(key=_first)  # stable: equal timestamps keep batch order
            parts.append(
                b'{"stream":%b,"values":[%b]}'
                % (orjson.dumps(labels), b",".join([entry for _, entry in values]))
            )
        body = b'{"streams":[%b]}' % b",".join(parts)
        if self._gzip:
            # ISA-L's deflate at level 1: JSON logs shrink ~20x, about ten times
            # faster than zlib's level 1 (docs/dependencies.md).
            compressor = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
            body = compressor.compress(body) + compressor.flush()
        return EncodedBatch(body=body, headers=dict(self._headers))

    # -- judge -------------------------------------------------------------------

    def judge(self, status: int, headers: dict[str, str], body: bytes) -> Verdict:
        if 200 <= status < 300:
            return Delivered()
        text = self._redact(body.decode("utf-8", errors="replace").strip()[:500])
        if status == 400:
            # Loki stored the valid entries and refused the rest for good: retrying
            # could not help.  Its answer does not say which entries (see the module
            # docstring), so the batch goes to the dead-letter file with Loki's text.
            return Rejected(f"{PARTLY_REFUSED}: {text}")
        verdict = super().judge(status, headers, body)
        if isinstance(verdict, Retry):
            return Retry(f"HTTP {status}: {text}" if text else verdict.reason, verdict.after)
        if isinstance(verdict, Rejected):
            return Rejected(f"HTTP {status}: {text}")
        return verdict

    def _redact(self, text: str) -> str:
        """An error body could echo our request (a gateway, a misconfigured proxy):
        whatever it says, our credentials never reach a reason or a log line."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


_first = itemgetter(0)
# (stream key, timestamp in ns, the entry's JSON): what prepare() makes of an event.
_Prepared = tuple[tuple[Any, ...], int, bytes]


def _timestamp_ns(event: dict[str, Any], clock: IReactorTime) -> int:
    """The event time in epoch ns: ``ts_ns``, else parsed from ``ts``, else now.

    A batch must never fail to encode because of one odd event (it would be retried
    for ever), so an event without a usable time is sent at the time it is encoded.
    """
    ts = event.get("ts_ns")
    if isinstance(ts, int) and not isinstance(ts, bool) and 0 <= ts < 1 << 63:
        return ts
    text = event.get("ts")
    if isinstance(text, str):
        parsed = parse_ns(text)
        if parsed is not None:
            return parsed
    return int(clock.seconds() * 1e9)  # type: ignore[misc]  # zope method, no mypy-zope


def _dumps_event(event: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(event)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        pass
    try:
        return orjson.dumps(event, default=json_default, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        # Beyond orjson (a lone surrogate, an int over 64 bits): the stdlib encodes
        # it, and a lone surrogate becomes "?" so the line stays valid UTF-8 JSON.
        text = json.dumps(event, default=json_default, separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8", errors="replace")


# -- shortening a line -----------------------------------------------------------------

# Tiers, in the order they are given up.
_BODIES, _CHUNKS, _HEADERS, _OTHER = 0, 1, 2, 3
# A string this short is never worth cutting.
_MIN_CUT = 16
# How many times a tier is re-encoded and cut again before moving on: each pass
# corrects the estimate of the previous one (JSON escapes, the growing marker).
_PASSES = 6
_MARK_SLACK = 64

# (container, key, path): one shortenable string or list inside the working copy.
_Place = tuple[Any, Any, str]


def shorten_line(event: dict[str, Any], line: bytes, limit: int) -> bytes:
    """Encode ``event`` in at most ``limit`` bytes of valid JSON.

    Bulky fields are given up step by step (:data:`_STEPS`) — large body
    text/base64, then the tail of the stream chunks, then long header values, then
    bodies and headers entirely, then any other long string — and the event is
    re-encoded after each cut, so the JSON is never cut mid-way.  Strings are cut
    down to one common length (every body keeps its head, a short prompt survives a
    long response); chunk lists keep their head.  The result carries
    ``loki_truncated: {original_bytes, fields}`` and a body's own ``truncated`` flag
    is set.  ``event`` is never modified.  If nothing else works (an event of
    thousands of tiny fields), the line is a stub of the identifying fields.
    """
    original = len(line)
    work = orjson.loads(line)  # a deep copy, cheaper than copy.deepcopy
    if not isinstance(work, dict):
        return _stub(event, original, limit)
    fields: list[str] = []
    work[TRUNCATION_MARK] = {"original_bytes": original, "fields": fields}
    for tier, floor_divisor, drop_tails in _STEPS:
        strings: list[_Place] = []
        lists: list[_Place] = []
        _collect(work, tier, "", None, strings, lists)
        if drop_tails and lists:
            line = orjson.dumps(work)
            if len(line) <= limit:
                return line
            # The slack pays for the marker naming the list, so one cut is enough.
            _drop_tails(lists, len(line) - limit + _MARK_SLACK, fields)
        floor = limit // floor_divisor if floor_divisor else 0
        for _ in range(_PASSES):
            line = orjson.dumps(work)
            if len(line) <= limit:
                return line
            if not _fill_down(strings, len(line) - limit, floor, fields):
                break
    line = orjson.dumps(work)
    if len(line) <= limit:
        return line
    return _stub(event, original, limit)


# (tier, floor as a fraction 1/n of the limit or 0 for none, drop list tails first)
_STEPS = (
    (_BODIES, 16, False),  # large bodies down to 1/16 of the limit (16 KiB of 256)
    (_CHUNKS, 0, True),  # then the tail of the stream
    (_HEADERS, 64, False),  # then long header values (a giant cookie)
    (_BODIES, 0, False),  # then whatever the bodies still hold
    (_CHUNKS, 0, False),  # a single huge chunk
    (_HEADERS, 0, False),
    (_OTHER, 0, False),
)


def _tier_of(key: Any, inherited: int | None) -> int | None:
    if inherited is not None or not isinstance(key, str):
        return inherited
    if key in BODY_KEYS:
        return _BODIES
    if key in CHUNK_KEYS:
        return _CHUNKS
    if key in HEADER_KEYS:
        return _HEADERS
    return None


def _collect(
    node: Any,
    want: int,
    path: str,
    inherited: int | None,
    strings: list[_Place],
    lists: list[_Place],
) -> None:
    """Gather the strings and lists of tier ``want`` under ``node``.  A subtree's
    tier is set by the first body/chunk/header key above it; outside any, other."""
    items: list[tuple[Any, Any]]
    if isinstance(node, dict):
        items = [(k, v) for k, v in node.items() if path or k != TRUNCATION_MARK]
        index = False
    elif isinstance(node, list):
        items = list(enumerate(node))
        index = True
    else:
        return
    for key, value in items:
        tier = _tier_of(key, inherited)
        effective = _OTHER if tier is None else tier
        # List indexes collapse to [] so the marker names a field once, not per chunk.
        sub_path = f"{path}[]" if index else (f"{path}.{key}" if path else str(key))
        if isinstance(value, str):
            if effective == want and len(value) > _MIN_CUT:
                strings.append((node, key, sub_path))
        elif isinstance(value, list):
            if effective == want and len(value) > 1:
                lists.append((node, key, sub_path))
            _collect(value, want, sub_path, tier, strings, lists)
        elif isinstance(value, dict):
            _collect(value, want, sub_path, tier, strings, lists)


def _note(container: Any, path: str, fields: list[str]) -> None:
    if path not in fields:
        fields.append(path)
    if isinstance(container, dict) and isinstance(container.get("truncated"), bool):
        container["truncated"] = True


def _fill_down(strings: list[_Place], excess: int, floor: int, fields: list[str]) -> bool:
    """Cut the longest strings down to one common encoded length, never below
    ``floor``, that frees ``excess`` bytes (water-filling).  False when nothing is
    left to cut."""
    sized = []
    for container, key, path in strings:
        value = container[key]
        if len(value) > _MIN_CUT:
            # Encoded size, escapes included (a quote or newline costs two bytes).
            size = len(orjson.dumps(value)) - 2
            if size > floor:
                sized.append((size, container, key, path))
    if not sized:
        return False
    sized.sort(key=_size, reverse=True)
    # The largest cap C >= floor with sum(max(0, size - C)) >= excess, else floor.
    cap = floor
    freed = 0
    for i, item in enumerate(sized):
        nxt = sized[i + 1][0] if i + 1 < len(sized) else floor
        step = (item[0] - nxt) * (i + 1)
        if freed + step >= excess:
            cap = max(floor, item[0] - -(-(excess - freed) // (i + 1)))
            break
        freed += step
    for size, container, key, path in sized:
        if size <= cap:
            break
        value = container[key]
        keep = min(len(value) - 1, len(value) * cap // size)  # chars in proportion
        if key == "base64":
            keep -= keep % 4  # stays decodable
        container[key] = value[: max(0, keep)]
        _note(container, path, fields)
    return True


def _size(item: tuple[int, Any, Any, str]) -> int:
    return item[0]


def _drop_tails(lists: list[_Place], excess: int, fields: list[str]) -> None:
    """Keep the head of the longest lists (stream chunks) and drop their tails
    until about ``excess`` bytes are freed; a list's partner (:data:`PAIRED_LISTS`)
    loses the same tail, and its bytes count with the list's."""
    sized = sorted(((_paired_size(c, k), c, k, p) for c, k, p in lists), key=_size, reverse=True)
    for size, container, key, path in sized:
        if excess <= 0:
            return
        items = container[key]
        partner_key = PAIRED_LISTS.get(key)
        partner = _partner(container, key)
        budget = size - excess
        kept = 2 if partner is None else 4  # the brackets
        keep = 0
        for i, item in enumerate(items):
            kept += len(orjson.dumps(item)) + 1
            if partner is not None and i < len(partner):
                kept += len(orjson.dumps(partner[i])) + 1
            if kept > budget:
                break
            keep += 1
        container[key] = items[:keep]
        excess -= size - (kept if keep == len(items) else budget)
        _note(container, f"{path}[{keep}:]", fields)
        if partner is not None and partner_key is not None and len(partner) > keep:
            container[partner_key] = partner[:keep]
            partner_path = path[: len(path) - len(key)] + partner_key
            _note(container, f"{partner_path}[{keep}:]", fields)


def _partner(container: Any, key: Any) -> list[Any] | None:
    """The list paired with ``container[key]`` (:data:`PAIRED_LISTS`), if there is one."""
    partner_key = PAIRED_LISTS.get(key) if isinstance(key, str) else None
    if partner_key is None or not isinstance(container, dict):
        return None
    partner = container.get(partner_key)
    return partner if isinstance(partner, list) else None


def _paired_size(container: Any, key: Any) -> int:
    """The encoded size of ``container[key]``, with its partner's when it has one."""
    size = len(orjson.dumps(container[key]))
    partner = _partner(container, key)
    return size if partner is None else size + len(orjson.dumps(partner))


def _stub(event: dict[str, Any], original: int, limit: int) -> bytes:
    stub: dict[str, Any] = {k: event[k] for k in IDENTITY_FIELDS if k in event}
    stub[TRUNCATION_MARK] = {"original_bytes": original, "fields": ["*"]}
    line = orjson.dumps(stub)
    if len(line) <= limit:
        return line
    # Identity fields themselves are huge (they never are in practice): keep the minimum.
    minimal: dict[str, Any] = {k: stub[k] for k in ("type", "ts_ns") if k in stub}
    minimal[TRUNCATION_MARK] = {"original_bytes": original, "fields": ["*"]}
    line = orjson.dumps(minimal)
    return line if len(line) <= limit else b'{"loki_truncated":{"fields":["*"]}}'
