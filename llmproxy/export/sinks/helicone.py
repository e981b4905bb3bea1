"""The Helicone sink (tests: tests/unit/export/sinks/test_helicone.py).

Helicone's async logger takes one exchange per request, ``POST`` to the worker
(``https://api.worker.helicone.ai`` by default; the EU worker
``https://eu.api.worker.helicone.ai`` or a self-hosted one) with
``Authorization: Bearer <Helicone API key>`` and the body::

    {"providerRequest":  {"url": ..., "json": {request}, "meta": {Helicone-* headers}},
     "providerResponse": {"status": ..., "headers": {...}, "json": {response},
                          "textBody": "<raw stream>"?},
     "timing": {"startTime": {"seconds", "milliseconds"},
                "endTime": {"seconds", "milliseconds"}, "timeToFirstToken": ms},
     "provider": "OPENAI" | "ANTHROPIC" | "CUSTOM"}

The worker fixes the provider by the URL, nothing else (Helicone's
``worker/src/routers/api/apiRouter.ts``): an OpenAI exchange goes to
``/oai/v1/log``, an Anthropic one to ``/anthropic/v1/log``, anything else to
``/custom/v1/log``.  Only OpenAI and Anthropic logs are priced and get model
analytics; a ``CUSTOM`` log gets neither.  The provider is the route's
(``provider = openai``/``anthropic``), else the upstream host's
(``api.openai.com``, ``api.anthropic.com``), else the response's shape.  A
self-hosted jawn takes every log at ``/v1/trace/custom/v1/log`` and reads the
top-level ``provider`` field instead, so it is always sent.

Only ``response`` events are sent (they are self-contained); ``request`` and
session events are delivered trivially (a ``fork`` is remembered, see
sessions).  Each exchange maps as follows:

- ``providerRequest.json`` is the request body as the client sent it;
  ``url`` the upstream URL (masked); ``meta`` is read by Helicone as the
  request's headers: ``Helicone-Request-Id`` (a UUID derived from the request id,
  so a log sent twice is the same Helicone request), ``Helicone-User-Id``
  (OpenAI ``user`` / Anthropic ``metadata.user_id``), the session headers, and
  ``Helicone-Property-*`` (request id and the provider's, session, seq, route,
  the proxy token's id and project, environment, machine, outcome, cache status,
  key and age, upstream host, the proxy's cost of the answer (``Cost-Usd``,
  ``Cost-Source``; Helicone computes its own cost besides), and the request's
  own string ``metadata``).
  Helicone has no field for an answer from our cache (its cache reference names
  one of its own requests, set by its gateway only).
- Sessions: Helicone's Sessions view reads ``Helicone-Session-Id``,
  ``Helicone-Session-Path`` and ``Helicone-Session-Name``.  A conversation and
  the forks made from it are one Helicone session: the id is the conversation's
  first session id, the path the chain of session ids down to the exchange's
  own (``/<root>`` for the conversation, ``/<root>/<fork>`` for a fork of it;
  learnt from the ``fork`` events the tracker publishes before the fork's
  exchanges, kept for the last ``remember`` sessions), the name the route.
- ``providerResponse``: for a JSON answer, ``json`` is the response object.
  For a stream (the request said ``"stream": true`` and the answer was SSE),
  ``textBody`` is the stream's text as the client got it (up to the capture cap)
  and ``json`` is empty: Helicone's stream processors read token counts from the
  stream and return early, with none, on a JSON body.  When the upstream
  reported no usage Helicone can read (an OpenAI chat stream without
  ``stream_options.include_usage``, a Responses stream, whose usage Helicone's
  OpenAI stream processor does not look for), one ``data:`` line carrying it in
  the shape that processor reads is added at the end: the upstream's usage when
  there was one, else an estimate (text length / 4), marked
  ``llmproxy_usage_estimated``.  A JSON answer without usage gets the same
  estimate in the provider's usage shape, with the same mark; the
  ``Helicone-Property-Usage`` meta says ``upstream`` or ``estimated``.  A body
  that is not JSON goes as ``textBody`` (binary ones as ``base64``), with
  ``json`` an empty object and a ``note`` saying why.
- ``timing`` is the real start and end of the exchange; for streams,
  ``timeToFirstToken`` is the time to the upstream's first byte, in ms.

Batches and verdicts.  One batch is several POSTs, at most ``concurrency`` at a
time.  Per event: 200 ``ok`` is delivered; 400 and other 4xx refuse that event
for good (``Delivered(rejected=...)``); 401/403 refuse the whole batch (a bad
key fails every event alike, so sending stops at the first); 408, 429, 5xx, a
200 carrying ``{"error": ...}`` (Helicone could not store the log) and transport
failures are retryable — sending stops, and the verdict is ``Retry`` for the
*whole* batch, even if part of it was delivered.  The exporter only knows
whole-batch retries, and returning ``Delivered`` for a half-sent batch would lose
the rest; re-sending is at-least-once, as everywhere in llmproxy.  Duplicates are
kept rare twice over: the sink remembers the outcome of the events it settled
(a bounded LRU of request ids), so a retried batch sends only what is still
pending; and after a restart, the deterministic ``Helicone-Request-Id`` makes a
re-sent log the same Helicone request.
"""

