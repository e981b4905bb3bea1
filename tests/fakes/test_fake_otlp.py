"""The fake OTLP receiver enforces OTLP/HTTP JSON, so tests against it mean something.

Each test states one rule of the OTLP specification's JSON encoding or of its
HTTP answers (see the docstring of :mod:`tests.fakes.otlp` for the sources).
"""

from __future__ import annotations

import base64
import copy
import gzip
from collections.abc import Mapping
from typing import Any

import orjson
import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from tests.fakes.otlp import FakeCollector, Respond, listen_fake_collector

TRACES = "http://collector:4318/v1/traces"
LOGS = "http://collector:4318/v1/logs"
TRACE_ID = "5b8efff798038103d269b633813fc60c"
SPAN_ID = "eee19b7ec3c1b174"
START = 1_795_419_612_000_000_000


def _fired(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the request got no answer"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def _post(
    stub: StubTreq,
    body: Any,
    *,
    url: str = TRACES,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Mapping[str, str], Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    sent = {"Content-Type": "application/json", **(headers or {})}
    response = _fired(stub.request("POST", url, data=data, headers=sent))
    raw = _fired(treq.content(response))
    got = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = raw
    return response.code, got, parsed


def span(**changes: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "traceId": TRACE_ID,
        "spanId": SPAN_ID,
        "name": "chat gpt-4o",
        "kind": 3,
        "startTimeUnixNano": str(START),
        "endTimeUnixNano": str(START + 500_000_000),
        "attributes": [
            {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
            {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "12"}},
            {"key": "llmproxy.ttfb_ms", "value": {"doubleValue": 12.5}},
            {"key": "llmproxy.stream", "value": {"boolValue": True}},
            {
                "key": "gen_ai.response.finish_reasons",
                "value": {"arrayValue": {"values": [{"stringValue": "stop"}]}},
            },
        ],
        "status": {},
    }
    s.update(changes)
    return {k: v for k, v in s.items() if v is not None}


def traces(*spans: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "llmproxy"}}]
                },
                "scopeSpans": [{"scope": {"name": "llmproxy"}, "spans": list(spans)}],
            }
        ]
    }


def logs(*records: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceLogs": [
            {
                "resource": {},
                "scopeLogs": [{"scope": {"name": "llmproxy"}, "logRecords": list(records)}],
            }
        ]
    }


@pytest.fixture
def fake() -> FakeCollector:
    return FakeCollector()


@pytest.fixture
def stub(fake: FakeCollector) -> StubTreq:
    return StubTreq(fake)


def test_a_valid_export_is_stored_and_answered_200_json(
    fake: FakeCollector, stub: StubTreq
) -> None:
    status, headers, reply = _post(stub, traces(span()))

    assert (status, reply) == (200, {})
    assert headers["content-type"] == "application/json"
    [stored] = fake.spans
    assert (stored.trace_id, stored.span_id, stored.kind) == (TRACE_ID, SPAN_ID, 3)
    assert (stored.start_ns, stored.end_ns) == (START, START + 500_000_000)
    assert stored.resource == {"service.name": "llmproxy"}
    assert stored.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.usage.input_tokens": 12,
        "llmproxy.ttfb_ms": 12.5,
        "llmproxy.stream": True,
        "gen_ai.response.finish_reasons": ["stop"],
    }


def test_an_empty_request_is_a_success(fake: FakeCollector, stub: StubTreq) -> None:
    assert _post(stub, {})[::2] == (200, {})
    assert _post(stub, {"resourceSpans": []})[0] == 200
    assert fake.spans == []


def test_hex_ids_are_case_insensitive(fake: FakeCollector, stub: StubTreq) -> None:
    assert _post(stub, traces(span(traceId=TRACE_ID.upper())))[0] == 200
    assert fake.spans[0].trace_id == TRACE_ID


def test_base64_ids_are_refused_as_the_wrong_length(fake: FakeCollector, stub: StubTreq) -> None:
    b64 = base64.b64encode(bytes.fromhex(TRACE_ID)).decode()
    status, headers, reply = _post(stub, traces(span(traceId=b64)))

    assert status == 400
    assert headers["content-type"] == "application/json"
    assert reply["code"] == 3 and "invalid length for ID" in reply["message"]
    assert fake.spans == []


