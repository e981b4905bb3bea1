"""The streaming proxy against a real upstream on 127.0.0.1 (real sockets both ways)."""

from __future__ import annotations

import io
import itertools
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.iweb import UNKNOWN_LENGTH

from llmproxy.testing import RecordingEventSink
from tests.fakes.upstream import CHAT_COMPLETION, sse_chunks
from tests.integration.harness import Collect, Running, raw_request, running_fixture

pytestmark = pytest.mark.integration


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Running]:
    yield from running_fixture(tmp_path)


def _timeout(d: defer.Deferred[Any], seconds: float = 10.0) -> defer.Deferred[Any]:
    return d.addTimeout(seconds, reactor)


@pytest_twisted.ensureDeferred
async def test_json_response_passes_through_unchanged(env: Running) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    resp = await env.client.post(env.url("/mock/v1/chat/completions"), json=body)
    assert resp.code == 200
    assert await resp.json() == CHAT_COMPLETION
    seen = env.upstream.requests[-1]
    assert seen["uri"] == b"/v1/chat/completions"
    assert json.loads(seen["body"]) == body


@pytest_twisted.ensureDeferred
async def test_sse_stream_passes_through_unchanged(env: Running) -> None:
    body = {"model": "gpt-4o-mini", "stream": True, "messages": []}
    resp = await env.client.post(env.url("/v1/chat/completions"), json=body)
    assert resp.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
    assert await resp.content() == b"".join(sse_chunks())


@pytest_twisted.ensureDeferred
async def test_sse_events_reach_the_client_as_the_upstream_sends_them(env: Running) -> None:
    agent = Agent(reactor, pool=env.pool)
    resp = await raw_request(agent, b"GET", env.url("/sse?n=3&gap=0.2"))
    collect = Collect()
    resp.deliverBody(collect)
    await _timeout(collect.done)
    assert collect.complete
    events = [(t, c) for t, c in collect.chunks if c.strip()]
    assert [c for _, c in events] == [b'data: {"i": %d}\n\n' % i for i in range(3)]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(events)]
    # Sent 200 ms apart: each arrives well after the previous, not all at the end.
    assert all(g > 0.12 for g in gaps), gaps


@pytest_twisted.ensureDeferred
async def test_slow_client_pauses_upstream_and_memory_stays_bounded(env: Running) -> None:
    total = 200 * 1024 * 1024
    agent = Agent(reactor, pool=env.pool)
    resp = await raw_request(agent, b"GET", env.url(f"/big?bytes={total}"))
    collect = Collect(pause_after=1024 * 1024)
    paused = env.upstream.next_pause()
    resp.deliverBody(collect)
    await _timeout(collect.got_some)
    await _timeout(paused)
    # Wait until the pipeline is full and still: the upstream producer paused
    # and producing nothing more while the client does not read.
    for _ in range(50):
        if not _upstream_paused(env):
            await _timeout(env.upstream.next_pause())
        before = env.upstream.big_sent
        await task.deferLater(reactor, 0.1, lambda: None)
        if env.upstream.big_sent == before and _upstream_paused(env):
            break
    (exchange,) = list(env.service.proxy.open)
    buffered = _buffered(exchange.request.channel.transport)
    assert buffered < 4 * 1024 * 1024, buffered
    # The upstream produced a small fraction: it is held back, not read into memory.
    assert env.upstream.big_sent < 40 * 1024 * 1024, env.upstream.big_sent
    assert collect.received < 40 * 1024 * 1024
    collect.transport.stopProducing()  # type: ignore[union-attr]
    await _timeout(collect.done)


def _upstream_paused(env: Running) -> bool:
    return any(
        getattr(r["_request"], "producer", None) is not None
        and getattr(r["_request"].producer, "paused", False)
        for r in env.upstream.requests
        if not r["_request"].finished
    )


def _buffered(transport: Any) -> int:
    return len(transport.dataBuffer) + transport._tempDataLen