from __future__ import annotations

import math
import re
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from llmproxy.config.model import ExporterSettings
from llmproxy.events.facts import facts_of, response_text
from llmproxy.events.usage import ResponseFacts
from llmproxy.export.sink import EncodedBatch, HTTPSink, checked_endpoint
from llmproxy.export.sinks import exchange
from llmproxy.export.sinks.exchange import exchange_ns, json_default, message_of
from llmproxy.export.verdict import Delivered, Rejected, Retry, Verdict
from llmproxy.interfaces import HTTPClient

__all__ = ["HeliconeSink", "helicone_request_id", "log_body", "log_url", "log_urls"]

DEFAULT_ENDPOINT = "https://api.worker.helicone.ai"
# The worker's log routes, by the provider each one files its logs under.
WORKER_PATHS = {
    "OPENAI": "/oai/v1/log",
    "ANTHROPIC": "/anthropic/v1/log",
    "CUSTOM": "/custom/v1/log",
}
# A self-hosted jawn's: the provider is read from the body.
JAWN_PATHS = ("/v1/trace/custom/v1/log", "/v1/trace/custom/log")
HELICONE_PROVIDERS = {"openai": "OPENAI", "anthropic": "ANTHROPIC"}
# Fixed forever: changing it would make every re-sent log a new Helicone request.
REQUEST_ID_NAMESPACE = uuid.UUID("0b5c1f4e-3d2a-5e8f-a6b7-c9d0e1f2a3b4")
# Event fields sent as Helicone-Property-<Name>.
PROPERTY_FIELDS = (
    ("request_id", "Request-Id"),
    ("upstream_request_id", "Upstream-Request-Id"),
    ("session_id", "Session-Id"),
    ("seq", "Seq"),
    ("route", "Route"),
    ("token_id", "Token-Id"),
    ("project", "Project"),
    ("environment", "Environment"),
    ("machine", "Machine"),
    ("outcome", "Outcome"),
    ("cache_status", "Cache-Status"),
    ("cache_key", "Cache-Key"),
    ("cache_age_s", "Cache-Age"),
    ("upstream_host", "Upstream-Host"),
)
MAX_USER_PROPERTIES = 20
# Forks of forks: a session path never grows past this many ids (and a cycle of
# remembered parents, which the tracker never makes, cannot loop).
MAX_SESSION_DEPTH = 32
_PROPERTY_NAME = re.compile(r"[^A-Za-z0-9_-]+")
# Request keys whose strings are the prompt (for the usage estimate).
PROMPT_KEYS = ("messages", "system", "instructions", "input", "prompt")
CHARS_PER_TOKEN = 4
# Helicone reads an Anthropic stream with these model names in them (or any
# stream of an Anthropic log) with its Anthropic stream processor.
CLAUDE = "claude"


