"""Self-healing storage against the real daemon (twistd subprocess), with real HTTP
through it to a fake upstream: ``state_dir`` removed while traffic flows, and the
events file moved aside as logrotate does (with and without ``kill -HUP``).
Every assertion is a count of request ids across the files."""

from __future__ import annotations

import json
import shutil
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from tests.fakes.upstream import FakeUpstream
from tests.integration.daemon import DaemonProtocol, kill, spawn, terminate, write_config
from tests.integration.harness import wait_until

pytestmark = pytest.mark.integration

FILE_SINK = """
[exporter:events]
type = file
path = events.jsonl
flush_interval = 0.1
batch_size = 10
"""

# A sink that is never reachable: every batch goes to its spool (max_retries = 0).
DOWN_SINK = """
[exporter:down]
type = loki
url = http://127.0.0.1:1/loki/api/v1/push
max_retries = 0
backoff_min = 0.05
backoff_max = 0.1
flush_interval = 0.1
batch_size = 10
"""


@attrs.define
class Daemon:
    tmp_path: Path
    upstream: FakeUpstream
    proc: DaemonProtocol
    transport: Any
    port: int
    admin: int
    pool: HTTPConnectionPool
    client: Any
    sent: list[str] = attrs.Factory(list)  # request ids, in the order answered

    @property
    def state(self) -> Path:
        return self.tmp_path / "state"

    async def chat(self, n: int) -> list[str]:
        ids = []
        for _ in range(n):
            number = len(self.sent)
            resp = await self.client.post(
                f"http://127.0.0.1:{self.port}/v1/chat/completions",
                json={
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": f"q{number}"}],
                },
            )
            await resp.content()
            assert resp.code == 200
            request_id = resp.headers.getRawHeaders(b"x-llmproxy-request-id")[0].decode()
            self.sent.append(request_id)
            ids.append(request_id)
        return ids

    async def stats(self) -> dict[str, Any]:
        resp = await self.client.get(f"http://127.0.0.1:{self.admin}/stats")
        body: dict[str, Any] = json.loads(await resp.content())
        return body


@pytest.fixture
def daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    extra = getattr(request, "param", FILE_SINK)
    upstream = FakeUpstream(reactor)
    upstream_port = upstream.listen()
    proc, transport = spawn(write_config(tmp_path, upstream_port, extra=extra))
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory.noisy = False  # type: ignore[attr-defined]
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))  # type: ignore[attr-defined]
    try:
        port, admin = pytest_twisted.blockon(proc.ready.addTimeout(30, reactor))
        d = Daemon(tmp_path, upstream, proc, transport, port, admin, pool, client)
        yield d
    finally:
        terminate(transport)
        try:
            pytest_twisted.blockon(proc.ended.addTimeout(30, reactor))
        except defer.TimeoutError:
            kill(transport)
            pytest_twisted.blockon(proc.ended)
        pytest_twisted.blockon(pool.closeCachedConnections())
        pytest_twisted.blockon(upstream.stop())


def remove_tree(path: Path) -> None:
    """``rm -rf``, again when the daemon wrote into the tree while it was removed."""
    for _ in range(100):
        if not path.exists():
            return
        shutil.rmtree(path, ignore_errors=True)
    raise AssertionError(f"{path} could not be removed")


def events_in(*paths: Path) -> Counter[tuple[str, str]]:
    """(type, request_id) of every request and response event in the files."""
    seen: Counter[tuple[str, str]] = Counter()
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_bytes().splitlines():
            event = json.loads(line)
            if event["type"] in ("request", "response"):
                seen[(event["type"], event["request_id"])] += 1
    return seen


def each_once(ids: list[str]) -> Counter[tuple[str, str]]:
    return Counter({(kind, i): 1 for i in ids for kind in ("request", "response")})


def all_written(seen: Counter[tuple[str, str]], ids: list[str]) -> bool:
    return all(seen[("response", i)] and seen[("request", i)] for i in ids)


