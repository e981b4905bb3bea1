"""``llmproxy benchmark``'s pure parts: percentiles, the summary, the status table, the
overhead split, cache outcomes, request bodies, argument checks and the masking of
credentials in ``--debug`` output (llmproxy/cli/benchmark.py, llmproxy/cli/benchmark_report.py,
llmproxy/cli/loadgen.py)."""

from __future__ import annotations

import argparse
import io
from collections import Counter
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from llmproxy.cli import benchmark as bench
from llmproxy.cli import benchmark_report as report
from llmproxy.cli import loadgen
from llmproxy.cli.benchmark_report import Percentiles
from llmproxy.cli.loadgen import Recorder, Sample
from llmproxy.cli.main import build_parser

URL = "http://127.0.0.1:8080/v1/chat/completions"


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["benchmark", *argv])


def summary_of(rec: Recorder, elapsed: float = 2.0, **kw: object) -> report.Summary:
    return report.summarize(
        rec,
        url=URL,
        planned=kw.pop("planned", rec.finished),  # type: ignore[arg-type]
        concurrency=4,
        elapsed=elapsed,
        **kw,  # type: ignore[arg-type]
    )


# -- percentiles -------------------------------------------------------------------------


def test_percentiles_are_nearest_rank_over_1_to_100() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # unsorted on purpose
    p = Percentiles.of(values)
    assert p is not None
    assert (p.min, p.p50, p.p90, p.p99, p.max) == (1.0, 50.0, 90.0, 99.0, 100.0)
    assert p.mean == 50.5
    assert p.count == 100


def test_percentile_of_few_values_is_a_measured_one() -> None:
    assert report.percentile([1.0, 2.0, 3.0], 50) == 2.0
    assert report.percentile([1.0, 2.0, 3.0], 99) == 3.0
    assert report.percentile([7.0], 1) == 7.0
    assert report.percentile([1.0, 10.0], 50) == 1.0


def test_percentiles_of_nothing_is_none_and_percentile_refuses() -> None:
    assert Percentiles.of([]) is None
    with pytest.raises(ValueError):
        report.percentile([], 50)


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=300))
def test_percentiles_are_ordered_and_measured(values: list[float]) -> None:
    p = Percentiles.of(values)
    assert p is not None
    assert p.min <= p.p50 <= p.p90 <= p.p99 <= p.max
    assert {p.p50, p.p90, p.p99} <= set(values)
    # Nearest rank: at least pct% of the values are at or below it.
    for pct, v in ((50, p.p50), (90, p.p90), (99, p.p99)):
        assert sum(1 for x in values if x <= v) >= pct / 100 * len(values)


# -- summary ---------------------------------------------------------------------------


def recorder() -> Recorder:
    rec = Recorder()
    for i in range(1, 11):  # 1..10 ms
        rec.latencies.append(i / 1000)
        rec.overheads.append((0.1 * i, i / 1000))
    rec.statuses.update({200: 8, 429: 2})
    rec.errors.update({"timeout": 1, "connection refused": 3})
    rec.cache.update({"hit": 7, "stored": 1, "miss": 2})
    rec.bytes_received = 4096
    return rec


def test_summary_figures() -> None:
    s = summary_of(recorder(), elapsed=2.0)
    assert s.responses == 10
    assert s.finished == 14
    assert s.throughput == 5.0
    assert s.latency is not None and s.latency.p50 == 5.0 and s.latency.max == 10.0
    assert s.statuses == {200: 8, 429: 2}
    # Most frequent first.
    assert list(s.errors) == ["connection refused", "timeout"]
    assert s.cache_hits == 7
    assert s.cache_lookups == 10


def test_overhead_split_is_latency_minus_overhead_per_response() -> None:
    s = summary_of(recorder())
    assert s.overhead is not None and s.upstream is not None
    assert s.overhead.p50 == pytest.approx(0.5)
    assert s.overhead.max == pytest.approx(1.0)
    # Request i: i ms in all, 0.1*i ms in the proxy: 0.9*i ms upstream and network.
    assert s.upstream.p50 == pytest.approx(4.5)
    assert s.upstream.max == pytest.approx(9.0)
    assert s.upstream.mean == pytest.approx(0.9 * 5.5)
    text = report.format_summary(s)
    assert "proxy overhead: mean 0.550 ms, p50 0.500 ms, p99 1.000 ms; 10.0%" in text
    assert "upstream+network: mean 4.950 ms, p50 4.500 ms, p99 9.000 ms" in text
    assert "(7 cache hits never reached the upstream" in text