def log_urls(endpoint: str) -> dict[str, str]:
    """The log URL of each Helicone provider (``OPENAI``, ``ANTHROPIC``,
    ``CUSTOM``) for an endpoint.

    A bare worker URL, or one ending in any of its log routes, gives the three
    routes under the same base (a path before the route is kept: a gateway in
    front).  A self-hosted jawn's ``/v1/trace/custom/v1/log`` (or
    ``/v1/trace/custom/log``) is used as given for all three: jawn reads the
    provider from the body.
    """
    parts = urlsplit(endpoint)
    path = parts.path.rstrip("/")
    if path.endswith(JAWN_PATHS):
        return dict.fromkeys(WORKER_PATHS, endpoint)
    for route in WORKER_PATHS.values():
        if path.endswith(route):
            path = path[: -len(route)]
            break
    base = parts._replace(path=path, query="", fragment="").geturl()
    return {provider: base + route for provider, route in WORKER_PATHS.items()}


def log_url(endpoint: str) -> str:
    """The ``CUSTOM`` log URL of an endpoint (see :func:`log_urls`)."""
    return log_urls(endpoint)["CUSTOM"]


def helicone_request_id(request_id: str) -> str:
    """The ``Helicone-Request-Id`` of an exchange (Helicone request ids are UUIDs)."""
    return str(uuid.uuid5(REQUEST_ID_NAMESPACE, request_id))


@attrs.frozen
class _Unauthorized(Rejected):
    """A 401/403: the key is refused, every event of the batch would be too."""


@attrs.frozen
class _Settled:
    """What became of one event sent earlier: delivered (``reason`` None) or
    refused for good."""

    reason: str | None


@attrs.define
class _BatchOutcome:
    """The verdicts of one batch's events, combined (see the module docstring)."""

    rejected: dict[int, str] = attrs.Factory(dict)
    retry: Retry | None = None
    unauthorized: Rejected | None = None

    @property
    def stop(self) -> bool:
        return self.retry is not None or self.unauthorized is not None

    def add(self, index: int, verdict: Verdict) -> _Settled | None:
        """Record one event's verdict; return what to remember of it, if settled."""
        if isinstance(verdict, _Unauthorized):
            self.unauthorized = self.unauthorized or verdict
            return None
        if isinstance(verdict, Rejected):
            self.rejected[index] = verdict.reason
            return _Settled(verdict.reason)
        if isinstance(verdict, Retry):
            if self.retry is None:
                self.retry = verdict
            elif verdict.after is not None:
                after = max(verdict.after, self.retry.after or 0.0)
                self.retry = Retry(self.retry.reason, after)
            return None
        return _Settled(None)

    def verdict(self) -> Verdict:
        if self.unauthorized is not None:
            return Rejected(self.unauthorized.reason)
        if self.retry is not None:
            return self.retry
        return Delivered(rejected=dict(self.rejected))


@attrs.define
class SessionTree:
    """Which session each fork was made from: the last ``limit`` forks seen."""

    limit: int = 65536
    _parents: OrderedDict[str, str] = attrs.field(factory=OrderedDict, init=False)

    def learn(self, event: dict[str, Any]) -> None:
        """Remember the parent of a ``fork`` event's session."""
        child, parent = event.get("session_id"), event.get("parent_session")
        if isinstance(child, str) and child and isinstance(parent, str) and parent:
            self._parents[child] = parent
            self._parents.move_to_end(child)
            while len(self._parents) > self.limit:
                self._parents.popitem(last=False)

    def chain(self, session: str) -> list[str]:
        """The session ids from the conversation's first session down to ``session``."""
        chain = [session]
        seen = {session}
        parent = self._parents.get(session)
        while parent is not None and parent not in seen and len(chain) < MAX_SESSION_DEPTH:
            chain.append(parent)
            seen.add(parent)
            parent = self._parents.get(parent)
        chain.reverse()
        return chain


