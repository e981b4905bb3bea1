"""Hostile clients against the real daemon (``twistd -n llmproxy``) on 127.0.0.1:
slowloris heads and trickled bodies, one address taking every slot, a flood of
huge conversations, the admin listener, secrets in every output, session ids of
another tenant, a token outside its paths, a header line over the limit.

Each attack is bounded in count and time; nothing here measures time: the
assertions are on answers, counters and what the outputs contain."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.web.client import Agent, HTTPConnectionPool

from llmproxy.access.tokens import TokenFile
from tests.fakes.loki import FakeLoki, listen_fake_loki
from tests.fakes.upstream import FakeUpstream
from tests.integration.daemon import DaemonProtocol, spawn, terminate
from tests.integration.harness import wait_until

pytestmark = pytest.mark.integration

ROUTE_KEY = "sk-proj-RouteKeyQ7vT9xKp2LmZ4rWb8NcY6hJd3F"
ADMIN_TOKEN = "admin-Zq8Wm3Xr6Kt1Vb9Nc4Ly7Hp2"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


class RawClient(protocol.Protocol):
    """A client that writes what it is told and keeps what it gets."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)

    @property
    def status(self) -> int | None:
        head = self.received.split(b"\r\n", 1)[0]
        return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None

    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = orjson.loads(self.received.partition(b"\r\n\r\n")[2])["error"]
        return error


@attrs.define
class Daemon:
    tmp_path: Path
    upstream: FakeUpstream
    proc: DaemonProtocol
    transport: Any
    port: int
    admin_port: int
    client: Any
    pool: HTTPConnectionPool
    loki: FakeLoki | None = None

    @property
    def state(self) -> Path:
        return self.tmp_path / "state"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def raw(
        self, data: bytes = b"", port: int | None = None, source: str | None = None
    ) -> RawClient:
        """A connection, from ``source`` (another loopback address) when given."""
        bind = None if source is None else (source, 0)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port or self.port, bindAddress=bind)
        client = await connectProtocol(endpoint, RawClient())
        if data:
            client.transport.write(data)  # type: ignore[union-attr]
        return client

    async def post(self, path: str, body: Any = CHAT, **headers: str) -> tuple[int, bytes]:
        resp = await self.client.post(
            self.url(path),
            data=json.dumps(body).encode() if not isinstance(body, bytes) else body,
            headers={"Content-Type": "application/json", **headers},
        )
        return resp.code, await resp.content()

    async def admin(self, path: str) -> Any:
        resp = await self.client.get(
            f"http://127.0.0.1:{self.admin_port}{path}",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert resp.code == 200, await resp.content()
        return resp

    async def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = await (await self.admin("/stats")).json()
        return stats

    async def metrics(self) -> str:
        text: bytes = await (await self.admin("/metrics")).content()
        return text.decode()

    async def stop(self) -> None:
        await self.pool.closeCachedConnections()
        if not self.proc.ended.called:
            terminate(self.transport)
            await self.proc.ended

    def outputs(self) -> dict[str, str]:
        """Everything the daemon wrote: its log, every file under state_dir (events,
        session logs, the audit log, spools), and the Loki lines."""
        found = {"daemon log": self.proc.output.decode(errors="replace")}
        for path in sorted(self.state.rglob("*")):
            if path.is_file():
                found[str(path.relative_to(self.state))] = path.read_text(errors="replace")
        if self.loki is not None:
            found["loki"] = "\n".join(e.line for e in self.loki.entries())
        return found

    def events(self) -> list[dict[str, Any]]:
        path = self.state / "events.jsonl"
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines()]


CONFIG = """
[server]
listen = tcp:0:interface=127.0.0.1
admin_listen = tcp:0:interface=127.0.0.1
state_dir = {state}
drain_timeout = 3
admin_token = env:TEST_ADMIN_TOKEN
{server}

[route:secure]
prefix = /secure
upstream = http://127.0.0.1:{port}
provider = openai
auth = token
api_key = env:TEST_ROUTE_KEY
openai_organization = org-operator

[route:root]
prefix = /
upstream = http://127.0.0.1:{port}
provider = openai

[passthrough]
allowed_http_hosts = 127.0.0.1:{port}

[exporter:events]
type = file
path = events.jsonl
flush_interval = 0.05

[exporter:sessions]
type = sessions
flush_interval = 0.05
{extra}
"""


