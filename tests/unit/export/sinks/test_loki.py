"""The Loki sink: what it sends (encode) and how it reads Loki's answers (judge),
directly and against the fake Loki through StubTreq."""

from __future__ import annotations

import base64
import gzip
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from llmproxy.config.loader import ConfigError
from llmproxy.config.model import ExporterSettings
from llmproxy.export.sink import EncodedBatch, Sink
from llmproxy.export.sinks.loki import LokiSink, push_url, shorten_line
from llmproxy.export.verdict import Delivered, Rejected, Retry, Verdict
from llmproxy.runtime.checks import load_checked
from llmproxy.testing import older_chunk_shape
from tests.fakes.loki import FakeLoki, Hang, LokiLimits, Respond

NOW = 1_795_419_612  # 2026-11-23T07:40:12Z
NS = 1_000_000_000
CANARY = "sk-canary-0123456789abcdef"
PASSWORD = "pa55-w0rd-secret"
TOKEN = "glc_bearer-token-secret"


def event(
    i: int = 0,
    *,
    type: str = "request",
    provider: str = "openai",
    environment: str = "prod",
    machine: str = "alice@box",
    ts_ns: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    ts = NOW * NS + i if ts_ns is None else ts_ns
    e: dict[str, Any] = {
        "schema": 1,
        "type": type,
        "ts": "2026-11-23T07:40:12.000000000Z",
        "ts_ns": ts,
        "request_id": f"req-{i}",
        "session_id": f"sess-{i}",
        "seq": i,
        "route": "openai",
        "provider": provider,
        "upstream_host": "api.openai.com",
        "environment": environment,
        "machine": machine,
    }
    e.update(extra)
    return e


def big_event(
    body_chars: int, *, chunks: int = 0, header_chars: int = 10, older: bool = False
) -> dict[str, Any]:
    """A response event shaped as llmproxy/capture/events.py makes them (``older``:
    its stream as an earlier version wrote it, a dict per read)."""
    e = event(
        type="response",
        status=200,
        outcome="ok",
        request_headers={"authorization": "Bearer sk-...cdef", "x-big": "h" * header_chars},
        request_body={
            "text": 'q"\n' * (body_chars // 3),
            "base64": None,
            "size": body_chars,
            "captured_bytes": body_chars,
            "truncated": False,
        },
        response_headers={"content-type": "text/event-stream"},
        response_body={
            "text": "é" * body_chars,
            "base64": None,
            "size": body_chars,
            "captured_bytes": body_chars,
            "truncated": False,
        },
        response_chunks=['data: {"delta": "hi"}\n\n'] * chunks,
        response_chunk_offsets_ms=[j / 10 for j in range(chunks)],
    )
    return older_chunk_shape(e) if older else e


def settings(**kw: Any) -> ExporterSettings:
    kw.setdefault("url", "http://loki:3100")
    return ExporterSettings(name="loki", type="loki", **kw)


def make_sink(client: Any = None, clock: Clock | None = None, **kw: Any) -> LokiSink:
    clock = clock or at_now()
    return LokiSink.from_settings(settings(**kw), client=client or _NoClient(), clock=clock)


def at_now() -> Clock:
    clock = Clock()
    clock.advance(NOW)
    return clock


class _NoClient:
    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        raise AssertionError("no HTTP expected")


class _RefusingClient:
    def __init__(self) -> None:
        self.urls: list[str] = []

    def request(self, method: str, url: Any, **kwargs: Any) -> Deferred[Any]:
        self.urls.append(str(url))
        return fail(net_error.ConnectionRefusedError("127.0.0.1:3100"))


def decode(batch: EncodedBatch) -> dict[str, Any]:
    body = batch.body
    if batch.headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    doc: dict[str, Any] = orjson.loads(body)
    return doc


def verdict_of(d: Deferred[Verdict]) -> Verdict:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "no verdict yet"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    result: Verdict = out[0]
    return result


def against_fake(**kw: Any) -> tuple[LokiSink, FakeLoki, Clock]:
    clock = at_now()
    fake_kw = {k: kw.pop(k) for k in ("limits", "expected_authorization") if k in kw}
    fake = FakeLoki(clock=clock, **fake_kw)
    sink = make_sink(StubTreq(fake), clock, **kw)
    return sink, fake, clock


# -- construction ------------------------------------------------------------------


def test_it_is_a_sink() -> None:
    assert isinstance(make_sink(), Sink)


@pytest.mark.parametrize(
    ("given_url", "expected"),
    [
        ("http://loki:3100", "http://loki:3100/loki/api/v1/push"),
        ("http://loki:3100/", "http://loki:3100/loki/api/v1/push"),
        ("https://logs.example/loki/api/v1/push", "https://logs.example/loki/api/v1/push"),
        ("http://gw/tenant-a", "http://gw/tenant-a/loki/api/v1/push"),
    ],
)
def test_the_push_path_is_appended_unless_present(given_url: str, expected: str) -> None:
    assert push_url(given_url) == expected
    assert make_sink(url=given_url).url == expected


@pytest.mark.parametrize("url", ["", "loki:3100", "ftp://loki/"])
def test_a_missing_or_non_http_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ValueError, match="exporter:loki: url"):
        make_sink(url=url)


@pytest.mark.parametrize("name", ["log-type", "1st", "team.name", "ünï", ""])
def test_a_bad_static_label_name_is_a_config_error_naming_it(name: str) -> None:
    with pytest.raises(ValueError, match=f"exporter:loki: loki label name {name!r} is invalid"):
        make_sink(labels=((name, "x"),))


def test_reserved_and_per_event_label_names_are_refused() -> None:
    with pytest.raises(ValueError, match="'__name__' is reserved"):
        make_sink(labels=(("__name__", "x"),))
    with pytest.raises(ValueError, match="'provider' is set from each event"):
        make_sink(labels=(("provider", "x"),))


def test_more_labels_than_loki_allows_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="limit is 15"):
        make_sink(labels=tuple((f"l{i}", "v") for i in range(11)))  # + app + 4 per event


