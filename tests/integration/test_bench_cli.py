"""``llmproxy benchmark`` as a user runs it: the real command in a subprocess, against
the real proxy service (in this process) in front of the fake upstream, all on
127.0.0.1 (llmproxy/cli/benchmark.py).

The subprocess is spawned through the reactor (``getProcessOutputAndValue``), so the
proxy keeps serving while the benchmark runs.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure

from tests.fakes.upstream import sse_chunks
from tests.integration.harness import Running, running_fixture, wait_until

pytestmark = pytest.mark.integration

TOKEN = "llmp_bench_canary_9f8e7d6c5b4a"
CACHE_INI = "\n[cache]\nenabled = true\nstore = memory\n"


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Running]:
    yield from running_fixture(tmp_path)


@pytest.fixture
def cached_env(tmp_path: Any) -> Iterator[Running]:
    yield from running_fixture(tmp_path, extra=CACHE_INI)


async def benchmark(*argv: str) -> tuple[str, str, int]:
    """Run ``llmproxy benchmark ARGV``; (stdout, stderr, exit code)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")}
    d = getProcessOutputAndValue(
        sys.executable,
        ["-m", "llmproxy.cli", "benchmark", *argv],
        env=environ,
        reactor=reactor,
    )
    d.addTimeout(120, reactor)
    out, err, code = await d
    return out.decode(), err.decode(), code


async def benchmark_json(*argv: str) -> dict[str, Any]:
    out, err, code = await benchmark(*argv, "--output", "json", "--no-progress")
    assert code == 0, err
    assert "Traceback" not in err
    data: dict[str, Any] = json.loads(out)
    return data


def chat_requests(running: Running) -> list[dict[str, Any]]:
    return [r for r in running.upstream.requests if r["uri"] == b"/v1/chat/completions"]


@pytest_twisted.ensureDeferred
async def test_every_request_reaches_the_upstream_and_the_overhead_is_split(
    env: Running,
) -> None:
    data = await benchmark_json(
        "--base-url", env.base, "--endpoint", "/v1/chat/completions",
        "--requests", "40", "--concurrency", "4", "--token", TOKEN,
    )  # fmt: skip
    seen = chat_requests(env)
    assert len(seen) == 40
    # No cache may answer or keep them, and the run is one session.
    assert all(r["headers"]["cache-control"] == ["no-store"] for r in seen)
    assert len({r["headers"]["x-session-id"][0] for r in seen}) == 1
    assert all(r["headers"]["authorization"] == [f"Bearer {TOKEN}"] for r in seen)
    assert data["responses"] == 40 and data["failed"] == 0
    assert data["statuses"] == {"200": 40}
    assert data["errors"] == {}
    assert data["overhead_header_seen"] == 40
    latency, overhead, upstream = data["latency_ms"], data["overhead_ms"], data["upstream_ms"]
    assert latency["count"] == overhead["count"] == upstream["count"] == 40
    assert 0 <= overhead["p50"] <= latency["max"]
    assert upstream["mean"] == pytest.approx(latency["mean"] - overhead["mean"], abs=0.01)
    assert data["throughput_rps"] > 0
    assert data["cache"] == {}  # no [cache]: no cache headers


@pytest_twisted.ensureDeferred
async def test_text_report_has_the_status_table_and_overhead_split(env: Running) -> None:
    out, err, code = await benchmark(
        "--base-url", env.base, "--endpoint", "/status/429", "-n", "12", "-c", "3",
    )  # fmt: skip
    assert code == 0, err
    assert len([r for r in env.upstream.requests if r["uri"] == b"/status/429"]) == 12
    table = out.split("status     count\n", 1)[1].split("\n\n", 1)[0]
    assert table.split() == ["429", "12"]
    assert "throughput" in out and "req/s (12 responses, 0 failed)" in out
    assert "proxy overhead: mean" in out
    assert "upstream+network: mean" in out
    for column in ("p50", "p90", "p99", "max"):
        assert column in out


@pytest_twisted.ensureDeferred
async def test_stream_reads_every_event_and_reports_first_byte(env: Running) -> None:
    data = await benchmark_json("--base-url", env.base, "-n", "10", "-c", "2", "--stream")
    seen = chat_requests(env)
    assert len(seen) == 10
    assert all(json.loads(r["body"])["stream"] is True for r in seen)
    assert data["statuses"] == {"200": 10}
    assert data["not_sse"] == 0
    assert data["events_per_stream"] == len(sse_chunks())
    assert data["ttfb_ms"]["count"] == 10
    assert data["ttfb_ms"]["p50"] <= data["latency_ms"]["max"]
    assert data["overhead_header_seen"] == 10


@pytest_twisted.ensureDeferred
async def test_cache_mode_is_answered_by_the_proxy_cache(cached_env: Running) -> None:
    data = await benchmark_json("--base-url", cached_env.base, "-n", "20", "-c", "4", "--cache")
    # One upstream call (concurrent identical misses are coalesced); the rest are hits.
    assert len(chat_requests(cached_env)) == 1
    assert data["statuses"] == {"200": 20}
    assert data["cache_hits"] == 19
    assert sum(data["cache"].values()) == 20
    assert data["cache"].get("stored") == 1