@pytest.fixture
def boot(tmp_path: Path) -> Iterator[Any]:
    started: list[Daemon] = []
    stops: list[Any] = []

    async def start(server: str = "", extra: str = "", loki: bool = False) -> Daemon:
        upstream = FakeUpstream(reactor)
        port = upstream.listen()
        stops.append(upstream.stop)
        fake_loki = None
        if loki:
            fake_loki = FakeLoki()
            running = listen_fake_loki(fake_loki)
            stops.append(running.stop)
            extra += f"\n[exporter:loki]\ntype = loki\nurl = {running.url}\nflush_interval = 0.05\n"
        config = tmp_path / "llmproxy.ini"
        config.write_text(
            CONFIG.format(state=tmp_path / "state", port=port, server=server, extra=extra)
        )
        env = {"TEST_ADMIN_TOKEN": ADMIN_TOKEN, "TEST_ROUTE_KEY": ROUTE_KEY}
        proc, transport = spawn(config, env)
        proxy_port, admin_port = await proc.ready.addTimeout(30, reactor)
        pool = HTTPConnectionPool(reactor, persistent=False)
        pool._factory.noisy = False  # type: ignore[attr-defined]
        client = treq.client.HTTPClient(Agent(reactor, pool=pool))  # type: ignore[attr-defined]
        daemon = Daemon(
            tmp_path, upstream, proc, transport, proxy_port, admin_port, client, pool, fake_loki
        )
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        pytest_twisted.blockon(defer.ensureDeferred(daemon.stop()))
    for stop in stops:
        pytest_twisted.blockon(defer.maybeDeferred(stop))


# -- slowloris ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_slowloris_heads_are_cut_by_the_deadline_and_a_normal_client_is_then_served(
    boot: Any,
) -> None:
    d = await boot("header_timeout = 1\nmax_connections = 12\nmax_connections_per_client = 0")
    slow = [await d.raw(b"GET /v1/models HTTP/1.1\r\n") for _ in range(12)]
    refused = await d.raw(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    await refused.closed  # every slot is held: 503
    assert refused.status == 503
    # A header line each 0.2 s keeps resetting idle_timeout, not header_timeout.
    for _ in range(40):
        if all(c.closed.called for c in slow):
            break
        for c in slow:
            if not c.closed.called:
                c.transport.write(b"X-Drip: 1\r\n")  # type: ignore[union-attr]
        await defer.ensureDeferred(_sleep(0.2))
    assert all(c.closed.called for c in slow)
    assert [c.status for c in slow] == [408] * 12
    assert "header_timeout" in slow[0].error()["message"]
    code, _ = await d.post("/v1/chat/completions")
    assert code == 200
    metrics = await d.metrics()
    assert 'llmproxy_limit_rejections_total{limit="header_timeout"} 12.0' in metrics
    assert 'llmproxy_limit_rejections_total{limit="max_connections"} 1.0' in metrics


@pytest_twisted.ensureDeferred
async def test_while_one_address_drips_heads_a_client_at_another_is_served(boot: Any) -> None:
    d = await boot("header_timeout = 2\nmax_connections = 20\nmax_connections_per_client = 10")
    slow = [await d.raw(b"GET /v1/models HTTP/1.1\r\n") for _ in range(15)]
    # Past its ten, the dripping address is refused at once: 429, not a slot each.
    await defer.gatherResults([c.closed for c in slow[10:]])
    assert [c.status for c in slow[10:]] == [429] * 5
    normal = await d.raw(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (len(json.dumps(CHAT)), json.dumps(CHAT).encode()),
        source="127.0.0.2",
    )
    await normal.closed
    assert normal.status == 200
    await defer.gatherResults([c.closed for c in slow[:10]])
    assert [c.status for c in slow[:10]] == [408] * 10
    stats = await d.stats()
    assert stats["proxy"]["limit_rejections"] == {
        "server.header_timeout": 10,
        "server.max_connections_per_client": 5,
    }


@pytest_twisted.ensureDeferred
async def test_a_body_at_a_byte_a_trickle_is_cut_by_the_minimum_rate(boot: Any) -> None:
    d = await boot("header_timeout = 0.5\nmin_body_rate = 100")
    slow = await d.raw(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"
    )
    for _ in range(50):
        if slow.closed.called:
            break
        slow.transport.write(b" ")  # type: ignore[union-attr]
        await defer.ensureDeferred(_sleep(0.1))
    await slow.closed
    assert slow.status == 408 and "min_body_rate" in slow.error()["message"]
    assert d.upstream.requests == []
    stats = await d.stats()
    assert stats["proxy"]["limit_rejections"] == {"server.min_body_rate": 1}


@pytest_twisted.ensureDeferred
async def test_one_address_cannot_take_more_than_its_share(boot: Any) -> None:
    d = await boot("max_connections_per_client = 5")
    held = [await d.raw() for _ in range(5)]
    extra = await d.raw()
    await extra.closed
    assert extra.status == 429
    assert "max_connections_per_client" in extra.error()["message"]
    for c in held:
        c.transport.loseConnection()  # type: ignore[union-attr]
        await c.closed
    codes: list[int] = []
    for _ in range(50):
        code, _ = await d.post("/v1/chat/completions")
        codes.append(code)
        if code == 200:
            break
    # Served once the address's connections are gone (until the proxy has seen
    # them close, a new one may still be over the cap).
    assert codes[-1] == 200 and set(codes[:-1]) <= {429}
    stats = await d.stats()
    assert stats["proxy"]["limit_rejections"] == {
        "server.max_connections_per_client": len(codes)  # the extra one and each 429
    }


# -- one big conversation must not stall everyone --------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_flood_of_huge_conversations_leaves_small_requests_served(boot: Any) -> None:
    d = await boot("max_body_bytes = 8MiB", "\n[sessions]\nmax_body_bytes = 1MiB\n")
    big = json.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * (4 * 1024 * 1024)}]}
    ).encode()
    floods = [defer.ensureDeferred(d.post("/v1/chat/completions", big)) for _ in range(6)]
    small = [
        defer.ensureDeferred(d.post("/v1/chat/completions", {**CHAT, "user": f"u{i}"}))
        for i in range(30)
    ]
    results = await defer.gatherResults(floods + small)
    assert [code for code, _ in results] == [200] * 36
    stats = await d.stats()
    sessions = stats["sessions"]
    # The tracker parsed none of the six: each was over its bound, and never read back.
    assert sessions["too_large"] == 6
    assert sessions["started"] == 30 and sessions["client_ids"] == 30
    assert stats["proxy"]["routes"]["root"]["by_status"] == {"200": 36}