@pytest.mark.parametrize(
    ("tenant", "message"),
    [
        ("team/a", r"tenant 'team/a' has characters Loki refuses \('/'\)"),
        ("a b|c", r"has characters Loki refuses \(' ', '\|'\)"),
        ("x" * 151, "longer than Loki's 150 characters"),
        (".", r"'\.' and '\.\.' are not tenant ids"),
        ("..", r"'\.' and '\.\.' are not tenant ids"),
    ],
)
def test_a_tenant_loki_would_refuse_is_a_config_error(tenant: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"exporter:loki: .*{message}"):
        make_sink(tenant=tenant)


@pytest.mark.parametrize("tenant", ["x" * 150, "platform", "a.b", "Team_1-(prod)*'!"])
def test_a_tenant_within_lokis_rule_is_pushed_as_is(tenant: str) -> None:
    sink, fake, _ = against_fake(tenant=tenant)
    assert verdict_of(sink.deliver([event()])) == Delivered()
    assert fake.requests[-1].tenant == tenant


def test_a_bad_tenant_is_a_problem_line_when_the_config_loads(tmp_path: Any) -> None:
    ini = tmp_path / "llmproxy.ini"
    ini.write_text(
        f"[server]\nstate_dir = {tmp_path}\n\n"
        "[exporter:logs]\ntype = loki\nurl = http://loki:3100\ntenant = team/a\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_checked(ini, env={})
    assert any(
        p.startswith("exporter:logs: tenant 'team/a' has characters Loki refuses")
        for p in caught.value.problems
    ), caught.value.problems


def test_an_empty_batch_is_not_pushed() -> None:
    sink, fake, _ = against_fake()
    assert verdict_of(sink.deliver([])) == Delivered()
    assert verdict_of(sink.deliver_lines([], [])) == Delivered()
    assert fake.request_count == 0


def test_basic_and_bearer_together_are_a_config_error() -> None:
    with pytest.raises(ValueError, match="not both"):
        make_sink(username="u", password=PASSWORD, bearer_token=TOKEN)


def test_a_password_without_username_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="username is not"):
        make_sink(password=PASSWORD)


def test_a_tiny_max_line_bytes_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="max_line_bytes"):
        make_sink(max_line_bytes=100)


# -- encode: labels and streams ----------------------------------------------------


def test_labels_are_the_low_cardinality_ones_plus_static_labels() -> None:
    sink = make_sink(labels=(("team", "ml"), ("region", "eu")))

    doc = decode(sink.encode([event()]))

    assert doc["streams"][0]["stream"] == {
        "app": "llmproxy",
        "team": "ml",
        "region": "eu",
        "provider": "openai",
        "environment": "prod",
        "machine": "alice@box",
        "log_type": "request",
    }


