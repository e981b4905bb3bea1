"""The OTLP sink: spans and log records in OTLP/HTTP JSON with the GenAI conventions,
and how it reads a receiver's answers, against the fake collector through StubTreq."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from llmproxy.config.model import ExporterSettings
from llmproxy.export.sink import Sink
from llmproxy.export.sinks.otlp import OTLPSink, operation_name, signal_url, span_ids
from llmproxy.export.verdict import Delivered, Rejected, Retry
from tests.fakes.otlp import FakeCollector, Hang, Respond, StoredSpan
from tests.unit.export.sinks.test_lunary import (
    CACHE_KEY,
    NOW,
    NoClient,
    RefusingClient,
    anthropic_json,
    anthropic_stream,
    at_now,
    binary_audio,
    cache_hit,
    delivered_in_both_chunk_shapes,
    make_record,
    not_modified,
    openai_json,
    openai_stream,
    rate_limited,
    reasons_of,
    request_only,
    timed_out,
    verdict_of,
)
from tests.unit.export.sinks.test_lunary import _finish as finish

START_NS = 1_795_419_612_250_000_000
END_NS = 1_795_419_612_750_000_000
TOKEN = "otlp-collector-token-0123456789"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def settings(**kw: Any) -> ExporterSettings:
    kw.setdefault("endpoint", "http://collector:4318")
    return ExporterSettings(name="otlp", type="otlp", **kw)


def against_fake(**kw: Any) -> tuple[OTLPSink, FakeCollector, Clock]:
    clock = at_now()
    fake = FakeCollector(clock=clock)
    sink = OTLPSink.from_settings(settings(**kw), client=StubTreq(fake), clock=clock)
    return sink, fake, clock


def only_span(fake: FakeCollector) -> StoredSpan:
    [span] = fake.spans
    return span


@pytest.fixture
def warnings() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "llmproxy.export.sinks.otlp":
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


# -- construction ------------------------------------------------------------------------


def test_it_is_a_sink_sending_traces_to_the_local_collector_by_default() -> None:
    sink = OTLPSink.from_settings(
        ExporterSettings(name="otlp", type="otlp"), client=NoClient(), clock=at_now()
    )
    assert isinstance(sink, Sink)
    assert (sink.url, sink.signal) == ("http://localhost:4318/v1/traces", "traces")


@pytest.mark.parametrize(
    ("endpoint", "url", "signal"),
    [
        ("http://collector:4318", "http://collector:4318/v1/traces", "traces"),
        ("http://collector:4318/", "http://collector:4318/v1/traces", "traces"),
        ("https://otlp.example/v1/traces", "https://otlp.example/v1/traces", "traces"),
        ("https://otlp.example/v1/logs", "https://otlp.example/v1/logs", "logs"),
        ("https://otlp.example/otlp/v1/logs/", "https://otlp.example/otlp/v1/logs", "logs"),
    ],
)
def test_the_endpoint_path_chooses_the_signal(endpoint: str, url: str, signal: str) -> None:
    assert signal_url(endpoint) == (url, signal)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"endpoint": "collector:4318"}, "endpoint must be an http"),
        ({"endpoint": "http://u:p@collector:4318"}, "endpoint must not carry credentials"),
        ({"headers": (("bad header", "x"),)}, "not a valid header name"),
    ],
)
def test_bad_settings_are_config_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"exporter:otlp: .*{message}"):
        OTLPSink.from_settings(settings(**kw), client=NoClient(), clock=at_now())


@pytest.mark.parametrize(
    ("path", "operation"),
    [
        ("/openai/v1/chat/completions", "chat"),
        ("/v1/completions", "text_completion"),
        ("/openai/v1/embeddings", "embeddings"),
        ("/anthropic/v1/messages", "chat"),
        ("/v1/responses", "chat"),
        ("/v1beta/models/gemini-2.5-pro:generateContent", "generate_content"),
        ("/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", "generate_content"),
        ("/v1beta/models/text-embedding-004:embedContent", "embeddings"),
    ],
)
def test_the_operation_name_comes_from_the_path(path: str, operation: str) -> None:
    assert operation_name(path) == operation


@pytest.mark.parametrize(
    "path",
    ["/v1/audio/speech", "/v1/models", "/anthropic/v1/messages/count_tokens", "/v1/files", "/"],
)
def test_an_unknown_endpoint_has_no_invented_operation_name(path: str) -> None:
    assert operation_name(path) is None


def test_a_span_of_an_unknown_endpoint_is_named_by_its_method_without_an_operation() -> None:
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([binary_audio(), not_modified()]))
    by_id = {s.attributes["llmproxy.request_id"]: s for s in fake.spans}
    speech = by_id["req-audio"]
    assert speech.name == "POST"
    assert "gen_ai.operation.name" not in speech.attributes
    assert speech.attributes["gen_ai.provider.name"] == "openai"
    assert by_id["req-304"].name == "GET"


# -- spans -------------------------------------------------------------------------------


def test_an_exchange_becomes_one_client_span_with_genai_attributes() -> None:
    sink, fake, _ = against_fake()
    assert verdict_of(sink.deliver([openai_json()])) == Delivered()

    span = only_span(fake)
    assert span.name == "chat gpt-4o-mini"
    assert span.kind == 3  # CLIENT
    assert (span.start_ns, span.end_ns) == (START_NS, END_NS)
    assert span.status_code == 0
    assert span.parent_span_id == ""
    assert span.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.system": "openai",  # deprecated, for older backends
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.request.max_tokens": 64,
        "gen_ai.request.temperature": 0.2,
        "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 2,
        "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.conversation.id": "sess-1",
        "http.request.method": "POST",
        "http.response.status_code": 200,
        "server.address": "api.openai.com",
        "server.port": 443,
        "client.address": "10.0.0.7",
        "llmproxy.request_id": "req-oa-json",
        "llmproxy.upstream_request_id": "up-1",
        "llmproxy.session_id": "sess-1",
        "llmproxy.seq": 2,
        "llmproxy.route": "openai",
        "llmproxy.outcome": "ok",
        "llmproxy.stream": False,
        "llmproxy.ttfb_ms": 100.0,
    }
    assert span.resource == {
        "service.name": "llmproxy",
        "service.version": span.resource["service.version"],
        "host.name": "host1",
        "deployment.environment.name": "prod",
    }
    assert span.scope["name"] == "llmproxy"


def test_the_wire_format_uses_hex_ids_integer_enums_and_string_int64s() -> None:
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([openai_json()]))

    raw = only_span(fake).raw
    assert len(raw["traceId"]) == 32 and raw["traceId"] == raw["traceId"].lower()
    assert len(raw["spanId"]) == 16
    assert raw["kind"] == 3
    assert (raw["startTimeUnixNano"], raw["endTimeUnixNano"]) == (str(START_NS), str(END_NS))
    tokens = next(a for a in raw["attributes"] if a["key"] == "gen_ai.usage.input_tokens")
    assert tokens["value"] == {"intValue": "12"}
    reasons = next(a for a in raw["attributes"] if a["key"] == "gen_ai.response.finish_reasons")
    assert reasons["value"] == {"arrayValue": {"values": [{"stringValue": "stop"}]}}
    assert fake.requests[-1].content_type == "application/json"


def test_streams_and_anthropic_exchanges_carry_their_facts() -> None:
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([openai_stream(), anthropic_json(), anthropic_stream()]))

    by_id = {s.attributes["llmproxy.request_id"]: s for s in fake.spans}
    stream = by_id["req-oa-sse"].attributes
    assert (stream["gen_ai.usage.output_tokens"], stream["llmproxy.stream"]) == (3, True)
    assert stream["gen_ai.response.id"] == "chatcmpl-2"
    assert stream["gen_ai.response.time_to_first_chunk"] == 0.1  # seconds
    anthropic = by_id["req-an-json"]
    assert anthropic.name == "chat claude-sonnet-4-5"
    assert anthropic.attributes["gen_ai.provider.name"] == "anthropic"
    assert anthropic.attributes["gen_ai.usage.input_tokens"] == 14  # cache reads included
    assert anthropic.attributes["gen_ai.usage.cache_read.input_tokens"] == 4
    assert anthropic.attributes["gen_ai.request.max_tokens"] == 256
    assert anthropic.attributes["gen_ai.response.id"] == "msg_1"
    assert anthropic.attributes["gen_ai.response.finish_reasons"] == ["end_turn"]
    assert "gen_ai.response.time_to_first_chunk" not in anthropic.attributes
    anthropic_sse = by_id["req-an-sse"].attributes
    assert anthropic_sse["gen_ai.usage.output_tokens"] == 4
    assert anthropic_sse["gen_ai.response.id"] == "msg_2"


def test_events_of_the_older_chunk_shape_make_the_same_spans() -> None:
    """Events written before the chunk offsets had their own list still wait in
    spools, dead-letter files and Redis streams after an upgrade."""
    events = [openai_stream(), anthropic_stream(), openai_json()]
    fake, older_fake = delivered_in_both_chunk_shapes(against_fake, events)
    assert older_fake.spans == fake.spans and len(fake.spans) == 3
    by_id = {s.attributes["llmproxy.request_id"]: s for s in older_fake.spans}
    assert by_id["req-oa-sse"].attributes["gen_ai.response.id"] == "chatcmpl-2"
    assert by_id["req-an-sse"].attributes["gen_ai.usage.output_tokens"] == 4


def test_cache_writes_and_the_upstream_port_are_attributes() -> None:
    event = anthropic_json()
    event["upstream_url"] = "http://10.1.2.3:8080/v1/messages"
    event["usage"] = {**event["usage"], "cache_creation_tokens": 7}
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([event]))
    attributes = only_span(fake).attributes
    assert attributes["gen_ai.usage.cache_creation.input_tokens"] == 7
    assert (attributes["server.address"], attributes["server.port"]) == ("10.1.2.3", 8080)


def test_usage_and_cost_values_of_the_wrong_type_are_left_out() -> None:
    event = anthropic_json()
    event["usage"] = {"input_tokens": True, "output_tokens": "2", "cache_read_tokens": 3}
    event["cost"] = {"total": False, "input": "0.1", "output": 2, "source": "", "version": 7}
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([event]))
    attributes = only_span(fake).attributes
    usage = {k: v for k, v in attributes.items() if k.startswith("gen_ai.usage.")}
    assert usage == {"gen_ai.usage.cache_read.input_tokens": 3}
    cost = {k: v for k, v in attributes.items() if k.startswith("llmproxy.cost.")}
    assert cost == {"llmproxy.cost.output_usd": 2.0}


def test_request_parameters_of_each_api_are_read() -> None:
    responses = openai_json(
        "req-resp",
        body={"model": "gpt-4.1", "input": "hi", "max_output_tokens": 99, "top_p": 1},
        path="/openai/v1/responses",
    )
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([responses]))
    attributes = only_span(fake).attributes
    assert attributes["gen_ai.request.max_tokens"] == 99
    assert attributes["gen_ai.request.top_p"] == 1.0
    assert "gen_ai.request.temperature" not in attributes


def test_a_cache_hit_is_an_ok_span_with_its_usage_and_cache_attributes() -> None:
    sink, fake, _ = against_fake()
    assert verdict_of(sink.deliver([cache_hit(), not_modified()])) == Delivered()

    by_id = {s.attributes["llmproxy.request_id"]: s for s in fake.spans}
    hit = by_id["req-hit"]
    assert hit.status_code == 0 and "error.type" not in hit.attributes
    assert hit.end_ns - hit.start_ns == 400_000  # answered in 0.4 ms, no upstream call
    assert hit.attributes["gen_ai.usage.output_tokens"] == 2
    assert hit.attributes["llmproxy.cache_status"] == "hit"
    assert hit.attributes["llmproxy.cache_key"] == CACHE_KEY
    assert hit.attributes["llmproxy.cache_age_s"] == 42.5
    revalidated = by_id["req-304"]
    assert revalidated.status_code == 0 and "error.type" not in revalidated.attributes
    assert revalidated.attributes["http.response.status_code"] == 304
    assert revalidated.attributes["llmproxy.cache_status"] == "conditional-hit"
    assert "gen_ai.usage.output_tokens" not in revalidated.attributes


def test_a_failed_exchange_is_an_error_span() -> None:
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([rate_limited(), timed_out()]))

    by_id = {s.attributes["llmproxy.request_id"]: s for s in fake.spans}
    limited = by_id["req-429"]
    assert (limited.status_code, limited.status_message) == (2, "HTTP 429")
    assert limited.attributes["error.type"] == "429"
    timeout = by_id["req-timeout"]
    assert timeout.status_code == 2
    assert timeout.status_message == "timeout: no response within 300s"
    assert timeout.attributes["error.type"] == "timeout"
    assert "http.response.status_code" not in timeout.attributes


def test_ids_are_deterministic_per_request() -> None:
    assert span_ids(openai_json("a")) == span_ids(openai_json("a"))
    assert span_ids(openai_json("a"))[:2] != span_ids(openai_json("b"))[:2]


def test_a_traceparent_header_puts_the_span_in_the_clients_trace() -> None:
    sink, fake, _ = against_fake()
    event = openai_json(headers=[(b"traceparent", TRACEPARENT.encode())])
    verdict_of(sink.deliver([event]))

    span = only_span(fake)
    assert span.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span.parent_span_id == "00f067aa0ba902b7"
    assert span.span_id == span_ids(openai_json())[1]


@pytest.mark.parametrize(
    "value",
    [
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "garbage",
    ],
)
def test_an_invalid_traceparent_is_ignored(value: str) -> None:
    event = openai_json(headers=[(b"traceparent", value.encode())])
    assert span_ids(event) == span_ids(openai_json())


def test_request_events_make_no_spans_and_an_empty_batch_no_request() -> None:
    sink, fake, _ = against_fake()
    assert verdict_of(sink.deliver([request_only("a"), request_only("b")])) == Delivered()
    assert fake.request_count == 0

    assert verdict_of(sink.deliver([request_only("c"), openai_json()])) == Delivered()
    assert len(fake.spans) == 1


def test_spans_are_grouped_by_resource() -> None:
    sink, fake, _ = against_fake()
    batch = [
        openai_json("a"),
        openai_json("b", machine="proxy@host2"),
        openai_json("c"),
        openai_json("d", environment="staging"),
    ]
    verdict_of(sink.deliver(batch))

    resources = orjson.loads(sink.encode(batch).body)["resourceSpans"]
    assert len(resources) == 3
    hosts = [
        (s.resource["host.name"], s.resource["deployment.environment.name"]) for s in fake.spans
    ]
    assert sorted(hosts) == [
        ("host1", "prod"),
        ("host1", "prod"),
        ("host1", "staging"),
        ("host2", "prod"),
    ]


def test_an_event_that_cannot_be_encoded_is_rejected_alone() -> None:
    sink, fake, _ = against_fake()
    broken = openai_json("req-broken")
    broken["start"] = broken["end"] = None
    del broken["ts_ns"]

    verdict = verdict_of(sink.deliver([broken, openai_json()]))

    assert isinstance(verdict, Delivered)
    assert list(verdict.rejected) == [0] and "could not encode" in verdict.rejected[0]
    assert len(fake.spans) == 1


def test_an_event_without_a_model_is_named_by_its_operation() -> None:
    record = make_record("req-nomodel", body=b"not json")
    event = finish(record, 200, b"text/plain", [b"ok"])
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([event]))
    assert only_span(fake).name == "chat"


# -- logs ----------------------------------------------------------------------------------


def test_a_logs_endpoint_sends_one_record_per_event_of_any_kind() -> None:
    sink, fake, _ = against_fake(endpoint="http://collector:4318/v1/logs")
    batch = [request_only("req-oa-json"), openai_json(), rate_limited(), timed_out()]

    assert verdict_of(sink.deliver(batch)) == Delivered()

    assert fake.requests[-1].path == "/v1/logs"
    records = fake.log_records
    assert [r.event_name for r in records] == [
        "llmproxy.request",
        "llmproxy.response",
        "llmproxy.response",
        "llmproxy.response",
    ]
    assert [(r.severity_number, r.severity_text) for r in records] == [
        (9, "INFO"),
        (9, "INFO"),
        (13, "WARN"),  # the client's rate limit: a 4xx
        (17, "ERROR"),  # the upstream timed out
    ]
    assert orjson.loads(records[1].body) == batch[1]
    assert records[1].time_ns == END_NS
    assert records[1].observed_time_ns == NOW * 1_000_000_000
    assert records[1].attributes["gen_ai.usage.input_tokens"] == 12
    assert records[0].attributes == {
        "llmproxy.type": "request",
        "llmproxy.request_id": "req-oa-json",
        "llmproxy.session_id": "sess-1",
        "llmproxy.route": "openai",
    }


def test_log_records_carry_the_ids_of_their_exchanges_span() -> None:
    traces, trace_fake, _ = against_fake()
    logs, log_fake, _ = against_fake(endpoint="http://collector:4318/v1/logs")
    batch = [request_only("req-oa-json"), openai_json()]
    verdict_of(traces.deliver(batch))
    verdict_of(logs.deliver(batch))

    span = only_span(trace_fake)
    assert {(r.trace_id, r.span_id) for r in log_fake.log_records} == {
        (span.trace_id, span.span_id)
    }


# -- answers -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_only_429_502_503_504_are_retried_honouring_retry_after(status: int) -> None:
    sink, fake, _ = against_fake()
    fake.fail_next(Respond(status, b'{"code": 14, "message": "busy"}', {"Retry-After": "4"}))

    assert verdict_of(sink.deliver([openai_json()])) == Retry(f"HTTP {status}: busy", 4.0)


@pytest.mark.parametrize("status", [500, 501, 408, 401, 403, 404, 413])
def test_every_other_error_is_permanent(status: int) -> None:
    sink, fake, _ = against_fake()
    fake.fail_next(Respond(status, b'{"code": 13, "message": "no"}'))

    assert verdict_of(sink.deliver([openai_json()])) == Rejected(f"HTTP {status}: no")


def test_a_collector_refusing_bad_data_is_permanent_with_its_message() -> None:
    sink, fake, _ = against_fake()
    event = openai_json()
    sink_body = sink.encode([event]).body
    fake.fail_next(Respond(400, b'{"code": 3, "message": "invalid length for ID"}'))

    verdict = verdict_of(sink.deliver([event]))

    assert verdict == Rejected("HTTP 400: invalid length for ID")
    assert orjson.loads(sink_body)["resourceSpans"]  # it did try


def test_a_throttling_collector_is_retried_and_then_accepts(
    warnings: list[dict[str, Any]],
) -> None:
    sink, fake, _ = against_fake()
    fake.fail_next(Respond(503, headers={"Retry-After": "1"}))
    assert verdict_of(sink.deliver([openai_json()])) == Retry("HTTP 503", 1.0)
    assert verdict_of(sink.deliver([openai_json()])) == Delivered()
    assert len(fake.spans) == 1
    assert warnings == []


def test_a_partial_success_is_delivered_not_retried_and_logged(
    warnings: list[dict[str, Any]],
) -> None:
    sink, fake, _ = against_fake()
    fake.partial_next(1, "span too large")

    verdict = verdict_of(sink.deliver([openai_json(), anthropic_json()]))

    assert verdict == Delivered()
    assert fake.request_count == 1
    assert len(fake.spans) == 1
    [warning] = warnings
    assert (warning["n"], warning["message"], warning["what"]) == (1, "span too large", "spans")
    assert warning["log_level"].name == "warn"


def test_a_partial_success_of_logs_reads_rejected_log_records(
    warnings: list[dict[str, Any]],
) -> None:
    sink, fake, _ = against_fake(endpoint="http://collector:4318/v1/logs")
    fake.partial_next(2)

    assert verdict_of(sink.deliver([request_only(), openai_json()])) == Delivered()
    assert [(w["n"], w["what"]) for w in warnings] == [(2, "log records")]


def test_a_partial_success_warning_without_rejections_is_informational(
    warnings: list[dict[str, Any]],
) -> None:
    sink, fake, _ = against_fake()
    fake.partial_next(0, "attribute truncated")

    assert verdict_of(sink.deliver([openai_json()])) == Delivered()
    [note] = warnings
    assert note["log_level"].name == "info" and note["message"] == "attribute truncated"


def test_a_connection_failure_and_a_hang_are_retried() -> None:
    refused = OTLPSink.from_settings(settings(), client=RefusingClient(), clock=at_now())
    assert verdict_of(refused.deliver([openai_json()])) == Retry("connection refused")
    sink, fake, clock = against_fake(timeout=3.0)
    fake.fail_next(Hang())
    d = sink.deliver([openai_json()])
    clock.advance(3.0)
    assert verdict_of(d) == Retry("timed out after 3s")


def test_headers_are_sent_and_api_key_is_bearer_auth() -> None:
    sink, fake, _ = against_fake(api_key=TOKEN, headers=(("X-Scope-OrgID", "team-a"),))
    verdict_of(sink.deliver([openai_json()]))

    headers = fake.requests[-1].headers
    assert headers["authorization"] == f"Bearer {TOKEN}"
    assert headers["x-scope-orgid"] == "team-a"


def test_an_authorization_header_setting_wins_over_api_key() -> None:
    sink, fake, _ = against_fake(api_key=TOKEN, headers=(("Authorization", "Basic dXNlcjpwdw=="),))
    verdict_of(sink.deliver([openai_json()]))
    assert fake.requests[-1].authorization == "Basic dXNlcjpwdw=="


@pytest.mark.parametrize("status", [400, 401, 429, 503])
def test_credentials_never_appear_in_a_verdict(status: int) -> None:
    sink, fake, _ = against_fake(
        api_key=TOKEN, headers=(("x-honeycomb-team", "hny-key-abcdef123"),)
    )
    echo = f'{{"message": "bad auth Bearer {TOKEN} / hny-key-abcdef123"}}'.encode()
    fake.fail_next(Respond(status, echo))

    [reason] = reasons_of(verdict_of(sink.deliver([openai_json()])))

    assert TOKEN not in reason and "hny-key-abcdef123" not in reason
    assert "***" in reason