@pytest_twisted.ensureDeferred
async def test_client_disconnect_mid_stream_closes_the_upstream_connection(env: Running) -> None:
    agent = Agent(reactor, pool=env.pool)
    resp = await raw_request(agent, b"GET", env.url("/sse?n=1000&gap=0.05"))
    collect = Collect(pause_after=1)
    resp.deliverBody(collect)
    await _timeout(collect.got_some)
    closed = env.upstream.next_close()
    assert env.upstream.open_connections == 1
    collect.transport.stopProducing()  # type: ignore[union-attr]
    await _timeout(closed, 5)
    assert env.upstream.open_connections == 0
    assert not env.service.proxy.open


@pytest_twisted.ensureDeferred
async def test_upstream_connections_are_kept_alive_and_reused(env: Running) -> None:
    for _ in range(10):
        resp = await env.client.post(env.url("/mock/v1/chat/completions"), json={"m": 1})
        await resp.content()
    assert len(env.upstream.requests) == 10
    assert env.upstream.connections == 1


@pytest_twisted.ensureDeferred
async def test_request_id_is_kept_when_sane(env: Running) -> None:
    resp = await env.client.get(env.url("/echo-headers"), headers={"X-Request-ID": "abc-123"})
    assert resp.headers.getRawHeaders(b"x-llmproxy-request-id") == [b"abc-123"]
    seen = await resp.json()
    assert seen["x-request-id"] == ["abc-123"]
    assert "x-llmproxy-request-id" not in seen


@pytest_twisted.ensureDeferred
async def test_the_proxys_own_request_id_header_wins_over_x_request_id(env: Running) -> None:
    resp = await env.client.get(
        env.url("/echo-headers"),
        headers={"X-LLMProxy-Request-ID": "mine-1", "X-Request-ID": "other-2"},
    )
    assert resp.headers.getRawHeaders(b"x-llmproxy-request-id") == [b"mine-1"]
    seen = await resp.json()
    assert seen["x-request-id"] == ["mine-1"]


@pytest_twisted.ensureDeferred
async def test_request_id_is_generated_when_missing_or_insane(env: Running) -> None:
    for headers in (
        {},
        {"X-Request-ID": "bad id with spaces"},
        {"X-Request-ID": "x" * 300},
        {"X-LLMProxy-Request-ID": "bad\x01id"},
    ):
        resp = await env.client.get(env.url("/echo-headers"), headers=headers)
        (rid,) = resp.headers.getRawHeaders(b"x-llmproxy-request-id")
        seen = await resp.json()
        assert len(rid) == 32 and int(rid, 16) >= 0
        assert seen["x-request-id"] == [rid.decode()]