async def traffic_with(daemon: Daemon, n: int, act: Callable[[], object]) -> int:
    """``n`` requests, one after the other, with ``act()`` done after the fifth is
    answered, while the events of those before are still on their way to the
    file (batched every 0.1 s).  Returns how many requests were answered before."""
    await daemon.chat(5)
    before = len(daemon.sent)
    act()
    await daemon.chat(n - 5)
    return before


async def settled(daemon: Daemon, name: str) -> dict[str, Any]:
    """The exporter's stats once everything it accepted was sent (bounded)."""
    for _ in range(200):
        stats: dict[str, Any] = (await daemon.stats())["exporters"][name]
        if stats["sent"] + stats["dropped"] == stats["accepted"]:
            return stats
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"exporter {name} did not settle: {stats}")


@pytest.mark.parametrize("daemon", [FILE_SINK + DOWN_SINK], indirect=True)
@pytest_twisted.ensureDeferred
async def test_state_dir_removed_while_traffic_flows_loses_nothing_afterwards(
    daemon: Daemon,
) -> None:
    events = daemon.state / "events.jsonl"
    first = await daemon.chat(20)
    await wait_until(lambda: all_written(events_in(events), first), what="first events")
    before = await traffic_with(daemon, 60, lambda: remove_tree(daemon.state))
    # Requests made after the removal: every event in the recreated file, once.
    later = daemon.sent[before:]
    assert len(later) == 55
    await wait_until(lambda: all_written(events_in(events), later), what="events after removal")
    seen = events_in(events)
    assert all(n == 1 for n in seen.values()), [k for k, n in seen.items() if n > 1]
    assert {k: seen[k] for k in each_once(later)} == each_once(later)
    # The file exporter lost nothing; the unreachable sink's spool is written again
    # (what it held before vanished with the directory, counted as such).
    assert (await settled(daemon, "events"))["dropped"] == 0
    down = (await daemon.stats())["exporters"]["down"]
    assert "spool_write_failed" not in down["dropped_by_reason"], down
    spool = daemon.state / "spool" / "down"
    await wait_until(lambda: spool.is_dir() and any(spool.glob("[0-9]*.jsonl")), what="spool")
    # The session journal is written again, whole, in the recreated directory.
    journal = daemon.state / "session-state.jsonl"
    await wait_until(journal.exists, what="session journal")
    assert b"unlinked" in daemon.proc.output  # the reopen was logged with its reason


@pytest_twisted.ensureDeferred
async def test_events_file_moved_aside_keeps_every_event_exactly_once(daemon: Daemon) -> None:
    events = daemon.state / "events.jsonl"
    rotated = daemon.state / "events.jsonl.1"
    await daemon.chat(10)
    await wait_until(lambda: events.exists(), what="events file")
    await traffic_with(daemon, 60, lambda: events.rename(rotated))  # no SIGHUP
    await wait_until(
        lambda: all_written(events_in(rotated, events), daemon.sent), what="every event"
    )
    assert events_in(rotated, events) == each_once(daemon.sent)
    assert events_in(rotated) and events_in(events)  # both files took some
    await daemon.proc.wait_for(b"(moved)").addTimeout(10, reactor)
    assert (await settled(daemon, "events"))["dropped"] == 0


@pytest_twisted.ensureDeferred
async def test_events_file_moved_aside_then_sighup_keeps_every_event_exactly_once(
    daemon: Daemon,
) -> None:
    events = daemon.state / "events.jsonl"
    rotated = daemon.state / "events.jsonl.1"
    await daemon.chat(10)
    await wait_until(lambda: events.exists(), what="events file")

    def logrotate() -> None:
        events.rename(rotated)
        daemon.transport.signalProcess(signal.SIGHUP)  # postrotate

    await traffic_with(daemon, 60, logrotate)
    await daemon.proc.wait_for(b"config reloaded").addTimeout(20, reactor)
    await wait_until(
        lambda: all_written(events_in(rotated, events), daemon.sent), what="every event"
    )
    assert events_in(rotated, events) == each_once(daemon.sent)
    assert events_in(rotated) and events_in(events)
    await daemon.proc.wait_for(b"(SIGHUP)").addTimeout(10, reactor)
    stats = await settled(daemon, "events")
    assert stats["dropped"] == 0, stats