# -- the admin listener -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_admin_listener_refuses_before_reading_a_body_and_caps_what_it_reads(
    boot: Any,
) -> None:
    d = await boot("header_timeout = 1")
    # 300 MiB announced, none sent: the 401 comes on the headers alone.
    claim = await d.raw(
        b"POST /cache/purge?all=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 314572800\r\n\r\n",
        d.admin_port,
    )
    await claim.closed
    assert claim.status == 401 and claim.error()["message"] == "admin token required"
    auth = f"Authorization: Bearer {ADMIN_TOKEN}\r\n".encode()
    too_big = await d.raw(
        b"POST /cache/purge?all=1 HTTP/1.1\r\nHost: x\r\n"
        + auth
        + b"Content-Length: 10000\r\n\r\n",
        d.admin_port,
    )
    await too_big.closed
    assert too_big.status == 413
    partial = await d.raw(b"GET /stats HTTP/1.1\r\n", d.admin_port)
    await partial.closed  # cut at header_timeout, not Twisted's 12 hours
    assert partial.status == 408
    audit = (d.state / "audit.jsonl").read_text()
    assert '"action":"admin_denied"' in audit and ADMIN_TOKEN not in audit
    assert not list((d.state).rglob("tmp*"))
    stats = await d.stats()
    assert stats["proxy"]["limit_rejections"] == {
        "admin.admin_token": 1,
        "admin.header_timeout": 1,
        "admin.max_body_bytes": 1,
    }


# -- secrets in every output ------------------------------------------------------------


MARKERS = {
    "query": "QueryMarkerK3yQ7vT9xKp2Lm",
    "x-auth": "XAuthMarkerZ4rWb8NcY6hJd3",
    "credential": "CredMarkerFgS5aEuHn4Rb7Yc2",
    "body": "BodyMarkerWq9Ld6Kx3Mf8Tv5P",
    "userinfo": "UserinfoMarkerz1Gs0JeQ7vT",
}


def leaks(outputs: dict[str, str], secret: str) -> list[str]:
    """Outputs holding any 12 characters of ``secret`` in a row."""
    pieces = {secret[i : i + 12] for i in range(len(secret) - 11)}
    return [name for name, text in outputs.items() if any(p in text for p in pieces)]


