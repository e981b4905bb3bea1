"""The session tracker: which conversation a request belongs to, and where a
conversation forks (tests: tests/unit/capture/test_sessions.py; with a shared
state: tests/unit/state/test_sessions.py, tests/integration/test_shared_state.py).

The proxy calls :meth:`SessionTracker.assign` for every request right before it
publishes the ``request`` event, and :meth:`SessionTracker.finished` when the
exchange ends.  ``assign`` sets ``record.session_id`` and ``record.seq`` for
*conversation requests*: ``POST`` to a path ending in ``/chat/completions``,
``/responses`` or ``/messages`` whose body is a JSON object.  Anything else
(models lists, embeddings, token counting, non-JSON bodies) gets no session.

Where the id comes from, first match wins:

1. a client-supplied id: Anthropic ``metadata.user_id`` (the part after
   ``_session_``, as Claude Code sends it), OpenAI ``conversation`` (a string or
   ``{"id": ...}``), ``previous_response_id``, ``metadata.session_id``, the
   ``X-Session-ID`` header, ``user``.  Ids must match ``[A-Za-z0-9_-]{1,255}``;
   anything else is ignored.  The session's ``seq`` counts on.  A
   ``previous_response_id`` naming a response the tracker saw is followed to
   that response's session instead (continuing it, or forking it when the
   client branches from an older response); an unknown one is the session id.
2. otherwise the conversation's own *fingerprint*.  Each message is reduced to
   what the conversation says -- role, text, tool calls, tool results and other
   parts as canonical JSON with ``cache_control`` stripped -- because the reply
   as the tracker reads it from the response and the reply as a client echoes it
   in the next request differ in form (a string or text blocks, ``null``
   fields, key order, thinking blocks, one Responses output item or several).
   A *state* is the SHA-256 of the canonical JSON (sorted keys) of the list of
   reduced messages of a request plus its assistant reply; it is recorded when
   the exchange ends well (2xx, complete, not cut at the capture cap).

   A new request is matched through its history, ``messages[:-1]``: the longest
   prefix of it that ends with an assistant message and is a recorded state.
   Matching the session's latest state continues the session (the next seq).
   Matching an earlier state -- an earlier user message was edited, or a reply
   regenerated -- starts a *fork*: a new session whose first event is ``fork``
   (``from_seq`` = the seq of the matched state, ``parent_session``, ``reason:
   "message_history_diverged"``) and whose seq goes on from there (``from_seq +
   1``), so seq is always the turn's place in the conversation.  No match: a new
   session, first event ``session_start``, seq 1.  A request without an assistant
   message in its history (a first turn) always starts a new session: a retried
   first turn cannot be told from a new conversation asking the same thing.

Cost on the request path: one ``orjson.loads`` of the body (none when the
capture pump hands over the object it parsed for the request event), one pass
reducing and hashing the messages, a few dictionary lookups; ``finished`` parses
the captured reply once, and leaves the response event the summary it needs.
States and session heads live in two LRU maps bounded by ``max_states`` each.
They survive a restart through an append-only JSONL journal (``store_path``),
written in one append per ``flush_interval`` on the injected clock, compacted (a
snapshot of memory written to a new file, fsynced and renamed over the old one;
in a thread when ``run_in_thread`` is given, changes meanwhile wait in memory)
when it holds more than twice the live entries, and read back at :meth:`start`.
Losing it (unreadable, unwritable) costs only continuity: new requests start
new sessions.  A journal moved, deleted or emptied under the running tracker (its
directory removed with ``state_dir``) is noticed at the next append (one
``os.stat``) and written whole again from memory, its directory made again.
Nothing here raises into the request path.

With ``[state] store = redis`` the decisions are taken in Redis
(llmproxy/state/sessions.py), in batches, off the request path; these maps
mirror them.  A reply's state reaches Redis only once the reply has ended, so a
next turn served by another process may be looked up before it: such a
continuation is asked again (50 ms, doubling to 200 ms) for up to ``[state]
continuation_wait`` before it starts a new session, and what needs its decision
(its own reply's record, a turn continuing from that reply) waits parked on it,
so turns are decided in order.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import attrs
import orjson
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.capture.body import content_codings, content_headers, decode_content, media_type
from llmproxy.capture.events import SCHEMA_VERSION
from llmproxy.capture.record import ExchangeRecord, Headers
from llmproxy.events.endpoints import CONVERSATIONS, endpoint_kind
from llmproxy.events.envelope import Envelope, StoredEvent
from llmproxy.events.machine import machine_id
from llmproxy.events.time import epoch_ns, rfc3339_ns
from llmproxy.events.usage import (
    EMPTY_FACTS,
    ResponseFacts,
    facts_from_json,
    facts_from_sse_bytes,
)
from llmproxy.export.appendfile import displaced, open_append
from llmproxy.interfaces import SharedSessionState
from llmproxy.state.health import StateHealth
from llmproxy.state.sessions import Assigned, AssignOp, RecordOp, StateKey

__all__ = [
    "COMPACT_SLACK",
    "CONVERSATION_SUFFIXES",
    "FORK_REASON",
    "MAX_PENDING",
    "REPLY_DECODE_LIMIT",
    "SESSION_ID",
    "Fingerprints",
    "SessionTracker",
    "StateKey",
    "client_id",
    "conversation_kind",
    "conversation_messages",
    "fingerprint",
    "reduce_message",
    "reduce_responses_input",
    "reply_facts",
]

log = Logger()

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")
# A session id as the tracker keeps it: a client's id may carry its tenant's tag.
_KEPT_ID = re.compile(r"[A-Za-z0-9_-]{1,300}")
FORK_REASON = "message_history_diverged"
CONVERSATION_SUFFIXES = ("/chat/completions", "/responses", "/messages")
# A decoded reply larger than this is not fingerprinted (capture caps are far below).
REPLY_DECODE_LIMIT = 64 * 1024 * 1024
# Exchanges between assign() and finished(); past it the oldest are forgotten.
MAX_PENDING = 65536
# Compact the journal once it holds this many lines more than twice the live entries.
COMPACT_SLACK = 1024

# Operations sent to the shared state in one script (one round trip) at most.
MAX_BATCH = 512
# A continuation whose history no process has recorded yet is asked again after
# this, then after twice as long each time (at most MAX_REASK: a turn continuing
# from a turn that waited too finds it within that of its record), until
# [state] continuation_wait.
FIRST_REASK = 0.05
MAX_REASK = 0.2


# ---------------------------------------------------------------- what a request is


def conversation_kind(method: str, path: str) -> str | None:
    """``"chat"``, ``"responses"`` or ``"messages"`` for a conversation request, else None."""
    if method != "POST":
        return None
    kind = endpoint_kind(path)
    return kind if kind in CONVERSATIONS else None


# A proxy sees few distinct paths; a client inventing many costs only cache misses.
_conversation_kind = functools.lru_cache(maxsize=512)(conversation_kind)


def _valid_id(value: Any) -> str | None:
    return value if isinstance(value, str) and SESSION_ID.fullmatch(value) else None


def _kept_id(value: Any) -> str | None:
    return value if isinstance(value, str) and _KEPT_ID.fullmatch(value) else None


# ---------------------------------------------------------------- whose request

# The credential headers the response cache hashes into its namespace
# (llmproxy/cache/policy.py, CREDENTIAL_HEADERS): one tenant rule for both.
_CREDENTIAL_HEADERS = (b"authorization", b"x-api-key", b"api-key")


def tenant_namespace(project: str, headers: Headers) -> bytes:
    """The tenant a request belongs to, exactly as the response cache's key has it
    (``llmproxy.cache.policy.namespace_for(...).full``): the proxy token's project,
    else a SHA-256 over the credential headers the client sent (a ``Cookie`` only
    without any of them), else ``anon``."""
    if project:
        return b"p:" + project.encode()
    h = hashlib.sha256()
    seen = False
    for name in _CREDENTIAL_HEADERS:
        for raw_name, value in headers:
            if len(raw_name) == len(name) and raw_name.lower() == name:
                seen = True
                h.update(b"%s:%d:%s\n" % (name, len(value), value))
    if not seen:
        for raw_name, value in headers:
            if len(raw_name) == 6 and raw_name.lower() == b"cookie":
                seen = True
                h.update(b"cookie:%d:%s\n" % (len(value), value))
    if not seen:
        return b"anon"
    return b"k:" + h.hexdigest().encode()


def tenant_tag(namespace: bytes) -> str:
    """What a tenant's client-chosen session ids are prefixed with: 12 hex digits
    that name the tenant without revealing its credentials; none for ``anon``."""
    if namespace == b"anon":
        return ""
    return hashlib.sha256(b"llmproxy-session-tenant\x00" + namespace).hexdigest()[:12]


def scoped_id(tag: str, client_id: str) -> str:
    """A client-chosen session id within its tenant: two tenants sending the same
    ``X-Session-ID`` get two sessions."""
    return f"{tag}-{client_id}" if tag else client_id


def _session_header(headers: Headers) -> str | None:
    """The first ``X-Session-ID`` header's value, stripped."""
    for raw_name, raw_value in headers:
        # Compare lengths first: most headers are not it, and lower() copies.
        if len(raw_name) == 12 and raw_name.lower() == b"x-session-id":
            return raw_value.decode("latin-1").strip()
    return None