@pytest_twisted.ensureDeferred
async def test_without_cache_mode_the_cache_never_answers(cached_env: Running) -> None:
    out, err, code = await benchmark("--base-url", cached_env.base, "-n", "8", "-c", "2")
    assert code == 0, err
    # The same body every time, but no-store: every request goes upstream.
    assert len(chat_requests(cached_env)) == 8
    assert "(json, no-store)" in out
    assert "cache: 0 hits (bypass 8)" in out


@pytest_twisted.ensureDeferred
async def test_debug_prints_a_sample_with_the_token_masked(env: Running) -> None:
    out, err, code = await benchmark(
        "--base-url", env.base, "-n", "3", "-c", "1", "--token", TOKEN, "--debug",
    )  # fmt: skip
    assert code == 0, err
    assert TOKEN not in out + err
    sample, report = out.split("llmproxy benchmark:", 1)
    assert "> Authorization: Bearer ****" in sample
    assert "< HTTP/1.1 200 OK" in sample
    assert "< X-Llmproxy-Overhead-Ms: " in sample
    assert "< X-Request-Id: " in sample
    assert '"chat.completion"' in sample
    assert "status     count" in report


@pytest_twisted.ensureDeferred
async def test_not_an_llmproxy_says_the_split_is_unknown(env: Running) -> None:
    assert env.upstream.port is not None
    direct = f"http://127.0.0.1:{env.upstream.port.getHost().port}"  # type: ignore[attr-defined]
    out, err, code = await benchmark("--base-url", direct, "-n", "5", "-c", "1")
    assert code == 0, err
    assert len(chat_requests(env)) == 5
    assert "no X-LLMProxy-Overhead-Ms header" in out
    assert "upstream+network" not in out


@pytest_twisted.ensureDeferred
async def test_requests_past_the_timeout_are_counted_as_timeouts(env: Running) -> None:
    out, err, code = await benchmark(
        "--base-url", env.base, "--endpoint", "/hang", "-n", "2", "-c", "2", "--timeout", "0.5",
    )  # fmt: skip
    assert code == 1
    assert "Traceback" not in err
    assert "no request got a response" in err
    table = out.split("status     count\n", 1)[1].split("\n\n", 1)[0]
    assert table.split() == ["timeout", "2"]


class _Collect(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred[int | None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))


@pytest_twisted.ensureDeferred
async def test_ctrl_c_stops_the_run_cleanly(env: Running) -> None:
    proto = _Collect()
    argv = [sys.executable, "-m", "llmproxy.cli", "benchmark", "--base-url", env.base]
    argv += ["--endpoint", "/hang", "-n", "100", "-c", "3", "--no-progress"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")}
    transport = reactor.spawnProcess(proto, sys.executable, argv, env=environ)  # type: ignore[attr-defined]
    # Wait until the three requests are in flight at the upstream, then interrupt.
    await wait_until(lambda: len([r for r in env.upstream.requests if r["uri"] == b"/hang"]) >= 3)
    transport.signalProcess("INT")
    code = await proto.ended.addTimeout(60, reactor)
    assert code == 130
    assert b"interrupted before any response" in proto.err
    assert b"Traceback" not in proto.err
    # No more than the three in flight were ever sent.
    assert len([r for r in env.upstream.requests if r["uri"] == b"/hang"]) == 3


@pytest_twisted.ensureDeferred
async def test_unreachable_base_url_is_a_clean_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port any more.
    out, err, code = await benchmark("--base-url", f"http://127.0.0.1:{port}", "-n", "50")
    assert code == 1
    assert out == ""
    assert f"cannot reach http://127.0.0.1:{port}/v1/chat/completions" in err
    assert "connection refused" in err
    assert "Traceback" not in err


@pytest_twisted.ensureDeferred
async def test_bad_arguments_exit_2() -> None:
    _, err, code = await benchmark("--base-url", "localhost:8080")
    assert code == 2
    assert "--base-url" in err and "Traceback" not in err


SESSIONS_INI = "\n[exporter:sessions]\ntype = sessions\nflush_interval = 0.05\n"


@pytest.fixture
def logged_env(tmp_path: Any) -> Iterator[Running]:
    yield from running_fixture(tmp_path, extra=SESSIONS_INI)


@pytest_twisted.ensureDeferred
async def test_a_run_is_one_session_in_the_session_log(logged_env: Running) -> None:
    _, err, code = await benchmark("--base-url", logged_env.base, "-n", "20", "-c", "4")
    assert code == 0, err
    logs = logged_env.service.settings.server.state_dir / "sessions"

    def responses() -> dict[str, int]:
        found: dict[str, int] = {}
        for path in logs.rglob("*.jsonl"):
            kinds = [json.loads(line)["type"] for line in path.read_text().splitlines()]
            found[path.stem] = kinds.count("response")
        return found

    await wait_until(lambda: sum(responses().values()) == 20, what="20 responses logged")
    (session,) = responses()  # one file for the run (was one per request)
    assert session.startswith("llmproxy-bench-")


@pytest_twisted.ensureDeferred
async def test_a_timed_run_stops_by_itself_and_reports_what_it_sent(env: Running) -> None:
    data = await benchmark_json("--base-url", env.base, "--duration", "0.5", "-c", "2")
    assert data["duration_s"] == 0.5
    assert data["responses"] >= 1 and data["failed"] == 0
    assert data["requests"] == data["responses"] == len(chat_requests(env))