def test_without_the_overhead_header_the_split_is_not_invented() -> None:
    rec = recorder()
    rec.overheads.clear()
    s = summary_of(rec)
    assert s.overhead is None and s.upstream is None
    text = report.format_summary(s)
    assert "no X-LLMProxy-Overhead-Ms header" in text
    assert "upstream+network" not in text
    assert summary_json(s)["overhead_ms"] is None


def test_overhead_header_on_some_responses_says_how_many() -> None:
    rec = recorder()
    del rec.overheads[5:]
    text = report.format_summary(summary_of(rec))
    assert "(header on 5 of 10 responses)" in text


def summary_json(s: report.Summary) -> dict[str, object]:
    return orjson.loads(orjson.dumps(report.summary_json(s)))  # type: ignore[no-any-return]


def test_status_table_lists_codes_then_failures() -> None:
    text = report.format_summary(summary_of(recorder()))
    table = text.split("status     count\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split() for line in table] == [
        ["200", "8"],
        ["429", "2"],
        ["connection", "refused", "3"],
        ["timeout", "1"],
    ]


def test_summary_text_has_throughput_percentiles_and_cache() -> None:
    text = report.format_summary(summary_of(recorder()))
    assert f"14 requests to {URL}, concurrency 4" in text
    assert "throughput      5.0 req/s (10 responses, 4 failed)" in text
    assert "received        4.0 KiB" in text
    table = text.split("latency (ms)", 1)[1].splitlines()
    total = next(line for line in table if line.split()[:1] == ["total"])
    assert total.split()[1:] == ["1.000", "5.500", "5.000", "9.000", "10.000", "10.000"]
    assert "cache: 7 hits (hit 7, miss 2, stored 1); hit ratio 70.0%" in text
    assert "first byte" not in text  # not a stream run


def test_stream_summary_reports_first_byte_and_events() -> None:
    rec = recorder()
    rec.ttfbs.extend(i / 2000 for i in range(1, 11))
    rec.events = 50
    rec.not_sse = 1
    s = summary_of(rec, stream=True)
    assert s.ttfb is not None and s.ttfb.p50 == 2.5
    assert s.events_per_stream == 5.0
    text = report.format_summary(s)
    assert "first byte" in text
    assert "events/stream   5.0" in text
    assert "(1 responses were not text/event-stream)" in text


def test_hit_ratio_is_never_rounded_up_to_all() -> None:
    rec = recorder()
    rec.cache = Counter({"hit": 1999, "stored": 1, "bypass": 5})
    assert "hit ratio 99.9%" in report.format_summary(summary_of(rec))


def test_no_cache_headers_said_plainly() -> None:
    rec = recorder()
    rec.cache.clear()
    assert "cache: no X-PROXY-CACHE or Cache-Status header" in report.format_summary(
        summary_of(rec)
    )


def test_summary_json_is_plain_data() -> None:
    data = summary_json(summary_of(recorder()))
    assert data["statuses"] == {"200": 8, "429": 2}
    assert data["errors"] == {"connection refused": 3, "timeout": 1}
    assert data["throughput_rps"] == 5.0
    assert data["latency_ms"]["p99"] == 10.0  # type: ignore[index]
    assert data["upstream_ms"]["p50"] == 4.5  # type: ignore[index]
    assert data["cache_hits"] == 7


def test_summary_with_no_responses() -> None:
    rec = Recorder(errors=Counter({"timeout": 3}))
    s = summary_of(rec)
    assert s.latency is None and s.throughput == 0.0
    text = report.format_summary(s)
    assert "latency: no responses" in text
    assert "proxy overhead: no responses" in text


def test_interrupted_summary_says_so() -> None:
    text = report.format_summary(summary_of(recorder(), planned=100, interrupted=True))
    assert "interrupted: 14 of 100 requests finished" in text