def client_id(body: dict[str, Any], headers: Headers) -> tuple[str, str] | None:
    """``(source, id)`` of the first valid client-supplied session id, in priority
    order: ``metadata.user_id`` (after ``_session_``), ``conversation``,
    ``previous_response_id``, ``metadata.session_id``, ``X-Session-ID``, ``user``."""
    get = body.get
    metadata = get("metadata")
    if not isinstance(metadata, dict):
        metadata = None
    elif "user_id" in metadata:
        user_id = metadata["user_id"]
        if isinstance(user_id, str) and "_session_" in user_id:
            found = _valid_id(user_id.rpartition("_session_")[2])
            if found:
                return "metadata.user_id", found
    conversation = get("conversation")
    if conversation is not None:
        if isinstance(conversation, dict):
            conversation = conversation.get("id")
        found = _valid_id(conversation)
        if found:
            return "conversation", found
    found = _valid_id(get("previous_response_id"))
    if found:
        return "previous_response_id", found
    if metadata is not None:
        found = _valid_id(metadata.get("session_id"))
        if found:
            return "metadata.session_id", found
    found = _valid_id(_session_header(headers))
    if found:
        return "x-session-id", found
    found = _valid_id(get("user"))
    if found:
        return "user", found
    return None


# ---------------------------------------------------------------- reducing messages

_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
_TOOL_USE = frozenset({"tool_use", "server_tool_use"})
# Keys that say how a message is carried, not what it says.
_FORM_KEYS = frozenset({"role", "content", "cache_control", "type", "id", "status"})


