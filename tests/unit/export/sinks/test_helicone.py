"""The Helicone sink: the log body of each kind of exchange, and how one batch of
several POSTs turns into one verdict, against the fake Helicone through StubTreq."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from llmproxy.config.model import ExporterSettings
from llmproxy.export.sink import Sink
from llmproxy.export.sinks.helicone import (
    HeliconeSink,
    SessionTree,
    helicone_request_id,
    log_body,
    log_url,
    log_urls,
)
from llmproxy.export.verdict import Delivered, Rejected, Retry
from llmproxy.testing import older_chunk_shape
from tests.fakes.helicone import (
    DEFAULT_KEY,
    FakeHelicone,
    Hang,
    HeliconeUsage,
    Respond,
    StoredLog,
    read_response,
)
from tests.unit.export.sinks.test_lunary import (
    CACHE_KEY,
    OPENAI_REQUEST,
    OPENAI_RESPONSE,
    NoClient,
    RefusingClient,
    anthropic_json,
    anthropic_record,
    anthropic_stream,
    at_now,
    binary_audio,
    cache_hit,
    not_modified,
    openai_json,
    openai_stream,
    plain_text,
    rate_limited,
    reasons_of,
    request_only,
    timed_out,
    verdict_of,
)
from tests.unit.export.sinks.test_lunary import _finish as finish

EU = "https://eu.api.worker.helicone.ai"
OK = Respond(200, b"ok", store=True)  # a scripted answer that stores the log, as Helicone would


def settings(**kw: Any) -> ExporterSettings:
    kw.setdefault("api_key", DEFAULT_KEY)
    return ExporterSettings(name="helicone", type="helicone", **kw)


class LaterClient:
    """StubTreq's answers, each given ``delay`` seconds later on the clock, so
    several requests can be in flight at once; counts them."""

    def __init__(self, stub: StubTreq, clock: Clock, delay: float) -> None:
        self._stub, self._clock, self._delay = stub, clock, delay
        self.in_flight = 0
        self.max_in_flight = 0

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        d: Deferred[Any] = Deferred()

        def answer() -> None:
            self.in_flight -= 1
            self._stub.request(method, url, **kwargs).chainDeferred(d)

        self._clock.callLater(self._delay, answer)
        return d


def against_fake(
    concurrency: int = 4, remember: int = 65536, later: float | None = None, **kw: Any
) -> tuple[HeliconeSink, FakeHelicone, Clock]:
    clock = at_now()
    fake = FakeHelicone(clock=clock)
    client: Any = StubTreq(fake)
    if later is not None:
        client = LaterClient(client, clock, later)
    base = HeliconeSink.from_settings(settings(**kw), client=client, clock=clock)
    sink = HeliconeSink(
        name=base.name,
        url=base.url,
        client=client,
        clock=clock,
        timeout=kw.get("timeout", 10.0),
        api_key=kw.get("api_key", DEFAULT_KEY),
        extra_headers=tuple(kw.get("headers", ())),
        concurrency=concurrency,
        remember=remember,
    )
    return sink, fake, clock


def stored(fake: FakeHelicone, request_id: str) -> StoredLog:
    return fake.by_id[helicone_request_id(request_id)]


# -- construction ----------------------------------------------------------------------


def test_it_is_a_sink_posting_to_the_us_worker_by_default() -> None:
    sink = HeliconeSink.from_settings(settings(), client=NoClient(), clock=at_now())
    assert isinstance(sink, Sink)
    assert sink.urls == {
        "OPENAI": "https://api.worker.helicone.ai/oai/v1/log",
        "ANTHROPIC": "https://api.worker.helicone.ai/anthropic/v1/log",
        "CUSTOM": "https://api.worker.helicone.ai/custom/v1/log",
    }
    assert sink.url == "https://api.worker.helicone.ai/custom/v1/log"


@pytest.mark.parametrize(
    "endpoint",
    [
        EU,
        EU + "/",
        EU + "/custom/v1/log",  # the manual logger's URL, as Helicone's docs give it
        EU + "/oai/v1/log",
        EU + "/anthropic/v1/log",
    ],
)
def test_a_worker_endpoint_gives_one_log_route_per_provider(endpoint: str) -> None:
    assert log_urls(endpoint) == {
        "OPENAI": EU + "/oai/v1/log",
        "ANTHROPIC": EU + "/anthropic/v1/log",
        "CUSTOM": EU + "/custom/v1/log",
    }
    assert log_url(endpoint) == EU + "/custom/v1/log"


def test_a_path_before_the_routes_is_kept() -> None:
    urls = log_urls("https://gw.example/helicone/anthropic/v1/log")
    assert urls["OPENAI"] == "https://gw.example/helicone/oai/v1/log"
    assert urls["CUSTOM"] == "https://gw.example/helicone/custom/v1/log"


@pytest.mark.parametrize("route", ["/v1/trace/custom/v1/log", "/v1/trace/custom/log"])
def test_a_self_hosted_jawn_route_takes_every_provider(route: str) -> None:
    url = "http://localhost:8585" + route
    assert set(log_urls(url).values()) == {url}


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"endpoint": "api.helicone.ai"}, "endpoint must be an http"),
        ({"endpoint": "https://k:s@api.worker.helicone.ai"}, "endpoint must not carry"),
        ({"api_key": ""}, "api_key .* is required"),
    ],
)
def test_bad_settings_are_config_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"exporter:helicone: {message}"):
        HeliconeSink.from_settings(settings(**kw), client=NoClient(), clock=at_now())


def test_the_helicone_request_id_is_a_uuid_derived_from_the_request_id() -> None:
    assert helicone_request_id("req-1") == helicone_request_id("req-1") != helicone_request_id("r")
    assert uuid.UUID(helicone_request_id("req-1")).version == 5


# -- the log body ------------------------------------------------------------------------


def test_an_openai_exchange_is_logged_with_its_request_response_and_timing() -> None:
    sink, fake, _ = against_fake()
    assert verdict_of(sink.deliver([openai_json()])) == Delivered()

    log = stored(fake, "req-oa-json")
    assert fake.requests[-1].authorization == f"Bearer {DEFAULT_KEY}"
    assert log.provider_request["url"] == "https://api.openai.com/v1/chat/completions"
    assert log.request_json == OPENAI_REQUEST
    assert log.response_json == OPENAI_RESPONSE
    assert log.provider_response["status"] == 200
    assert log.provider_response["headers"] == {
        "content-type": "application/json",
        "x-request-id": "up-1",
    }
    assert log.timing == {
        "startTime": {"seconds": 1_795_419_612, "milliseconds": 250},
        "endTime": {"seconds": 1_795_419_612, "milliseconds": 750},
    }


def test_meta_carries_the_ids_sessions_and_properties() -> None:
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([openai_json()]))

    log = stored(fake, "req-oa-json")
    assert log.provider == "OPENAI"
    assert "helicone-provider" not in log.meta  # Helicone reads it nowhere
    assert log.user_id == "alice"
    assert log.session == ("sess-1", "/sess-1", "openai")
    assert log.meta["helicone-request-id"] == helicone_request_id("req-oa-json")
    assert log.properties == {
        "request-id": "req-oa-json",
        "upstream-request-id": "up-1",  # the provider's own id of its answer
        "session-id": "sess-1",
        "seq": "2",
        "route": "openai",
        "environment": "prod",
        "machine": "proxy@host1",
        "outcome": "ok",
        "upstream-host": "api.openai.com",
        "usage": "upstream",
        # The request's own metadata (OpenAI's stored-completion tags).
        "team": "search",
        "ticket": "T-9",
        # The Sessions headers, which Helicone files as properties too.
        "Helicone-Session-Id": "sess-1",
        "Helicone-Session-Path": "/sess-1",
        "Helicone-Session-Name": "openai",
    }


def test_a_stream_goes_as_its_text_so_helicone_counts_its_tokens() -> None:
    sink, fake, _ = against_fake()
    event = openai_stream()
    verdict_of(sink.deliver([event]))

    log = stored(fake, "req-oa-sse")
    assert log.is_stream and log.request_json["stream"] is True
    assert log.response_json == {}
    assert log.response_body == "".join(event["response_chunks"])
    assert log.usage == HeliconeUsage(prompt_tokens=12, completion_tokens=3)
    assert log.cost_inputs == ("OPENAI", "gpt-4o-mini", log.usage)
    assert log.properties["usage"] == "upstream"
    assert log.time_to_first_token == 100


@pytest.mark.parametrize(
    "make",
    [openai_stream, lambda: openai_stream(usage=False), anthropic_stream, openai_json],
    ids=["openai-stream", "openai-stream-without-usage", "anthropic-stream", "json"],
)
def test_an_event_of_the_older_chunk_shape_is_the_same_log(make: Any) -> None:
    """Events written before the chunk offsets had their own list still wait in
    spools, dead-letter files and Redis streams after an upgrade."""
    event = make()
    older = older_chunk_shape(event)
    sink, fake, _ = against_fake()
    older_sink, older_fake, _ = against_fake()

    assert older_sink.encode([older]).body == sink.encode([event]).body
    assert verdict_of(sink.deliver([event])) == Delivered()
    assert verdict_of(older_sink.deliver([older])) == Delivered()
    assert older_fake.logs == fake.logs and len(fake.logs) == 1
    if event["response_chunks"] is not None:
        assert older_fake.logs[0].response_body.startswith("".join(event["response_chunks"]))
        assert older_fake.logs[0].usage is not None


def test_a_stream_sent_as_merged_json_would_get_no_tokens() -> None:
    """Why the text: Helicone's stream processors return at once on a JSON body."""
    clock = at_now()
    fake = FakeHelicone(clock=clock)
    doc = log_body(openai_stream())
    doc["providerResponse"] = {**doc["providerResponse"], "json": OPENAI_RESPONSE}
    del doc["providerResponse"]["textBody"]
    response = verdict_of(
        StubTreq(fake).post(
            "https://api.worker.helicone.ai/oai/v1/log",
            json=doc,
            headers={"Authorization": f"Bearer {DEFAULT_KEY}"},
        )
    )
    assert response.code == 200
    assert fake.logs[0].usage is None and fake.logs[0].cost_inputs is None


