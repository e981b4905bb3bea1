"""Capture waits for the reactor to send what the request path wrote
(llmproxy/capture/pump.py): a request is handed to the kernel for its upstream,
and a reply's last bytes for its client, before their capture runs.

Twisted's transports buffer what is written until the reactor polls, and the
reactor runs its due calls before it polls: a capture turn scheduled straight
from the request path would run while the reply's last bytes still wait in the
client's transport.  Each test records, whenever the pump takes queued records,
which TCP connections of the process still hold unsent bytes (a transport with
unsent bytes is registered with the reactor as a writer until they are sent).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, tcp

from tests.fakes.upstream import sse_chunks
from tests.integration.harness import Running, running_fixture, wait_until

pytestmark = pytest.mark.integration

FILE_SINK = """
[exporter:events]
type = file
path = events.jsonl
"""


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Running]:
    yield from running_fixture(tmp_path, extra=FILE_SINK)


def _unsent() -> list[str]:
    """The TCP connections holding bytes the reactor has not sent yet."""
    writers = reactor.getWriters()  # type: ignore[attr-defined]
    return [repr(w) for w in writers if isinstance(w, tcp.Connection)]


async def _watch(env: Running) -> list[list[str]]:
    """What ``_unsent`` gives each time the pump takes queued records, from the
    second exchange on: the first one's request waits for its upstream connection
    to be made (a connecting socket is a writer too)."""
    warm = await env.client.post(env.url("/mock/v1/models"), data=b"")
    await warm.content()
    pump = env.service.capture
    await wait_until(lambda: not pump.pending(), what="the first exchange captured")
    seen: list[list[str]] = []
    flush = pump.flush

    def watched(budget: float | None = None) -> None:
        if pump.pending():
            seen.append(_unsent())
        flush(budget)

    pump.flush = watched  # type: ignore[method-assign]
    return seen


@pytest_twisted.ensureDeferred
async def test_a_json_exchange_is_sent_both_ways_before_its_capture(env: Running) -> None:
    seen = await _watch(env)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):
        resp = await env.client.post(env.url("/mock/v1/chat/completions"), json=body)
        assert resp.code == 200
        await resp.content()
    capture = env.service.capture
    await wait_until(lambda: capture.flushed >= 8, what="six more records taken by the pump")
    assert seen, "the pump never took a record"
    assert all(not unsent for unsent in seen), seen


@pytest_twisted.ensureDeferred
async def test_a_streams_last_bytes_reach_the_kernel_before_its_capture(env: Running) -> None:
    seen = await _watch(env)
    body = {"model": "gpt-4o-mini", "stream": True, "messages": []}
    for _ in range(3):
        resp = await env.client.post(env.url("/v1/chat/completions"), json=body)
        assert await resp.content() == b"".join(sse_chunks())
    capture = env.service.capture
    await wait_until(lambda: capture.flushed >= 8, what="six more records taken by the pump")
    assert seen, "the pump never took a record"
    assert all(not unsent for unsent in seen), seen
