"""The Lunary sink (tests: tests/unit/export/sinks/test_lunary.py).

One batch becomes one ``POST {endpoint}/v1/runs/ingest`` with
``Authorization: Bearer <project public key>`` and the body
``{"events": [...]}`` (a bare array is not read: Lunary takes ``body.events``).

Only ``response`` events produce output: they are self-contained, so each one
becomes a whole run — a ``start`` event (model, input messages, params, user,
tags, metadata: the proxy's cost of the answer among them, ``cost_usd``,
``cost_input_usd``, ``cost_output_usd``, ``cost_source``) and then an ``end``
event (output message, token usage) or, when
the exchange failed (outcome not ``ok`` or HTTP status 400 and up), an ``error``
event.  ``request`` events (and session events) are delivered trivially: nothing
is sent for them, and a batch of nothing else is ``Delivered`` without a request.

The run id is a UUID derived from the request id (``uuid5``), so a batch sent
again yields the same runs.  Lunary refuses a second ``start`` for a run it
already has ("Run with this ID already exists"); after a retried batch that is
the expected answer for runs the first attempt stored, so that one error counts
as success.

Lunary answers 200 with one ``{id, success, error}`` result per event (``id`` is
the run id; results follow Lunary's processing order, by timestamp, not ours).
A failed start/end/error fails its canonical event: ``Delivered(rejected=...)``
with Lunary's error text.  401 (unknown project) and 402 (a key that is not a
project id) are permanent, like any 4xx; 429 and 5xx are retried.  The key never
appears in a verdict.

The answer is read up to ``RESULT_BYTES`` per Lunary event sent, beyond the
sinks' ``ANSWER_LIMIT``: a batch's results are read whole (1000 exchanges are
2000 events: ~120 KB of results, ~180 KB when every start says its run already
exists), and a receiver cannot make the daemon hold more than the batch's size
allows (~1 MB for those 1000).

NUL characters.  Postgres refuses ``\\u0000`` in text and jsonb, and Lunary
stores input, output and metadata in jsonb: one NUL in a prompt would fail its
start, and so its run.  Every NUL in what is sent (input, output, params,
metadata, user id, error text; keys included) is replaced by U+FFFD; the run's
metadata says how many (``nul_replaced``), and :attr:`LunarySink.nul_replaced`
counts them all.

A start that fails.  Lunary takes a batch's events one at a time, and before an
``llm`` ``end`` whose run it does not have, it waits 5 s and looks again
(``registerRunEvent`` in lunary-ai/lunary ``packages/backend/src/api/v1/runs/
ingest.ts``): each run whose start failed delays the answer by 5 s, so a batch
with a few of them can outlast ``timeout``, and sent again the same way, would
time out again, for ever.  So a batch whose attempt got no answer (a timeout, a
connection lost) is sent again in two steps: its starts, then the ends (or
errors) of the runs Lunary stored or already had.  Lunary never waits in either
step; a run whose start failed is dead-lettered with the start's error.  This
costs one more request only for such a retried batch.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import orjson
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmproxy.config.model import ExporterSettings
from llmproxy.events.facts import chunk_texts, facts_of, response_text
from llmproxy.export.sink import ANSWER_LIMIT, EncodedBatch, checked_endpoint
from llmproxy.export.sinks import exchange
from llmproxy.export.sinks.exchange import (
    PlannedBatch,
    exchange_ns,
    json_default,
    message_of,
    nonempty_str,
    request_json,
)
from llmproxy.export.verdict import Delivered, Rejected, Retry, Verdict
from llmproxy.interfaces import HTTPClient

__all__ = [
    "DEFAULT_ENDPOINT",
    "DUPLICATE_RUN",
    "INGEST_PATH",
    "MAX_ERROR_CHARS",
    "MAX_SPLIT_RUNS",
    "METADATA_FIELDS",
    "NUL_REPLACEMENT",
    "PARAM_KEYS",
    "RESULT_BYTES",
    "RUN_ID_NAMESPACE",
    "LunarySink",
    "ingest_url",
    "run_id",
]

log = Logger()

DEFAULT_ENDPOINT = "https://api.lunary.ai"
INGEST_PATH = "/v1/runs/ingest"
# Fixed forever: changing it would give every exchange a new run id.
RUN_ID_NAMESPACE = uuid.UUID("6f1d7f52-8a3b-5c1e-9d47-2b0c3e5a7f10")
# Lunary's answer to a start for a run it already stored (a batch sent again).
DUPLICATE_RUN = "Run with this ID already exists"

# Request keys that are model parameters (Lunary's ``params``/``extra``).
PARAM_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "stop",
    "stop_sequences",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning_effort",
    "reasoning",
    "thinking",
    "stream",
)
# Event fields copied into Lunary's ``metadata`` (it keeps top-level scalars only).
METADATA_FIELDS = (
    "request_id",
    "upstream_request_id",
    "session_id",
    "seq",
    "route",
    "token_id",
    "project",
    "provider",
    "upstream_host",
    "method",
    "path",
    "status",
    "outcome",
    "cache_status",
    "cache_key",
    "cache_age_s",
    "is_stream",
    "duration_ms",
    "ttfb_ms",
    "environment",
    "machine",
)
MAX_ERROR_CHARS = 2000
# The answer read per Lunary event sent: a result is {"id", "success", "error"},
# ~60 bytes, ~120 with the duplicate-run error; the rest is room for longer errors.
RESULT_BYTES = 512
# What a NUL character becomes: Postgres refuses NUL in text and jsonb.
NUL_REPLACEMENT = "\ufffd"
# Run ids of batches sent again in two steps, at most this many remembered.
MAX_SPLIT_RUNS = 65536


def ingest_url(endpoint: str) -> str:
    """The ingest URL for a Lunary base URL, unless the endpoint already names it."""
    base = endpoint.rstrip("/")
    return base if base.endswith(INGEST_PATH) else base + INGEST_PATH


def run_id(request_id: str) -> str:
    """The Lunary run id of an exchange: stable across retries and restarts."""
    return str(uuid.uuid5(RUN_ID_NAMESPACE, request_id))


@attrs.frozen
class _Run:
    """One exchange of the batch, as the Lunary events it becomes (a start, then
    an end or an error), and the NUL characters replaced in them."""

    index: int
    run_id: str
    events: tuple[dict[str, Any], ...]
    nul_replaced: int = 0


@attrs.frozen
class _Plan:
    """What a batch becomes: the runs to send, and events that could not be encoded."""

    source: Sequence[dict[str, Any]]
    runs: tuple[_Run, ...]
    unencodable: Mapping[int, str]
    batch: EncodedBatch

    def verdict(self, answer: Verdict) -> Verdict:
        """Lunary's per-run results, mapped back to the batch's indexes."""
        if not isinstance(answer, Delivered):
            return answer
        rejected = dict(self.unencodable)
        if isinstance(answer, _RunResults):
            for run in self.runs:
                error = answer.failures.get(run.run_id)
                if error is None and run.run_id not in answer.seen:
                    error = "Lunary returned no result for this run"
                if error is not None:
                    rejected[run.index] = error
        return Delivered(rejected=rejected)


class _PlannedBatch(PlannedBatch[_Plan]):
    """A batch with its plan, so ``encode`` does not build it twice."""


@attrs.frozen
class _RunResults(Delivered):
    """A 200 from Lunary before it is mapped to batch indexes: the error of each
    failed run id, and every run id a result was given for."""

    failures: Mapping[str, str] = attrs.field(factory=dict)
    seen: frozenset[str] = frozenset()


@attrs.frozen
class _AnsweredRetry(Retry):
    """A retryable HTTP answer (429, 5xx): Lunary did not take the batch, so it
    is sent again as it was.  Only a retry without an answer splits the batch."""


@attrs.define(kw_only=True)
class LunarySink(exchange.BearerSink):
    """Sends exchanges to Lunary as ``llm`` runs.  Build it with :meth:`from_settings`."""

    # Run ids whose batch got no answer: sent again in two steps (module docstring).
    _split: OrderedDict[str, None] = attrs.field(factory=OrderedDict, init=False, repr=False)
    _nul_replaced: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self.url = ingest_url(self.url)
        super().__attrs_post_init__()

    @classmethod
    def from_settings(
        cls, settings: ExporterSettings, *, client: HTTPClient, clock: IReactorTime
    ) -> LunarySink:
        """A sink for one ``[exporter:NAME]`` section of ``type = lunary``.

        ``endpoint`` is Lunary's base URL (default ``https://api.lunary.ai``; a
        self-hosted one, or a URL already ending in ``/v1/runs/ingest``);
        ``api_key`` is the project's public key, a UUID; ``headers`` are extra
        HTTP headers (a gateway in front of a self-hosted Lunary).
        """
        where = f"exporter:{settings.name}"
        endpoint = checked_endpoint(
            where, settings.endpoint or DEFAULT_ENDPOINT, "the Lunary API", "api_key"
        )
        if not settings.api_key:
            raise ValueError(f"{where}: api_key (the Lunary project's public key) is required")
        try:
            uuid.UUID(settings.api_key)
        except ValueError:
            # Lunary reads the bearer token as the project id and answers 402 to
            # anything that is not a UUID: say so now rather than on every batch.
            raise ValueError(
                f"{where}: api_key must be the Lunary project's public key (a UUID)"
            ) from None
        return cls.keyed(settings, endpoint, client, clock)

    @property
    def nul_replaced(self) -> int:
        """NUL characters replaced in what was sent so far (a batch sent again
        counts again; see the module docstring)."""
        return self._nul_replaced

    # -- deliver -----------------------------------------------------------------

    def deliver(self, events: Sequence[dict[str, Any]]) -> Deferred[Verdict]:
        try:
            plan = self._plan(events)
        except Exception:
            return fail()  # a bug here, not in one event: the exporter logs and retries
        if not plan.runs:
            return succeed(Delivered(rejected=dict(plan.unencodable)))
        self._count_nul(plan)
        if any(run.run_id in self._split for run in plan.runs):
            return self._deliver_in_two_steps(plan)
        d = super().deliver(_PlannedBatch(plan))
        d.addCallback(self._after_one_request, plan)
        d.addCallback(plan.verdict)
        return d

    def _after_one_request(self, verdict: Verdict, plan: _Plan) -> Verdict:
        if isinstance(verdict, _AnsweredRetry):
            return Retry(verdict.reason, verdict.after)
        if isinstance(verdict, Retry):
            # No answer: Lunary may still be working through it, waiting 5 s per
            # run whose start failed.  The next attempt goes in two steps.
            for run in plan.runs:
                self._split[run.run_id] = None
                self._split.move_to_end(run.run_id)
            while len(self._split) > MAX_SPLIT_RUNS:
                self._split.popitem(last=False)
        return verdict

    def _deliver_in_two_steps(self, plan: _Plan) -> Deferred[Verdict]:
        """The starts, then the ends and errors of the runs Lunary has: no end
        ever names a missing run, so Lunary never waits."""
        d = self.post(self._encoded([run.events[0] for run in plan.runs]))

        def after_starts(verdict: Verdict) -> Verdict | Deferred[Verdict]:
            if not isinstance(verdict, _RunResults):
                return _plain(verdict)
            stored = [
                run
                for run in plan.runs
                if run.run_id in verdict.seen and run.run_id not in verdict.failures
            ]
            if not stored:
                return finish(verdict)
            second = self.post(self._encoded([event for run in stored for event in run.events[1:]]))
            return second.addCallback(after_ends, verdict)

        def after_ends(verdict: Verdict, starts: _RunResults) -> Verdict:
            if not isinstance(verdict, _RunResults):
                return _plain(verdict)
            failures = dict(starts.failures)
            for rid, error in verdict.failures.items():
                failures[rid] = f"{failures[rid]}; {error}" if rid in failures else error
            return finish(_RunResults(failures=failures, seen=starts.seen))

        def finish(results: _RunResults) -> Verdict:
            for run in plan.runs:
                self._split.pop(run.run_id, None)
            return plan.verdict(results)

        d.addCallback(after_starts)
        return d

    def _count_nul(self, plan: _Plan) -> None:
        replaced = sum(run.nul_replaced for run in plan.runs)
        if replaced:
            if not self._nul_replaced:
                log.info(
                    "exporter {name}: replaced NUL characters (Postgres refuses them) in what "
                    "goes to Lunary; each run's metadata nul_replaced says how many",
                    name=self.name,
                )
            self._nul_replaced += replaced

    # -- encode ------------------------------------------------------------------

    def encode(self, events: Sequence[dict[str, Any]]) -> EncodedBatch:
        if isinstance(events, _PlannedBatch):
            return events.plan.batch
        return self._plan(events).batch

    def _plan(self, events: Sequence[dict[str, Any]]) -> _Plan:
        runs: list[_Run] = []
        unencodable: dict[int, str] = {}
        body: list[dict[str, Any]] = []
        for index, event in enumerate(events):
            if event.get("type") != "response":
                continue
            try:
                run = _run_of(index, event)
            except Exception as e:
                # One odd event must not hold the batch back for ever.
                unencodable[index] = f"could not encode for Lunary ({type(e).__name__})"
                continue
            runs.append(run)
            body.extend(run.events)
        batch = self._encoded(body) if runs else EncodedBatch(body=b"", headers={})
        return _Plan(events, tuple(runs), unencodable, batch)

    def _encoded(self, body: list[dict[str, Any]]) -> EncodedBatch:
        """One ingest request for these Lunary events."""
        return EncodedBatch(
            body=orjson.dumps({"events": body}, default=json_default),
            headers=dict(self._headers),
            answer_limit=ANSWER_LIMIT + RESULT_BYTES * len(body),
        )

    # -- judge -------------------------------------------------------------------

    def judge(self, status: int, headers: dict[str, str], body: bytes) -> Verdict:
        text = self._redact(body.decode("utf-8", errors="replace").strip())
        if status == 200:
            return self._results(text)
        message = message_of(text)[:500]
        if status in (401, 402, 403):
            # 401: no project with this key; 402: the key is not a project id.
            return Rejected(f"HTTP {status}: {message} (check api_key: the project's public key)")
        verdict = super().judge(status, headers, body)
        if isinstance(verdict, Retry):
            reason = f"HTTP {status}: {message}" if message else verdict.reason
            return _AnsweredRetry(reason, verdict.after)
        if isinstance(verdict, Rejected):
            return Rejected(f"HTTP {status}: {message}")
        return verdict

    def _results(self, text: str) -> Verdict:
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            doc = None
        results = doc.get("results") if isinstance(doc, dict) else None
        if not isinstance(results, list):
            # Not Lunary (a gateway's page?): nothing says the runs were stored.
            return Rejected(f"HTTP 200 without per-event results: {text[:300]}")
        failures: dict[str, str] = {}
        seen: set[str] = set()
        for result in results:
            if not isinstance(result, dict) or not isinstance(result.get("id"), str):
                continue
            rid = result["id"]
            seen.add(rid)
            if result.get("success") is True:
                continue
            error = result.get("error")
            error = error if isinstance(error, str) and error else "failed (no error text)"
            if DUPLICATE_RUN in error:
                continue  # stored by an earlier attempt of this batch
            previous = failures.get(rid)
            failures[rid] = error if previous is None else f"{previous}; {error}"
        return _RunResults(
            failures={k: v[:MAX_ERROR_CHARS] for k, v in failures.items()}, seen=frozenset(seen)
        )

    def _redact(self, text: str) -> str:
        """An error body could echo our request: our key never reaches a reason."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