def test_a_cache_hit_is_logged_with_its_reply_and_marked_in_properties() -> None:
    sink, fake, _ = against_fake()
    events = [cache_hit(), cache_hit("req-hit-sse", stream=True), not_modified()]
    assert verdict_of(sink.deliver(events)) == Delivered()

    log = stored(fake, "req-hit")
    assert log.response_json == OPENAI_RESPONSE  # the upstream's usage, not an estimate
    assert log.provider_response["status"] == 200
    assert log.properties["usage"] == "upstream"
    assert (log.properties["cache-status"], log.properties["cache-key"]) == ("hit", CACHE_KEY)
    assert log.properties["cache-age"] == "42.5"
    # No upstream time: the answer took 0.4 ms, first byte included.
    assert log.timing == {
        "startTime": {"seconds": 1_795_419_612, "milliseconds": 250},
        "endTime": {"seconds": 1_795_419_612, "milliseconds": 250},
    }
    streamed = stored(fake, "req-hit-sse")
    assert streamed.usage == HeliconeUsage(prompt_tokens=12, completion_tokens=3)
    assert streamed.time_to_first_token == 0
    revalidated = stored(fake, "req-304")
    assert revalidated.provider_response["status"] == 304
    assert revalidated.provider_response["note"] == "no response body was captured"
    assert "usage" not in revalidated.properties
    assert revalidated.properties["cache-status"] == "conditional-hit"