@pytest.mark.parametrize(
    "change",
    [
        {"spanId": SPAN_ID + "00"},
        {"spanId": "zz" * 8},
        {"traceId": "0" * 32},
        {"parentSpanId": "abc"},
        {"traceId": None},
    ],
)
def test_bad_ids_are_400(change: dict[str, Any], stub: StubTreq) -> None:
    assert _post(stub, traces(span(**change)))[0] == 400


def test_snake_case_keys_are_unknown_so_the_id_is_missing(stub: StubTreq) -> None:
    bad = span(traceId=None)
    bad["trace_id"] = TRACE_ID
    status, _, reply = _post(stub, traces(bad))
    assert status == 400 and "traceId" in reply["message"]


def test_unknown_fields_are_ignored(fake: FakeCollector, stub: StubTreq) -> None:
    assert _post(stub, traces(span(futureField={"x": 1})))[0] == 200
    assert len(fake.spans) == 1


@pytest.mark.parametrize("kind", ["SPAN_KIND_CLIENT", "3"])
def test_enums_must_be_integers_not_names(kind: str, stub: StubTreq) -> None:
    status, _, reply = _post(stub, traces(span(kind=kind)))
    assert status == 400 and "enum" in reply["message"]


def test_a_status_code_name_is_refused(stub: StubTreq) -> None:
    assert _post(stub, traces(span(status={"code": "STATUS_CODE_ERROR"})))[0] == 400


def test_int64_times_may_be_strings_or_numbers(fake: FakeCollector, stub: StubTreq) -> None:
    assert _post(stub, traces(span(startTimeUnixNano=START, endTimeUnixNano=START + 1)))[0] == 200
    assert fake.spans[0].end_ns == START + 1


@pytest.mark.parametrize("value", ["soon", "1.5e18", 1.5, -1, True])
def test_a_time_that_is_not_a_uint64_is_400(value: Any, stub: StubTreq) -> None:
    assert _post(stub, traces(span(startTimeUnixNano=value)))[0] == 400


def test_a_span_ending_before_it_starts_is_400(stub: StubTreq) -> None:
    bad = span(startTimeUnixNano=str(START + 1), endTimeUnixNano=str(START))
    assert _post(stub, traces(bad))[0] == 400


def test_a_span_without_times_or_name_is_400(stub: StubTreq) -> None:
    assert _post(stub, traces(span(endTimeUnixNano=None)))[0] == 400
    assert _post(stub, traces(span(name="")))[0] == 400


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ({"intValue": 7}, True),
        ({"intValue": "-7"}, True),
        ({"intValue": 1.5}, False),
        ({"intValue": str(1 << 63)}, False),
        ({"doubleValue": "NaN"}, True),
        ({"doubleValue": "fast"}, False),
        ({"boolValue": "true"}, False),
        ({"bytesValue": base64.b64encode(b"\x00\x01").decode()}, True),
        ({"bytesValue": "not base64!"}, False),
        ({"stringValue": "a", "intValue": "1"}, False),
        ({"kvlistValue": {"values": [{"key": "k", "value": {"stringValue": "v"}}]}}, True),
        ({}, True),
    ],
)
def test_attribute_values_follow_the_anyvalue_shapes(
    value: dict[str, Any], ok: bool, stub: StubTreq
) -> None:
    doc = traces(span(attributes=[{"key": "k", "value": value}]))
    assert _post(stub, doc)[0] == (200 if ok else 400)


def test_an_empty_attribute_key_is_400(stub: StubTreq) -> None:
    doc = traces(span(attributes=[{"key": "", "value": {"stringValue": "v"}}]))
    assert _post(stub, doc)[0] == 400


def test_one_bad_span_refuses_the_whole_request(fake: FakeCollector, stub: StubTreq) -> None:
    assert _post(stub, traces(span(), span(kind="CLIENT")))[0] == 400
    assert fake.spans == []


def test_only_json_is_decoded(stub: StubTreq) -> None:
    assert _post(stub, b"\x0a\x00", headers={"Content-Type": "application/x-protobuf"})[0] == 415
    assert _post(stub, traces(span()), headers={"Content-Type": "text/plain"})[0] == 415