def _plain(verdict: Verdict) -> Verdict:
    """A verdict as the exporter sees it (no private subclass)."""
    if isinstance(verdict, _AnsweredRetry):
        return Retry(verdict.reason, verdict.after)
    return verdict


# -- building the Lunary events --------------------------------------------------------


def _run_of(index: int, event: dict[str, Any]) -> _Run:
    request_id = str(event.get("request_id") or "")
    if not request_id:
        raise ValueError("no request_id")
    rid = run_id(request_id)
    request = request_json(event)
    model = nonempty_str(event.get("model")) or nonempty_str(event.get("request_model"))
    start_ns, end_ns = exchange_ns(event)
    start: dict[str, Any] = {
        "type": "llm",
        "event": "start",
        "runId": rid,
        "timestamp": _iso_ms(start_ns),
        "input": _input_of(event, request),
        "tags": _tags_of(event),
        "metadata": {
            k: v for k in METADATA_FIELDS if isinstance(v := event.get(k), str | int | float | bool)
        },
    }
    cost = event.get("cost")
    if isinstance(cost, dict):
        # Lunary prices runs itself from its own table; ours (negotiated prices
        # included) goes in the metadata, which keeps top-level scalars only.
        for key, field in (
            ("cost_usd", "total"),
            ("cost_input_usd", "input"),
            ("cost_output_usd", "output"),
            ("cost_source", "source"),
        ):
            value = cost.get(field)
            if isinstance(value, str | int | float) and not isinstance(value, bool):
                start["metadata"][key] = value
    if model:
        start["name"] = model
    if request is not None:
        params = {k: request[k] for k in PARAM_KEYS if k in request}
        if params:
            start["params"] = params
        user = exchange.user_of(request)
        if user:
            start["userId"] = user
    status = event.get("status")
    failed = event.get("outcome") != "ok" or (isinstance(status, int) and status >= 400)
    end: dict[str, Any] = {"type": "llm", "runId": rid, "timestamp": _iso_ms(end_ns)}
    if model:
        end["name"] = model
    if failed:
        end["event"] = "error"
        end["error"] = {"message": _error_message(event)}
    else:
        end["event"] = "end"
        output = _output_of(event)
        if output is not None:
            end["output"] = output
        usage = _tokens_usage(event.get("usage"))
        if usage:
            end["tokensUsage"] = usage
    if not _may_hold_nul(event):
        return _Run(index, rid, (start, end))
    start, in_start = _without_nul(start)
    end, in_end = _without_nul(end)
    if in_start + in_end:
        start["metadata"] = {**start["metadata"], "nul_replaced": in_start + in_end}
    return _Run(index, rid, (start, end), in_start + in_end)