def test_request_and_session_ids_are_never_labels() -> None:
    sink = make_sink(structured_metadata=True)

    doc = decode(sink.encode([event(i) for i in range(20)]))

    assert len(doc["streams"]) == 1  # 20 request ids, one stream
    labels = doc["streams"][0]["stream"]
    assert not {"request_id", "session_id", "seq", "route"} & set(labels)
    assert not any(v.startswith(("req-", "sess-")) for v in labels.values())


def test_empty_label_values_are_omitted() -> None:
    doc = decode(make_sink(labels=(("team", ""),)).encode([event(environment="", provider="")]))

    assert set(doc["streams"][0]["stream"]) == {"app", "machine", "log_type"}


def test_a_static_label_may_rename_the_app() -> None:
    doc = decode(make_sink(labels=(("app", "gateway"),)).encode([event()]))

    assert doc["streams"][0]["stream"]["app"] == "gateway"


def test_events_are_grouped_into_one_stream_per_label_set() -> None:
    events = [
        event(i, provider=p, type=t)
        for i, (p, t) in enumerate(
            [("openai", "request"), ("anthropic", "request"), ("openai", "response")] * 3
        )
    ]

    doc = decode(make_sink().encode(events))

    by_key = {(s["stream"]["provider"], s["stream"]["log_type"]): s for s in doc["streams"]}
    assert sorted(by_key) == [
        ("anthropic", "request"),
        ("openai", "request"),
        ("openai", "response"),
    ]
    assert all(len(s["values"]) == 3 for s in doc["streams"])
    for (provider, log_type), stream in by_key.items():
        for _, line in stream["values"]:
            e = orjson.loads(line)
            assert (e["provider"], e["type"]) == (provider, log_type)


def test_timestamps_are_nanosecond_strings_from_ts_ns() -> None:
    doc = decode(make_sink().encode([event(ts_ns=1_795_419_612_123_456_789)]))

    assert doc["streams"][0]["values"][0][0] == "1795419612123456789"


def test_entries_are_sorted_by_time_within_a_stream_keeping_batch_order_on_ties() -> None:
    base = NOW * NS
    events = [
        event(1, ts_ns=base + 30),
        event(2, ts_ns=base + 10),
        event(3, ts_ns=base + 20),
        event(4, ts_ns=base + 10),
    ]

    values = decode(make_sink().encode(events))["streams"][0]["values"]

    assert [v[0] for v in values] == [str(base + t) for t in (10, 10, 20, 30)]
    assert [orjson.loads(v[1])["request_id"] for v in values] == [
        "req-2",
        "req-4",
        "req-3",
        "req-1",
    ]


def test_the_line_is_the_event_as_json() -> None:
    e = event(7, model="gpt-4o", usage={"input_tokens": 3})

    line = decode(make_sink().encode([e]))["streams"][0]["values"][0][1]

    assert orjson.loads(line) == e


def test_without_ts_ns_the_rfc3339_ts_is_used() -> None:
    e = event()
    del e["ts_ns"]
    e["ts"] = "2026-11-23T07:40:12.123456789Z"

    ts = decode(make_sink().encode([e]))["streams"][0]["values"][0][0]

    assert ts == "1795419612123456789"


def test_a_value_that_is_not_json_ready_does_not_fail_the_batch() -> None:
    doc = decode(make_sink().encode([event(odd=b"bytes", tags={"a"})]))

    line = orjson.loads(doc["streams"][0]["values"][0][1])
    assert (line["odd"], line["tags"]) == ("bytes", ["a"])


def test_structured_metadata_carries_the_ids_when_enabled() -> None:
    values = decode(make_sink(structured_metadata=True).encode([event(5)]))["streams"][0]["values"]

    assert values[0][2] == {"request_id": "req-5", "session_id": "sess-5", "route": "openai"}


def test_structured_metadata_skips_missing_ids() -> None:
    e = event(5, session_id=None)

    values = decode(make_sink(structured_metadata=True).encode([e]))["streams"][0]["values"]

    assert values[0][2] == {"request_id": "req-5", "route": "openai"}


def test_without_structured_metadata_entries_have_two_elements() -> None:
    values = decode(make_sink().encode([event()]))["streams"][0]["values"]

    assert len(values[0]) == 2


# -- encode: body and headers ------------------------------------------------------


def test_the_body_is_gzipped_by_default() -> None:
    batch = make_sink().encode([event()])

    assert batch.headers["Content-Encoding"] == "gzip"
    assert batch.headers["Content-Type"] == "application/json"
    assert orjson.loads(gzip.decompress(batch.body))["streams"]