def _strip(value: Any) -> Any:
    """``value`` without ``cache_control`` keys at any depth."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _arguments(value: Any) -> Any:
    """Tool-call arguments as a value: a JSON string parsed, so key order and spacing
    do not matter (Anthropic sends an object, OpenAI a string)."""
    if isinstance(value, str):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def _text_and_parts(content: Any, keep_parts: bool) -> tuple[str, list[Any]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        return "", [_strip(content)] if keep_parts else []
    texts: list[str] = []
    parts: list[Any] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            text = part.get("text")
            if part.get("type") in _TEXT_PARTS and isinstance(text, str):
                texts.append(text)
            elif keep_parts:
                parts.append(_strip(part))
        elif keep_parts:
            parts.append(part)
    return "".join(texts), parts


def _call(call_id: Any, name: Any, arguments: Any) -> list[Any]:
    return [
        call_id if isinstance(call_id, str) else "",
        name if isinstance(name, str) else "",
        _arguments(arguments),
    ]


def _calls(message: dict[str, Any]) -> list[list[Any]]:
    calls = []
    tool_calls = message.get("tool_calls")
    for raw in tool_calls if isinstance(tool_calls, list) else ():
        if isinstance(raw, dict):
            fn = raw.get("function")
            fn = fn if isinstance(fn, dict) else {}
            calls.append(_call(raw.get("id"), fn.get("name"), fn.get("arguments", "")))
    legacy = message.get("function_call")
    if isinstance(legacy, dict) and not calls:
        calls.append(_call("", legacy.get("name"), legacy.get("arguments", "")))
    content = message.get("content")
    for block in content if isinstance(content, list) else ():
        if isinstance(block, dict) and block.get("type") in _TOOL_USE:
            calls.append(_call(block.get("id"), block.get("name"), block.get("input", {})))
    return calls


def reduce_message(message: Any) -> dict[str, Any]:
    """What a chat or Anthropic message says, in one form whatever its shape.

    An assistant message keeps its text and tool calls only (thinking blocks,
    refusals and server-side results are not part of the reply the tracker reads);
    other messages keep their text, their other parts and their other keys
    (``tool_call_id``, ``name``), with ``cache_control`` stripped everywhere.
    """
    if not isinstance(message, dict):
        return {"role": "?", "text": "", "parts": [_strip(message)]}
    role = message.get("role")
    role = role if isinstance(role, str) else "?"
    content = message.get("content")
    # Plain text content, the usual form, needs no _text_and_parts.
    text_only = type(content) is str
    if role == "assistant":
        text = content if text_only else _text_and_parts(content, keep_parts=False)[0]
        reduced: dict[str, Any] = {"role": role, "text": text}
        if not text_only or "tool_calls" in message or "function_call" in message:
            calls = _calls(message)
            if calls:
                reduced["calls"] = calls
        return reduced
    if text_only:
        reduced = {"role": role, "text": content}
    else:
        text, parts = _text_and_parts(content, keep_parts=True)
        reduced = {"role": role, "text": text}
        if parts:
            reduced["parts"] = parts
    if not message.keys() <= _FORM_KEYS:
        reduced["extra"] = {k: _strip(v) for k, v in message.items() if k not in _FORM_KEYS}
    return reduced


def reduce_responses_input(items: Any) -> list[dict[str, Any]] | None:
    """A Responses API ``input`` as reduced messages.

    Consecutive assistant-side items (output messages, function calls, reasoning)
    become one assistant message, as the reply of one response does; reasoning
    and hosted tool calls (``*_call`` other than ``function_call``) carry nothing
    the reply carries.
    """
    if isinstance(items, str):
        return [{"role": "user", "text": items}]
    if not isinstance(items, list):
        return None
    out: list[dict[str, Any]] = []
    assistant: dict[str, Any] | None = None
    for item in items:
        if not isinstance(item, dict):
            out.append(reduce_message(item))
            assistant = None
            continue
        kind = item.get("type")
        role = item.get("role")
        if kind in (None, "message") and isinstance(role, str):
            if role != "assistant":
                out.append(reduce_message(item))
                assistant = None
                continue
            text, _ = _text_and_parts(item.get("content"), keep_parts=False)
            if assistant is None:
                assistant = {"role": "assistant", "text": ""}
                out.append(assistant)
            assistant["text"] += text
        elif kind == "function_call":
            if assistant is None:
                assistant = {"role": "assistant", "text": ""}
                out.append(assistant)
            call = _call(item.get("call_id"), item.get("name"), item.get("arguments", ""))
            assistant.setdefault("calls", []).append(call)
        elif kind == "reasoning" or (isinstance(kind, str) and kind.endswith("_call")):
            continue
        else:
            out.append(
                {
                    "role": kind if isinstance(kind, str) else "?",
                    "text": "",
                    "parts": [_strip({k: v for k, v in item.items() if k not in _FORM_KEYS})],
                }
            )
            assistant = None
    return out


def conversation_messages(kind: str, body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The reduced messages of a conversation request body, or None when it has none."""
    if kind == "responses":
        return reduce_responses_input(body.get("input"))
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    return [reduce_message(m) for m in messages]


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


@attrs.define(eq=False)
class Fingerprints:
    """The hashes of one request's conversation.

    ``history``: digests of the prefixes of ``messages[:-1]`` that end with an
    assistant message, shortest first.  ``state(reply)``: the digest of the whole
    conversation plus the reply.  A digest is SHA-256 over the canonical JSON of
    the list of reduced messages; the list is hashed once, incrementally.
    """

    history: list[bytes]
    _open: Any  # hashlib sha256 over "[m1,m2,...,mn" (no closing bracket)
    _count: int

    @classmethod
    def of(cls, messages: list[dict[str, Any]], tenant: str = "") -> Fingerprints:
        """``tenant``: a :func:`tenant_tag`; the same conversation of two tenants
        has two sets of digests (no tag: the digests of a tenant-less proxy)."""
        hasher = hashlib.sha256(tenant.encode() + b"\x00[" if tenant else b"[")
        update = hasher.update
        dumps = orjson.dumps
        history = []
        last = len(messages) - 1
        for index, message in enumerate(messages):
            if index:
                update(b",")
            update(dumps(message, option=orjson.OPT_SORT_KEYS))  # _canonical, inlined
            if index < last and message.get("role") == "assistant":
                prefix = hasher.copy()
                prefix.update(b"]")
                history.append(prefix.digest())
        return cls(history, hasher, len(messages))

    def state(self, reply: dict[str, Any]) -> bytes:
        hasher = self._open.copy()
        if self._count:
            hasher.update(b",")
        hasher.update(_canonical(reply))
        hasher.update(b"]")
        digest: bytes = hasher.digest()
        return digest


def fingerprint(messages: list[dict[str, Any]]) -> bytes:
    """SHA-256 of the canonical JSON of already reduced messages (a state's key)."""
    return hashlib.sha256(_canonical(messages)).digest()


# ---------------------------------------------------------------- reading the reply


def reply_facts(record: ExchangeRecord) -> ResponseFacts:
    """The facts of a finished exchange's captured response (JSON or SSE, decoded).

    For a body without a Content-Encoding that parsed, the summary the response
    event needs is left on the record (``reply_summary``): the event does not
    parse it again.
    """
    # The event builder's own helpers: the tracker reads a reply exactly as the
    # response event does, so the event can take the summary (``reply_summary``).
    content_type, content_encoding = content_headers(record.response_headers)
    chunks = record.response_chunks
    raw = chunks[0][1] if len(chunks) == 1 else b"".join([chunk for _, chunk in chunks])
    if content_encoding and content_codings(content_encoding):
        decoded = decode_content(raw, content_encoding, REPLY_DECODE_LIMIT)
        if decoded.error or decoded.truncated or decoded.incomplete:
            return EMPTY_FACTS
        raw = decoded.data
    if content_type is not None and media_type(content_type) == "text/event-stream":
        # The response event's own reading: its summary of these very bytes is
        # (model, usage, finish_reasons) of these facts.
        facts = facts_from_sse_bytes(raw)
    else:
        if raw[:1] != b"{" and raw.lstrip()[:1] != b"{":
            return EMPTY_FACTS
        facts = facts_from_json(raw)
        if facts.merged_json is None:
            return facts
    if not content_encoding:
        record.reply_summary = (facts.model, facts.usage, facts.finish_reasons)
    return facts


# ---------------------------------------------------------------- the tracker


# Where a session stands: (the last seq given out, the seq of its latest state).
# A plain tuple of ints, replaced rather than changed: the cyclic garbage collector
# stops tracking exact tuples of untracked values, so a tracker holding 100,000
# sessions adds nothing to its full collections (an object per session made each
# one tens of ms longer: a stall for every request waiting meanwhile).  A tuple
# subclass (NamedTuple) would stay tracked.
_Head: TypeAlias = tuple[int, int]
_LAST, _STATE = 0, 1