def test_missing_usage_in_a_stream_is_estimated_in_a_line_helicone_reads() -> None:
    sink, fake, _ = against_fake()
    event = openai_stream(usage=False)
    verdict_of(sink.deliver([event]))

    log = stored(fake, "req-oa-sse")
    text = "".join(event["response_chunks"])
    assert log.response_body.startswith(text)
    added = log.response_body[len(text) :]
    assert added.startswith("data: {") and added.endswith("\n\n")
    line = orjson.loads(added[len("data: ") :])
    assert line["llmproxy_usage_estimated"] is True
    # "Be brief." + "Say hi" = 15 characters, "Grüß dich" = 9, at 4 per token.
    assert log.usage == HeliconeUsage(prompt_tokens=4, completion_tokens=3)
    assert log.properties["usage"] == "estimated"


def test_without_the_added_line_helicone_would_count_minus_one() -> None:
    event = openai_stream(usage=False)
    text = "".join(event["response_chunks"])
    assert read_response("OPENAI", True, text, "gpt-4o-mini")[1] == HeliconeUsage(-1, -1)


def test_a_stream_cut_at_the_capture_cap_still_gets_a_usage_line() -> None:
    event = openai_stream(usage=False)
    event["response_chunks"][-1] = 'data: {"id": "chatcmpl-2", "obj'  # cut
    body = log_body(event)["providerResponse"]["textBody"]
    assert '{"id": "chatcmpl-2", "obj\n\ndata: {' in body
    assert read_response("OPENAI", True, body, "gpt-4o-mini")[1] == HeliconeUsage(4, 3)