def test_gzip_can_be_turned_off() -> None:
    batch = make_sink(gzip=False).encode([event()])

    assert "Content-Encoding" not in batch.headers
    assert orjson.loads(batch.body)["streams"]


def test_the_tenant_goes_in_x_scope_orgid() -> None:
    assert make_sink(tenant="team-a").encode([event()]).headers["X-Scope-OrgID"] == "team-a"
    assert "X-Scope-OrgID" not in make_sink().encode([event()]).headers


def test_basic_auth_from_username_and_password() -> None:
    headers = make_sink(username="12345", password=PASSWORD).encode([event()]).headers

    expected = base64.b64encode(f"12345:{PASSWORD}".encode()).decode()
    assert headers["Authorization"] == f"Basic {expected}"


def test_bearer_auth_from_bearer_token() -> None:
    headers = make_sink(bearer_token=TOKEN).encode([event()]).headers

    assert headers["Authorization"] == f"Bearer {TOKEN}"


def test_credentials_in_the_url_become_basic_auth_and_leave_the_url() -> None:
    sink = make_sink(url=f"https://bob:{PASSWORD}@logs.example:8443")

    assert sink.url == "https://logs.example:8443/loki/api/v1/push"
    expected = base64.b64encode(f"bob:{PASSWORD}".encode()).decode()
    assert sink.encode([event()]).headers["Authorization"] == f"Basic {expected}"


def test_no_authorization_header_without_credentials() -> None:
    assert "Authorization" not in make_sink().encode([event()]).headers


# -- encode: long lines ------------------------------------------------------------


def _only_line(batch: EncodedBatch) -> bytes:
    values = decode(batch)["streams"][0]["values"]
    assert len(values) == 1
    line: str = values[0][1]
    return line.encode()


def test_a_line_under_the_limit_is_untouched() -> None:
    e = big_event(1000)

    line = _only_line(make_sink(max_line_bytes=64 * 1024).encode([e]))

    assert orjson.loads(line) == e


def test_an_oversized_line_is_shortened_by_truncating_bodies() -> None:
    e = big_event(200_000)  # ~600 KB of JSON
    limit = 256 * 1024

    line = _only_line(make_sink().encode([e]))

    assert len(line) <= limit
    got = orjson.loads(line)
    assert got["request_id"] == e["request_id"]
    assert got["loki_truncated"]["original_bytes"] == len(orjson.dumps(e))
    assert "response_body.text" in got["loki_truncated"]["fields"]
    assert got["response_body"]["truncated"] is True
    assert got["response_body"]["size"] == 200_000  # the true size stays
    assert e["response_body"]["text"].startswith(got["response_body"]["text"])
    assert got["request_headers"] == e["request_headers"]  # headers only if needed
    assert len(got["response_body"]["text"]) > 10_000  # cut to fit, not emptied


def test_a_short_prompt_survives_a_long_response() -> None:
    e = big_event(300_000)
    e["request_body"]["text"] = "p" * 2000

    got = orjson.loads(_only_line(make_sink().encode([e])))

    assert got["request_body"] == e["request_body"]
    assert got["loki_truncated"]["fields"] == ["response_body.text"]


def test_stream_chunks_lose_their_tail_and_its_offsets_while_small_bodies_stay() -> None:
    e = big_event(100, chunks=5000)
    limit = 16 * 1024

    line = _only_line(make_sink(max_line_bytes=limit).encode([e]))

    assert len(line) <= limit
    got = orjson.loads(line)
    chunks = got["response_chunks"]
    n = len(chunks)
    assert 0 < n < 5000
    assert chunks == e["response_chunks"][:n]
    # The texts and their offsets still pair up: the same tail went from both.
    assert got["response_chunk_offsets_ms"] == e["response_chunk_offsets_ms"][:n]
    # The small bodies were kept: only the tail of the stream went.
    assert got["loki_truncated"]["fields"] == [
        f"response_chunks[{n}:]",
        f"response_chunk_offsets_ms[{n}:]",
    ]
    assert got["request_body"] == e["request_body"]
    # About as many chunks kept as fit: the offsets' bytes were counted with them.
    assert limit - len(line) < 200