@attrs.define(slots=True, eq=False)
class _Pending:
    session_id: str
    seq: int
    fingerprints: Fingerprints | None  # None: the session's id came from the client
    responses: bool  # a Responses API request: remember its response id
    op: AssignOp | None  # shared state: the assignment (session_id and seq once decided)
    fresh: bool = False  # shared state: a session started here, unknown to Redis yet


@attrs.define(slots=True, eq=False)
class _Deciding:
    """A request whose session Redis is deciding: what its result needs."""

    record: ExchangeRecord
    source: str
    prints: Fingerprints | None
    responses: bool
    waiting: Deferred[None]  # the capture pump's: the request event waits for it
    chosen: str | None = None  # the session id the client sent (before its tenant's tag)


@attrs.define(slots=True, eq=False)
class _Held:
    """An assignment not decided yet whose history no process had recorded when
    it was asked (it is asked again), or on which other operations wait."""

    deadline: float | None = None  # from its first miss: asked without waiting from then
    delay: float = FIRST_REASK  # until its next ask
    call: IDelayedCall | None = None  # its next ask
    # Operations that need its decision first: its reply's record, and the next
    # turns that continue from that reply.
    parked: list[AssignOp | RecordOp] = attrs.Factory(list)


class _RandomHex:
    """Random hex digits from the OS, read 4 KiB (256 session ids) at a time: one
    system call per 256 new sessions rather than one each.  Not thread-safe: the
    tracker runs in the reactor thread.  A forked child starts with none (it must
    not hand out the ids its parent will)."""

    __slots__ = ("_at", "_hex")

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0

    def reset(self) -> None:
        self._hex = ""
        self._at = 0

    def take32(self) -> str:
        at = self._at
        if at >= len(self._hex):
            self._hex = os.urandom(4096).hex()
            at = 0
        self._at = at + 32
        return self._hex[at : at + 32]


_RANDOM_HEX = _RandomHex()
os.register_at_fork(after_in_child=_RANDOM_HEX.reset)


def _new_session_id() -> str:
    """A random (version 4) UUID's text, as ``str(uuid.uuid4())`` gives it, in a
    fraction of the time (a new session per one-shot request makes it a
    per-request cost)."""
    h = _RANDOM_HEX.take32()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


# The variant bits (10xx) of a version 4 UUID's 17th hex digit.
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


