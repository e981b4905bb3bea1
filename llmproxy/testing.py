"""Test doubles for people who extend llmproxy, as ``treq.testing`` is for treq's
users (tests: tests/unit/test_testing.py; the project's own tests use them too).

- ``ScriptedSink``: a ``Sink`` that records every batch the delivery engine hands
  it and answers each with the verdict the test gives, at once from a script or
  later by hand.  Drive a ``BatchingExporter`` with it (and a
  ``twisted.internet.task.Clock``) to see what your settings do with retries,
  spooling and order without a backend.
- ``RecordingEventSink``: an ``EventSink`` for the proxy's request path that keeps
  the exchange records instead of making events of them, for tests of the proxy
  (a new route, an access policy) that look at what was recorded.
- ``older_chunk_shape``: a ``response`` event with its stream in the shape an
  earlier version wrote (a dict per read), which events waiting in spools,
  dead-letter files and Redis streams still have after an upgrade: a sink reads
  both, and a test can check that it gives the same for each.

A new sink is tested against a fake of its backend (``treq.testing.StubTreq``
over a ``twisted.web`` resource); these doubles are for the code around sinks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, succeed

from llmproxy.export.verdict import Delivered, Verdict

if TYPE_CHECKING:
    from llmproxy.capture.record import ExchangeRecord

__all__ = ["RecordingEventSink", "ScriptedSink", "older_chunk_shape"]


@attrs.define(eq=False)
class ScriptedSink:
    """Records batches; answers them from ``script`` (in order), or, once the
    script is used up, with ``then`` (``None``: the Deferred stays unanswered
    until :meth:`answer`)."""

    name: str = "scripted"
    script: deque[Verdict] = attrs.field(factory=deque, converter=deque)
    then: Verdict | None = attrs.field(factory=Delivered)
    batches: list[list[dict[str, Any]]] = attrs.field(factory=list)
    closed: int = 0
    _pending: deque[Deferred[Verdict]] = attrs.field(factory=deque, init=False)

    def deliver(self, events: Sequence[dict[str, Any]]) -> Deferred[Verdict]:
        self.batches.append(list(events))
        verdict = self.script.popleft() if self.script else self.then
        if verdict is not None:
            return succeed(verdict)
        d: Deferred[Verdict] = Deferred()
        self._pending.append(d)
        return d

    def answer(self, verdict: Verdict) -> None:
        """Answer the oldest unanswered batch (the exporter may have cancelled it
        at its deadline: then nothing happens)."""
        d = self._pending.popleft()
        if not d.called:
            d.callback(verdict)

    @property
    def waiting(self) -> int:
        """Batches delivered and not answered yet."""
        return sum(1 for d in self._pending if not d.called)

    def close(self) -> Deferred[None]:
        self.closed += 1
        return succeed(None)

    def delivered(self, key: str) -> list[Any]:
        """``event[key]`` of every event handed over, in order (resends included)."""
        return [event.get(key) for batch in self.batches for event in batch]


@attrs.define(eq=False)
class RecordingEventSink:
    """What the proxy hands to capture, kept: the records of started and of finished
    exchanges (and the request bodies as the proxy passed them)."""

    enabled: bool = True
    # Up to which size the proxy reads back a body the capture cut short (a
    # session tracker's bound); 0: never.
    whole_body_bytes: int = 0
    started: list[ExchangeRecord] = attrs.field(factory=list)
    bodies: list[bytes] = attrs.field(factory=list)
    finished: list[ExchangeRecord] = attrs.field(factory=list)

    def request_started(self, record: ExchangeRecord, body: bytes) -> None:
        self.started.append(record)
        self.bodies.append(body)

    def request_finished(self, record: ExchangeRecord) -> None:
        self.finished.append(record)

    def statuses(self) -> Iterable[int | None]:
        return [record.status for record in self.finished]


def older_chunk_shape(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` (a ``response`` event dict, not changed) as an earlier version
    wrote it: ``response_chunks`` a list of ``{"offset_ms": ..., "data": ...}``,
    one per read, and no ``response_chunk_offsets_ms``.  An event without a
    stream comes back as a copy without the offsets key."""
    older = {key: value for key, value in event.items() if key != "response_chunk_offsets_ms"}
    texts = event.get("response_chunks")
    if isinstance(texts, list):
        offsets = event.get("response_chunk_offsets_ms")
        if not isinstance(offsets, list):
            offsets = [0.0] * len(texts)
        older["response_chunks"] = [
            {"offset_ms": offset, "data": text} for offset, text in zip(offsets, texts, strict=True)
        ]
    return older