def test_stream_chunks_of_the_older_shape_lose_their_tail_as_before() -> None:
    e = big_event(100, chunks=5000, older=True)
    limit = 16 * 1024

    line = _only_line(make_sink(max_line_bytes=limit).encode([e]))

    assert len(line) <= limit
    got = orjson.loads(line)
    chunks = got["response_chunks"]
    assert 0 < len(chunks) < 5000
    assert chunks == e["response_chunks"][: len(chunks)]
    assert "response_chunk_offsets_ms" not in got
    assert got["loki_truncated"]["fields"] == [f"response_chunks[{len(chunks)}:]"]
    assert got["request_body"] == e["request_body"]


def test_headers_are_cut_only_when_bodies_are_not_enough() -> None:
    e = big_event(300, header_chars=50_000)

    line = _only_line(make_sink(max_line_bytes=8 * 1024).encode([e]))

    got = orjson.loads(line)
    assert len(line) <= 8 * 1024
    assert "request_headers.x-big" in got["loki_truncated"]["fields"]
    assert got["request_headers"]["authorization"] == "Bearer sk-...cdef"


def test_base64_bodies_stay_decodable_when_cut() -> None:
    raw = bytes(range(256)) * 400
    e = event(response_body={"base64": base64.b64encode(raw).decode(), "truncated": False})

    got = orjson.loads(_only_line(make_sink(max_line_bytes=4096).encode([e])))

    kept = got["response_body"]["base64"]
    assert got["response_body"]["truncated"] is True
    assert len(kept) % 4 == 0
    assert raw.startswith(base64.b64decode(kept))


def test_shortening_never_modifies_the_event() -> None:
    e = big_event(50_000, chunks=100)
    before = orjson.dumps(e)

    make_sink(max_line_bytes=4096).encode([e])

    assert orjson.dumps(e) == before


def test_an_event_of_many_tiny_fields_becomes_an_identifying_stub() -> None:
    e = event(3, cache_status="hit")
    e.update({f"k{i}": i for i in range(5000)})

    got = orjson.loads(_only_line(make_sink(max_line_bytes=2048).encode([e])))

    assert got["request_id"] == "req-3"
    assert got["cache_status"] == "hit"  # a stub still tells an answer from the cache
    assert got["ts_ns"] == e["ts_ns"]
    assert got["loki_truncated"]["fields"] == ["*"]


_text = st.text(st.characters(codec="utf-8"), max_size=3000)


@given(
    request_body=_text,
    response_body=_text,
    chunks=st.lists(st.tuples(st.floats(0, 1e4), _text), max_size=40),
    older=st.booleans(),
    headers=st.dictionaries(st.text(min_size=1, max_size=20), _text, max_size=5),
    limit=st.integers(1024, 8192),
)
def test_any_event_shortens_to_valid_json_within_the_limit(
    request_body: str,
    response_body: str,
    chunks: list[tuple[float, str]],
    older: bool,
    headers: dict[str, str],
    limit: int,
) -> None:
    e = event(
        type="response",
        request_headers=headers,
        request_body={"text": request_body, "truncated": False},
        response_body={"text": response_body, "truncated": False},
        response_chunks=[text for _, text in chunks],
        response_chunk_offsets_ms=[offset for offset, _ in chunks],
    )
    if older:
        e = older_chunk_shape(e)
    line = orjson.dumps(e)

    out = shorten_line(e, line, limit) if len(line) > limit else line

    assert len(out) <= limit
    got = orjson.loads(out)
    assert got["request_id"] == e["request_id"]
    assert got["ts_ns"] == e["ts_ns"]
    if older or "response_chunks" not in got:  # no offsets key; or a stub of the ids
        assert "response_chunk_offsets_ms" not in got
    else:
        # Each text kept (whole, or its head) still has its own offset beside it.
        kept = got["response_chunks"]
        assert got["response_chunk_offsets_ms"] == e["response_chunk_offsets_ms"][: len(kept)]
        assert all(e["response_chunks"][i].startswith(text) for i, text in enumerate(kept))


@given(
    texts=st.lists(st.text(), min_size=1, max_size=6),
    metadata=st.booleans(),
)
def test_any_text_survives_the_push_body_exactly(texts: list[str], metadata: bool) -> None:
    # Quotes, backslashes, control characters, non-ASCII: each entry's line is the
    # event's JSON, whatever its strings hold, and its timestamp the event's.
    events = [
        event(i, request_body={"text": t}, route=t[:5], provider=("openai", "anthropic")[i % 2])
        for i, t in enumerate(texts)
    ]
    sink = make_sink(structured_metadata=metadata)

    doc = decode(sink.encode(events, [orjson.dumps(e) for e in events]))

    entries = [v for stream in doc["streams"] for v in stream["values"]]
    assert sorted((e[0], e[1]) for e in entries) == sorted(
        (str(e["ts_ns"]), orjson.dumps(e).decode()) for e in events
    )
    assert all(orjson.loads(e[1]) in events for e in entries)
    if metadata:
        assert all(e[2]["request_id"] == orjson.loads(e[1])["request_id"] for e in entries)


