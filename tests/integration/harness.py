"""Run the real proxy service in-process against a real upstream on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest_twisted
import treq
from twisted.internet import defer, protocol, reactor, task
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from llmproxy.config.loader import load_settings
from llmproxy.runtime.service import ProxyService
from tests.fakes.upstream import FakeUpstream


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition"
) -> None:
    """Poll a condition (not a timing assertion): bounded, fails with a clear message."""
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while not predicate():
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"{what} not met within {timeout}s")
        await task.deferLater(reactor, 0.05, lambda: None)


@attrs.define
class Running:
    service: ProxyService
    upstream: FakeUpstream
    base: str
    admin: str
    client: treq.client.HTTPClient  # type: ignore[name-defined]
    pool: HTTPConnectionPool

    def url(self, path: str) -> str:
        return self.base + path


def config_text(upstream_port: int, state_dir: str, extra: str = "", server: str = "") -> str:
    return f"""
[server]
listen = tcp:0:interface=127.0.0.1
admin_listen = tcp:0:interface=127.0.0.1
state_dir = {state_dir}
drain_timeout = 5
{server}

[route:mock]
prefix = /mock
upstream = http://127.0.0.1:{upstream_port}
provider = openai

[route:root]
prefix = /
upstream = http://127.0.0.1:{upstream_port}
provider = openai

[passthrough]
enabled = true
allowed_hosts = api.openai.com, api.anthropic.com
allowed_http_hosts = 127.0.0.1:{upstream_port}
{extra}
"""


def start(
    tmp_path: Any, extra: str = "", server: str = "", env: dict[str, str] | None = None
) -> Running:
    upstream = FakeUpstream(reactor)
    port = upstream.listen()
    # ``{upstream_port}`` in ``extra``: a route of its own to the upstream.
    extra = extra.replace("{upstream_port}", str(port))
    settings = load_settings(
        text=config_text(port, str(tmp_path / "state"), extra, server), env=env or {}
    )
    service = ProxyService(settings, reactor)
    service.startService()
    assert service.port is not None and service.admin_port is not None
    base = f"http://127.0.0.1:{service.port.getHost().port}"  # type: ignore[attr-defined]
    admin = f"http://127.0.0.1:{service.admin_port.getHost().port}"  # type: ignore[attr-defined]
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory.noisy = False  # type: ignore[attr-defined]
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))  # type: ignore[attr-defined]
    return Running(service, upstream, base, admin, client, pool)


def stop(running: Running) -> None:
    pytest_twisted.blockon(running.pool.closeCachedConnections())
    if running.service.running:
        pytest_twisted.blockon(running.service.stopService())
    pytest_twisted.blockon(running.upstream.stop())


def running_fixture(tmp_path: Any, **kw: Any) -> Iterator[Running]:
    r = start(tmp_path, **kw)
    try:
        yield r
    finally:
        stop(r)


class Collect(protocol.Protocol):
    """Collects a body with arrival times; can read slowly (pause its transport)."""

    def __init__(self, pause_after: int | None = None) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.done: defer.Deferred[None] = defer.Deferred()
        self.received = 0
        self.pause_after = pause_after
        self.reason: Any = None

    def connectionMade(self) -> None:
        self.got_some: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append((time.monotonic(), data))
        self.received += len(data)
        if self.pause_after is not None and self.received >= self.pause_after:
            self.transport.pauseProducing()  # type: ignore[union-attr]
            self.pause_after = None
            if not self.got_some.called:
                self.got_some.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason
        if not self.done.called:
            self.done.callback(None)

    @property
    def body(self) -> bytes:
        return b"".join(c for _, c in self.chunks)

    @property
    def complete(self) -> bool:
        return self.reason is not None and self.reason.check(ResponseDone) is not None


def raw_request(
    agent: Agent, method: bytes, url: str, headers: dict[bytes, list[bytes]] | None = None
) -> defer.Deferred[IResponse]:
    return agent.request(method, url.encode(), Headers(headers or {}), None)
