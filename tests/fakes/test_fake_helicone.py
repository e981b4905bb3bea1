"""The fake Helicone enforces the manual logger's rules, so tests against it mean something.

Each test states one behaviour of Helicone's log routes, or of how Helicone reads
what they stored (see the docstring of :mod:`tests.fakes.helicone` for the sources).
"""

from __future__ import annotations

import copy
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

from tests.fakes.helicone import (
    DEFAULT_KEY,
    FakeHelicone,
    Hang,
    HeliconeUsage,
    Respond,
    listen_fake_helicone,
)

URL = "https://api.worker.helicone.ai/custom/v1/log"
OAI = "https://api.worker.helicone.ai/oai/v1/log"
ANTHROPIC = "https://api.worker.helicone.ai/anthropic/v1/log"
REQUEST_ID = "3f1e2d4c-5b6a-4798-8a1b-2c3d4e5f6a7b"
OTHER_ID = "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d"


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
    key: str | None = DEFAULT_KEY,
    url: str = URL,
) -> tuple[int, Mapping[str, str], str]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    response = _fired(stub.request("POST", url, data=data, headers=headers))
    text = _fired(treq.content(response)).decode()
    got = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
    return response.code, got, text


def log(**meta: str) -> dict[str, Any]:
    return {
        "providerRequest": {
            "url": "https://api.openai.com/v1/chat/completions",
            "json": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
            "meta": {"Helicone-Request-Id": REQUEST_ID, **meta},
        },
        "providerResponse": {
            "status": 200,
            "headers": {"content-type": "application/json"},
            "json": {
                "model": "gpt-4o",
                "choices": [{"message": {"role": "assistant", "content": "hello"}}],
            },
        },
        "timing": {
            "startTime": {"seconds": 1795419612, "milliseconds": 250},
            "endTime": {"seconds": 1795419613, "milliseconds": 5},
        },
    }


def _without(doc: dict[str, Any], path: str) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = out
    for part in parents:
        node = node[part]
    del node[last]
    return out


