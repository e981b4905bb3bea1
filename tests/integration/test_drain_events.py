"""The drain hands the events of exchanges it aborts to the exporters before they close."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.web.client import Agent

from tests.integration.harness import Collect, Running, raw_request, running_fixture

pytestmark = pytest.mark.integration

FILE_SINK = "[exporter:events]\ntype = file\npath = events.jsonl\n"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Running]:
    yield from running_fixture(
        tmp_path, extra=FILE_SINK, env={"LLMPROXY_SERVER_DRAIN_TIMEOUT": "1"}
    )


@pytest_twisted.ensureDeferred
async def test_streams_cut_at_the_deadline_are_exported_not_spooled(
    env: Running, tmp_path: Path
) -> None:
    agent = Agent(reactor, pool=env.pool)
    streams = []
    for _ in range(5):
        collect = Collect()
        resp = await raw_request(agent, b"GET", env.url("/sse?n=100000&gap=0.05"))
        resp.deliverBody(collect)
        streams.append(collect)
    for _ in range(200):
        if len(env.service.proxy.open) == 5:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert len(env.service.proxy.open) == 5
    exporter = env.service.exporters[0]
    await env.service.stopService()
    stats = exporter.stats()
    assert (stats["after_close"], stats["spooled"], stats["dropped"]) == (0, 0, 0), stats
    events = [
        orjson.loads(x)
        for x in (tmp_path / "state" / "events.jsonl").read_bytes().split(b"\n")
        if x
    ]
    cut = [e for e in events if e["type"] == "response"]
    assert len(cut) == 5 and all(e["outcome"] != "ok" for e in cut), cut
    assert all(not c.complete for c in streams)
