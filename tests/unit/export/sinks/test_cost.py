"""An answer's cost reaches every sink's payload, each where its service keeps
such a thing: the file line, Lunary's run metadata, an OTLP span attribute, Loki
structured metadata, a Helicone property.  Each sink against its fake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from treq.testing import StubTreq

from llmproxy.export.sink import Delivered
from llmproxy.export.sinks.file import FileSink
from tests.fakes.loki import FakeLoki
from tests.unit.export.sinks import test_helicone, test_loki, test_lunary, test_otlp
from tests.unit.export.sinks.test_file import run_now
from tests.unit.export.sinks.test_lunary import at_now, openai_json, verdict_of

COST = {
    "total": 0.00123,
    "input": 0.00093,
    "output": 0.0003,
    "currency": "USD",
    "source": "genai-prices",
    "version": "0.2.5",
    "priced_as": "openai:gpt-4o-mini",
}


def priced_event() -> dict[str, Any]:
    event = openai_json()
    assert "cost" in event  # every response event has the key
    event["cost"] = dict(COST)
    return event


def test_the_file_line_is_the_event_with_its_cost(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = FileSink("f", path, run_blocking=run_now)
    assert verdict_of(sink.deliver([priced_event()])) == Delivered()
    (line,) = path.read_bytes().splitlines()
    assert orjson.loads(line)["cost"] == COST


def test_lunary_runs_carry_the_cost_in_their_metadata() -> None:
    sink, fake, _ = test_lunary.against_fake()
    assert verdict_of(sink.deliver([priced_event()])) == Delivered()
    (run,) = fake.runs.values()
    assert run.metadata is not None
    # Lunary stores metadata keys in camel case.
    assert run.metadata["costUsd"] == 0.00123
    assert run.metadata["costInputUsd"] == 0.00093
    assert run.metadata["costOutputUsd"] == 0.0003
    assert run.metadata["costSource"] == "genai-prices"


def test_otlp_spans_carry_the_cost_as_attributes() -> None:
    sink, fake, _ = test_otlp.against_fake()
    assert verdict_of(sink.deliver([priced_event()])) == Delivered()
    span = test_otlp.only_span(fake)
    assert span.attributes["llmproxy.cost.usd"] == 0.00123
    assert span.attributes["llmproxy.cost.input_usd"] == 0.00093
    assert span.attributes["llmproxy.cost.output_usd"] == 0.0003
    assert span.attributes["llmproxy.cost.source"] == "genai-prices"
    assert span.attributes["llmproxy.cost.version"] == "0.2.5"


def test_otlp_spans_without_a_cost_have_no_cost_attributes() -> None:
    sink, fake, _ = test_otlp.against_fake()
    assert verdict_of(sink.deliver([openai_json()])) == Delivered()
    assert not any(k.startswith("llmproxy.cost") for k in test_otlp.only_span(fake).attributes)


def test_loki_entries_carry_the_cost_in_structured_metadata() -> None:
    clock = at_now()
    fake = FakeLoki(clock=clock)
    sink = test_loki.make_sink(StubTreq(fake), clock, structured_metadata=True)
    assert verdict_of(sink.deliver([priced_event()])) == Delivered()
    (entry,) = fake.entries()
    assert entry.metadata["cost_usd"] == "0.00123"
    assert entry.json()["cost"] == COST  # and in the line, as every field


def test_helicone_logs_carry_our_cost_as_a_property() -> None:
    sink, fake, _ = test_helicone.against_fake()
    event = priced_event()
    assert verdict_of(sink.deliver([event])) == Delivered()
    log = test_helicone.stored(fake, event["request_id"])
    assert log.properties["cost-usd"] == "0.00123"
    assert log.properties["cost-source"] == "genai-prices"
