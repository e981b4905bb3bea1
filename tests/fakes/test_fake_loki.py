"""The fake Loki enforces Loki's push rules, so tests against it mean something.

Each test states one documented behaviour of Loki's push endpoint (see the
docstring of :mod:`tests.fakes.loki` for the sources).
"""

from __future__ import annotations

import gzip
import zlib
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

from tests.fakes.loki import (
    FakeLoki,
    Hang,
    LokiLimits,
    Reset,
    Respond,
    listen_fake_loki,
)

URL = "http://loki:3100/loki/api/v1/push"
NOW = 1_795_419_612  # 2026-11-23T07:40:12Z
NS = 1_000_000_000
LABELS = {"app": "llmproxy", "log_type": "request"}


def _fired(d: Deferred[Any]) -> Any:
    """The result of a Deferred that must already have fired (StubTreq answers
    synchronous resources at once)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the request got no answer"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def _post(
    stub: StubTreq,
    body: Any,
    headers: Mapping[str, str] | None = None,
    *,
    gzipped: bool = False,
    url: str = URL,
) -> tuple[int, Mapping[str, str], str]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    sent = {"Content-Type": "application/json", **(headers or {})}
    if gzipped:
        data = gzip.compress(data)
        sent["Content-Encoding"] = "gzip"
    response = _fired(stub.request("POST", url, data=data, headers=sent))
    text = _fired(treq.content(response)).decode()
    got = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
    return response.code, got, text


def _push(*streams: tuple[Mapping[str, str], list[list[Any]]]) -> dict[str, Any]:
    return {"streams": [{"stream": dict(labels), "values": values} for labels, values in streams]}


def _ts(offset_s: float = 0) -> str:
    return str(int((NOW + offset_s) * NS))


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(NOW)
    return c


@pytest.fixture
def fake(clock: Clock) -> FakeLoki:
    return FakeLoki(clock=clock)


@pytest.fixture
def stub(fake: FakeLoki) -> StubTreq:
    return StubTreq(fake)


def test_a_valid_push_is_stored_and_answered_204(fake: FakeLoki, stub: StubTreq) -> None:
    status, _, text = _post(stub, _push((LABELS, [[_ts(), "hello"], [_ts(1), "world"]])))

    assert (status, text) == (204, "")
    stored = fake.entries()
    assert [(e.line, e.ts_ns) for e in stored] == [("hello", NOW * NS), ("world", (NOW + 1) * NS)]
    assert stored[0].labels == LABELS
    assert fake.streams() == [LABELS]


def test_a_gzipped_body_is_accepted_and_its_encoding_recorded(
    fake: FakeLoki, stub: StubTreq
) -> None:
    status, _, _ = _post(stub, _push((LABELS, [[_ts(), "zipped"]])), gzipped=True)

    assert status == 204
    assert [e.line for e in fake.entries()] == ["zipped"]
    assert fake.requests[0].content_encoding == "gzip"


def test_a_deflated_body_is_accepted(fake: FakeLoki, stub: StubTreq) -> None:
    raw = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = raw.compress(orjson.dumps(_push((LABELS, [[_ts(), "deflated"]])))) + raw.flush()

    status, _, _ = _post(stub, data, {"Content-Encoding": "deflate"})

    assert status == 204
    assert [e.line for e in fake.entries()] == ["deflated"]


def test_an_unknown_content_encoding_is_400(fake: FakeLoki, stub: StubTreq) -> None:
    status, _, text = _post(stub, _push((LABELS, [[_ts(), "x"]])), {"Content-Encoding": "br"})

    assert status == 400
    assert 'Content-Encoding "br" not supported' in text
    assert fake.entries() == []


def test_a_non_json_content_type_is_400(fake: FakeLoki, stub: StubTreq) -> None:
    status, _, _ = _post(
        stub, _push((LABELS, [[_ts(), "x"]])), {"Content-Type": "application/x-protobuf"}
    )

    assert status == 400
    assert fake.entries() == []


def test_malformed_json_is_400(fake: FakeLoki, stub: StubTreq) -> None:
    status, headers, _ = _post(stub, b'{"streams": [')

    assert status == 400
    assert headers["content-type"].startswith("text/plain")


def test_a_numeric_timestamp_refuses_the_whole_request(fake: FakeLoki, stub: StubTreq) -> None:
    body = _push((LABELS, [[_ts(), "fine"]]), ({"app": "b"}, [[NOW * NS, "number"]]))

    status, _, text = _post(stub, body)

    assert status == 400
    assert "timestamp" in text
    assert fake.entries() == []  # a parse error drops the good stream too


@pytest.mark.parametrize("ts", ["1.5e18", "17954196120000000000000", "", "12a", "2026-11-23"])
def test_a_timestamp_that_is_not_an_int64_string_is_400(
    fake: FakeLoki, stub: StubTreq, ts: str
) -> None:
    status, _, _ = _post(stub, _push((LABELS, [[ts, "bad"]])))

    assert status == 400
    assert fake.entries() == []


def test_a_non_string_label_value_is_400(fake: FakeLoki, stub: StubTreq) -> None:
    status, _, _ = _post(stub, {"streams": [{"stream": {"a": 1}, "values": [[_ts(), "x"]]}]})

    assert status == 400


@pytest.mark.parametrize("name", ["log-type", "1abc", "a.b", "é"])
def test_a_bad_label_name_drops_its_stream_and_keeps_the_others(
    fake: FakeLoki, stub: StubTreq, name: str
) -> None:
    body = _push(({name: "x"}, [[_ts(), "bad stream"]]), (LABELS, [[_ts(), "good stream"]]))

    status, _, text = _post(stub, body)

    assert status == 400
    assert "error parsing labels" in text
    assert [e.line for e in fake.entries()] == ["good stream"]


def test_a_stream_without_labels_is_refused(fake: FakeLoki, stub: StubTreq) -> None:
    body = _push(({}, [[_ts(), "no labels"]]), (LABELS, [[_ts(), "kept"]]))

    status, _, text = _post(stub, body)

    assert status == 400
    assert "at least one label pair is required" in text
    assert [e.line for e in fake.entries()] == ["kept"]


def test_more_than_15_label_names_is_refused(fake: FakeLoki, stub: StubTreq) -> None:
    labels = {f"l{i}": "v" for i in range(16)}

    status, _, text = _post(stub, _push((labels, [[_ts(), "x"]])))

    assert status == 400
    assert "has 16 label names; limit 15" in text
    fifteen = {f"l{i}": "v" for i in range(15)}
    assert _post(stub, _push((fifteen, [[_ts(), "x"]])))[0] == 204


def test_a_label_value_over_2048_bytes_is_refused(fake: FakeLoki, stub: StubTreq) -> None:
    status, _, text = _post(stub, _push(({"a": "v" * 2049}, [[_ts(), "x"]])))

    assert status == 400
    assert "label value too long" in text


def test_a_line_over_256kib_drops_that_entry_and_keeps_the_rest(
    fake: FakeLoki, stub: StubTreq
) -> None:
    limit = 256 * 1024
    body = _push((LABELS, [[_ts(), "x" * (limit + 1)], [_ts(1), "y" * limit], [_ts(2), "short"]]))

    status, _, text = _post(stub, body, gzipped=True)

    assert status == 400
    assert f"max entry size '{limit}' bytes exceeded" in text
    assert f"length '{limit + 1}' bytes" in text
    assert [len(e.line) for e in fake.entries()] == [limit, 5]


def test_the_line_limit_counts_utf8_bytes(fake: FakeLoki, stub: StubTreq) -> None:
    line = "é" * (256 * 1024 // 2 + 1)  # 2 bytes each: one byte over

    status, _, _ = _post(stub, _push((LABELS, [[_ts(), line]])))

    assert status == 400


def test_an_entry_older_than_a_week_is_refused(fake: FakeLoki, stub: StubTreq) -> None:
    week = 7 * 24 * 3600
    body = _push((LABELS, [[_ts(-week - 1), "too old"], [_ts(-week + 60), "old but fine"]]))

    status, _, text = _post(stub, body)

    assert status == 400
    assert "timestamp too old" in text
    assert [e.line for e in fake.entries()] == ["old but fine"]


def test_an_entry_beyond_the_creation_grace_period_is_refused(
    fake: FakeLoki, stub: StubTreq
) -> None:
    body = _push((LABELS, [[_ts(601), "future"], [_ts(599), "nearly now"]]))

    status, _, text = _post(stub, body)

    assert status == 400
    assert "timestamp too new" in text
    assert [e.line for e in fake.entries()] == ["nearly now"]


def test_old_samples_are_accepted_when_the_limit_is_off(clock: Clock) -> None:
    fake = FakeLoki(clock=clock, limits=LokiLimits(reject_old_samples=False))

    status, _, _ = _post(StubTreq(fake), _push((LABELS, [[_ts(-30 * 24 * 3600), "old"]])))

    assert status == 204


def test_out_of_order_entries_are_accepted_within_the_window(
    fake: FakeLoki, stub: StubTreq
) -> None:
    _post(stub, _push((LABELS, [[_ts(0), "newest"]])))

    status, _, _ = _post(stub, _push((LABELS, [[_ts(-3599), "earlier"]])))

    assert status == 204
    assert [e.line for e in fake.entries()] == ["earlier", "newest"]


def test_an_entry_too_far_behind_its_stream_is_refused(fake: FakeLoki, stub: StubTreq) -> None:
    _post(stub, _push((LABELS, [[_ts(0), "newest"]])))

    status, _, text = _post(stub, _push((LABELS, [[_ts(-3601), "too far behind"]])))

    assert status == 400
    assert "entry too far behind" in text
    assert [e.line for e in fake.entries()] == ["newest"]


def test_an_identical_entry_is_stored_once(fake: FakeLoki, stub: StubTreq) -> None:
    body = _push((LABELS, [[_ts(), "same"]]))

    assert _post(stub, body)[0] == 204
    assert _post(stub, body)[0] == 204

    assert [e.line for e in fake.entries()] == ["same"]
    assert fake.duplicates_dropped == 1


def test_same_timestamp_different_lines_are_both_kept(fake: FakeLoki, stub: StubTreq) -> None:
    _post(stub, _push((LABELS, [[_ts(), "one"], [_ts(), "two"]])))

    assert [e.line for e in fake.entries()] == ["one", "two"]


def test_structured_metadata_is_stored(fake: FakeLoki, stub: StubTreq) -> None:
    status, _, _ = _post(stub, _push((LABELS, [[_ts(), "x", {"request_id": "r1"}]])))

    assert status == 204
    assert fake.entries()[0].metadata == {"request_id": "r1"}


def test_non_string_structured_metadata_is_400(fake: FakeLoki, stub: StubTreq) -> None:
    status, _, _ = _post(stub, _push((LABELS, [[_ts(), "x", {"n": 1}]])))

    assert status == 400
    assert fake.entries() == []


def test_an_entry_with_four_elements_is_400(fake: FakeLoki, stub: StubTreq) -> None:
    status, _, _ = _post(stub, _push((LABELS, [[_ts(), "x", {}, "extra"]])))

    assert status == 400


def _limited(clock: Clock, **kw: Any) -> FakeLoki:
    # 1 KiB/s with a 2 KiB burst: small numbers for tests.
    return FakeLoki(
        clock=clock,
        limits=LokiLimits(ingestion_rate_mb=1 / 1024, ingestion_burst_size_mb=2 / 1024),
        **kw,
    )


def test_over_the_ingestion_rate_is_429_without_retry_after_and_nothing_stored(
    clock: Clock,
) -> None:
    fake = _limited(clock)
    stub = StubTreq(fake)
    assert _post(stub, _push((LABELS, [[_ts(), "a" * 1500]])))[0] == 204

    status, headers, text = _post(stub, _push((LABELS, [[_ts(1), "b" * 1500]])))

    assert status == 429
    assert "ingestion rate limit exceeded for user fake (limit: 1024 bytes/sec)" in text
    assert "retry-after" not in headers  # Loki sends none
    assert [e.line[0] for e in fake.entries()] == ["a"]


def test_a_test_may_ask_for_retry_after(clock: Clock) -> None:
    fake = _limited(clock, retry_after=True)
    stub = StubTreq(fake)
    assert _post(stub, _push((LABELS, [[_ts(), "a" * 1500]])))[0] == 204
    status, headers, _ = _post(stub, _push((LABELS, [[_ts(1), "b" * 1500]])))
    assert (status, headers["retry-after"]) == (429, "1")  # 952 bytes missing at 1024/s


def test_after_retry_after_seconds_the_same_push_is_accepted(clock: Clock) -> None:
    fake = _limited(clock, retry_after=True)
    stub = StubTreq(fake)
    _post(stub, _push((LABELS, [[_ts(), "a" * 2000]])))
    status, headers, _ = _post(stub, _push((LABELS, [[_ts(1), "b" * 2000]])))
    assert status == 429

    clock.advance(int(headers["retry-after"]))

    assert _post(stub, _push((LABELS, [[_ts(1), "b" * 2000]])))[0] == 204


def test_a_push_bigger_than_the_burst_is_429_without_retry_after(clock: Clock) -> None:
    fake = _limited(clock, retry_after=True)

    status, headers, _ = _post(StubTreq(fake), _push((LABELS, [[_ts(), "a" * 3000]])))

    assert status == 429
    assert "retry-after" not in headers  # it would never pass


def test_stock_loki_sends_no_retry_after(clock: Clock) -> None:
    fake = _limited(clock)
    stub = StubTreq(fake)
    _post(stub, _push((LABELS, [[_ts(), "a" * 2000]])))

    status, headers, _ = _post(stub, _push((LABELS, [[_ts(1), "b" * 2000]])))

    assert status == 429
    assert "retry-after" not in headers


def test_the_rate_limit_is_per_tenant(clock: Clock) -> None:
    fake = _limited(clock)
    stub = StubTreq(fake)
    _post(stub, _push((LABELS, [[_ts(), "a" * 2000]])), {"X-Scope-OrgID": "one"})

    status, _, _ = _post(stub, _push((LABELS, [[_ts(), "b" * 2000]])), {"X-Scope-OrgID": "two"})

    assert status == 204


def test_tenant_and_auth_headers_are_recorded_and_tenants_kept_apart(
    fake: FakeLoki, stub: StubTreq
) -> None:
    _post(
        stub,
        _push((LABELS, [[_ts(), "t1"]])),
        {"X-Scope-OrgID": "team-a", "Authorization": "Bearer abc"},
    )
    _post(stub, _push((LABELS, [[_ts(), "default"]])))

    assert fake.requests[0].tenant == "team-a"
    assert fake.requests[0].authorization == "Bearer abc"
    assert [e.line for e in fake.entries(tenant="team-a")] == ["t1"]
    assert [e.line for e in fake.entries(tenant="fake")] == ["default"]


def test_a_missing_tenant_is_401_when_required(clock: Clock) -> None:
    fake = FakeLoki(clock=clock, require_tenant=True)

    status, _, text = _post(StubTreq(fake), _push((LABELS, [[_ts(), "x"]])))

    assert (status, text) == (401, "no org id\n")


def test_a_gateway_refuses_the_wrong_credentials(clock: Clock) -> None:
    fake = FakeLoki(clock=clock, expected_authorization="Bearer right")
    stub = StubTreq(fake)

    assert _post(stub, _push((LABELS, [[_ts(), "x"]])), {"Authorization": "Bearer no"})[0] == 401
    assert _post(stub, _push((LABELS, [[_ts(), "x"]])), {"Authorization": "Bearer right"})[0] == 204


def test_entries_filter_by_labels(fake: FakeLoki, stub: StubTreq) -> None:
    _post(
        stub,
        _push(
            ({"app": "a", "log_type": "request"}, [[_ts(), "req"]]),
            ({"app": "a", "log_type": "response"}, [[_ts(), "resp"]]),
        ),
    )

    assert [e.line for e in fake.entries({"log_type": "response"})] == ["resp"]
    assert len(fake.entries({"app": "a"})) == 2
    assert fake.entries({"app": "other"}) == []


def test_scripted_statuses_come_first_and_store_nothing(fake: FakeLoki, stub: StubTreq) -> None:
    fake.fail_next(503, Respond(500, b"boom"))
    body = _push((LABELS, [[_ts(), "x"]]))

    assert _post(stub, body)[0] == 503
    assert _post(stub, body)[:3:2] == (500, "boom")
    assert fake.entries() == []
    assert _post(stub, body)[0] == 204
    assert fake.request_count == 3


def test_a_scripted_failure_can_store_before_failing(fake: FakeLoki, stub: StubTreq) -> None:
    fake.fail_next(Respond(500, store=True))

    assert _post(stub, _push((LABELS, [[_ts(), "stored anyway"]])))[0] == 500
    assert [e.line for e in fake.entries()] == ["stored anyway"]


def test_a_scripted_429_carries_its_retry_after(fake: FakeLoki, stub: StubTreq) -> None:
    fake.fail_next(Respond(429, headers={"Retry-After": "30"}))

    status, headers, _ = _post(stub, _push((LABELS, [[_ts(), "x"]])))

    assert (status, headers["retry-after"]) == (429, "30")


def test_a_hang_never_answers_until_released(fake: FakeLoki, stub: StubTreq) -> None:
    fake.fail_next(Hang())
    d = stub.request("POST", URL, data=b"{}", headers={"Content-Type": "application/json"})
    stub.flush()
    out: list[Any] = []
    d.addBoth(out.append)

    assert out == []
    assert fake.hung == 1
    fake.release_hung(503)
    stub.flush()
    assert out[0].code == 503


def test_a_reset_drops_the_connection_without_an_answer(fake: FakeLoki, stub: StubTreq) -> None:
    fake.fail_next(Reset())
    d = stub.request("POST", URL, data=b"{}", headers={"Content-Type": "application/json"})
    stub.flush()
    out: list[Any] = []
    d.addBoth(out.append)

    assert isinstance(out[0], Failure)
    assert fake.requests[0].status is None


def test_other_paths_are_404_and_other_methods_405(fake: FakeLoki, stub: StubTreq) -> None:
    assert _post(stub, b"{}", url="http://loki:3100/api/prom/push")[0] == 404
    response = _fired(stub.request("GET", URL))
    assert response.code == 405


@pytest_twisted.inlineCallbacks
def test_it_serves_on_a_real_port() -> Any:
    from twisted.internet import reactor

    fake = FakeLoki()  # real time: the entry below is "now"
    running = listen_fake_loki(fake)
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, pool=pool))
    try:
        ts = str(int(fake.now() * NS))
        body = gzip.compress(orjson.dumps(_push((LABELS, [[ts, "over tcp"]]))))
        response = yield client.post(
            running.push_url,
            data=body,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
        yield treq.content(response)
        assert response.code == 204
        assert [e.line for e in fake.entries()] == ["over tcp"]
        assert running.url.startswith("http://127.0.0.1:")
    finally:
        yield running.stop()
        yield pool.closeCachedConnections()


@pytest_twisted.inlineCallbacks
def test_stop_closes_a_hung_connection_on_a_real_port() -> Any:
    from twisted.internet import reactor

    fake = FakeLoki()
    fake.fail_next(Hang())
    running = listen_fake_loki(fake)
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, pool=pool))
    d = client.post(running.push_url, data=b"{}", headers={"Content-Type": "application/json"})
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    # Wait until the fake holds the request.
    while fake.hung == 0:
        yield _tick(reactor)

    yield running.stop()
    while not outcome:
        yield _tick(reactor)

    # release_hung answered 503 before the connection was dropped, or the drop won.
    assert isinstance(outcome[0], Failure) or outcome[0].code == 503
    if not isinstance(outcome[0], Failure):
        yield treq.content(outcome[0]).addErrback(lambda _: None)
    yield pool.closeCachedConnections()


def _tick(reactor: Any) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(0, d.callback, None)
    return d


# -- stricter, as Loki is (issue 18) -----------------------------------------------------


@pytest.mark.parametrize("body", [{"streams": []}, {}, {"streams": None}])
def test_a_push_without_streams_is_422(body: Any, fake: FakeLoki, stub: StubTreq) -> None:
    status, _, text = _post(stub, body)
    assert (status, text.strip()) == (
        422,
        "error at least one valid stream is required for ingestion",
    )


def test_a_stream_without_entries_is_no_error(fake: FakeLoki, stub: StubTreq) -> None:
    assert _post(stub, _push((LABELS, [])))[0] == 204


@pytest.mark.parametrize(
    ("tenant", "message"),
    [
        ("team/a", "tenant ID 'team/a' contains unsupported character '/'"),
        ("a b", "tenant ID 'a b' contains unsupported character ' '"),
        ("a|b", "tenant ID 'a|b' contains unsupported character '|'"),
        ("x" * 151, "tenant ID is too long: max 150 characters"),
        (".", "tenant ID is '.' or '..'"),
        ("..", "tenant ID is '.' or '..'"),
    ],
)
def test_a_tenant_outside_dskits_rule_is_400(
    tenant: str, message: str, fake: FakeLoki, stub: StubTreq
) -> None:
    status, _, text = _post(stub, _push((LABELS, [[_ts(), "x"]])), {"X-Scope-OrgID": tenant})
    assert (status, text.strip()) == (400, message)
    assert fake.entries() == []


@pytest.mark.parametrize("tenant", ["x" * 150, "a.b", "Team_1-(prod)*'!"])
def test_a_tenant_within_the_rule_is_accepted(tenant: str, fake: FakeLoki, stub: StubTreq) -> None:
    assert _post(stub, _push((LABELS, [[_ts(), "x"]])), {"X-Scope-OrgID": tenant})[0] == 204


def test_identical_validation_errors_are_grouped_with_a_count(
    fake: FakeLoki, stub: StubTreq
) -> None:
    old = _ts(-8 * 24 * 3600)
    body = _push((LABELS, [[old, "a"], [old, "b"], [_ts(), "kept"], [_ts(3600), "new"]]))
    status, _, text = _post(stub, body)
    assert status == 400
    parts = text.strip().split("; ")
    assert len(parts) == 2
    assert parts[0].startswith('2 errors like: entry for stream \'{app="llmproxy"')
    assert "has timestamp too old" in parts[0]
    assert parts[1].startswith("1 errors like: ") and "has timestamp too new" in parts[1]
    assert [e.line for e in fake.entries()] == ["kept"]


def test_the_stream_limit_refuses_new_streams_with_429_and_keeps_the_rest(clock: Clock) -> None:
    fake = FakeLoki(clock=clock, limits=LokiLimits(max_global_streams_per_user=2))
    stub = StubTreq(fake)
    first, second, third = ({"app": "a", "n": str(i)} for i in range(3))
    assert _post(stub, _push((first, [[_ts(), "1"]]), (second, [[_ts(), "2"]])))[0] == 204

    status, headers, text = _post(stub, _push((first, [[_ts(1), "1b"]]), (third, [[_ts(), "3"]])))

    assert status == 429 and "retry-after" not in headers
    assert text.startswith("maximum active stream limit exceeded when trying to create stream")
    assert '{app="a", n="2"}' in text and "user: 'fake'" in text
    assert sorted(e.line for e in fake.entries()) == ["1", "1b", "2"]  # the known stream kept
    # Another tenant has its own count.
    assert _post(stub, _push((third, [[_ts(), "3"]])), {"X-Scope-OrgID": "other"})[0] == 204


def test_the_per_stream_rate_limit_refuses_that_stream_with_429(clock: Clock) -> None:
    limits = LokiLimits(per_stream_rate_limit=1024, per_stream_rate_limit_burst=2048)
    fake = FakeLoki(clock=clock, limits=limits)
    stub = StubTreq(fake)
    busy, quiet = {"app": "busy"}, {"app": "quiet"}
    body = _push((busy, [[_ts(), "a" * 1500], [_ts(1), "b" * 1500]]), (quiet, [[_ts(), "q"]]))

    status, _, text = _post(stub, body)

    assert status == 429
    assert "Per stream rate limit exceeded (limit: 1.0 KiB/sec)" in text
    assert text.strip().endswith(
        "user 'fake', total ignored: 2 out of 2 for stream: {app=\"busy\"}"
    )
    assert [e.line for e in fake.entries()] == ["q"]  # the other stream was stored
    clock.advance(3)  # the bucket refills at 1 KiB/s
    assert _post(stub, _push((busy, [[_ts(), "a" * 1500]])))[0] == 204


def test_an_ingester_429_wins_over_validation_errors(clock: Clock) -> None:
    fake = FakeLoki(clock=clock, limits=LokiLimits(max_global_streams_per_user=1))
    stub = StubTreq(fake)
    old = _ts(-8 * 24 * 3600)
    body = _push(({"app": "a"}, [[_ts(), "kept"], [old, "old"]]), ({"app": "b"}, [[_ts(), "x"]]))
    status, _, text = _post(stub, body)
    assert status == 429 and "maximum active stream limit" in text
    assert [e.line for e in fake.entries()] == ["kept"]