def _with(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = out
    for part in parents:
        node = node[part]
    node[last] = value
    return out


@pytest.fixture
def fake() -> FakeHelicone:
    return FakeHelicone()


@pytest.fixture
def stub(fake: FakeHelicone) -> StubTreq:
    return StubTreq(fake)


def test_a_valid_log_is_stored_and_answered_ok(fake: FakeHelicone, stub: StubTreq) -> None:
    status, headers, text = _post(
        stub, log(**{"Helicone-User-Id": "alice", "Helicone-Property-Route": "openai"})
    )

    assert (status, text) == (200, "ok")
    assert headers["helicone-id"] == REQUEST_ID
    [stored] = fake.logs
    assert stored.request_id == REQUEST_ID
    assert stored.user_id == "alice"
    assert stored.properties == {"route": "openai"}
    assert (stored.start_ms, stored.end_ms) == (1795419612250, 1795419613005)
    assert stored.response_json == {
        "model": "gpt-4o",
        "choices": [{"message": {"role": "assistant", "content": "hello"}}],
    }


def test_meta_names_are_read_case_insensitively_like_headers(fake: FakeHelicone) -> None:
    doc = log()
    doc["providerRequest"]["meta"] = {"helicone-request-id": REQUEST_ID, "HELICONE-USER-ID": "bob"}
    _post(StubTreq(fake), doc)
    assert fake.logs[0].request_id == REQUEST_ID
    assert fake.logs[0].user_id == "bob"


@pytest.mark.parametrize(
    ("path", "provider"),
    [
        ("/custom/v1/log", "CUSTOM"),
        ("/oai/v1/log", "OPENAI"),
        ("/anthropic/v1/log", "ANTHROPIC"),
        ("/googleapis/v1/log", "GOOGLE"),
    ],
)
def test_the_provider_is_the_routes_and_nothing_else(
    path: str, provider: str, fake: FakeHelicone, stub: StubTreq
) -> None:
    doc = log(**{"Helicone-Provider": "anthropic"})  # read nowhere by Helicone
    doc["provider"] = "ANTHROPIC"  # nor this, by the worker
    assert _post(stub, doc, url="https://api.worker.helicone.ai" + path)[0] == 200
    assert fake.logs[0].provider == provider


def test_a_custom_log_is_never_priced(fake: FakeHelicone, stub: StubTreq) -> None:
    doc = _with(log(), "providerResponse.json.usage", {"prompt_tokens": 5, "completion_tokens": 2})
    _post(stub, doc)
    [stored] = fake.logs
    assert stored.usage == HeliconeUsage(5, 2)  # counted...
    assert stored.cost_inputs is None  # ...but CUSTOM has no prices
    _post(stub, _with(doc, "providerRequest.meta.Helicone-Request-Id", OTHER_ID), url=OAI)
    assert fake.by_id[OTHER_ID].cost_inputs == ("OPENAI", "gpt-4o", HeliconeUsage(5, 2))


@pytest.mark.parametrize("route", ["/v1/trace/custom/v1/log", "/v1/trace/custom/log"])
def test_jawn_reads_the_provider_from_the_body(
    route: str, fake: FakeHelicone, stub: StubTreq
) -> None:
    url = "http://localhost:8585" + route
    _post(stub, {**log(), "provider": "ANTHROPIC"}, url=url)
    _post(stub, _with(log(), "providerRequest.meta.Helicone-Request-Id", OTHER_ID), url=url)
    assert fake.by_id[REQUEST_ID].provider == "ANTHROPIC"
    assert fake.by_id[OTHER_ID].provider == "OPENAI"  # jawn's default


def test_a_prefix_mounts_the_routes_under_a_path() -> None:
    fake = FakeHelicone(prefix=b"/helicone")
    stub = StubTreq(fake)
    assert _post(stub, log(), url="https://gw.example/helicone/oai/v1/log")[0] == 200
    assert _post(stub, log(), url="https://gw.example/oai/v1/log")[::2] == (400, "invalid path")


def test_the_sessions_headers_group_requests(fake: FakeHelicone, stub: StubTreq) -> None:
    session = {
        "Helicone-Session-Id": "conv-1",
        "Helicone-Session-Path": "/conv-1/fork-2",
        "Helicone-Session-Name": "support",
    }
    _post(stub, log(**session, **{"Helicone-Property-Session-Id": "fork-2"}))
    [stored] = fake.logs
    assert stored.session == ("conv-1", "/conv-1/fork-2", "support")
    assert stored.properties["Helicone-Session-Id"] == "conv-1"
    assert stored.properties["session-id"] == "fork-2"


def test_a_session_property_alone_is_no_session(fake: FakeHelicone, stub: StubTreq) -> None:
    _post(stub, log(**{"Helicone-Property-Session-Id": "conv-1"}))
    assert fake.logs[0].session == (None, None, None)
    assert fake.logs[0].properties == {"session-id": "conv-1"}


def _stream_log(text: str, *, model: str = "gpt-4o", json: Any = None) -> dict[str, Any]:
    doc = _with(log(), "providerRequest.json", {"model": model, "stream": True, "messages": []})
    doc["providerResponse"]["json"] = {} if json is None else json
    if text:
        doc["providerResponse"]["textBody"] = text
    return doc


OPENAI_SSE = (
    'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
    '"delta":{"content":"Hi"}}],"usage":null}\n\n'
    'data: {"id":"c1","object":"chat.completion.chunk","choices":[],'
    '"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}\n\n'
    "data: [DONE]\n\n"
)
ANTHROPIC_SSE = (
    "event: message_start\n"
    'data: {"type":"message_start","message":{"id":"msg_1","model":"claude-sonnet-4-5",'
    '"usage":{"input_tokens":11,"output_tokens":1,"cache_read_input_tokens":3}}}\n\n'
    "event: message_delta\n"
    'data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    '"usage":{"output_tokens":5}}\n\n'
    "event: message_stop\n"
    'data: {"type":"message_stop"}\n\n'
)


def test_a_stream_is_read_from_its_text(fake: FakeHelicone, stub: StubTreq) -> None:
    _post(stub, _stream_log(OPENAI_SSE), url=OAI)
    assert fake.logs[0].is_stream
    assert fake.logs[0].usage == HeliconeUsage(7, 2)