def test_a_gzipped_body_is_accepted(fake: FakeCollector, stub: StubTreq) -> None:
    body = gzip.compress(orjson.dumps(traces(span())))
    assert _post(stub, body, headers={"Content-Encoding": "gzip"})[0] == 200
    assert len(fake.spans) == 1


def test_a_body_over_the_limit_is_413(stub: StubTreq) -> None:
    small = FakeCollector(max_body=1000)
    doc = traces(span(name="x" * 2000))
    assert _post(StubTreq(small), doc)[0] == 413
    assert (
        _post(
            StubTreq(small), gzip.compress(orjson.dumps(doc)), headers={"Content-Encoding": "gzip"}
        )[0]
        == 413
    )


def test_bad_json_is_400(stub: StubTreq) -> None:
    assert _post(stub, b'{"resourceSpans": [')[0] == 400


def test_a_partial_success_stores_the_rest_and_says_how_many_as_a_string(
    fake: FakeCollector, stub: StubTreq
) -> None:
    fake.partial_next(1, "span name too long")
    other = span(spanId="0123456789abcdef")
    status, _, reply = _post(stub, traces(span(), other))

    assert status == 200
    assert reply == {"partialSuccess": {"rejectedSpans": "1", "errorMessage": "span name too long"}}
    assert [s.span_id for s in fake.spans] == [SPAN_ID]


def test_a_partial_success_on_logs_counts_log_records(fake: FakeCollector, stub: StubTreq) -> None:
    fake.partial_next(1)
    reply = _post(stub, logs({"body": {"stringValue": "a"}}), url=LOGS)[2]
    assert reply == {"partialSuccess": {"rejectedLogRecords": "1"}}
    assert fake.log_records == []


def test_log_records_are_decoded(fake: FakeCollector, stub: StubTreq) -> None:
    record = {
        "timeUnixNano": str(START),
        "observedTimeUnixNano": START + 5,
        "severityNumber": 17,
        "severityText": "ERROR",
        "body": {"stringValue": '{"type":"response"}'},
        "attributes": [{"key": "llmproxy.type", "value": {"stringValue": "response"}}],
        "traceId": TRACE_ID,
        "spanId": SPAN_ID,
        "eventName": "llmproxy.response",
    }
    assert _post(stub, logs(record, {"body": {"stringValue": "no ids"}}), url=LOGS)[0] == 200

    first, second = fake.log_records
    assert (first.time_ns, first.observed_time_ns) == (START, START + 5)
    assert (first.severity_number, first.severity_text) == (17, "ERROR")
    assert first.body == '{"type":"response"}'
    assert (first.trace_id, first.span_id, first.event_name) == (
        TRACE_ID,
        SPAN_ID,
        "llmproxy.response",
    )
    assert (second.trace_id, second.span_id) == ("", "")


def test_a_log_severity_name_is_refused(stub: StubTreq) -> None:
    assert _post(stub, logs({"severityNumber": "SEVERITY_NUMBER_INFO"}), url=LOGS)[0] == 400


def test_scripted_throttling_comes_first_with_retry_after(
    fake: FakeCollector, stub: StubTreq
) -> None:
    fake.fail_next(Respond(429, headers={"Retry-After": "2"}), 503)

    status, headers, _ = _post(stub, traces(span()))
    assert (status, headers["retry-after"]) == (429, "2")
    assert _post(stub, traces(span()))[0] == 503
    assert fake.spans == []
    assert _post(stub, traces(span()))[0] == 200


def test_other_paths_are_404_and_other_methods_405(stub: StubTreq) -> None:
    assert _post(stub, {}, url="http://collector:4318/v1/metrics")[0] == 404
    assert _fired(stub.request("GET", TRACES)).code == 405


@pytest_twisted.inlineCallbacks
def test_it_serves_on_a_real_port() -> Any:
    from twisted.internet import reactor

    fake = FakeCollector()
    running = listen_fake_collector(fake)
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, pool=pool))
    try:
        response = yield client.post(
            running.url + "/v1/traces",
            data=orjson.dumps(traces(copy.deepcopy(span()))),
            headers={"Content-Type": "application/json"},
        )
        body = yield treq.content(response)
        assert (response.code, body) == (200, b"{}")
        assert len(fake.spans) == 1
    finally:
        yield running.stop()
        yield pool.closeCachedConnections()
