"""benchmarks/capture_floor: the floor the performance docs compare capture with
writes whole events, or its figure would be a floor of less than it claims."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from twisted.internet.task import Clock

from llmproxy.capture import pump
from llmproxy.capture.pump import CapturePump
from llmproxy.capture.record import ExchangeRecord
from llmproxy.config.model import CaptureSettings
from tests.unit.capture.test_pump import record

ROOT = Path(__file__).resolve().parents[2]
FLOOR = ROOT / "benchmarks" / "capture_floor" / "sitecustomize.py"


def load_recorded() -> list[bytes]:
    spec = importlib.util.spec_from_file_location("recorded", ROOT / "benchmarks" / "recorded.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    chunks: list[bytes] = module.recorded_stream()
    return chunks


@pytest.fixture
def floor_pump(monkeypatch: pytest.MonkeyPatch) -> tuple[CapturePump, list[Any]]:
    """A pump whose flush is the floor's, put back after the test."""
    monkeypatch.setattr(pump.CapturePump, "flush", pump.CapturePump.flush)
    spec = importlib.util.spec_from_file_location("capture_floor_sitecustomize", FLOOR)
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    published: list[Any] = []

    class Bus:
        def publish(self, envelope: Any) -> None:
            published.append(envelope)

    return CapturePump(Bus(), CaptureSettings(), Clock(), enabled=True), published


def exchange(chunks: list[bytes], content_type: bytes) -> ExchangeRecord:
    """test_pump's request with a key in it, answered with ``chunks``."""
    rec = record("r1")
    rec.request_headers = [(b"Authorization", b"Bearer sk-proj-abcdefghijklmnop1234")]
    rec.status, rec.first_byte_at, rec.ended_at = 200, 0.004, 0.009
    rec.response_headers = [(b"Content-Type", content_type)]
    rec.response_chunks = [(0.004 + i / 1000, chunk) for i, chunk in enumerate(chunks)]
    rec.response_body_size = sum(map(len, chunks))
    return rec


def events(floor_pump: tuple[CapturePump, list[Any]], rec: ExchangeRecord) -> list[Any]:
    capture, published = floor_pump
    capture.request_started(rec, rec.request_body)
    capture.request_finished(rec)
    capture.flush()
    return [json.loads(envelope.json()) for envelope in published]


def test_a_stream_gives_both_events_with_its_reads_and_usage(
    floor_pump: tuple[CapturePump, list[Any]],
) -> None:
    chunks = load_recorded()
    request, response = events(floor_pump, exchange(chunks, b"text/event-stream"))
    assert (request["type"], response["type"]) == ("request", "response")
    assert "".join(response["response_chunks"]).encode() == b"".join(chunks)
    assert len(response["response_chunk_offsets_ms"]) == len(chunks)
    assert response["usage"] == {"prompt_tokens": 9, "completion_tokens": 98, "total_tokens": 107}
    assert response["model"] == "gpt-4o-mini"
    assert response["duration_ms"] == pytest.approx(9.0)
    # Secrets masked in every event, as the product's events have them.
    for event in (request, response):
        assert "abcdefghijklmnop" not in json.dumps(event)
        assert event["request_headers"]["authorization"].endswith("1234")


def test_a_json_body_is_its_text_with_usage(floor_pump: tuple[CapturePump, list[Any]]) -> None:
    reply = {"model": "gpt-4o", "choices": [], "usage": {"total_tokens": 5}}
    _, response = events(floor_pump, exchange([orjson.dumps(reply)], b"application/json"))
    assert json.loads(response["response_body"]) == reply
    assert response["response_chunks"] is None
    assert (response["model"], response["usage"]) == ("gpt-4o", {"total_tokens": 5})
