"""Properties of the batching exporter under any sequence of sink answers.

An ``HTTPSink`` talks to a scripted client: each request is answered 2xx, 2xx
with some events refused (``Delivered(rejected={index: reason})``: any subset of
the batch, none and all included), 400, 429 with Retry-After, 503, connection
refused, or never (the sink's timeout), in an order hypothesis draws, while the
test publishes, answers and advances the ``Clock`` step by step.  After every step
the accounting identity holds; after close, every accepted event is in exactly
one place (delivered, dead-lettered, spooled, or dropped with a reason), none
twice, and in order with one batch in flight; the dead-letter file holds exactly
the events the sink refused, each once, with the sink's reason.  A restart on the
same spool then delivers what was spooled, in order.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StringStubbingResource, StubTreq
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from llmproxy.config.model import ExporterSettings
from llmproxy.events.envelope import StoredEvent
from llmproxy.export.deadletter import DeadLetter
from llmproxy.export.exporter import BatchingExporter
from llmproxy.export.sink import EncodedBatch, HTTPSink
from llmproxy.export.spool import Spool
from llmproxy.export.verdict import Delivered, Verdict

ANSWERS = ("2xx", "partial", "400", "429", "503", "refused", "timeout")
STATUS = {"2xx": 204, "partial": 200, "400": 400, "429": 429, "503": 503}
PARTS = ("sent", "in_flight", "queued", "spooled", "dead_lettered", "dropped")
WHOLE_BATCH_REFUSED = "HTTP 400: refused for good"
MASK_BITS = 6  # above the largest batch (batch_size <= 5): 0 refuses none, 63 all

# (kind, mask): for "partial", event ``k`` of the batch is refused when bit
# ``k % MASK_BITS`` of the mask is set.
Answer = tuple[str, int]


class JsonSink(HTTPSink):
    def encode(self, events: Sequence[dict[str, Any]]) -> EncodedBatch:
        return EncodedBatch(orjson.dumps(list(events)), {"Content-Type": "application/json"})

    def judge(self, status: int, headers: dict[str, str], body: bytes) -> Verdict:
        # A 2xx with a body lists the events refused for good, by index in the
        # batch, as APIs with per-event results do.
        if 200 <= status < 300 and body:
            rejected = orjson.loads(body)["rejected"]
            return Delivered(rejected={int(k): reason for k, reason in rejected.items()})
        return super().judge(status, headers, body)


@attrs.define
class ScriptedClient:
    """A treq-like client whose requests wait until the test answers them."""

    answers: Sequence[Answer]
    delivered: list[int] = attrs.Factory(list)  # event ids the server accepted, in order
    refused: dict[int, str] = attrs.Factory(dict)  # event id -> the server's reason
    pending: list[tuple[Deferred[Any], Answer, str, dict[str, Any]]] = attrs.Factory(list)
    count: int = 0
    _answer: Answer = ("2xx", 0)

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        answer = self.answers[self.count % len(self.answers)]
        self.count += 1
        d: Deferred[Any] = Deferred()
        self.pending.append((d, answer, url, kwargs))
        return d

    def respond(self) -> None:
        """Answer the oldest request that is still waiting and not meant to hang."""
        for index, (d, answer, url, kwargs) in enumerate(self.pending):
            if d.called:
                continue  # cancelled by the sink's timeout or the exporter's deadline
            if answer[0] == "timeout":
                continue
            del self.pending[index]
            if answer[0] == "refused":
                d.errback(net_error.ConnectionRefusedError())
                return
            self._answer = answer
            stub = StubTreq(StringStubbingResource(self._serve))
            stub.request("POST", url, **kwargs).chainDeferred(d)
            return

    def respond_all(self) -> None:
        for _ in range(len(self.pending)):
            self.respond()

    def _serve(
        self, method: bytes, url: str, params: Any, headers: Any, data: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        kind, mask = self._answer
        status = STATUS[kind]
        ids = [e["i"] for e in orjson.loads(data)]
        if kind == "partial":
            rejected = {
                k: f"event {i} refused" for k, i in enumerate(ids) if mask >> (k % MASK_BITS) & 1
            }
            self.delivered.extend(i for k, i in enumerate(ids) if k not in rejected)
            self.refused.update((ids[k], reason) for k, reason in rejected.items())
            return status, {}, orjson.dumps({"rejected": {str(k): r for k, r in rejected.items()}})
        if 200 <= status < 300:
            self.delivered.extend(ids)
        if status == 400:
            self.refused.update((i, WHOLE_BATCH_REFUSED) for i in ids)
        extra = {"Retry-After": "2"} if status == 429 else {}
        return status, extra, b"refused for good" if status == 400 else b""


def identity(exporter: BatchingExporter) -> dict[str, Any]:
    s = exporter.stats()
    assert s["accepted"] == sum(s[k] for k in PARTS), s
    assert s["dropped"] == sum(s["dropped_by_reason"].values())
    return s


def spooled_ids(directory: Path) -> list[int]:
    spool = Spool(directory, 10**9)
    return [e["i"] for seg in spool.segments() for e in spool.read(seg).events]


def dead_letters(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


exporter_settings = st.fixed_dictionaries(
    {
        "batch_size": st.integers(1, 5),
        "batch_bytes": st.sampled_from([20, 60, 10**6]),
        "buffer": st.integers(1, 8),
        "max_retries": st.integers(0, 3),
        "max_in_flight": st.sampled_from([1, 1, 2, 3]),
    }
)
# Which events of a batch a "partial" answer refuses: none, all, or any subset.
masks = st.one_of(st.sampled_from([0, 2**MASK_BITS - 1]), st.integers(0, 2**MASK_BITS - 1))
answer = st.sampled_from(
    # 2xx weighs more, so long runs of deliveries (and replays) happen too
    ("2xx", "2xx", *ANSWERS)
).flatmap(lambda kind: st.tuples(st.just(kind), masks if kind == "partial" else st.just(0)))
publish = st.tuples(st.just("publish"), st.integers(1, 6))
steps = st.lists(
    st.one_of(
        publish,
        st.tuples(st.just("advance"), st.sampled_from([0.0, 0.3, 1.0, 2.5])),
        st.tuples(st.just("respond"), st.just(0)),
        st.tuples(st.just("respond_all_then_advance"), st.sampled_from([0.0, 1.0])),
    ),
    max_size=40,
).map(lambda rest: [("publish", 3), *rest])


@settings(max_examples=500)
@given(
    config=exporter_settings,
    answers=st.lists(answer, min_size=1, max_size=12),
    script=steps,
    with_spool=st.sampled_from([True, True, False]),
    spool_max_bytes=st.sampled_from([60, 10**9, 10**9]),
)
def test_every_accepted_event_ends_in_exactly_one_place(
    config: dict[str, Any],
    answers: list[Answer],
    script: list[tuple[str, float]],
    with_spool: bool,
    spool_max_bytes: int,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        clock = Clock()
        client = ScriptedClient(answers)
        sink = JsonSink(name="p", url="http://sink.test/", client=client, clock=clock, timeout=2.0)
        exporter_config = ExporterSettings(
            name="p",
            type="http",
            flush_interval=1.0,
            backoff_min=0.5,
            backoff_max=4.0,
            **config,
        )
        spool = Spool(base / "spool", spool_max_bytes) if with_spool else None
        dead = DeadLetter(base / "dead.jsonl", "p")
        exporter = BatchingExporter(exporter_config, sink, clock, spool, dead, lambda: 0.5)
        exporter.start()

        published = 0
        for action, amount in script:
            if action == "publish":
                for _ in range(int(amount)):
                    exporter.publish(StoredEvent({"type": "request", "i": published}))
                    published += 1
            elif action == "advance":
                clock.advance(amount)
            elif action == "respond":
                client.respond()
            else:
                client.respond_all()
                clock.advance(amount)
            identity(exporter)

        done = exporter.stop(10.0)
        for _ in range(30):
            if done.called:
                break
            client.respond_all()
            clock.advance(1.0)
            identity(exporter)
        assert done.called
        assert clock.getDelayedCalls() == []

        s = identity(exporter)
        assert (s["in_flight"], s["queued"], s["state"]) == (0, 0, "closed")
        delivered = client.delivered
        letters = dead_letters(base / "dead.jsonl")
        dead_lettered = [letter["event"]["i"] for letter in letters]
        spooled = spooled_ids(base / "spool") if with_spool else []
        places = delivered + dead_lettered + spooled
        assert len(places) == len(set(places)), "an event is in two places"
        assert set(places) <= set(range(published))
        assert (s["sent"], s["dead_lettered"], s["spooled"]) == (
            len(delivered),
            len(dead_lettered),
            len(spooled),
        )
        assert s["dropped"] == published - len(places)
        # The dead-letter file holds what the sink refused, each event once, whole,
        # with the sink's reason: per event for a partial answer, the batch's else.
        assert {letter["event"]["i"]: letter["reason"] for letter in letters} == client.refused
        for letter in letters:
            assert letter["sink"] == "p"
            assert letter["event"] == {"type": "request", "i": letter["event"]["i"]}
        assert s["accepted"] == published
        if not with_spool:
            assert set(s["dropped_by_reason"]) <= {
                "buffer_full",
                "retries_exhausted",
                "shutdown_no_spool",
            }
        if config["max_in_flight"] == 1:
            assert delivered == sorted(delivered)
        assert spooled == sorted(spooled)

        if not with_spool:
            return
        # A restart on the same spool, against a sink that takes everything.
        healthy = ScriptedClient([("2xx", 0)])
        sink2 = JsonSink(name="p", url="http://sink.test/", client=healthy, clock=clock)
        restarted = BatchingExporter(
            attrs.evolve(exporter_config, max_in_flight=1),
            sink2,
            clock,
            Spool(base / "spool", spool_max_bytes),
            dead,
            lambda: 0.5,
        )
        assert identity(restarted)["recovered"] == len(spooled)
        restarted.start()
        for _ in range(len(spooled) + 1):
            healthy.respond_all()
            identity(restarted)
        assert healthy.delivered == spooled
        assert identity(restarted)["spooled"] == 0
        closed = restarted.stop(1.0)
        clock.advance(1.0)
        assert closed.called