@attrs.define(kw_only=True)
class HeliconeSink(exchange.BearerSink):
    """Logs exchanges to Helicone, one POST each.  Build it with :meth:`from_settings`."""

    # POSTs of one batch in flight at once.
    _concurrency: int = 4
    # How many settled events (and forked sessions) are remembered.
    _remember: int = 65536
    _urls_by_provider: dict[str, str] = attrs.field(factory=dict, init=False, repr=False)
    _settled: OrderedDict[tuple[Any, ...], _Settled] = attrs.field(
        factory=OrderedDict, init=False, repr=False
    )
    _sessions: SessionTree = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self._concurrency < 1:
            raise ValueError("helicone concurrency must be at least 1")
        self._urls_by_provider = log_urls(self.url)
        self.url = self._urls_by_provider["CUSTOM"]
        super().__attrs_post_init__()
        self._sessions = SessionTree(self._remember)

    @property
    def urls(self) -> dict[str, str]:
        """The log URL of each Helicone provider."""
        return dict(self._urls_by_provider)

    @classmethod
    def from_settings(
        cls, settings: ExporterSettings, *, client: HTTPClient, clock: IReactorTime
    ) -> HeliconeSink:
        """A sink for one ``[exporter:NAME]`` section of ``type = helicone``.

        ``endpoint`` defaults to the US worker; ``api_key`` (required) is a
        Helicone API key; ``headers`` are extra HTTP headers on every POST.
        """
        where = f"exporter:{settings.name}"
        endpoint = checked_endpoint(
            where, settings.endpoint or DEFAULT_ENDPOINT, "Helicone's log API", "api_key"
        )
        if not settings.api_key:
            raise ValueError(f"{where}: api_key (a Helicone API key) is required")
        return cls.keyed(settings, endpoint, client, clock)

    # -- deliver -----------------------------------------------------------------

    def deliver(self, events: Sequence[dict[str, Any]]) -> Deferred[Verdict]:
        outcome = _BatchOutcome()
        pending: list[tuple[int, tuple[Any, ...], dict[str, Any]]] = []
        for index, event in enumerate(events):
            kind = event.get("type")
            if kind == "fork":
                self._sessions.learn(event)
            if kind != "response":
                continue
            key = _key_of(event)
            earlier = self._settled.get(key) if key[0] else None
            if earlier is not None:
                self._settled.move_to_end(key)
                if earlier.reason is not None:
                    outcome.rejected[index] = earlier.reason
                continue
            pending.append((index, key, event))
        if not pending:
            return succeed(outcome.verdict())
        finished: Deferred[Verdict] = Deferred()
        queue = iter(pending)
        in_flight = 0
        pumping = False

        def pump() -> None:
            # Answers may come synchronously (StubTreq, a failing encode): the loop
            # then continues here instead of recursing once per event.
            nonlocal in_flight, pumping
            if pumping:
                return
            pumping = True
            try:
                while in_flight < self._concurrency and not outcome.stop:
                    item = next(queue, None)
                    if item is None:
                        break
                    index, key, event = item
                    in_flight += 1
                    d = HTTPSink.deliver(self, [event])
                    d.addBoth(settle, index, key)
            finally:
                pumping = False
            if in_flight == 0 and not finished.called:
                finished.callback(outcome.verdict())

        def settle(result: Verdict | Failure, index: int, key: tuple[Any, ...]) -> None:
            nonlocal in_flight
            in_flight -= 1
            if isinstance(result, Failure):
                # Only encode() errbacks (the base turns transport failures into
                # Retry): this one event cannot be sent, ever.
                verdict: Verdict = Rejected(
                    f"could not encode for Helicone ({type(result.value).__name__})"
                )
            else:
                verdict = result
            settled = outcome.add(index, verdict)
            if settled is not None and key[0]:
                self._remember_settled(key, settled)
            pump()

        pump()
        return finished

    def _remember_settled(self, key: tuple[Any, ...], settled: _Settled) -> None:
        self._settled[key] = settled
        self._settled.move_to_end(key)
        while len(self._settled) > self._remember:
            self._settled.popitem(last=False)

    # -- encode ------------------------------------------------------------------

    def encode(self, events: Sequence[dict[str, Any]]) -> EncodedBatch:
        """The log of one exchange (Helicone takes one per request), to the URL
        of its provider."""
        if len(events) != 1:
            raise ValueError("a Helicone log carries exactly one exchange")
        doc = log_body(events[0], self._sessions)
        body = orjson.dumps(doc, default=json_default)
        return EncodedBatch(
            body=body, headers=dict(self._headers), url=self._urls_by_provider[doc["provider"]]
        )

    # -- judge -------------------------------------------------------------------

    def judge(self, status: int, headers: dict[str, str], body: bytes) -> Verdict:
        text = self._redact(body.decode("utf-8", errors="replace").strip())
        message = message_of(text, keys=("error", "message"))[:500]
        if 200 <= status < 300:
            if text.startswith("{"):
                # 200 {"error": ...}: Helicone took the request but could not
                # store it (its database or queue): worth another try.
                try:
                    doc = orjson.loads(text)
                except orjson.JSONDecodeError:
                    doc = None
                if isinstance(doc, dict) and doc.get("error"):
                    return Retry(f"HTTP {status}: Helicone could not store the log: {message}")
            return Delivered()
        if status in (401, 403):
            return _Unauthorized(f"HTTP {status}: {message} (check api_key)")
        verdict = super().judge(status, headers, body)
        if isinstance(verdict, Retry):
            return Retry(f"HTTP {status}: {message}" if message else verdict.reason, verdict.after)
        return Rejected(f"HTTP {status}: {message}")

    def _redact(self, text: str) -> str:
        """An error body could echo our request: our key never reaches a reason."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


def _key_of(event: dict[str, Any]) -> tuple[Any, ...]:
    return (event.get("request_id"), event.get("ts_ns"))


# -- the log body ----------------------------------------------------------------------


def log_body(event: dict[str, Any], sessions: SessionTree | None = None) -> dict[str, Any]:
    """Helicone's ``HeliconeAsyncLogRequest`` for one ``response`` event, with the
    Helicone provider it is filed under (``provider``, also the URL's)."""
    request_id = event.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise ValueError("no request_id")
    request = exchange.request_json(event)
    facts = facts_of(event)
    provider = HELICONE_PROVIDERS.get(_provider_of(event, facts) or "", "CUSTOM")
    response, estimated = _response_part(event, request, facts, provider)
    meta: dict[str, str] = {"Helicone-Request-Id": helicone_request_id(request_id)}
    user = exchange.user_of(request)
    if user:
        meta["Helicone-User-Id"] = user
    meta.update(_session_meta(event, sessions or SessionTree()))
    for field, name in PROPERTY_FIELDS:
        value = event.get(field)
        if value is not None and value != "":
            meta[f"Helicone-Property-{name}"] = str(value)
    if estimated is not None:
        meta["Helicone-Property-Usage"] = "estimated" if estimated else "upstream"
    # Helicone prices the log itself; ours (the ini's negotiated prices included)
    # goes along as a property, to compare and to filter on.
    cost = event.get("cost")
    if isinstance(cost, dict) and isinstance(cost.get("total"), int | float):
        meta["Helicone-Property-Cost-Usd"] = f"{cost['total']:.9f}".rstrip("0").rstrip(".")
        meta["Helicone-Property-Cost-Source"] = str(cost.get("source"))
    body = event.get("response_body")
    if isinstance(body, dict) and body.get("truncated"):
        meta["Helicone-Property-Truncated"] = "true"
    meta.update(_user_properties(request))
    request_json: dict[str, Any]
    if request is not None:
        request_json = request
    else:
        request_json = {"llmproxy_note": "request body not captured as a JSON object"}
        text = _body_text(event.get("request_body"))
        if text:
            request_json["text"] = text
    start_ns, end_ns = exchange_ns(event)
    timing: dict[str, Any] = {"startTime": _seconds_ms(start_ns), "endTime": _seconds_ms(end_ns)}
    ttfb = event.get("ttfb_ms")
    if event.get("is_stream") and isinstance(ttfb, int | float) and not isinstance(ttfb, bool):
        timing["timeToFirstToken"] = max(0, round(ttfb))
    upstream = event.get("upstream_url")
    return {
        "providerRequest": {
            "url": upstream if isinstance(upstream, str) and upstream else str(event.get("path")),
            "json": request_json,
            "meta": meta,
        },
        "providerResponse": response,
        "timing": timing,
        "provider": provider,
    }


def _session_meta(event: dict[str, Any], sessions: SessionTree) -> dict[str, str]:
    """The Sessions headers: a conversation and its forks are one Helicone session."""
    session = event.get("session_id")
    if not isinstance(session, str) or not session:
        return {}
    chain = sessions.chain(session)
    meta = {"Helicone-Session-Id": chain[0], "Helicone-Session-Path": "/" + "/".join(chain)}
    route = event.get("route")
    meta["Helicone-Session-Name"] = route if isinstance(route, str) and route else "llmproxy"
    return meta


def _response_part(
    event: dict[str, Any], request: dict[str, Any] | None, facts: ResponseFacts, provider: str
) -> tuple[dict[str, Any], bool | None]:
    """``providerResponse``, and whether its usage is estimated (None: no usage)."""
    status = event.get("status")
    part: dict[str, Any] = {
        # No status: the upstream never answered (timeout, refused connection).
        "status": status if isinstance(status, int) and not isinstance(status, bool) else 0,
        "headers": _flat_headers(event.get("response_headers")),
    }
    ok = event.get("outcome") == "ok" and isinstance(status, int) and status < 400
    if isinstance(event.get("response_chunks"), list) and _streamed(request):
        return _stream_part(part, event, request, facts, provider, ok)
    merged = facts.merged_json
    if merged is None:
        part["json"] = {}
        body = event.get("response_body")
        b64 = body.get("base64") if isinstance(body, dict) else None
        text = response_text(event)
        if isinstance(b64, str) and b64:
            part["base64"] = b64
            part["note"] = "the response body is not text; it is in base64"
        elif text:
            part["textBody"] = text
            part["note"] = "the response body is not a JSON object; it is in textBody"
        else:
            part["note"] = "no response body was captured"
        return part, None
    merged = dict(merged)
    estimated: bool | None = None
    if facts.usage is not None:
        estimated = False
    elif ok:
        merged["usage"] = _estimated_usage(merged, request, facts)
        merged["llmproxy_usage_estimated"] = True
        estimated = True
    part["json"] = merged
    return part, estimated


def _streamed(request: dict[str, Any] | None) -> bool:
    """Helicone reads the answer as a stream: ``providerRequest.json.stream == true``."""
    return request is not None and request.get("stream") is True


def _stream_part(
    part: dict[str, Any],
    event: dict[str, Any],
    request: dict[str, Any] | None,
    facts: ResponseFacts,
    provider: str,
    ok: bool,
) -> tuple[dict[str, Any], bool | None]:
    """A stream as its text, so Helicone's stream processors read it (see the
    module docstring), with a usage line added where they would find none."""
    text = response_text(event) or ""
    part["json"] = {}
    part["textBody"] = text
    model = str((request or {}).get("model") or "")
    if provider == "ANTHROPIC" or CLAUDE in model:
        # Helicone's Anthropic stream processor reads message_start and
        # message_delta; an Anthropic stream always carries them.
        return part, (False if facts.usage is not None else None)
    if _has_usage_line(text):
        return part, False
    usage = facts.usage
    if usage is not None and usage.input_tokens is not None and usage.output_tokens is not None:
        prompt, completion, estimated = usage.input_tokens, usage.output_tokens, False
    elif ok:
        prompt = _tokens(_prompt_chars(request))
        completion = _tokens(sum(len(s) for s in _strings(facts.assistant_message)))
        estimated = True
    else:
        return part, None
    line = {
        "object": "llmproxy.usage",
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
        "llmproxy_usage_estimated": estimated,
    }
    separator = (
        "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    )
    part["textBody"] = f"{text}{separator}data: {orjson.dumps(line).decode()}\n\n"
    return part, estimated


def _has_usage_line(text: str) -> bool:
    """A ``data:`` line of the stream whose object has a top-level ``usage``, as
    Helicone's OpenAI stream processor looks for (it comes last, so from the end)."""
    for line in reversed(text.split("\n")):
        if '"usage"' not in line or not line.startswith("data:"):
            continue
        try:
            obj = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("usage"):
            return True
    return False


def _estimated_usage(
    merged: dict[str, Any], request: dict[str, Any] | None, facts: ResponseFacts
) -> dict[str, int]:
    prompt = _tokens(_prompt_chars(request))
    completion = _tokens(sum(len(s) for s in _strings(facts.assistant_message)))
    if merged.get("type") == "message":  # Anthropic
        return {"input_tokens": prompt, "output_tokens": completion}
    if merged.get("object") == "response":  # OpenAI Responses
        return {
            "input_tokens": prompt,
            "output_tokens": completion,
            "total_tokens": prompt + completion,
        }
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _prompt_chars(request: dict[str, Any] | None) -> int:
    return sum(len(s) for key in PROMPT_KEYS for s in _strings((request or {}).get(key)))


def _tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def _strings(value: Any) -> list[str]:
    """Every string inside ``value`` except dict keys (message texts, tool args)."""
    out: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(v for k, v in item.items() if k not in ("role", "type", "id"))
        elif isinstance(item, list):
            stack.extend(item)
    return out


def _provider_of(event: dict[str, Any], facts: ResponseFacts) -> str | None:
    provider = event.get("provider")
    if provider in HELICONE_PROVIDERS:
        return str(provider)
    host = str(event.get("upstream_host") or "").split(":")[0]
    for name in HELICONE_PROVIDERS:
        if host == f"api.{name}.com" or host.endswith(f".{name}.com"):
            return name
    merged = facts.merged_json or {}
    if merged.get("type") == "message":
        return "anthropic"
    if str(merged.get("object", "")).startswith(("chat.completion", "text_completion", "response")):
        return "openai"
    return None


def _user_properties(request: dict[str, Any] | None) -> dict[str, str]:
    """The request's own ``metadata`` strings (OpenAI's stored-completion tags)
    as Helicone properties."""
    metadata = request.get("metadata") if request is not None else None
    if not isinstance(metadata, dict):
        return {}
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if key == "user_id" or not isinstance(value, str):
            continue
        name = _PROPERTY_NAME.sub("-", str(key)).strip("-")
        if name:
            out[f"Helicone-Property-{name}"] = value
        if len(out) >= MAX_USER_PROPERTIES:
            break
    return out


def _flat_headers(headers: Any) -> dict[str, str]:
    if not isinstance(headers, dict):
        return {}
    return {
        str(k): ", ".join(map(str, v)) if isinstance(v, list) else str(v)
        for k, v in headers.items()
    }


def _body_text(body: Any) -> str | None:
    text = body.get("text") if isinstance(body, dict) else None
    return text if isinstance(text, str) else None


def _seconds_ms(ns: int) -> dict[str, int]:
    ms = ns // 1_000_000
    return {"seconds": ms // 1000, "milliseconds": ms % 1000}