# -- headers and failures ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("x_cache", "status", "expected"),
    [
        (b"hit", None, "hit"),
        (b" HIT ", b"llmproxy; fwd=miss", "hit"),  # X-PROXY-CACHE wins
        (b"conditional-hit", None, "conditional-hit"),
        (None, b"llmproxy; hit; ttl=30", "hit"),
        (None, b"llmproxy; fwd=miss; stored; ttl=300", "stored"),
        (None, b"llmproxy; fwd=uri-miss", "miss"),
        (None, b"llmproxy; fwd=method; detail=method", "bypass"),
        (None, b"origin; hit, edge; fwd=miss", "miss"),  # the member nearest the client
        (None, None, None),
        (b"", b"  ", None),
    ],
)
def test_cache_outcome(x_cache: bytes | None, status: bytes | None, expected: str | None) -> None:
    assert loadgen.cache_outcome(x_cache, status) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([b"0.250"], 0.25),
        ([b"3"], 3.0),
        (None, None),
        ([], None),
        ([b"fast"], None),
        ([b"-1"], None),
        ([b"nan"], None),
        ([b"inf"], None),
    ],
)
def test_parse_overhead(values: list[bytes] | None, expected: float | None) -> None:
    assert loadgen.parse_overhead(values) == expected


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (defer.TimeoutError(), "timeout"),
        (ierror.ConnectionRefusedError(), "connection refused"),
        (ierror.DNSLookupError("nope.invalid"), "dns lookup failed"),
        (ierror.TimeoutError(), "connect timeout"),
        (ierror.TCPTimedOutError(), "connect timeout"),
        (ResponseNeverReceived([Failure(ierror.ConnectionDone())]), "closed before response"),
        (ResponseFailed([Failure(ierror.ConnectionLost())]), "response cut short"),
        (ierror.ConnectionLost(), "connection lost"),
        (RuntimeError("odd"), "RuntimeError"),
    ],
)
def test_error_kinds(exc: BaseException, kind: str) -> None:
    assert loadgen.error_kind(exc) == kind


def test_describe_error_names_the_wrapped_reason() -> None:
    exc = ResponseNeverReceived([Failure(ierror.ConnectionLost("reset by peer"))])
    assert "reset by peer" in loadgen.describe_error(exc)


# -- progress ----------------------------------------------------------------------------


def test_progress_line_with_bar() -> None:
    line = report.progress_line(50, 100, 2, 2.0, width=10)
    assert line == "[#####-----]  50/100   50%  2.0s  25 req/s  2 failed  eta 2s"


def test_progress_line_plain_and_done() -> None:
    line = report.progress_line(100, 100, 0, 4.0, bar=False)
    assert line == "100/100  100%  4.0s  25 req/s  0 failed"
    assert report.progress_line(0, 10, 0, 0.0, bar=False) == "0/10    0%  0.0s  0 req/s  0 failed"


def progress_for(tty: bool) -> tuple[bench.Progress, io.StringIO, Clock]:
    clock = Clock()
    b = loadgen.Benchmark(clock, bench.make_plan(parse("--base-url", "http://h:1", "-n", "8")))
    b.rec.latencies.extend([0.001] * 3)
    b.rec.errors["timeout"] += 1
    out = io.StringIO()
    return bench.Progress(b, out, tty, clock), out, clock