def test_lines_shortened_by_the_sink_are_accepted_by_loki() -> None:
    sink, fake, _ = against_fake()
    events = [big_event(300_000), big_event(10, chunks=20_000), event(1)]

    assert verdict_of(sink.deliver(events)) == Delivered()

    assert len(fake.entries()) == 3
    assert all(len(e.line.encode()) <= 256 * 1024 for e in fake.entries())


# -- deliver and judge, against the fake -------------------------------------------


def test_a_batch_is_delivered_and_stored_with_its_labels() -> None:
    sink, fake, _ = against_fake(tenant="team-a", labels=(("team", "ml"),))
    events = [event(i, provider=("openai", "anthropic")[i % 2]) for i in range(6)]

    assert verdict_of(sink.deliver(events)) == Delivered()

    stored = fake.entries({"provider": "anthropic"}, tenant="team-a")
    assert [e.json()["request_id"] for e in stored] == ["req-1", "req-3", "req-5"]
    assert stored[0].labels["team"] == "ml"
    assert len(fake.streams()) == 2
    request = fake.requests[0]
    assert (request.tenant, request.content_encoding) == ("team-a", "gzip")
    assert request.path == "/loki/api/v1/push"


def test_deliver_lines_sends_what_deliver_sends_without_encoding_again() -> None:
    sink, fake, _ = against_fake()
    events = [event(i, provider=("openai", "anthropic")[i % 2]) for i in range(4)]
    events.append(big_event(200_000))  # over max_line_bytes: shortened from its line too
    lines = [orjson.dumps(e) for e in events]

    by_events = decode(sink.encode(events))
    by_lines = decode(sink.encode(events, lines))
    assert by_lines == by_events
    assert verdict_of(sink.deliver_lines(events, lines)) == Delivered()
    assert len(fake.entries()) == 5
    first = sorted(e.line for e in fake.entries())
    # Prepared when published (the exporter calls prepare), some not (the spool):
    # the same entries reach Loki.
    sink, fake, _ = against_fake()
    prepared = [
        sink.prepare(e, line) if n % 2 else None
        for n, (e, line) in enumerate(zip(events, lines, strict=True))
    ]
    assert verdict_of(sink.deliver_prepared(events, lines, prepared)) == Delivered()
    assert sorted(e.line for e in fake.entries()) == first
    # The lines are what is sent: the sink does not encode the events itself.
    marked = [orjson.dumps({**e, "marker": n}) for n, e in enumerate(events[:4])]
    sent = decode(sink.encode(events[:4], marked))
    assert sorted(orjson.loads(v[1])["marker"] for s in sent["streams"] for v in s["values"]) == [
        0, 1, 2, 3,
    ]  # fmt: skip


def test_a_broken_encoder_fails_deliver_lines_for_a_retry() -> None:
    sink = make_sink()
    with pytest.raises(ValueError):
        sink.encode([event(1)], [])  # fewer lines than events: a caller's bug
    out: list[object] = []
    sink.deliver_lines([event(1)], []).addBoth(out.append)
    assert isinstance(out[0], Failure) and out[0].check(ValueError)


def test_auth_reaches_loki() -> None:
    expected = "Basic " + base64.b64encode(f"u:{PASSWORD}".encode()).decode()
    sink, fake, _ = against_fake(username="u", password=PASSWORD, expected_authorization=expected)

    assert verdict_of(sink.deliver([event()])) == Delivered()
    assert fake.requests[0].authorization == expected


def test_structured_metadata_reaches_loki() -> None:
    sink, fake, _ = against_fake(structured_metadata=True)

    verdict_of(sink.deliver([event(4)]))

    assert fake.entries()[0].metadata == {
        "request_id": "req-4",
        "session_id": "sess-4",
        "route": "openai",
    }


def test_a_400_is_rejected_with_lokis_text_and_not_retried() -> None:
    sink, fake, _ = against_fake()
    week_ago = (NOW - 8 * 24 * 3600) * NS

    verdict = verdict_of(sink.deliver([event(1), event(2, ts_ns=week_ago)]))

    assert isinstance(verdict, Rejected)
    assert "HTTP 400" in verdict.reason
    assert "timestamp too old" in verdict.reason
    assert len(fake.entries()) == 1  # Loki kept the good entry