def test_missing_usage_in_json_is_estimated_and_marked() -> None:
    event = openai_json()
    event["response_body"]["text"] = orjson.dumps(
        {k: v for k, v in OPENAI_RESPONSE.items() if k != "usage"}
    ).decode()
    response = log_body(event)["providerResponse"]["json"]
    assert response["usage"] == {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
    assert response["llmproxy_usage_estimated"] is True


def test_an_anthropic_exchange_is_logged_under_anthropic_and_priced() -> None:
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([anthropic_json(), anthropic_stream()]))

    plain = stored(fake, "req-an-json")
    assert fake.requests[0].path == "/anthropic/v1/log"
    assert plain.provider == "ANTHROPIC"
    assert plain.user_id == "bob"
    assert plain.usage == HeliconeUsage(10, 3, cache_read_tokens=4)
    assert plain.cost_inputs == ("ANTHROPIC", "claude-sonnet-4-5", plain.usage)
    streamed = stored(fake, "req-an-sse")
    assert streamed.provider == "ANTHROPIC"
    assert streamed.response_json == {}
    assert streamed.processed[0]["id"] == "msg_2"
    assert streamed.usage == HeliconeUsage(10, 4)
    assert streamed.cost_inputs == ("ANTHROPIC", "claude-sonnet-4-5", streamed.usage)


def test_each_provider_is_posted_to_its_own_route() -> None:
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([openai_json(), anthropic_json(), plain_text()]))

    assert [r.path for r in fake.requests] == [
        "/oai/v1/log",
        "/anthropic/v1/log",
        "/oai/v1/log",  # a plain-text answer on the openai route: still OpenAI
    ]
    other = openai_json("req-other", provider="vllm", upstream="http://10.0.0.9:8000/v1/x")
    other["response_body"]["text"] = '{"answer": 42}'
    assert log_body(other)["provider"] == "CUSTOM"


def test_anthropic_usage_is_estimated_in_anthropics_shape() -> None:
    record = anthropic_record("req-an-nousage", {"model": "claude-x", "messages": []})
    body = b'{"type":"message","role":"assistant","content":[{"type":"text","text":"12345678"}]}'
    event = finish(record, 200, b"application/json", [body])

    usage = log_body(event)["providerResponse"]["json"]["usage"]

    assert usage == {"input_tokens": 0, "output_tokens": 2}


def test_the_provider_is_detected_from_the_host_when_the_route_does_not_say() -> None:
    event = anthropic_json()
    event["provider"] = ""
    assert log_body(event)["provider"] == "ANTHROPIC"
    event["upstream_host"] = "llm.internal:8443"
    assert log_body(event)["provider"] == "ANTHROPIC"  # body shape