def test_a_stream_sent_as_json_gets_no_usage(fake: FakeHelicone, stub: StubTreq) -> None:
    merged = {"object": "chat.completion", "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
    _post(stub, _stream_log("", json=merged), url=OAI)
    assert fake.logs[0].is_stream
    assert fake.logs[0].usage is None and fake.logs[0].cost_inputs is None


def test_an_openai_stream_without_usage_counts_minus_one(
    fake: FakeHelicone, stub: StubTreq
) -> None:
    text = OPENAI_SSE.split("\n\n")[0].replace(',"usage":null', "") + "\n\ndata: [DONE]\n\n"
    _post(stub, _stream_log(text), url=OAI)
    assert fake.logs[0].usage == HeliconeUsage(-1, -1)
    assert fake.logs[0].cost_inputs is None


def test_an_openai_stream_with_only_null_usage_counts_nothing(
    fake: FakeHelicone, stub: StubTreq
) -> None:
    text = OPENAI_SSE.split("\n\n")[0] + "\n\ndata: [DONE]\n\n"
    _post(stub, _stream_log(text), url=OAI)
    assert fake.logs[0].usage is None


def test_two_usage_lines_add_up(fake: FakeHelicone, stub: StubTreq) -> None:
    usage = OPENAI_SSE.split("\n\n")[1] + "\n\n"
    _post(stub, _stream_log(OPENAI_SSE + usage), url=OAI)
    assert fake.logs[0].usage == HeliconeUsage(14, 4)


def test_an_anthropic_stream_is_read_by_the_anthropic_processor(
    fake: FakeHelicone, stub: StubTreq
) -> None:
    _post(stub, _stream_log(ANTHROPIC_SSE, model="claude-sonnet-4-5"), url=ANTHROPIC)
    assert fake.logs[0].usage == HeliconeUsage(11, 5, cache_read_tokens=3)
    assert fake.logs[0].cost_inputs == ("ANTHROPIC", "claude-sonnet-4-5", HeliconeUsage(11, 5, 3))


def test_a_claude_model_outside_helicones_list_counts_zero(
    fake: FakeHelicone, stub: StubTreq
) -> None:
    _post(stub, _stream_log(ANTHROPIC_SSE, model="claude-haiku-4-5"), url=ANTHROPIC)
    assert fake.logs[0].usage == HeliconeUsage(0, 0)


def test_an_openai_json_answer_counts_cached_tokens_apart(
    fake: FakeHelicone, stub: StubTreq
) -> None:
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 60},
        "completion_tokens_details": {"reasoning_tokens": 5},
    }
    _post(stub, _with(log(), "providerResponse.json.usage", usage), url=OAI)
    assert fake.logs[0].usage == HeliconeUsage(40, 15, cache_read_tokens=60)


def test_a_non_json_answer_is_a_parse_error(fake: FakeHelicone, stub: StubTreq) -> None:
    doc = _with(log(), "providerResponse.textBody", "data: {}\n\n")  # not a stream request
    _post(stub, doc, url=OAI)
    body, usage = fake.logs[0].processed
    assert usage is None and body["helicone_error"] == "error parsing response"


def test_without_a_request_id_helicone_makes_one(fake: FakeHelicone, stub: StubTreq) -> None:
    status, headers, _ = _post(stub, _without(log(), "providerRequest.meta.Helicone-Request-Id"))
    assert status == 200
    assert fake.logs[0].request_id == headers["helicone-id"] != REQUEST_ID


def test_no_authorization_header_is_401(fake: FakeHelicone, stub: StubTreq) -> None:
    assert _post(stub, log(), key=None)[::2] == (401, "Unauthorized")
    assert fake.logs == []


def test_an_unknown_key_is_401_after_the_body_is_validated(
    fake: FakeHelicone, stub: StubTreq
) -> None:
    status, _, text = _post(stub, log(), key="sk-helicone-wrong")
    assert status == 401 and "error" in orjson.loads(text)
    # The worker validates the body before it authenticates the key.
    assert _post(stub, _without(log(), "timing"), key="sk-helicone-wrong")[0] == 400
    assert fake.logs == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: _without(d, "timing"),
            "One of the required fields is missing, providerRequest, providerResponse, or timing",
        ),
        (
            lambda d: _without(d, "providerResponse"),
            "One of the required fields is missing, providerRequest, providerResponse, or timing",
        ),
        (
            lambda d: _with(d, "providerRequest.url", None),
            "Invalid providerRequest: 'url' should be a string",
        ),
        (
            lambda d: _without(d, "providerRequest.meta"),
            "Invalid providerRequest: 'meta' should be an object",
        ),
        (
            lambda d: _without(d, "providerRequest.json"),
            "Invalid providerRequest: 'json' is undefined",
        ),
        (
            lambda d: _without(d, "providerResponse.json"),
            "Invalid providerResponse: 'json' is undefined",
        ),
        (
            lambda d: _with(d, "providerResponse.status", "200"),
            "Invalid providerResponse: 'status' should be a number",
        ),
        (
            lambda d: _without(d, "providerResponse.headers"),
            "Invalid providerResponse: 'headers' should be an object",
        ),
        (
            lambda d: _without(d, "timing.startTime.seconds"),
            "Invalid timing: 'startTime.seconds' should be a number",
        ),
        (
            lambda d: _with(d, "timing.endTime.milliseconds", "5"),
            "Invalid timing: 'endTime.milliseconds' should be a number",
        ),
        (
            lambda d: _with(d, "timing.startTime", {"seconds": 1795419614, "milliseconds": 0}),
            "startTime cannot be greater than endTime",
        ),
        (
            lambda d: _with(d, "timing.startTime", {"seconds": -2, "milliseconds": 0}),
            "startTime and endTime cannot be negative",
        ),
    ],
)
def test_an_invalid_log_is_400_with_the_workers_message(
    change: Any, message: str, fake: FakeHelicone, stub: StubTreq
) -> None:
    status, _, text = _post(stub, change(log()))

    assert (status, orjson.loads(text)) == (400, {"error": message})
    assert fake.logs == []