def test_progress_off_a_terminal_is_a_line_every_two_seconds() -> None:
    progress, out, clock = progress_for(tty=False)
    progress.start()
    clock.advance(1.9)
    assert out.getvalue() == ""
    clock.advance(0.1)
    clock.advance(2.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("4/8 ") and "1 failed" in lines[0] and "[" not in lines[0]
    progress.stop()
    assert len(out.getvalue().splitlines()) == 2  # no final line: the report follows


def test_progress_on_a_terminal_redraws_a_bar_in_place() -> None:
    progress, out, clock = progress_for(tty=True)
    progress.start()
    clock.advance(0.1)
    clock.advance(0.1)
    assert out.getvalue().count("\r[") == 2 and "\n" not in out.getvalue()
    progress.stop()
    assert out.getvalue().endswith("\n")
    assert not clock.getDelayedCalls()


# -- masking and --debug -----------------------------------------------------------------

TOKEN = "llmp_canary_5ecret_T0ken"


def sample(**kw: object) -> Sample:
    fields: dict[str, object] = {
        "method": "POST",
        "url": URL,
        "request_headers": (
            ("Content-Type", "application/json"),
            ("Authorization", f"Bearer {TOKEN}"),
            ("x-api-key", "sk-ant-other-secret"),
        ),
        "request_body": b'{"model":"gpt-4o-mini"}',
        "status": 200,
        "phrase": "OK",
        "headers": (
            ("Content-Type", "application/json"),
            ("X-LLMProxy-Overhead-Ms", "0.120"),
            ("X-Echo", f"you sent {TOKEN}"),
        ),
        "body": b'{"echo": "' + TOKEN.encode() + b'"}',
        "body_size": 40,
    }
    fields.update(kw)
    return Sample(**fields)  # type: ignore[arg-type]


def test_debug_sample_masks_the_token_everywhere() -> None:
    text = report.format_sample(sample(), [TOKEN, "sk-ant-other-secret"])
    assert TOKEN not in text
    assert "sk-ant-other-secret" not in text
    assert "> Authorization: Bearer ****" in text
    assert "> x-api-key: ****" in text
    assert "< X-Echo: you sent ****" in text
    assert '{"echo": "****"}' in text


def test_debug_sample_shows_status_line_headers_and_body() -> None:
    text = report.format_sample(sample(), [TOKEN])
    lines = text.splitlines()
    assert lines[0] == f"> POST {URL}"
    assert "< HTTP/1.1 200 OK" in lines
    assert "< X-LLMProxy-Overhead-Ms: 0.120" in lines
    assert '{"model":"gpt-4o-mini"}' in lines


def test_debug_sample_clips_a_long_body() -> None:
    body = b"x" * 5000
    text = report.format_sample(sample(body=body[:2000], body_size=5000), [], limit=100)
    assert "x" * 100 in text and "x" * 101 not in text
    assert "[... 4900 more bytes]" in text


def test_debug_sample_of_a_failed_request() -> None:
    text = report.format_sample(sample(error="timeout (deadline)"), [TOKEN])
    assert "< no response: timeout (deadline)" in text
    assert "HTTP/1.1" not in text


def test_masked_header_keeps_only_the_scheme() -> None:
    assert report.masked_header("authorization", "Bearer abc") == "Bearer ****"
    assert report.masked_header("Cookie", "a=b; c=d") == "****"
    assert report.masked_header("Accept", "text/plain") == "text/plain"


def test_credential_headers_become_secrets() -> None:
    plan = bench.make_plan(
        parse(
            "--base-url",
            "http://h:1",
            "-H",
            "x-api-key: sk-ant-KEY",
            "-H",
            "Cookie: a=b; c=d",
            "-H",
            "Proxy-Authorization: Basic dXNlcjpwdw==",
        )
    )
    assert set(plan.secrets) == {"sk-ant-KEY", "a=b; c=d", "dXNlcjpwdw=="}


def test_plan_repr_has_no_secrets() -> None:
    plan = bench.make_plan(parse("--base-url", "http://h:1", "--token", TOKEN))
    assert TOKEN not in repr(plan)
    assert plan.secrets == (TOKEN,)


# -- bodies and headers --------------------------------------------------------------------


def test_default_bodies_are_chat_completions_no_cache_keeps() -> None:
    plan = bench.make_plan(parse("--base-url", "http://h:1", "-n", "3"))
    bodies = [orjson.loads(plan.body(i)) for i in range(3)]
    for b in bodies:
        assert b["model"] == "gpt-4o-mini"
        assert b["messages"][0]["role"] == "user"
        assert "stream" not in b and "user" not in b
    # No cache answers or stores them: the same body every time, and no-store.
    assert ("Cache-Control", "no-store") in plan.headers
    assert ("Cache-Control", "public, max-age=300") not in plan.headers


def test_every_request_of_a_run_is_one_session_and_runs_are_apart() -> None:
    first = bench.make_plan(parse("--base-url", "http://h:1"))
    second = bench.make_plan(parse("--base-url", "http://h:1"))
    (one,) = [v for n, v in first.headers if n == "X-Session-ID"]
    (other,) = [v for n, v in second.headers if n == "X-Session-ID"]
    assert one.startswith("llmproxy-bench-") and one != other
    assert first.raw_headers().getRawHeaders(b"x-session-id") == [one.encode()]


def test_a_timed_run_sends_until_its_duration_and_a_count_caps_it() -> None:
    timed = bench.make_plan(parse("--base-url", "http://h:1", "--duration", "2"))
    assert timed.duration == 2.0
    assert timed.wants_more(10**6, 1.99)
    assert not timed.wants_more(0, 2.0)
    capped = bench.make_plan(parse("--base-url", "http://h:1", "-d", "2", "-n", "5"))
    assert capped.wants_more(4, 0.5) and not capped.wants_more(5, 0.5)
    counted = bench.make_plan(parse("--base-url", "http://h:1"))
    assert counted.requests == 100 and counted.duration is None
    assert counted.wants_more(99, 1e9) and not counted.wants_more(100, 0.0)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_duration_must_be_a_positive_number_of_seconds(value: str) -> None:
    with pytest.raises(SystemExit):
        parse("--base-url", "http://h:1", "--duration", value)


def test_a_timed_runs_progress_counts_its_seconds() -> None:
    line = report.progress_line(512, 10**12, 0, 2.0, width=10, duration=5.0)
    assert line == "[####------]  512 done   40%  2.0s/5s  256 req/s  0 failed  eta 3s"
    done = report.progress_line(900, 10**12, 1, 5.2, width=10, bar=False, duration=5.0)
    assert done.startswith("900 done  100%  5.2s/5s")


def test_cache_mode_bodies_are_identical_and_opt_in() -> None:
    plan = bench.make_plan(parse("--base-url", "http://h:1", "--cache", "--stream"))
    assert plan.body(0) == plan.body(41)
    assert orjson.loads(plan.body(0))["stream"] is True
    assert "user" not in orjson.loads(plan.body(0))
    assert ("Cache-Control", "public, max-age=300") in plan.headers


def test_stream_sets_stream_true_in_a_given_body() -> None:
    plan = bench.make_plan(
        parse("--base-url", "http://h:1", "--json", '{"model": "m", "stream": false}', "--stream")
    )
    body = orjson.loads(plan.body(0))
    assert body["stream"] is True and body["model"] == "m"


def test_a_messages_body_is_sent_as_given() -> None:
    plan = bench.make_plan(
        parse(
            "--base-url",
            "http://h:1/anthropic",
            "--endpoint",
            "v1/messages",
            "--json",
            '{"model": "claude", "max_tokens": 8, "metadata": {"k": "v"}}',
        )
    )
    assert plan.url == "http://h:1/anthropic/v1/messages"
    assert orjson.loads(plan.body(0)) == {
        "model": "claude",
        "max_tokens": 8,
        "metadata": {"k": "v"},
    }
    assert plan.body(0) == plan.body(1)


def test_token_and_headers() -> None:
    plan = bench.make_plan(
        parse(
            "--base-url",
            "http://h:1/",
            "--token",
            TOKEN,
            "-H",
            "OpenAI-Organization: org-1",
            "-H",
            "user-agent: mine",
        )
    )
    names = {n.lower(): v for n, v in plan.headers}
    assert names["authorization"] == f"Bearer {TOKEN}"
    assert names["openai-organization"] == "org-1"
    assert names["user-agent"] == "mine"  # -H replaces a default
    assert plan.url == "http://h:1/v1/chat/completions"


def test_json_from_a_file(tmp_path: Path) -> None:
    f = tmp_path / "body.json"
    f.write_text('{"model": "from-file"}')
    plan = bench.make_plan(parse("--base-url", "http://h:1", "--json", f"@{f}"))
    assert orjson.loads(plan.body(0))["model"] == "from-file"


def test_token_from_a_file(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    assert bench.make_plan(parse("--base-url", "http://h:1", "--token", f"@{f}")).secrets == (
        TOKEN,
    )


def test_concurrency_is_capped_by_requests() -> None:
    assert (
        bench.make_plan(parse("--base-url", "http://h:1", "-n", "3", "-c", "50")).concurrency == 3
    )


# -- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--base-url", "ftp://h"], "is not an http:// or https:// URL"),
        (["--base-url", "h:8080"], "is not an http:// or https:// URL"),
        (["--base-url", "http://h:99999"], "has a bad port"),
        (["--base-url", "http://h?x=1"], "takes no query"),
        (["--base-url", "http://h", "--requests", "0"], "must be greater than 0"),
        (["--base-url", "http://h", "--concurrency", "many"], "not a whole number"),
        (["--base-url", "http://h", "--json", "{nope"], "not valid JSON"),
        (["--base-url", "http://h", "--json", "[1, 2]"], "must be a JSON object"),
        (["--base-url", "http://h", "--json", "@/nonexistent/body.json"], "cannot read"),
        (["--base-url", "http://h", "--endpoint", "http://x/y"], "is not a path"),
        (["--base-url", "http://h", "-H", "no colon"], "is not 'Name: value'"),
        (["--base-url", "http://h", "--token", "two words"], "contains spaces"),
        (["--base-url", "http://h", "--timeout", "-1"], "must be greater than 0"),
        (["--base-url", "http://h", "--output", "xml"], "invalid choice"),
        (["--requests", "5"], "--base-url"),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_https_urls_get_a_tls_endpoint() -> None:
    from twisted.internet import reactor  # building endpoints does not touch it
    from twisted.internet.endpoints import HostnameEndpoint
    from twisted.web.client import URI

    url = "https://api.example.com/v1/chat/completions"
    tls = loadgen._OneEndpoint(reactor, url, 5.0).endpointForURI(URI.fromBytes(url.encode()))
    plain = loadgen._OneEndpoint(reactor, "http://h:81/x", 5.0).endpointForURI(
        URI.fromBytes(b"http://h:81/x")
    )
    assert isinstance(plain, HostnameEndpoint)
    assert not isinstance(tls, HostnameEndpoint)  # wrapped in TLS