def test_a_429_without_retry_after_is_retried_on_the_exporters_backoff() -> None:
    # 1 KiB/s, 4 KiB burst; a batch of 10 events is about 2.6 KB.
    tiny = LokiLimits(ingestion_rate_mb=1 / 1024, ingestion_burst_size_mb=4 / 1024)
    sink, fake, _ = against_fake(limits=tiny, gzip=False)
    assert verdict_of(sink.deliver([event(i) for i in range(10)])) == Delivered()

    verdict = verdict_of(sink.deliver([event(i) for i in range(10, 20)]))

    assert isinstance(verdict, Retry)
    assert verdict.after is None  # Loki sends no Retry-After
    assert "ingestion rate limit exceeded" in verdict.reason
    assert len(fake.entries()) == 10


def test_a_scripted_429_retry_after_is_honoured() -> None:
    sink, fake, _ = against_fake()
    fake.fail_next(Respond(429, headers={"Retry-After": "42"}))

    assert verdict_of(sink.deliver([event()])) == Retry("HTTP 429", 42.0)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_retried(status: int) -> None:
    sink, fake, _ = against_fake()
    fake.fail_next(status)

    verdict = verdict_of(sink.deliver([event()]))

    assert isinstance(verdict, Retry)
    assert verdict.reason == f"HTTP {status}"
    assert fake.entries() == []


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_and_not_found_are_permanent(status: int) -> None:
    sink, fake, _ = against_fake()
    fake.fail_next(Respond(status, b"denied"))

    assert verdict_of(sink.deliver([event()])) == Rejected(f"HTTP {status}: denied")


def test_a_204_is_delivered() -> None:
    sink, fake, _ = against_fake()

    assert verdict_of(sink.deliver([event()])) == Delivered()
    assert fake.requests[0].status == 204


def test_a_200_is_delivered() -> None:
    sink, fake, _ = against_fake()
    fake.fail_next(200)

    assert verdict_of(sink.deliver([event()])) == Delivered()


def test_connection_refused_is_retried() -> None:
    client = _RefusingClient()
    sink = make_sink(client)

    verdict = verdict_of(sink.deliver([event()]))

    assert verdict == Retry("connection refused")
    assert client.urls == ["http://loki:3100/loki/api/v1/push"]


def test_a_hanging_loki_times_out_into_retry() -> None:
    sink, fake, clock = against_fake(timeout=5.0)
    fake.fail_next(Hang())
    d = sink.deliver([event()])
    out: list[Verdict] = []
    d.addCallback(out.append)
    assert out == []

    clock.advance(5.0)

    assert len(out) == 1 and isinstance(out[0], Retry)


# -- secrets -----------------------------------------------------------------------


def _echoing(status: int, headers: Mapping[str, str]) -> bytes:
    """A misbehaving gateway that echoes the request's credentials in its error."""
    auth = headers.get("authorization", "")
    return f"{status} refused: authorization={auth!r}".encode()


@pytest.mark.parametrize("status", [401, 500, 400])
@pytest.mark.parametrize(
    ("kw", "secrets"),
    [
        ({"username": "bob", "password": PASSWORD}, [PASSWORD]),
        ({"bearer_token": TOKEN}, [TOKEN]),
    ],
)
def test_reasons_never_carry_credentials(
    status: int, kw: dict[str, Any], secrets: Sequence[str]
) -> None:
    sink = make_sink(**kw)
    headers = {k.lower(): v for k, v in sink.encode([event()]).headers.items()}
    body = _echoing(status, headers)
    body += f" and again {PASSWORD} {TOKEN}".encode()
    credential = headers["authorization"].split(" ", 1)[1]

    verdict = sink.judge(status, {}, body)

    assert not isinstance(verdict, Delivered)
    for secret in [*secrets, credential, headers["authorization"]]:
        assert secret not in verdict.reason
    assert "***" in verdict.reason


def test_a_canary_in_an_events_headers_is_sent_as_the_event_says() -> None:
    # Obfuscation belongs to the event model, upstream: the sink sends the event as
    # given (it must not silently rewrite lines) and never logs it in a reason.
    sink, fake, _ = against_fake(bearer_token=TOKEN)
    e = event(request_headers={"x-api-key": CANARY})

    verdict = verdict_of(sink.deliver([e]))

    assert verdict == Delivered()
    assert fake.entries()[0].json()["request_headers"]["x-api-key"] == CANARY
    fake.fail_next(Respond(500, f"echo {TOKEN}".encode()))
    retry = verdict_of(sink.deliver([event(1)]))
    assert isinstance(retry, Retry) and TOKEN not in retry.reason