def test_stricter_than_the_worker_meta_values_are_strings(stub: StubTreq) -> None:
    status, _, text = _post(stub, _with(log(), "providerRequest.meta.Helicone-Property-Seq", 3))
    assert status == 400 and "'meta' values should be strings" in text


@pytest.mark.parametrize(
    "request_id",
    ["req-1", "3f1e2d4c-5b6a-0798-8a1b-2c3d4e5f6a7b", "3f1e2d4c5b6a47988a1b2c3d4e5f6a7b"],
)
def test_stricter_than_the_worker_request_ids_are_uuids(request_id: str, stub: StubTreq) -> None:
    """Helicone would file these under a random id (getValidUUID): refused here."""
    status, _, text = _post(stub, log(**{"Helicone-Request-Id": request_id}))
    assert status == 400 and "must be a UUID" in text


def test_stricter_than_the_worker_time_to_first_token_is_a_number(stub: StubTreq) -> None:
    assert _post(stub, _with(log(), "timing.timeToFirstToken", "12"))[0] == 400
    assert _post(stub, _with(log(), "timing.timeToFirstToken", 12))[0] == 200


def test_an_empty_json_with_a_text_body_is_valid(fake: FakeHelicone, stub: StubTreq) -> None:
    doc = _with(log(), "providerResponse.json", {})
    doc["providerResponse"]["textBody"] = "upstream said no"

    assert _post(stub, doc)[0] == 200
    assert fake.logs[0].response_body == "upstream said no"


def test_a_payload_over_10_mib_is_400(fake: FakeHelicone, stub: StubTreq) -> None:
    big = _with(log(), "providerRequest.json", {"text": "x" * (10 * 1024 * 1024)})
    assert _post(stub, big)[::2] == (400, "Payload too large")
    assert fake.logs == []


def test_the_same_request_id_twice_is_one_request(fake: FakeHelicone, stub: StubTreq) -> None:
    _post(stub, log())
    _post(stub, log())

    assert len(fake.logs) == 1
    assert fake.duplicates == 1


def test_scripted_answers_come_first(fake: FakeHelicone, stub: StubTreq) -> None:
    fake.fail_next(
        Respond(429, headers={"Retry-After": "3"}), Respond(200, b'{"error":"kafka down"}')
    )

    status, headers, _ = _post(stub, log())
    assert (status, headers["retry-after"]) == (429, "3")
    assert _post(stub, log())[::2] == (200, '{"error":"kafka down"}')
    assert fake.logs == []
    assert _post(stub, log())[0] == 200


def test_a_hang_never_answers_until_released(fake: FakeHelicone, stub: StubTreq) -> None:
    fake.fail_next(Hang())
    d = stub.request("POST", URL, data=b"{}", headers={"Content-Type": "application/json"})
    stub.flush()
    out: list[Any] = []
    d.addBoth(out.append)

    assert out == [] and fake.hung == 1
    fake.release_hung(504)
    stub.flush()
    assert out[0].code == 504


def test_other_paths_are_invalid(stub: StubTreq) -> None:
    assert _post(stub, log(), url="https://api.worker.helicone.ai/v1/log")[::2] == (
        400,
        "invalid path",
    )


@pytest_twisted.inlineCallbacks
def test_it_serves_on_a_real_port() -> Any:
    from twisted.internet import reactor

    fake = FakeHelicone()
    running = listen_fake_helicone(fake)
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, pool=pool))
    try:
        response = yield client.post(
            running.log_url,
            data=orjson.dumps(log()),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {DEFAULT_KEY}"},
        )
        body = yield treq.content(response)
        assert (response.code, body) == (200, b"ok")
        assert fake.logs[0].request_id == REQUEST_ID
    finally:
        yield running.stop()
        yield pool.closeCachedConnections()