def _may_hold_nul(event: dict[str, Any]) -> bool:
    """Whether the captured texts hold a NUL, raw or as a JSON escape (a cheap
    look at the few strings everything sent comes from)."""
    texts = [event.get("error")]
    for field in ("request_body", "response_body"):
        body = event.get(field)
        texts.append(body.get("text") if isinstance(body, dict) else None)
    texts.extend(chunk_texts(event) or ())
    return any(isinstance(t, str) and ("\x00" in t or "\\u0000" in t) for t in texts)


def _without_nul(value: Any) -> tuple[Any, int]:
    """``value`` with every NUL (in strings and keys) replaced, and how many were."""
    if isinstance(value, str):
        n = value.count("\x00")
        return (value.replace("\x00", NUL_REPLACEMENT), n) if n else (value, 0)
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        total = 0
        for key, item in value.items():
            key, n_key = _without_nul(key)
            item, n_item = _without_nul(item)
            out[key] = item
            total += n_key + n_item
        return (out, total) if total else (value, 0)
    if isinstance(value, list):
        items = [_without_nul(item) for item in value]
        total = sum(n for _, n in items)
        return ([item for item, _ in items], total) if total else (value, 0)
    return value, 0


def _text_of(content: Any) -> Any:
    """Anthropic's ``system`` as blocks becomes its text; anything else stays as sent."""
    if isinstance(content, list) and all(
        isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        for b in content
    ):
        return "\n".join(b["text"] for b in content)
    return content


