"""The fake Lunary enforces Lunary's ingestion rules, so tests against it mean something.

Each test states one behaviour of ``POST /v1/runs/ingest`` (see the docstring of
:mod:`tests.fakes.lunary` for the sources).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from tests.fakes.lunary import (
    DEFAULT_KEY,
    FakeLunary,
    Hang,
    Respond,
    listen_fake_lunary,
    uuid_from_seed,
)

URL = "https://api.lunary.ai/v1/runs/ingest"
NOW = 1_795_419_612  # 2026-11-23T07:40:12Z
RUN = "5d2c4a8e-1b3f-4c6d-9e7a-0f1b2c3d4e5f"
OTHER_RUN = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"


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
    headers: Mapping[str, str] | None = None,
    url: str = URL,
) -> tuple[int, Mapping[str, str], Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    sent = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    response = _fired(stub.request("POST", url, data=data, headers=sent))
    raw = _fired(treq.content(response)).decode()
    got = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = raw
    return response.code, got, parsed


def _post_waiting(
    stub: StubTreq, clock: Clock, body: Any, waits: int
) -> tuple[int, Mapping[str, str], Any]:
    """``_post`` for a request Lunary answers only after ``waits`` 5-second waits."""
    sent = {"Content-Type": "application/json", "Authorization": f"Bearer {DEFAULT_KEY}"}
    d = stub.request("POST", URL, data=orjson.dumps(body), headers=sent)
    stub.flush()
    out: list[Any] = []
    d.addBoth(out.append)
    for _ in range(waits):
        assert out == [], "answered before the wait was over"
        clock.advance(4.999)
        stub.flush()
        assert out == [], "answered before the wait was over"
        clock.advance(0.001)
        stub.flush()
    assert out, "no answer after the waits"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    response = out[0]
    return response.code, {}, orjson.loads(_fired(treq.content(response)))


def start(run: str = RUN, ts: str = "2026-11-23T07:40:12.000Z", **extra: Any) -> dict[str, Any]:
    return {
        "type": "llm",
        "event": "start",
        "runId": run,
        "timestamp": ts,
        "name": "gpt-4o",
        "input": [{"role": "user", "content": "hi"}],
        **extra,
    }


def end(run: str = RUN, ts: str = "2026-11-23T07:40:13.000Z", **extra: Any) -> dict[str, Any]:
    return {
        "type": "llm",
        "event": "end",
        "runId": run,
        "timestamp": ts,
        "output": {"role": "assistant", "content": "hello"},
        "tokensUsage": {"prompt": 3, "completion": 1},
        **extra,
    }


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(NOW)
    return c


@pytest.fixture
def fake(clock: Clock) -> FakeLunary:
    return FakeLunary(clock=clock)


@pytest.fixture
def stub(fake: FakeLunary) -> StubTreq:
    return StubTreq(fake)


def test_a_start_and_an_end_make_a_successful_run(fake: FakeLunary, stub: StubTreq) -> None:
    status, headers, reply = _post(stub, {"events": [start(), end()]})

    assert status == 200
    assert headers["content-type"] == "application/json"
    assert reply == {"results": [{"id": RUN, "success": True}, {"id": RUN, "success": True}]}
    run = fake.runs[RUN]
    assert (run.status, run.name, run.created_at) == (
        "success",
        "gpt-4o",
        "2026-11-23T07:40:12.000Z",
    )
    assert run.output == {"role": "assistant", "content": "hello"}
    assert (run.prompt_tokens, run.completion_tokens) == (3, 1)
    assert run.ended_at == "2026-11-23T07:40:13.000Z"


def test_a_single_event_object_is_accepted(fake: FakeLunary, stub: StubTreq) -> None:
    status, _, reply = _post(stub, {"events": start()})

    assert (status, reply) == (200, {"results": [{"id": RUN, "success": True}]})
    assert fake.runs[RUN].status == "started"


def test_a_bare_array_body_is_refused_and_nothing_stored(fake: FakeLunary, stub: StubTreq) -> None:
    status, _, reply = _post(stub, [start(), end()])

    assert (status, reply) == (500, {"message": "Missing events payload."})
    assert fake.runs == {}


def test_a_body_without_events_is_refused(stub: StubTreq) -> None:
    assert _post(stub, {"runs": [start()]})[0] == 500


def test_an_empty_events_array_is_an_empty_success(stub: StubTreq) -> None:
    assert _post(stub, {"events": []})[::2] == (200, {"results": []})


def test_a_body_that_is_not_json_is_400(stub: StubTreq) -> None:
    status, _, reply = _post(stub, b'{"events": [')
    assert status == 400
    assert "invalid JSON" in reply["message"]


@pytest.mark.parametrize("key", [None, "", "not-a-uuid", "sk-lunary-1234"])
def test_a_missing_or_malformed_key_is_402(key: str | None, stub: StubTreq) -> None:
    status, _, reply = _post(stub, {"events": [start()]}, key=key)
    assert (status, reply) == (402, {"message": "Incorrect project id format"})


def test_an_unknown_project_key_is_401(fake: FakeLunary, stub: StubTreq) -> None:
    status, _, reply = _post(stub, {"events": [start()]}, key=OTHER_RUN)

    assert (status, reply) == (401, {"message": "This project does not exist"})
    assert fake.runs == {}


def test_an_end_whose_start_was_never_seen_fails_that_event_after_five_seconds(
    fake: FakeLunary, stub: StubTreq, clock: Clock
) -> None:
    status, _, reply = _post_waiting(stub, clock, {"events": [start(OTHER_RUN), end(RUN)]}, 1)

    assert fake.waits == 1

    assert status == 200
    assert reply["results"][0] == {"id": OTHER_RUN, "success": True}
    assert reply["results"][1]["id"] == RUN
    assert reply["results"][1]["success"] is False
    assert "end before start" in reply["results"][1]["error"]
    assert RUN not in fake.runs


def test_an_error_whose_start_was_never_seen_fails_too(stub: StubTreq) -> None:
    error = {**end(), "event": "error", "error": {"message": "boom"}}
    result = _post(stub, {"events": [error]})[2]["results"][0]
    assert result["success"] is False and "end before start" in result["error"]


def test_an_error_event_marks_the_run_failed(fake: FakeLunary, stub: StubTreq) -> None:
    error = {**end(), "event": "error", "error": {"message": "HTTP 429: slow down"}}
    _post(stub, {"events": [start(), error]})

    assert fake.runs[RUN].status == "error"
    assert fake.runs[RUN].error == {"message": "HTTP 429: slow down"}


def test_a_second_start_for_a_run_fails_as_a_duplicate(fake: FakeLunary, stub: StubTreq) -> None:
    _post(stub, {"events": [start(), end()]})
    reply = _post(stub, {"events": [start(), end()]})[2]

    assert reply["results"][0] == {
        "id": RUN,
        "success": False,
        "error": "Run with this ID already exists in the database.",
    }
    assert reply["results"][1] == {"id": RUN, "success": True}
    assert fake.runs[RUN].status == "success"


def test_events_are_processed_in_timestamp_order(fake: FakeLunary, stub: StubTreq) -> None:
    reply = _post(
        stub, {"events": [end(ts="2026-11-23T07:40:13Z"), start(ts="2026-11-23T07:40:12Z")]}
    )

    assert [r["success"] for r in reply[2]["results"]] == [True, True]
    assert fake.runs[RUN].status == "success"


def test_an_end_timestamped_before_its_start_fails(
    fake: FakeLunary, stub: StubTreq, clock: Clock
) -> None:
    body = {"events": [start(ts="2026-11-23T07:40:13Z"), end(ts="2026-11-23T07:40:12Z")]}
    reply = _post_waiting(stub, clock, body, 1)

    results = reply[2]["results"]
    assert results[0]["success"] is False and "end before start" in results[0]["error"]
    assert fake.runs[RUN].status == "started"


def test_equal_timestamps_keep_the_order_sent(fake: FakeLunary, stub: StubTreq) -> None:
    ts = "2026-11-23T07:40:12.500Z"
    reply = _post(stub, {"events": [start(ts=ts), end(ts=ts)]})
    assert [r["success"] for r in reply[2]["results"]] == [True, True]


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("type", None, "invalid event type"),
        ("type", "completion", "invalid event type"),
        ("event", None, "event is required"),
        ("runId", None, "runId is required"),
        ("timestamp", None, "Invalid time value"),
        ("timestamp", "yesterday", "Invalid time value"),
    ],
)
def test_an_event_missing_a_required_field_fails_alone(
    field: str, value: Any, error: str, fake: FakeLunary, stub: StubTreq
) -> None:
    bad = start(OTHER_RUN)
    if value is None:
        del bad[field]
    else:
        bad[field] = value
    reply = _post(stub, {"events": [start(), bad]})[2]

    by_success = {r["success"]: r for r in reply["results"]}
    assert error in by_success[False]["error"]
    assert by_success[True]["id"] == RUN
    assert list(fake.runs) == [RUN]


def test_keys_become_camel_case_and_metadata_keeps_scalars_only(
    fake: FakeLunary, stub: StubTreq
) -> None:
    metadata = {"request_id": "req-1", "duration_ms": 12.5, "ok": True, "tags": ["a"], "nested": {}}
    _post(stub, {"events": [start(metadata=metadata, user_id="alice")]})

    run = fake.runs[RUN]
    assert run.metadata == {"requestId": "req-1", "durationMs": 12.5, "ok": True, "tags": ["a"]}
    assert run.user_id == "alice"


def test_a_run_id_that_is_not_a_uuid_is_stored_under_one_derived_from_it(
    fake: FakeLunary, stub: StubTreq
) -> None:
    reply = _post(stub, {"events": [start("req-123")]})[2]

    assert reply["results"] == [{"id": "req-123", "success": True}]
    assert list(fake.runs) == [uuid_from_seed("req-123")]


def test_params_or_extra_are_kept(fake: FakeLunary, stub: StubTreq) -> None:
    _post(stub, {"events": [start(params={"temperature": 0.2}), start(OTHER_RUN, extra={"n": 1})]})
    assert fake.runs[RUN].params == {"temperature": 0.2}
    assert fake.runs[OTHER_RUN].params == {"n": 1}


def test_past_150_requests_a_minute_is_429_with_retry_after(clock: Clock) -> None:
    fake = FakeLunary(clock=clock, rate_limit=2)
    stub = StubTreq(fake)
    assert _post(stub, {"events": []})[0] == 200
    clock.advance(20)
    assert _post(stub, {"events": []})[0] == 200
    status, headers, reply = _post(stub, {"events": [start()]})

    assert (status, reply) == (429, "Sometimes You Just Have to Slow Down.")
    assert headers["retry-after"] == "40"
    assert fake.runs == {}
    clock.advance(40)
    assert _post(stub, {"events": [start()]})[0] == 200


def test_the_default_rate_limit_is_lunarys_150(clock: Clock) -> None:
    fake = FakeLunary(clock=clock)
    stub = StubTreq(fake)
    statuses = [_post(stub, {"events": []})[0] for _ in range(151)]
    assert statuses.count(200) == 150 and statuses[-1] == 429


def test_scripted_answers_come_first_and_store_nothing(fake: FakeLunary, stub: StubTreq) -> None:
    fake.fail_next(Respond(402, b'{"message":"plan limit"}'), 503)

    assert _post(stub, {"events": [start()]})[:3:2] == (402, {"message": "plan limit"})
    assert _post(stub, {"events": [start()]})[0] == 503
    assert fake.runs == {}
    assert _post(stub, {"events": [start()]})[0] == 200


def test_a_scripted_failure_can_store_before_failing(fake: FakeLunary, stub: StubTreq) -> None:
    fake.fail_next(Respond(502, store=True))

    assert _post(stub, {"events": [start(), end()]})[0] == 502
    assert fake.runs[RUN].status == "success"


def test_a_scripted_429_carries_its_retry_after(fake: FakeLunary, stub: StubTreq) -> None:
    fake.fail_next(Respond(429, headers={"Retry-After": "7"}))
    status, headers, _ = _post(stub, {"events": [start()]})
    assert (status, headers["retry-after"]) == (429, "7")


def test_a_hang_never_answers_until_released(fake: FakeLunary, stub: StubTreq) -> None:
    fake.fail_next(Hang())
    d = stub.request("POST", URL, data=b"{}", headers={"Content-Type": "application/json"})
    stub.flush()
    out: list[Any] = []
    d.addBoth(out.append)

    assert out == [] and fake.hung == 1
    fake.release_hung(503)
    stub.flush()
    assert out[0].code == 503


def test_other_paths_are_404_and_other_methods_405(stub: StubTreq) -> None:
    assert _post(stub, {}, url="https://api.lunary.ai/v1/runs")[0] == 404
    response = _fired(stub.request("GET", URL))
    assert response.code == 405


@pytest_twisted.inlineCallbacks
def test_it_serves_on_a_real_port() -> Any:
    from twisted.internet import reactor

    fake = FakeLunary()
    running = listen_fake_lunary(fake)
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, pool=pool))
    try:
        response = yield client.post(
            running.url + "/v1/runs/ingest",
            data=orjson.dumps({"events": [start()]}),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {DEFAULT_KEY}"},
        )
        body = yield treq.content(response)
        assert response.code == 200
        assert orjson.loads(body) == {"results": [{"id": RUN, "success": True}]}
        assert RUN in fake.runs
    finally:
        yield running.stop()
        yield pool.closeCachedConnections()


# -- stricter, as Lunary is (issue 18) ---------------------------------------------------


@pytest.mark.parametrize(
    ("event", "error"),
    [
        (
            start(input=[{"role": "user", "content": "a\x00b"}]),
            "unsupported Unicode escape sequence",
        ),
        (start(name="gpt\x004o"), 'invalid byte sequence for encoding "UTF8": 0x00'),
        (start(userId="bob\x00"), 'invalid byte sequence for encoding "UTF8": 0x00'),
        (start(metadata={"k": "v\x00"}), "unsupported Unicode escape sequence"),
        (start(params={"stop": ["\x00"]}), "unsupported Unicode escape sequence"),
    ],
)
def test_a_nul_character_fails_that_start(
    event: dict[str, Any], error: str, fake: FakeLunary, stub: StubTreq
) -> None:
    reply = _post(stub, {"events": [event, start(OTHER_RUN)]})[2]

    assert reply["results"][0] == {"id": RUN, "success": False, "error": error}
    assert reply["results"][1]["success"] is True
    assert list(fake.runs) == [OTHER_RUN]


def test_a_nul_in_the_output_fails_that_end(fake: FakeLunary, stub: StubTreq) -> None:
    bad = end(output={"role": "assistant", "content": "\x00"})
    reply = _post(stub, {"events": [start(), bad]})[2]

    assert reply["results"][1]["success"] is False
    assert reply["results"][1]["error"] == "unsupported Unicode escape sequence"
    assert fake.runs[RUN].status == "started"


def test_each_end_of_a_failed_start_waits_five_seconds_one_after_the_other(
    fake: FakeLunary, stub: StubTreq, clock: Clock
) -> None:
    fake.fail_starts(RUN, OTHER_RUN)
    body = {"events": [start(), start(OTHER_RUN), end(), end(OTHER_RUN)]}

    status, _, reply = _post_waiting(stub, clock, body, 2)

    assert status == 200 and fake.waits == 2
    assert [r["success"] for r in reply["results"]] == [False, False, False, False]
    assert reply["results"][0]["error"] == "connection to database lost"
    assert fake.runs == {}


def test_an_error_event_never_waits(fake: FakeLunary, stub: StubTreq) -> None:
    fake.fail_starts(RUN)
    error = {**end(), "event": "error", "error": {"message": "boom"}}
    reply = _post(stub, {"events": [start(), error]})[2]
    assert fake.waits == 0
    assert reply["results"][1]["success"] is False


def test_a_client_that_leaves_during_the_wait_does_not_stop_the_ingestion(
    fake: FakeLunary, stub: StubTreq, clock: Clock
) -> None:
    fake.fail_starts(RUN)
    body = {"events": [start(), end(), start(OTHER_RUN), end(OTHER_RUN)]}
    sent = {"Content-Type": "application/json", "Authorization": f"Bearer {DEFAULT_KEY}"}
    d = stub.request("POST", URL, data=orjson.dumps(body), headers=sent)
    stub.flush()
    d.cancel()
    d.addErrback(lambda _: None)
    clock.advance(5)
    stub.flush()
    assert fake.runs[OTHER_RUN].status == "success"  # Lunary went on after the wait