def test_a_self_hosted_jawn_reads_the_provider_from_the_body() -> None:
    clock = at_now()
    fake = FakeHelicone(clock=clock)
    url = "http://localhost:8585/v1/trace/custom/v1/log"
    sink = HeliconeSink.from_settings(settings(endpoint=url), client=StubTreq(fake), clock=clock)
    verdict_of(sink.deliver([openai_json(), anthropic_json()]))
    assert {r.path for r in fake.requests} == {"/v1/trace/custom/v1/log"}
    assert [log.provider for log in fake.logs] == ["OPENAI", "ANTHROPIC"]


# -- sessions ----------------------------------------------------------------------------


def fork_event(child: str, parent: str) -> dict[str, Any]:
    return {"type": "fork", "session_id": child, "parent_session": parent, "from_seq": 1}


def test_a_fork_is_a_branch_of_its_conversations_helicone_session() -> None:
    sink, fake, _ = against_fake()
    forked = openai_json("req-fork")
    forked["session_id"] = "sess-2"
    deeper = openai_json("req-fork-2")
    deeper["session_id"] = "sess-3"
    batch = [fork_event("sess-2", "sess-1"), forked, fork_event("sess-3", "sess-2"), deeper]
    verdict_of(sink.deliver([openai_json(), *batch]))

    assert stored(fake, "req-oa-json").session == ("sess-1", "/sess-1", "openai")
    assert stored(fake, "req-fork").session == ("sess-1", "/sess-1/sess-2", "openai")
    assert stored(fake, "req-fork-2").session == ("sess-1", "/sess-1/sess-2/sess-3", "openai")
    # llmproxy's own session id stays a property.
    assert stored(fake, "req-fork").properties["session-id"] == "sess-2"


def test_a_fork_learnt_in_an_earlier_batch_is_remembered() -> None:
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([fork_event("sess-2", "sess-1")]))
    forked = openai_json("req-fork")
    forked["session_id"] = "sess-2"
    verdict_of(sink.deliver([forked]))
    assert stored(fake, "req-fork").session[:2] == ("sess-1", "/sess-1/sess-2")


def test_the_session_tree_is_bounded() -> None:
    tree = SessionTree(limit=2)
    for child, parent in (("b", "a"), ("c", "b"), ("d", "c")):
        tree.learn(fork_event(child, parent))
    assert tree.chain("d") == ["b", "c", "d"]  # "b"'s parent was forgotten


def test_the_session_tree_never_loops() -> None:
    tree = SessionTree()
    tree.learn(fork_event("b", "a"))
    tree.learn(fork_event("a", "b"))  # a cycle (the tracker never makes one)
    assert tree.chain("a") == ["b", "a"]
    for i in range(100):
        tree.learn(fork_event(f"s{i + 1}", f"s{i}"))
    assert len(tree.chain("s100")) == 32


def test_an_exchange_without_a_session_has_no_session_headers() -> None:
    event = openai_json()
    event["session_id"] = None
    meta = log_body(event)["providerRequest"]["meta"]
    assert not any(name.startswith("Helicone-Session") for name in meta)


def test_an_error_response_is_logged_as_is_without_invented_usage() -> None:
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([rate_limited()]))

    log = stored(fake, "req-429")
    assert log.provider_response["status"] == 429
    assert log.response_json["error"]["code"] == "rate_limit_exceeded"
    assert "usage" not in log.response_json
    assert "usage" not in log.properties


def test_a_timeout_without_status_is_logged_with_status_0_and_a_note() -> None:
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([timed_out()]))

    log = stored(fake, "req-timeout")
    assert log.provider_response["status"] == 0
    assert log.response_json == {}
    assert log.provider_response["note"] == "no response body was captured"
    assert log.properties["outcome"] == "timeout"


def test_a_non_json_body_goes_as_text_body_with_an_empty_json() -> None:
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([plain_text()]))

    log = stored(fake, "req-text")
    assert log.response_json == {}
    assert log.provider_response["textBody"] == "pong from a plain server"
    assert "not a JSON object" in log.provider_response["note"]
    assert log.response_body == "pong from a plain server"