@attrs.define(eq=False)
class SessionTracker:
    """Assigns ``session_id``/``seq`` to conversation requests (``SessionAssigner``).

    ``publish`` takes the ``session_start`` and ``fork`` envelopes (the bus's
    ``publish``).  ``store_path`` is the journal (None: memory only).  Call
    :meth:`start` before serving and :meth:`close` in the drain.
    """

    _publish: Callable[[Envelope], None]
    _store_path: Path | None
    _max_states: int = attrs.field(validator=attrs.validators.gt(0))
    _clock: IReactorTime
    _flush_interval: float = 1.0
    _new_id: Callable[[], str] = _new_session_id
    # Runs the journal's compaction (build, write, fsync, rename) off the reactor
    # thread, e.g. ``lambda f: deferToThreadPool(reactor, reactor.getThreadPool(), f)``;
    # None: in the reactor thread (tests; ~0.1 s per 100k states).
    _run_in_thread: Callable[[Callable[[], int]], Deferred[int]] | None = None
    # [state] store = redis: the decisions are taken there (llmproxy/state/sessions.py),
    # this process's maps and journal mirror them and decide while Redis does not answer.
    _shared: SharedSessionState | None = None
    _health: StateHealth | None = None
    # [state] continuation_wait: how long a continuation whose history no process
    # has recorded yet waits for that record before it starts a new session (0: not).
    _continuation_wait: float = 0.0
    # Conversation bodies above this are not parsed or fingerprinted (see
    # [sessions] max_body_bytes): the work per request on the reactor is bounded
    # (parse, reduce and hash: ~4 ms at 1 MiB, ~8 ms at 2 MiB on the 2-core CI VM).
    max_body_bytes: int = 2 * 1024 * 1024
    _states: OrderedDict[StateKey, tuple[str, int]] = attrs.field(init=False, factory=OrderedDict)
    _sessions: OrderedDict[str, _Head] = attrs.field(init=False, factory=OrderedDict)
    _pending: dict[ExchangeRecord, _Pending] = attrs.field(init=False, factory=dict)
    _buffer: list[bytes] = attrs.field(init=False, factory=list)
    _dirty: dict[str, None] = attrs.field(init=False, factory=dict)
    _loop: LoopingCall | None = attrs.field(init=False, default=None)
    _fd: int | None = attrs.field(init=False, default=None)
    _identity: tuple[int, int] = attrs.field(init=False, default=(0, 0))  # (st_dev, st_ino)
    _journal_lines: int = attrs.field(init=False, default=0)
    _rewrite: bool = attrs.field(init=False, default=False)
    _closing: Deferred[None] | None = attrs.field(init=False, default=None)
    _compacting: Deferred[None] | None = attrs.field(init=False, default=None)
    _warned: set[str] = attrs.field(init=False, factory=set)
    _ops: list[AssignOp | RecordOp] = attrs.field(init=False, factory=list)
    _sending: Deferred[None] | None = attrs.field(init=False, default=None)
    _send_call: IDelayedCall | None = attrs.field(init=False, default=None)
    _deciding: dict[AssignOp, _Deciding] = attrs.field(init=False, factory=dict)
    _held: dict[AssignOp, _Held] = attrs.field(init=False, factory=dict)
    # The state keys of records parked on an assignment -> that assignment.
    _parked_keys: dict[StateKey, AssignOp] = attrs.field(init=False, factory=dict)
    _hurrying: bool = attrs.field(init=False, default=False)  # stopping: no more waits
    _counts: dict[str, int] = attrs.field(
        init=False,
        factory=lambda: dict.fromkeys(
            (
                "started",
                "continued",
                "forked",
                "client_ids",
                "states_recorded",
                "too_large",
                "errors",
                "shared_batches",
                "local_fallbacks",
                "continuations_waited",
                "continuations_not_found",
            ),
            0,
        ),
    )

    def __attrs_post_init__(self) -> None:
        if self._health is not None and self._shared is not None:
            self._health.watch("sessions")

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        """Load the journal (when there is one) and start flushing it."""
        if self._store_path is not None:
            self._load(self._store_path)
        if self._loop is None and self._closing is None:
            self._loop = LoopingCall(self.flush)
            self._loop.clock = self._clock
            self._loop.start(self._flush_interval, now=False)

    def stop(self, timeout: float) -> Deferred[None]:
        """Stop flushing, send what waits for the shared state (each batch bounded
        by the connection's deadline, then decided here), let a running compaction
        end, write what is buffered and close the journal (in the reactor thread).
        Idempotent; never fails."""
        if self._closing is not None:
            return self._closing
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self._closing = ensureDeferred(self._close())
        return self._closing

    async def _close(self) -> None:
        await self._settled()
        if self._compacting is not None:
            await _when_done(self._compacting)
        self._flush(in_thread=False)
        self._close_fd()

    async def _settled(self) -> None:
        """Until no operation waits for the shared state.  A continuation still
        looking for its history is asked at once, without waiting any longer."""
        self._hurrying = True
        while self._shared is not None and (self._ops or self._sending is not None or self._held):
            if self._sending is None:
                if self._send_call is not None and self._send_call.active():
                    self._send_call.cancel()
                if not self._ops and not self._hurry():
                    break  # nothing can move (never expected): do not spin
                self._send()
                continue
            await _when_done(self._sending)

    def stats(self) -> dict[str, int]:
        return {
            **self._counts,
            "states": len(self._states),
            "sessions": len(self._sessions),
            "pending": len(self._pending),
            # Shared state: a batch under way (0 or 1), and the continuations
            # still looking for their history (with what waits for them).
            "shared_in_flight": int(self._sending is not None),
            "continuations_waiting": len(self._held),
            "journal_lines": self._journal_lines,
        }

    # -- the request path -----------------------------------------------------

    def assign(
        self, record: ExchangeRecord, body: bytes, parsed: dict[str, Any] | None = None
    ) -> Deferred[None] | None:
        """``parsed``: ``orjson.loads(record.request_body)`` when the caller parsed it
        already (used only when ``body`` is that same whole body).  None when the
        record has its session (or none) now; with shared state, a Deferred that
        fires once it has (it never fails)."""
        try:
            return self._assign(record, body, parsed)
        except Exception:
            self._counts["errors"] += 1
            log.failure("session tracker: no session for request {rid}", rid=record.request_id)
            return None

    def finished(self, record: ExchangeRecord) -> None:
        try:
            self._finished(record)
        except Exception:
            self._counts["errors"] += 1
            log.failure("session tracker: reply of {rid} not recorded", rid=record.request_id)

    def _assign(
        self, record: ExchangeRecord, body: bytes, parsed: dict[str, Any] | None
    ) -> Deferred[None] | None:
        kind = _conversation_kind(record.method, record.path)
        if kind is None:
            return None
        tenant = tenant_tag(tenant_namespace(record.tenant, record.request_headers))
        if record.request_body_size > self.max_body_bytes:
            # Too big to parse on the reactor: only a header can name its session.
            self._counts["too_large"] += 1
            found_header = _valid_id(_session_header(record.request_headers))
            if found_header is None:
                return None
            session_id = scoped_id(tenant, found_header)
            return self._decide(
                record, (), session_id, "x-session-id", None, False, chosen=found_header
            )
        # body[:1] first: lstrip() copies the whole body, and a JSON body starts
        # with "{" as good as always.
        if body[:1] != b"{" and body.lstrip()[:1] != b"{":
            return None
        obj: Any
        raw = record.request_body
        if parsed is not None and (body is raw or body == raw):
            obj = parsed
        else:
            try:
                obj = orjson.loads(body)
            except orjson.JSONDecodeError:
                return None  # cut at the capture cap, or not JSON: no session
            if not isinstance(obj, dict):
                return None
        responses = kind == "responses"
        found = client_id(obj, record.request_headers)
        if found is not None:
            source, chosen = found
            # The client's id within its tenant: two tenants sending the same id
            # get two sessions.
            session_id = scoped_id(tenant, chosen)
            # A response id the tracker saw leads to that response's session.
            followed: Sequence[StateKey] = (
                ("r:" + session_id,) if source == "previous_response_id" else ()
            )
            return self._decide(
                record, followed, session_id, source, None, responses, chosen=chosen
            )
        messages = conversation_messages(kind, obj)
        if messages is None:
            return None
        prints = Fingerprints.of(messages, tenant)
        history = prints.history
        # The longest matching history wins: newest prefix first.
        lookups = history[::-1] if len(history) > 1 else history
        return self._decide(record, lookups, None, "fingerprint", prints, responses)

    def _decide(
        self,
        record: ExchangeRecord,
        lookups: Sequence[StateKey],
        client: str | None,
        source: str,
        prints: Fingerprints | None,
        responses: bool,
        chosen: str | None = None,
    ) -> Deferred[None] | None:
        """Here, or (shared state) in Redis and a Deferred for when it is decided.
        ``client``: the client's session id within its tenant, ``chosen`` as sent."""
        if self._shared is None:
            result = self._decide_locally(lookups, client, "")
            self._assigned(record, result, client, source, prints, responses, chosen)
            return None
        if not lookups and client is None:
            # A first turn (no history, no client id) starts a new session
            # whatever any process knows: decided here, nothing to wait for.  Redis
            # learns of the session with its first recorded state, whose record
            # makes the session's head there.
            result = self._decide_locally((), None, "")
            self._assigned(record, result, None, source, prints, responses)
            if prints is not None or responses:
                entry = _Pending(result[0], result[1], prints, responses, None, fresh=True)
                self._add_pending(record, entry)
            return None
        # A continuation may find its history recorded a little later: the
        # previous turn's reply, served by another process, is recorded once it
        # has ended.
        wait = bool(lookups) and self._continuation_wait > 0 and not self._hurrying
        op = AssignOp(lookups, client, self._new_id(), wait=wait)
        waiting: Deferred[None] = Deferred()
        self._deciding[op] = _Deciding(record, source, prints, responses, waiting, chosen)
        if prints is not None or responses:
            # Its reply is recorded at this op's session, decided by then or not.
            self._add_pending(record, _Pending("", 0, prints, responses, op))
        self._queue(op)
        return waiting

    def apply_locally(self, ops: Sequence[AssignOp | RecordOp]) -> None:
        """Run ``ops`` on this process's maps, as Redis runs them in its script
        (each assignment gets its ``result``); the maps are journaled as usual."""
        states = self._states
        for op in ops:
            if isinstance(op, AssignOp):
                if op.wait and op.lookups and op.lookups[0] not in states:
                    op.result, op.missed = None, True
                    continue
                op.missed = False
                op.result = self._decide_locally(op.lookups, op.client, op.new_id)
            else:
                target = op.target()
                if target is not None:
                    self._record_locally(op.keys, *target, fresh=op.fresh)

    def _decide_locally(
        self, lookups: Sequence[StateKey], client: str | None, new_id: str
    ) -> Assigned:
        """An :class:`AssignOp` on this process's maps (llmproxy/state/sessions.py
        says what it decides; Redis decides the same in its script)."""
        states = self._states
        sessions = self._sessions
        for key in lookups:
            hit = states.get(key)
            if hit is None:
                continue
            states.move_to_end(key)
            parent, from_seq = hit
            head = sessions.get(parent)
            if head is not None and from_seq >= head[_STATE]:
                seq = head[_LAST] + 1
                self._set_head(parent, (seq, head[_STATE]))
                return (parent, seq, "continue", 0, "", head[_STATE])
            # The fork shares the parent's turns up to from_seq; its own start there.
            session_id = new_id or self._new_id()
            seq = from_seq + 1
            self._set_head(session_id, (seq, from_seq))
            return (session_id, seq, "fork", from_seq, parent, from_seq)
        if client is not None:
            head = sessions.get(client)
            if head is not None:
                seq = head[_LAST] + 1
                self._set_head(client, (seq, head[_STATE]))
                return (client, seq, "continue", 0, "", head[_STATE])
            session_id = client
        else:
            session_id = new_id or self._new_id()
        self._set_head(session_id, (1, 0))
        return (session_id, 1, "start", 0, "", 0)

    def _assigned(
        self,
        record: ExchangeRecord,
        result: Assigned,
        client: str | None,
        source: str,
        prints: Fingerprints | None,
        responses: bool,
        chosen: str | None = None,
    ) -> None:
        """The request's session is decided: on the record, and its event."""
        session_id, seq, kind, from_seq, parent, _ = result
        counts = self._counts
        if client is not None and kind != "fork" and session_id == client:
            counts["client_ids"] += 1
        record.session_id = session_id
        record.seq = seq
        if self._shared is None and (prints is not None or responses):
            self._add_pending(record, _Pending(session_id, seq, prints, responses, None))
        if kind == "continue":
            counts["continued"] += 1
            return
        if kind == "start":
            counts["started"] += 1
            event = self._event("session_start", record, session_id, 1)
            if chosen is not None and session_id == client:
                event["client_session_id"] = chosen
        else:
            counts["forked"] += 1
            event = self._event("fork", record, session_id, seq)
            event["from_seq"] = from_seq
            event["parent_session"] = parent
            event["reason"] = FORK_REASON
        event["id_source"] = source
        self._publish(StoredEvent(event))

    def _add_pending(self, record: ExchangeRecord, entry: _Pending) -> None:
        pending = self._pending
        pending[record] = entry
        if len(pending) > MAX_PENDING:
            del pending[next(iter(pending))]

    # -- the shared state ([state] store = redis) -----------------------------

    def _queue(self, op: AssignOp | RecordOp) -> None:
        self._ops.append(op)
        if self._sending is None and self._send_call is None:
            self._send_call = self._clock.callLater(0, self._send)

    def _send(self) -> None:
        """Send the operations queued (a batch at most), one batch at a time: a
        record may name an assignment, whose result is then known or decided
        earlier in the same batch (else the record is parked on it)."""
        self._send_call = None
        shared = self._shared
        while self._sending is None and self._ops and shared is not None:
            ops = self._batch()
            if not ops:
                continue
            if not shared.usable:
                self._settle(ops, "not connected")
                continue
            self._counts["shared_batches"] += 1
            d = self._sending = shared.apply(ops)
            d.addCallbacks(
                self._applied, self._not_applied, callbackArgs=(ops,), errbackArgs=(ops,)
            )

    def _batch(self) -> list[AssignOp | RecordOp]:
        """The next batch: up to ``MAX_BATCH`` queued operations, without those
        that need an assignment decided first (parked on it): a record of a
        reply whose assignment is still looking for its history, and a next
        turn continuing from such a reply (it is asked after that record)."""
        queued = self._ops
        batch: list[AssignOp | RecordOp] = []
        taken: set[AssignOp] = set()
        hurrying = self._hurrying
        at = 0
        while at < len(queued) and len(batch) < MAX_BATCH:
            op = queued[at]
            at += 1
            if isinstance(op, RecordOp):
                assign = op.assign
                if assign is not None and assign.result is None and assign not in taken:
                    self._park(op, assign)
                    continue
            else:
                owner = self._owner(op)
                if owner is not None:
                    self._park(op, owner)
                    continue
                if hurrying:
                    op.wait = False
                taken.add(op)
            batch.append(op)
        del queued[:at]
        return batch

    def _owner(self, op: AssignOp) -> AssignOp | None:
        """The undecided assignment whose reply ``op`` continues from, if any."""
        parked = self._parked_keys
        if parked:
            for key in op.lookups:
                owner = parked.get(key)
                if owner is not None and owner is not op:
                    return owner
        return None

    def _park(self, op: AssignOp | RecordOp, on: AssignOp) -> None:
        self._held.setdefault(on, _Held()).parked.append(op)
        if isinstance(op, RecordOp):
            for key in op.keys:
                self._parked_keys[key] = on

    def _missed(self, op: AssignOp) -> None:
        """``op`` (asked with ``wait``) found no recorded history: asked again
        later, after the reply it continues from when that is parked here, else
        after a delay that doubles each time; once ``continuation_wait`` is over,
        asked without waiting (a new session when there is still none)."""
        held = self._held.setdefault(op, _Held())  # rare: a continuation waiting
        now = self._clock.seconds()
        if held.deadline is None:
            held.deadline = now + self._continuation_wait
            self._counts["continuations_waited"] += 1
        owner = self._owner(op)
        if owner is not None:
            self._park(op, owner)
            return
        remaining = held.deadline - now
        if remaining <= held.delay or self._hurrying:
            op.wait = False
            delay = max(0.0, remaining) if not self._hurrying else 0.0
        else:
            delay = held.delay
            held.delay = min(2 * held.delay, MAX_REASK)
        held.call = self._clock.callLater(delay, self._ask_again, op)

    def _ask_again(self, op: AssignOp) -> None:
        held = self._held.get(op)
        if held is not None:
            held.call = None
        if self._hurrying:
            op.wait = False
        self._queue(op)

    def _hurry(self) -> bool:
        """Stopping: the continuations waiting to be asked again are asked now,
        without waiting.  False when there was none (nothing to send)."""
        hurried = False
        for op, held in list(self._held.items()):
            call = held.call
            if call is not None and call.active():
                call.cancel()
                held.call = None
                op.wait = False
                self._ops.append(op)
                hurried = True
        return hurried

    def _release(self, op: AssignOp) -> None:
        """``op`` is decided: what was parked on it is queued again, in order."""
        held = self._held.pop(op, None)
        if held is None:
            return
        if held.call is not None and held.call.active():
            held.call.cancel()
        if held.deadline is not None and op.result is not None and op.result[2] == "start":
            self._counts["continuations_not_found"] += 1
        now = self._clock.seconds()
        parked_keys = self._parked_keys
        for parked in held.parked:
            if isinstance(parked, RecordOp):
                for key in parked.keys:
                    if parked_keys.get(key) is op:
                        del parked_keys[key]
            else:
                mine = self._held.get(parked)
                if mine is not None and mine.deadline is not None and now >= mine.deadline:
                    parked.wait = False
            self._queue(parked)

    def _applied(self, _: object, ops: list[AssignOp | RecordOp]) -> None:
        self._sending = None
        if self._health is not None:
            self._health.succeeded("sessions")
        self._settle(ops, None)
        self._send()

    def _not_applied(self, failure: Failure, ops: list[AssignOp | RecordOp]) -> None:
        self._sending = None
        self._settle(ops, failure.getErrorMessage())
        self._send()

    def _settle(self, ops: list[AssignOp | RecordOp], failed: str | None) -> None:
        """Apply a batch here: what Redis decided (``failed`` None), or, when it
        did not answer, decide here (fail open: this process's own state)."""
        if failed is not None:
            self._counts["local_fallbacks"] += len(ops)
            if self._health is not None:
                self._health.failed("sessions", "local", failed)
        for op in ops:
            try:
                if isinstance(op, AssignOp):
                    if failed is None and op.missed:
                        self._missed(op)
                    else:
                        self._settle_assignment(op, failed is not None)
                else:
                    target = op.target()
                    if target is not None:
                        self._record_locally(op.keys, *target)
                    elif op.assign is not None:
                        self._park(op, op.assign)  # its assignment missed: not applied
            except Exception:
                self._counts["errors"] += 1
                log.failure("session tracker: a shared-state operation failed")

    def _settle_assignment(self, op: AssignOp, here: bool) -> None:
        if here or op.result is None:
            op.result = self._decide_locally(op.lookups, op.client, op.new_id)
        else:
            result = op.result
            self._set_head(result[0], (result[1], result[5]))
        if self._held:
            self._release(op)
        deciding = self._deciding.pop(op, None)
        if deciding is None:
            return
        record = deciding.record
        pending = self._pending.get(record)
        if pending is not None and pending.op is op:
            pending.session_id, pending.seq = op.result[0], op.result[1]
        try:
            self._assigned(
                record,
                op.result,
                op.client,
                deciding.source,
                deciding.prints,
                deciding.responses,
                deciding.chosen,
            )
        finally:
            deciding.waiting.callback(None)

    def _event(
        self, kind: str, record: ExchangeRecord, session_id: str, seq: int
    ) -> dict[str, Any]:
        """A session event's common fields; the caller adds its own after them."""
        ts_ns = epoch_ns(record.started_at)
        return {
            "schema": SCHEMA_VERSION,
            "type": kind,
            "ts": rfc3339_ns(ts_ns),
            "ts_ns": ts_ns,
            "request_id": record.request_id,
            "session_id": session_id,
            "seq": seq,
            "route": record.route,
            "provider": record.provider,
            "upstream_host": record.upstream_host,
            "environment": record.environment,
            "machine": record.machine or machine_id(),
        }

    # -- the end of an exchange ---------------------------------------------------

    def _finished(self, record: ExchangeRecord) -> None:
        pending = self._pending.pop(record, None)
        if pending is None:
            return
        if pending.fingerprints is None and not pending.responses:
            return  # nothing to record (a client id's session)
        status = record.status
        if (
            record.outcome != "ok"
            or status is None
            or not 200 <= status < 300
            or record.response_truncated
        ):
            return
        facts = reply_facts(record)
        keys: list[StateKey] = []
        prints = pending.fingerprints
        if prints is not None:
            message = facts.assistant_message
            if message is not None:
                keys.append(prints.state(reduce_message(message)))
        if pending.responses and facts.merged_json is not None:
            response_id = _valid_id(facts.merged_json.get("id"))
            if response_id:
                tenant = tenant_tag(tenant_namespace(record.tenant, record.request_headers))
                keys.append("r:" + scoped_id(tenant, response_id))
        if not keys:
            return
        op = pending.op
        if self._shared is None or op is None:
            if self._shared is None:
                self._record_locally(keys, pending.session_id, pending.seq)
            else:
                self._queue(RecordOp(keys, pending.session_id, pending.seq, fresh=pending.fresh))
            return
        if op.result is not None:
            self._queue(RecordOp(keys, op.result[0], op.result[1]))
        else:
            self._queue(RecordOp(keys, assign=op))

    def _record_locally(
        self, keys: Sequence[StateKey], session_id: str, seq: int, fresh: bool = False
    ) -> None:
        """A :class:`RecordOp` on this process's maps."""
        for key in keys:
            self._remember(key, session_id, seq)
        self._counts["states_recorded"] += 1
        head = self._sessions.get(session_id)
        if head is not None:
            if seq > head[_STATE]:
                self._set_head(session_id, (head[_LAST], seq))
        elif fresh:
            self._set_head(session_id, (seq, seq))

    # -- the maps -------------------------------------------------------------

    def _remember(self, key: StateKey, session_id: str, seq: int) -> None:
        states = self._states
        states[key] = (session_id, seq)
        states.move_to_end(key)
        if len(states) > self._max_states:
            states.popitem(last=False)
        if self._store_path is not None:
            self._buffer.append(_state_line(key, session_id, seq))

    def _set_head(self, session_id: str, head: _Head) -> None:
        sessions = self._sessions
        sessions[session_id] = head
        sessions.move_to_end(session_id)
        if len(sessions) > self._max_states:
            sessions.popitem(last=False)
        if self._store_path is not None:
            self._dirty[session_id] = None

    # -- the journal ------------------------------------------------------------

    def flush(self) -> None:
        """Append what changed since the last flush to the journal, or compact it
        when it has grown past twice the live entries.  An I/O error is logged once
        and the next flush rewrites the whole journal from memory."""
        self._flush(in_thread=True)

    def _flush(self, in_thread: bool) -> None:
        path = self._store_path
        if path is None or self._compacting is not None:
            return  # while compacting, changes wait: the old file is being replaced
        try:
            lines = self._buffer
            self._buffer = []
            sessions = self._sessions
            for session_id in self._dirty:
                head = sessions.get(session_id)
                if head is not None:
                    lines.append(_head_line(session_id, head[_LAST], head[_STATE]))
            self._dirty = {}
            live = len(self._states) + len(sessions)
            # The snapshot holds everything the lines say.
            compact = self._rewrite or self._journal_lines + len(lines) > 2 * live + COMPACT_SLACK
            if lines and not compact:
                fd = self._open(path)
                if fd is None:
                    compact = True  # the journal vanished: written whole from memory
                else:
                    _write_all(fd, b"".join(lines))
                    self._journal_lines += len(lines)
                    self._warned.discard("write")  # a later outage is worth a line again
            if compact:
                self._compact(path, in_thread)
        except OSError as e:
            self._rewrite = True
            self._close_fd()
            self._warn("write", "session state {path} not written ({why})", path, e)
        except Exception:
            self._rewrite = True
            self._counts["errors"] += 1
            log.failure("session tracker: flushing the journal failed")

    def _compact(self, path: Path, in_thread: bool) -> None:
        """Rewrite the journal from a snapshot of memory (heads, then states, oldest
        first, so a reload rebuilds the same LRU order)."""
        heads = [(sid, h[_LAST], h[_STATE]) for sid, h in self._sessions.items()]
        states = list(self._states.items())
        self._close_fd()  # appends go to the new file once it is in place

        def write() -> int:
            return _write_journal(path, heads, states)

        if self._run_in_thread is None or not in_thread:
            self._compacted(write())
            return
        self._rewrite = True  # until the new file is in place
        # Set before the work starts: a runner may fire at once, and its callbacks
        # must find (and clear) this.
        waiting: Deferred[None] = Deferred()
        self._compacting = waiting
        try:
            done = self._run_in_thread(write)
        except Exception:
            self._compacting = None
            raise
        done.addCallbacks(self._compacted, self._compaction_failed).chainDeferred(waiting)

    def _compacted(self, lines: int) -> None:
        self._compacting = None
        self._journal_lines = lines
        self._rewrite = False
        self._warned.discard("write")

    def _compaction_failed(self, failure: Failure) -> None:
        self._compacting = None
        self._rewrite = True
        if isinstance(failure.value, OSError) and self._store_path is not None:
            self._warn(
                "write", "session state {path} not written ({why})", self._store_path, failure.value
            )
            return
        self._counts["errors"] += 1
        log.failure("session tracker: compacting the journal failed", failure=failure)

    def _open(self, path: Path) -> int | None:
        """The journal's descriptor for appending, or None when the journal is
        not where it was (moved, deleted, its directory removed: appending would
        leave a file without what came before)."""
        fd = self._fd
        if fd is not None:
            reason = displaced(path, fd, self._identity)
            if reason is None:
                return fd
            self._close_fd()
        else:
            opened = open_append(path, 0o600)
            self._fd, self._identity = opened.fd, opened.identity
            if opened.size or not self._journal_lines:
                return opened.fd
            reason = "emptied"
        log.info(
            "session state {path}: the journal was {reason}; rewriting it from memory",
            path=str(path),
            reason=reason,
        )
        return None

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    def _load(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            self._rewrite = True
            self._warn("read", "session state {path} not read, starting empty ({why})", path, e)
            return
        lines = data.splitlines()
        bad = 0
        for line in lines:
            if not self._replay(line):
                bad += 1
        # The loaded entries are journaled already; only a torn or foreign line
        # calls for a rewrite.
        self._dirty = {}
        self._buffer = []
        self._journal_lines = len(lines)
        if bad:
            self._rewrite = True
            log.warn(
                "session state {path}: {bad} unreadable lines skipped", path=str(path), bad=bad
            )
        log.info(
            "session state: {states} states, {sessions} sessions from {path}",
            states=len(self._states),
            sessions=len(self._sessions),
            path=str(path),
        )

    def _replay(self, line: bytes) -> bool:
        if not line.strip():
            return True
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(entry, dict):
            return False
        session_id = _kept_id(entry.get("s") if "k" in entry else entry.get("h"))
        if session_id is None:
            return False
        if "k" in entry:
            key = entry["k"]
            seq = entry.get("q")
            if not isinstance(key, str) or not isinstance(seq, int):
                return False
            state_key: StateKey
            if key.startswith("r:"):
                state_key = key
            else:
                try:
                    state_key = bytes.fromhex(key)
                except ValueError:
                    return False
            self._remember(state_key, session_id, seq)
            return True
        last, latest = entry.get("n"), entry.get("l")
        if not isinstance(last, int) or not isinstance(latest, int):
            return False
        self._set_head(session_id, (last, latest))
        return True

    def _warn(self, kind: str, text: str, path: Path, error: OSError) -> None:
        if kind in self._warned:
            return
        self._warned.add(kind)
        log.warn(text, path=str(path), why=error.strerror or type(error).__name__)


def _when_done(d: Deferred[None]) -> Deferred[None]:
    """A Deferred firing (with None) after ``d`` fires, leaving ``d``'s result alone."""
    done: Deferred[None] = Deferred()

    def release(result: object) -> object:
        done.callback(None)
        return result

    d.addBoth(release)
    return done


def _state_line(key: StateKey, session_id: str, seq: int) -> bytes:
    text = key.hex() if isinstance(key, bytes) else key
    return orjson.dumps({"k": text, "s": session_id, "q": seq}) + b"\n"


def _head_line(session_id: str, last_seq: int, state_seq: int) -> bytes:
    return orjson.dumps({"h": session_id, "n": last_seq, "l": state_seq}) + b"\n"


def _write_journal(
    path: Path,
    heads: list[tuple[str, int, int]],
    states: list[tuple[StateKey, tuple[str, int]]],
) -> int:
    """Write a whole journal next to ``path`` and rename it over; the line count.
    Reads only its arguments (immutable values), so it may run in a thread."""
    lines = [_head_line(sid, last, latest) for sid, last, latest in heads]
    lines.extend(_state_line(key, sid, seq) for key, (sid, seq) in states)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, b"".join(lines))
        os.fsync(fd)  # the rename must not publish an empty file after a crash
    finally:
        os.close(fd)
    os.replace(temporary, path)
    return len(lines)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