@pytest_twisted.ensureDeferred
async def test_no_secret_reaches_an_event_a_loki_line_a_session_log_or_the_audit(
    boot: Any, tmp_path: Path
) -> None:
    secret, _ = TokenFile.in_state_dir(tmp_path / "state").create("team-a", time.time())
    d = await boot(loki=True)
    resp = await d.client.get(d.url(f"/echo-headers?k%65y={MARKERS['query']}&limit=2"))
    assert resp.code == 200
    await resp.content()
    code, _ = await d.post(
        "/v1/chat/completions",
        {**CHAT, "api_key": MARKERS["body"], "user": "leak-test"},
        **{"X-Auth": MARKERS["x-auth"], "X-Custom-Credential": MARKERS["credential"]},
    )
    assert code == 200
    resp = await d.client.get(d.url(f"/openai/user:{MARKERS['userinfo']}@evil.example/v1/models"))
    assert resp.code == 403
    await resp.content()
    # An upstream that echoes what it got: the injected route key comes back.
    resp = await d.client.get(
        d.url("/secure/echo-headers"), headers={"Authorization": f"Bearer {secret}"}
    )
    echoed = await resp.content()
    assert resp.code == 200 and ROUTE_KEY.encode() in echoed  # the upstream did get it
    await wait_until(lambda: len(d.events()) >= 7, what="the events of four exchanges")
    assert d.loki is not None
    await wait_until(lambda: len(d.loki.entries()) >= 7, what="the Loki lines")
    await d.stop()
    outputs = d.outputs()
    assert {"events.jsonl", "audit.jsonl", "loki"} <= set(outputs)
    assert any(name.startswith("sessions/") for name in outputs)
    for what, marker in {**MARKERS, "route key": ROUTE_KEY, "proxy token": secret}.items():
        assert leaks(outputs, marker) == [], what
    refused = [e for e in d.events() if e.get("status") == 403]
    assert refused and refused[0]["path"] == "/openai/****@evil.example/v1/models"


# -- tenants, paths, headers -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_same_session_id_from_two_tenants_makes_two_session_logs(boot: Any) -> None:
    d = await boot()
    for key in ("sk-tenant-one-0123456789abcdef", "sk-tenant-two-0123456789abcdef"):
        code, _ = await d.post(
            "/v1/chat/completions",
            **{"Authorization": f"Bearer {key}", "X-Session-ID": "ticket-42"},
        )
        assert code == 200
    await wait_until(lambda: len(d.events()) >= 4, what="four events")
    await d.stop()
    responses = [e for e in d.events() if e["type"] == "response"]
    sessions = {e["session_id"] for e in responses}
    assert len(sessions) == 2 and all(s.endswith("-ticket-42") for s in sessions)
    logs = sorted((d.state / "sessions").rglob("*.jsonl"))
    assert len(logs) == 2
    for log in logs:
        lines = [orjson.loads(line) for line in log.read_bytes().splitlines()]
        assert len({line["session_id"] for line in lines}) == 1
        assert sum(1 for line in lines if line["type"] == "response") == 1


@pytest_twisted.ensureDeferred
async def test_a_token_outside_its_paths_gets_403_and_no_upstream_connection(
    boot: Any, tmp_path: Path
) -> None:
    tokens = TokenFile.in_state_dir(tmp_path / "state")
    secret, token = tokens.create(
        "team-b", time.time(), allowed_paths=("/v1/chat/completions",), allowed_methods=("POST",)
    )
    d = await boot()
    bearer = {"Authorization": f"Bearer {secret}"}
    for method, path in (("POST", "/secure/v1/files"), ("DELETE", "/secure/v1/chat/completions")):
        resp = await d.client.request(method, d.url(path), headers=bearer)
        assert resp.code == 403, path
        assert (await resp.json())["error"]["type"] == "permission_error"
    assert d.upstream.connections == 0 and d.upstream.requests == []
    code, _ = await d.post(
        "/secure/v1/chat/completions",
        **bearer,
        **{"OpenAI-Organization": "org-someone-else", "OpenAI-Project": "proj_x"},
    )
    assert code == 200 and d.upstream.connections == 1
    sent = {k.lower(): v for k, v in d.upstream.requests[-1]["headers"].items()}
    assert sent["openai-organization"] == ["org-operator"] and "openai-project" not in sent
    audit = [orjson.loads(x) for x in (d.state / "audit.jsonl").read_bytes().splitlines()]
    denied = [a for a in audit if a["action"] == "access_denied"]
    assert [(a["reason"], a["token_id"]) for a in denied] == [
        ("token_path", token.id),
        ("token_method", token.id),
    ]


@pytest_twisted.ensureDeferred
async def test_a_20_kib_header_line_gets_431_an_event_and_a_metric(boot: Any) -> None:
    d = await boot("max_header_bytes = 16KiB")
    long = await d.raw(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Long: "
        + b"a" * (20 * 1024)
        + b"\r\n\r\n"
    )
    await long.closed
    assert long.status == 431
    assert long.error()["code"] == "request_header_fields_too_large"
    assert "max_header_bytes" in long.error()["message"]
    assert 'llmproxy_limit_rejections_total{limit="max_header_bytes"} 1.0' in await d.metrics()
    await wait_until(lambda: any(e.get("status") == 431 for e in d.events()), what="the event")
    (event,) = [e for e in d.events() if e.get("status") == 431]
    assert (event["method"], event["path"], event["outcome"]) == (
        "POST",
        "/v1/chat/completions",
        "rejected",
    )


async def _sleep(seconds: float) -> None:
    from twisted.internet import task

    await task.deferLater(reactor, seconds, lambda: None)