def _input_of(event: dict[str, Any], request: dict[str, Any] | None) -> Any:
    """The prompt as chat messages: OpenAI ``messages``, Anthropic ``system`` +
    ``messages``, Responses ``instructions`` + ``input``, legacy ``prompt``."""
    if request is None:
        body = event.get("request_body")
        text = body.get("text") if isinstance(body, dict) else None
        if isinstance(text, str) and text:
            return text  # not JSON, or cut at the capture cap
        return None
    messages: list[Any] = []
    system = request.get("system")
    instructions = request.get("instructions")
    for preamble in (system, instructions):
        if preamble:
            messages.append({"role": "system", "content": _text_of(preamble)})
    if isinstance(request.get("messages"), list):
        return messages + request["messages"]
    source = request.get("input", request.get("prompt"))
    if isinstance(source, str):
        return [*messages, {"role": "user", "content": source}]
    if isinstance(source, list):
        if all(isinstance(m, dict) and "role" in m for m in source):
            return messages + source
        return [*messages, {"role": "user", "content": source}]
    return request


def _output_of(event: dict[str, Any]) -> Any:
    facts = facts_of(event)
    if facts.assistant_message is not None:
        return facts.assistant_message
    if facts.merged_json is not None:
        return None  # embeddings and such: no message, and vectors are no output to show
    body = event.get("response_body")
    if isinstance(body, dict) and body.get("base64"):
        return None
    text = response_text(event)
    return text or None