def test_a_binary_body_goes_as_base64_with_an_empty_json() -> None:
    sink, fake, _ = against_fake()
    verdict_of(sink.deliver([binary_audio()]))

    log = stored(fake, "req-audio")
    assert log.response_json == {}
    assert log.provider_response["base64"] == "//uQAAABAv4="
    assert "base64" in log.provider_response["note"]


def test_a_request_body_that_is_not_json_is_carried_as_text() -> None:
    event = openai_json()
    event["request_body"]["text"] = '{"model": "gpt-4o-mini", "messages": [{"ro'  # cut at the cap
    request = log_body(event)["providerRequest"]["json"]
    assert request["text"].startswith('{"model"')
    assert "not captured as a JSON object" in request["llmproxy_note"]


def test_timing_never_has_the_end_before_the_start() -> None:
    event = openai_json()
    event["end"] = "2026-11-23T07:40:11.000000000Z"
    timing = log_body(event)["timing"]
    assert (
        timing["endTime"] == timing["startTime"] == {"seconds": 1_795_419_612, "milliseconds": 250}
    )


# -- batches and verdicts ----------------------------------------------------------------


def test_each_exchange_is_its_own_post_and_request_events_are_skipped() -> None:
    sink, fake, _ = against_fake()
    batch = [request_only(), openai_json(), anthropic_json(), request_only("x"), openai_stream()]

    assert verdict_of(sink.deliver(batch)) == Delivered()
    assert fake.request_count == 3
    assert len(fake.logs) == 3


def test_a_batch_of_request_events_is_delivered_without_a_request() -> None:
    sink, fake, _ = against_fake()
    assert verdict_of(sink.deliver([request_only("a"), request_only("b")])) == Delivered()
    assert fake.request_count == 0


def test_a_400_refuses_that_event_alone() -> None:
    sink, fake, _ = against_fake(concurrency=1)
    fake.fail_next(OK, Respond(400, b'{"error": "Invalid timing structure or value type"}'))

    verdict = verdict_of(sink.deliver([openai_json(), anthropic_json(), openai_stream()]))

    assert verdict == Delivered(rejected={1: "HTTP 400: Invalid timing structure or value type"})
    assert fake.request_count == 3


def test_a_refused_key_rejects_the_batch_and_stops_sending() -> None:
    sink, fake, _ = against_fake(concurrency=1, api_key="sk-helicone-revoked-000000")

    verdict = verdict_of(sink.deliver([openai_json(), anthropic_json(), openai_stream()]))

    assert isinstance(verdict, Rejected)
    assert verdict.reason.startswith("HTTP 401:")
    assert "sk-helicone-revoked-000000" not in verdict.reason
    assert fake.request_count == 1


def test_a_retryable_failure_midway_retries_the_whole_batch_and_stops_sending() -> None:
    sink, fake, _ = against_fake(concurrency=1)
    fake.fail_next(OK, Respond(503, b"upstream connect error"))
    batch = [openai_json(), anthropic_json(), openai_stream()]

    assert verdict_of(sink.deliver(batch)) == Retry("HTTP 503: upstream connect error", None)
    assert fake.request_count == 2
    assert len(fake.logs) == 1


def test_a_retried_batch_sends_only_what_was_not_delivered() -> None:
    sink, fake, _ = against_fake(concurrency=1)
    fake.fail_next(OK, 503)
    batch = [openai_json(), anthropic_json(), openai_stream()]
    verdict_of(sink.deliver(batch))

    assert verdict_of(sink.deliver(batch)) == Delivered()
    assert fake.request_count == 4  # 1 ok + 1 failed, then the 2 left
    assert len(fake.logs) == 3
    assert fake.duplicates == 0


def test_a_refusal_is_remembered_across_a_retry() -> None:
    sink, fake, _ = against_fake(concurrency=1)
    fake.fail_next(Respond(400, b'{"error": "bad"}'), 503)
    batch = [openai_json(), anthropic_json()]
    assert isinstance(verdict_of(sink.deliver(batch)), Retry)

    assert verdict_of(sink.deliver(batch)) == Delivered(rejected={0: "HTTP 400: bad"})
    assert fake.request_count == 3