def test_the_repr_shows_no_credentials() -> None:
    sink = make_sink(username="bob", password=PASSWORD)

    assert PASSWORD not in repr(sink)
    assert base64.b64encode(f"bob:{PASSWORD}".encode()).decode() not in repr(sink)


def test_even_a_lone_surrogate_or_a_huge_int_does_not_fail_the_batch() -> None:
    doc = decode(make_sink().encode([event(bad="\ud800", big=1 << 70)]))

    line = orjson.loads(doc["streams"][0]["values"][0][1])
    assert line["big"] == 1 << 70
    assert line["request_id"] == "req-0"


def test_a_real_canonical_stream_event_reaches_loki_shortened_and_obfuscated() -> None:
    from llmproxy.capture.events import response_event
    from llmproxy.capture.record import ExchangeRecord
    from llmproxy.config.model import CaptureSettings

    chunk = b'data: {"choices": [{"delta": {"content": "' + b"x" * 200 + b'"}}]}\n\n'
    record = ExchangeRecord(
        request_id="req-canonical",
        started_at=NOW - 1.0,
        method="POST",
        path="/openai/v1/chat/completions",
        query="",
        route="openai",
        provider="openai",
        upstream_url="https://api.openai.com/v1/chat/completions",
        upstream_host="api.openai.com",
        client_addr="127.0.0.1",
        request_headers=[(b"authorization", f"Bearer {CANARY}".encode())],
        request_body=b'{"model": "gpt-4o", "stream": true}',
        request_body_size=36,
        first_byte_at=0.1,
        ended_at=0.9,
        status=200,
        response_headers=[(b"content-type", b"text/event-stream")],
        response_chunks=[(0.1 + i / 1000, chunk) for i in range(2000)],
        response_body_size=2000 * len(chunk),
        environment="prod",
        machine="alice@box",
    )
    payload = response_event(record, CaptureSettings(response_body_bytes=1 << 20))
    assert len(orjson.dumps(payload)) > 256 * 1024  # the point: it needs shortening
    sink, fake, _ = against_fake()

    assert verdict_of(sink.deliver([payload])) == Delivered()

    (stored,) = fake.entries({"log_type": "response", "provider": "openai"})
    assert len(stored.line.encode()) <= 256 * 1024
    line = stored.json()
    assert line["request_id"] == "req-canonical"
    assert line["loki_truncated"]["fields"][0].startswith("response_chunks[")
    n = len(line["response_chunks"])
    assert 0 < n < 2000
    assert line["response_chunk_offsets_ms"] == payload["response_chunk_offsets_ms"][:n]
    assert line["response_chunks"] == payload["response_chunks"][:n]
    assert line["request_body"]["text"] == '{"model": "gpt-4o", "stream": true}'
    assert CANARY not in stored.line
    assert stored.ts_ns == payload["ts_ns"]


def test_the_stream_limit_is_retried_and_the_stored_part_shows_once() -> None:
    sink, fake, _ = against_fake(limits=LokiLimits(max_global_streams_per_user=1))
    batch = [event(0), event(1, type="response"), event(2), event(3, type="response")]

    verdict = verdict_of(sink.deliver(batch))

    assert isinstance(verdict, Retry) and verdict.after is None
    assert "maximum active stream limit exceeded" in verdict.reason
    assert len(fake.entries()) == 2  # Loki stored the stream it already had room for
    fake.limits = LokiLimits()  # the operator raised the limit
    assert verdict_of(sink.deliver(batch)) == Delivered()
    assert sorted(e.json()["request_id"] for e in fake.entries()) == [f"req-{i}" for i in range(4)]


def test_a_streams_own_rate_limit_is_retried() -> None:
    limits = LokiLimits(per_stream_rate_limit=512, per_stream_rate_limit_burst=1024)
    sink, fake, _ = against_fake(limits=limits, gzip=False)
    batch = [event(i, body="x" * 300) for i in range(4)]

    verdict = verdict_of(sink.deliver(batch))

    assert isinstance(verdict, Retry)
    assert "Per stream rate limit exceeded" in verdict.reason
    assert fake.entries() == []