def _tokens_usage(usage: Any) -> dict[str, int]:
    if not isinstance(usage, dict):
        return {}
    out: dict[str, int] = {}
    for ours, theirs in (
        ("input_tokens", "prompt"),
        ("output_tokens", "completion"),
        ("cache_read_tokens", "promptCached"),
    ):
        value = usage.get(ours)
        if isinstance(value, int) and not isinstance(value, bool):
            out[theirs] = value
    return out


def _tags_of(event: dict[str, Any]) -> list[str]:
    tags = ["llmproxy"]
    for field in ("route", "environment"):
        value = event.get(field)
        if isinstance(value, str) and value and value not in tags:
            tags.append(value)
    return tags


def _error_message(event: dict[str, Any]) -> str:
    """``HTTP 429: Rate limit reached`` / ``timeout: no answer in 300s``: the
    status or outcome, and the upstream's own error message when it gave one."""
    outcome = nonempty_str(event.get("outcome")) or "error"
    status = event.get("status")
    head = f"HTTP {status}" if isinstance(status, int) and status >= 400 else outcome
    detail = nonempty_str(event.get("error")) or _upstream_error(event)
    message = f"{head}: {detail}" if detail else head
    return message[:MAX_ERROR_CHARS]


def _upstream_error(event: dict[str, Any]) -> str | None:
    text = response_text(event)
    if not text:
        return None
    message = message_of(text)
    return message[:MAX_ERROR_CHARS] or None


def _iso_ms(ns: int) -> str:
    """ISO 8601 with milliseconds, as JavaScript's ``Date`` writes and reads it
    (Lunary parses timestamps with ``new Date()``)."""
    second, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + f".{rest // 1_000_000:03d}Z"