def test_after_a_restart_a_resent_log_is_the_same_helicone_request() -> None:
    clock = at_now()
    fake = FakeHelicone(clock=clock)
    for _ in range(2):  # two sink instances: the second knows nothing of the first
        sink = HeliconeSink.from_settings(settings(), client=StubTreq(fake), clock=clock)
        assert verdict_of(sink.deliver([openai_json()])) == Delivered()

    assert len(fake.logs) == 1
    assert fake.duplicates == 1


def test_what_is_remembered_is_bounded() -> None:
    sink, fake, _ = against_fake(remember=2)
    verdict_of(sink.deliver([openai_json("a"), openai_json("b"), openai_json("c")]))

    verdict_of(sink.deliver([openai_json("a"), openai_json("c")]))

    assert fake.request_count == 4  # "a" was forgotten and sent again, "c" was not
    assert fake.duplicates == 1


def test_a_200_with_an_error_is_retried() -> None:
    sink, fake, _ = against_fake()
    fake.fail_next(Respond(200, b'{"error": "Error inserting into clickhouse"}'))

    verdict = verdict_of(sink.deliver([openai_json()]))

    assert verdict == Retry(
        "HTTP 200: Helicone could not store the log: Error inserting into clickhouse", None
    )


def test_rate_limits_are_retried_after_the_longest_retry_after() -> None:
    sink, fake, clock = against_fake(concurrency=2, later=1.0)
    fake.fail_next(
        Respond(429, headers={"Retry-After": "3"}), Respond(429, headers={"Retry-After": "9"})
    )
    d = sink.deliver([openai_json(), anthropic_json(), openai_stream()])

    clock.advance(1.0)

    assert verdict_of(d) == Retry("HTTP 429", 9.0)
    assert fake.request_count == 2  # the third was never sent


def test_at_most_concurrency_posts_are_in_flight() -> None:
    sink, fake, clock = against_fake(concurrency=2, later=1.0)
    d = sink.deliver([openai_json(str(i)) for i in range(5)])
    client = sink._client
    assert isinstance(client, LaterClient)

    assert client.in_flight == 2
    clock.pump([1.0] * 3)

    assert verdict_of(d) == Delivered()
    assert client.max_in_flight == 2
    assert len(fake.logs) == 5


def test_a_hung_post_is_retried_after_the_timeout() -> None:
    sink, fake, clock = against_fake(timeout=5.0)
    fake.fail_next(Hang())
    d = sink.deliver([openai_json()])

    clock.advance(5.0)

    assert verdict_of(d) == Retry("timed out after 5s")


def test_a_connection_failure_is_retried() -> None:
    sink = HeliconeSink.from_settings(settings(), client=RefusingClient(), clock=at_now())
    assert verdict_of(sink.deliver([openai_json()])) == Retry("connection refused")


def test_an_event_that_cannot_be_encoded_is_rejected_alone() -> None:
    sink, fake, _ = against_fake()
    broken = openai_json("req-broken")
    del broken["request_id"]

    verdict = verdict_of(sink.deliver([broken, anthropic_json()]))

    assert isinstance(verdict, Delivered)
    assert list(verdict.rejected) == [0] and "could not encode" in verdict.rejected[0]
    assert len(fake.logs) == 1


def test_extra_headers_are_sent() -> None:
    sink, fake, _ = against_fake(headers=(("Helicone-Target-Url", "https://x.example"),))
    verdict_of(sink.deliver([openai_json()]))
    assert fake.requests[-1].headers["helicone-target-url"] == "https://x.example"


@pytest.mark.parametrize("status", [200, 400, 401, 429, 500])
def test_the_key_never_appears_in_a_verdict(status: int) -> None:
    sink, fake, _ = against_fake()
    echo = f'{{"error": "rejected header Authorization: Bearer {DEFAULT_KEY}"}}'.encode()
    fake.fail_next(Respond(status, echo))

    reasons = reasons_of(verdict_of(sink.deliver([openai_json()])))

    assert reasons and all(DEFAULT_KEY not in r for r in reasons)
    assert "***" in reasons[0]