@pytest_twisted.ensureDeferred
async def test_the_providers_request_id_reaches_the_client_unchanged(env: Running) -> None:
    # Read as the OpenAI SDK reads it (response.headers.get("x-request-id")) and as the
    # Anthropic SDK does ("request-id"): the provider's own, for its support.
    openai = await env.client.post(
        env.url("/mock/v1/chat/completions"),
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-Request-ID": "client-chosen"},
    )
    await openai.content()
    n = len(env.upstream.requests)
    assert openai.headers.getRawHeaders(b"x-request-id") == [b"req_%d" % n]
    assert openai.headers.getRawHeaders(b"x-llmproxy-request-id") == [b"client-chosen"]
    anthropic = await env.client.post(
        env.url("/mock/v1/messages"),
        json={"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
    )
    await anthropic.content()
    assert anthropic.headers.getRawHeaders(b"request-id") == [b"req_%d" % (n + 1)]
    assert anthropic.headers.getRawHeaders(b"x-request-id") is None
    (own,) = anthropic.headers.getRawHeaders(b"x-llmproxy-request-id")
    assert len(own) == 32


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_headers_are_removed_both_ways_and_host_is_set(env: Running) -> None:
    resp = await env.client.get(
        env.url("/echo-headers"),
        headers={
            "Connection": "keep-alive, X-Private",
            "X-Private": "secret-hop",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "X-Kept": "yes",
        },
    )
    seen = await resp.json()
    for name in ("x-private", "keep-alive", "te", "proxy-authorization"):
        assert name not in seen, name
    assert seen["x-kept"] == ["yes"]
    port = env.upstream.port.getHost().port  # type: ignore[union-attr]
    assert seen["host"] == [f"127.0.0.1:{port}"]
    assert resp.headers.getRawHeaders(b"x-hop") is None
    assert resp.headers.getRawHeaders(b"keep-alive") is None


@pytest_twisted.ensureDeferred
async def test_overhead_header_reports_milliseconds(env: Running) -> None:
    resp = await env.client.post(env.url("/mock/v1/chat/completions"), json={})
    await resp.content()
    (value,) = resp.headers.getRawHeaders(b"x-llmproxy-overhead-ms")
    assert 0 <= float(value) < 1000


@pytest_twisted.ensureDeferred
async def test_upstream_status_and_body_pass_through(env: Running) -> None:
    resp = await env.client.get(env.url("/status/429"))
    assert resp.code == 429
    assert await resp.content() == b"{}"


@pytest_twisted.ensureDeferred
async def test_passthrough_form_reaches_an_allowed_http_host(env: Running) -> None:
    port = env.upstream.port.getHost().port  # type: ignore[union-attr]
    resp = await env.client.post(
        env.url(f"/openai/127.0.0.1:{port}/v1/chat/completions"), json={"x": 1}
    )
    assert resp.code == 200
    assert await resp.json() == CHAT_COMPLETION
    assert env.upstream.requests[-1]["uri"] == b"/v1/chat/completions"


@pytest_twisted.ensureDeferred
async def test_form_bodies_pass_through_unparsed(env: Running) -> None:
    # twisted.web parses POSTed forms by default and answers a malformed
    # multipart body with its own 400: a proxy must forward it untouched.
    body = b"--not-the-boundary\r\nthis is not multipart at all\r\n"
    for ctype in (b"multipart/form-data; boundary=xyz", b"application/x-www-form-urlencoded"):
        resp = await env.client.post(
            env.url("/mock/v1/chat/completions"), data=body, headers={b"content-type": [ctype]}
        )
        assert resp.code == 200, ctype
        await resp.content()
        seen = env.upstream.requests[-1]
        assert seen["body"] == body


@pytest.mark.parametrize(
    "path",
    [
        "/openai/api.openai.com.evil.test/v1/chat/completions",
        "/openai/127.0.0.1/v1/chat/completions",
        "/openai/[::1]/v1/chat/completions",
        "/openai/localhost/v1/chat/completions",
        "/openai/api.openai.com@evil.test/v1/chat/completions",
        "/openai/evil.test%2f@api.openai.com/v1/chat/completions",
        "/openai/api%2eopenai%2ecom/v1/chat/completions",
        "/openai/api.openai.com:8443/v1/chat/completions",
        "/openai/API.OPENAI.COM./v1/chat/completions",
        "/anthropic/api.anthropic.com/../evil.test/v1/messages",
    ],
)
@pytest_twisted.ensureDeferred
async def test_passthrough_refuses_hosts_off_the_allowlist(env: Running, path: str) -> None:
    resp = await env.client.get(env.url(path))
    assert resp.code == 403
    body = await resp.json()
    assert body["error"]["type"] == "permission_error"
    assert env.upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_refused_host_is_audited(env: Running) -> None:
    resp = await env.client.get(env.url("/openai/evil.test/v1/models"))
    await resp.content()
    assert resp.code == 403
    audit = env.service.settings.audit_path
    assert audit is not None
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert lines[-1]["action"] == "upstream_refused"
    assert lines[-1]["host"] == "evil.test"


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@pytest.fixture
def tight(tmp_path: Any) -> Iterator[Running]:
    dead = _free_port()
    extra = f"""
[route:dead]
prefix = /dead
upstream = http://127.0.0.1:{dead}
provider = anthropic
"""
    server = "first_byte_timeout = 0.3\nidle_timeout = 0.3\nmax_body_bytes = 1000\n"
    yield from running_fixture(tmp_path, extra=extra, server=server)


@pytest_twisted.ensureDeferred
async def test_unreachable_upstream_gives_502(tight: Running) -> None:
    resp = await tight.client.post(tight.url("/dead/v1/messages"), json={})
    assert resp.code == 502
    err = (await resp.json())["error"]
    assert err["type"] == "upstream_error" and "refused" in err["message"].lower()


@pytest_twisted.ensureDeferred
async def test_no_response_within_first_byte_timeout_gives_504(tight: Running) -> None:
    resp = await tight.client.get(tight.url("/hang"))
    assert resp.code == 504
    err = (await resp.json())["error"]
    assert err["type"] == "timeout_error"
    assert "first_byte_timeout" in err["message"]


@pytest_twisted.ensureDeferred
async def test_idle_upstream_mid_stream_ends_the_stream(tight: Running) -> None:
    agent = Agent(reactor, pool=tight.pool)
    resp = await raw_request(agent, b"GET", tight.url("/stall"))
    assert resp.code == 200
    collect = Collect()
    resp.deliverBody(collect)
    await _timeout(collect.done)
    assert collect.body == b"data: first\n\n"
    assert not collect.complete  # cut, not a clean end: the client can tell
    assert not tight.service.proxy.open


@pytest_twisted.ensureDeferred
async def test_body_over_max_body_bytes_gives_413(tight: Running) -> None:
    resp = await tight.client.post(tight.url("/mock/v1/chat/completions"), data=b"x" * 5000)
    assert resp.code == 413
    err = (await resp.json())["error"]
    assert "max_body_bytes" in err["message"]
    assert tight.upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_max_body_bytes_gives_413(tight: Running) -> None:
    producer = FileBodyProducer(io.BytesIO(b"y" * 5000))
    producer.length = UNKNOWN_LENGTH
    resp = await tight.client.post(tight.url("/mock/v1/chat/completions"), data=producer)
    assert resp.code == 413
    await resp.content()
    assert tight.upstream.requests == []


@pytest.fixture
def no_root(tmp_path: Any) -> Iterator[Running]:
    r = running_fixture(tmp_path)
    env = next(r)
    # Rebuild the router without the catch-all route.
    from llmproxy.http.router import Router

    settings = env.service.settings
    env.service.proxy.router = Router(
        tuple(x for x in settings.routes if x.name != "root"), settings.passthrough
    )
    yield env
    with pytest.raises(StopIteration):
        next(r)


@pytest_twisted.ensureDeferred
async def test_unknown_route_gives_404(no_root: Running) -> None:
    resp = await no_root.client.get(no_root.url("/nothing/here"))
    assert resp.code == 404
    assert (await resp.json())["error"]["type"] == "invalid_request_error"


class _ConnectTimesOut:
    """An endpoint whose connection attempt times out (as TCP endpoints report it)."""

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        from twisted.internet.error import TimeoutError as ConnectTimeout

        return defer.fail(ConnectTimeout("connect timed out"))


@pytest_twisted.ensureDeferred
async def test_connect_timeout_gives_504(env: Running) -> None:
    from llmproxy.proxy.client import UpstreamPool

    pool = UpstreamPool(reactor, 1.0, endpoint_factory=lambda origin: _ConnectTimesOut())
    env.service.proxy.upstream = pool
    resp = await env.client.post(env.url("/mock/v1/chat/completions"), json={})
    assert resp.code == 504
    err = (await resp.json())["error"]
    assert err["type"] == "timeout_error" and "connecting" in err["message"]
    stats = env.service.metrics.snapshot()
    assert stats["routes"]["mock"]["by_outcome"] == {"timeout": 1}


@pytest.mark.parametrize("bound", ["none", "above", "below"])
@pytest_twisted.ensureDeferred
async def test_a_long_body_is_read_back_whole_only_for_the_session_tracker_within_its_bound(
    env: Running, bound: str
) -> None:
    cap = env.service.settings.capture.request_body_bytes
    body = json.dumps({"messages": [{"role": "user", "content": "x" * (3 * cap)}]}).encode()
    whole_body_bytes = {"none": 0, "above": len(body), "below": len(body) - 1}[bound]
    events = env.service.proxy.events = RecordingEventSink(whole_body_bytes=whole_body_bytes)  # type: ignore[assignment]
    resp = await env.client.post(env.url("/mock/v1/chat/completions"), data=body)
    assert resp.code == 200
    await resp.content()
    assert env.upstream.requests[-1]["body"] == body  # the upstream always gets it all
    assert events.bodies == [body if bound == "above" else body[:cap]]
