"""Session log end to end: real requests through the in-process proxy to the fake
upstream, the session tracker on the request path, and the session files the
``sessions`` exporter writes (linear conversations, edits and regenerates that
fork, interleaved conversations, client ids, and a restart on the same state_dir)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from llmproxy.capture.sessions import SessionTracker
from tests.integration.harness import Running, start, stop

pytestmark = pytest.mark.integration

KEY = "sk-proj-SESSIONScanary0123456789abcdefWXYZ"
EXTRA = """
[exporter:sessions]
type = sessions
flush_interval = 0.05
"""


@attrs.define
class Proxy:
    """One in-process proxy, with the tracker wired in by hand when the service
    does not wire one itself."""

    env: Running
    tracker: SessionTracker
    owns_tracker: bool
    port: int = 0  # the fake upstream's
    stopped: bool = False

    def __attrs_post_init__(self) -> None:
        assert self.env.upstream.port is not None
        self.port = int(self.env.upstream.port.getHost().port)  # type: ignore[attr-defined]

    @property
    def state_dir(self) -> Path:
        return self.env.service.settings.server.state_dir

    async def shutdown(self) -> None:
        """Drain the service (the exporter writes everything), then the tracker."""
        if self.stopped:
            return
        self.stopped = True
        await self.env.pool.closeCachedConnections()
        await self.env.service.stopService()
        await self.env.upstream.stop()
        if self.owns_tracker:
            self.tracker.stop(0)


def boot(tmp_path: Path) -> Proxy:
    env = start(tmp_path, extra=EXTRA)
    current = env.service.capture.sessions
    if isinstance(current, SessionTracker):
        return Proxy(env, current, owns_tracker=False)
    state = env.service.settings.sessions.state_file
    assert state is not None
    tracker = SessionTracker(env.service.bus.publish, state, 100_000, reactor)
    tracker.start()
    env.service.capture.sessions = tracker
    return Proxy(env, tracker, owns_tracker=True)


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[list[Proxy]]:
    started: list[Proxy] = []
    yield started
    for proxy in started:
        if not proxy.stopped:
            proxy.stopped = True
            stop(proxy.env)
            if proxy.owns_tracker:
                proxy.tracker.stop(0)


@pytest.fixture
def boot_proxy(tmp_path: Path, proxies: list[Proxy]) -> Any:
    def make() -> Proxy:
        proxy = boot(tmp_path)
        proxies.append(proxy)
        return proxy

    return make


# ---------------------------------------------------------------- clients


@attrs.define
class Chat:
    """An OpenAI chat client keeping its history, echoing replies as received."""

    proxy: Proxy
    messages: list[dict[str, Any]] = attrs.Factory(list)
    stream: bool = False
    headers: dict[str, str] = attrs.Factory(dict)
    request_ids: list[str] = attrs.Factory(list)

    async def say(self, text: str) -> str:
        self.messages.append({"role": "user", "content": text})
        body = {"model": "gpt-4o-mini", "messages": self.messages, "stream": self.stream}
        raw, rid = await post(self.proxy, "/mock/v1/chat/completions", body, self.headers)
        if self.stream:
            content = ""
            for line in raw.decode().splitlines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    for choice in chunk["choices"]:
                        content += choice["delta"].get("content") or ""
            message = {"role": "assistant", "content": content}
        else:
            message = json.loads(raw)["choices"][0]["message"]
        self.messages.append(message)
        self.request_ids.append(rid)
        return rid

    def fork(self, keep: int) -> Chat:
        """A client that rewrote history: the first ``keep`` messages only."""
        return Chat(self.proxy, [dict(m) for m in self.messages[:keep]], self.stream, self.headers)


@attrs.define
class Claude:
    """An Anthropic client through the transparent passthrough form, streaming."""

    proxy: Proxy
    messages: list[dict[str, Any]] = attrs.Factory(list)
    metadata: dict[str, str] | None = None
    request_ids: list[str] = attrs.Factory(list)

    async def say(self, text: str) -> str:
        self.messages.append({"role": "user", "content": [{"type": "text", "text": text}]})
        body: dict[str, Any] = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "messages": self.messages,
            "stream": True,
        }
        if self.metadata:
            body["metadata"] = self.metadata
        path = f"/anthropic/127.0.0.1:{self.proxy.port}/v1/messages"
        raw, rid = await post(self.proxy, path, body, {"x-api-key": "sk-ant-api03-" + KEY[8:]})
        text_out = ""
        for line in raw.decode().splitlines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "content_block_delta":
                    text_out += event["delta"]["text"]
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": text_out}]})
        self.request_ids.append(rid)
        return rid


async def post(
    proxy: Proxy, path: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[bytes, str]:
    response = await proxy.env.client.post(
        proxy.env.url(path),
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **headers},
    )
    raw: bytes = await response.content()
    assert response.code == 200, raw
    return raw, response.headers.getRawHeaders("x-llmproxy-request-id")[0]


# ---------------------------------------------------------------- reading the session log


def session_files(state_dir: Path) -> dict[str, list[dict[str, Any]]]:
    root = state_dir / "sessions"
    parts = []
    for path in root.rglob("*.jsonl"):
        entries = [json.loads(line) for line in path.read_text().splitlines()]
        parts.append((entries[0]["ts_ns"], path.stem, entries))
    files: dict[str, list[dict[str, Any]]] = {}
    # One session may span host directories (the fake upstream's port changes
    # across a restart): join its files in time order.
    for _, session, entries in sorted(parts, key=lambda part: part[0]):
        files.setdefault(session, []).extend(entries)
    return files


def file_of(files: dict[str, list[dict[str, Any]]], request_id: str) -> str:
    found = {
        session
        for session, entries in files.items()
        for e in entries
        if e.get("request_id") == request_id
    }
    assert len(found) == 1, found
    return found.pop()


def shape(entries: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(e["type"], e["seq"]) for e in entries]


def exchanges(*seqs: int) -> list[tuple[str, int]]:
    return [(kind, seq) for seq in seqs for kind in ("request", "response")]


# ---------------------------------------------------------------- tests


@pytest_twisted.ensureDeferred
async def test_a_five_turn_conversation_is_one_session_file(boot_proxy: Any) -> None:
    proxy = boot_proxy()
    chat = Chat(proxy)
    for question in ("Hi!", "What can you do?", "Tell me a fact.", "Another one?", "Thanks."):
        await chat.say(question)
    await proxy.shutdown()
    files = session_files(proxy.state_dir)
    assert len(files) == 1
    ((session, entries),) = files.items()
    assert shape(entries) == [("session_start", 1), *exchanges(1, 2, 3, 4, 5)]
    path = next((proxy.state_dir / "sessions").rglob(f"{session}.jsonl"))
    assert path.parent.parent.name == f"127.0.0.1_{proxy.port}"  # {upstream}/{date}/
    for entry in entries:
        meta = entry["_meta"]
        assert meta["session"] == entry["session_id"] == session
        assert meta["host"] == f"127.0.0.1:{proxy.port}"
        assert meta["ts"] == entry["ts"] and meta["machine"] == entry["machine"]
    assert [e["_meta"]["request_id"] for e in entries[1::2]] == chat.request_ids
    assert KEY not in path.read_text()


@pytest_twisted.ensureDeferred
async def test_a_long_conversation_spooled_to_a_temp_file_keeps_its_session(
    boot_proxy: Any,
) -> None:
    # Bodies over 100 kB sit in a temp file, past the 64 KiB capture cap.
    proxy = boot_proxy()
    chat = Chat(proxy)
    for n in range(3):
        await chat.say(f"Summarise part {n}: " + "lorem ipsum " * 12_000)
    await proxy.shutdown()
    files = session_files(proxy.state_dir)
    assert len(files) == 1
    ((_, entries),) = files.items()
    assert shape(entries) == [("session_start", 1), *exchanges(1, 2, 3)]


@pytest_twisted.ensureDeferred
async def test_streamed_replies_continue_the_session(boot_proxy: Any) -> None:
    proxy = boot_proxy()
    chat = Chat(proxy, stream=True)
    claude = Claude(proxy)
    for n in range(3):
        await chat.say(f"streamed question {n}")
        await claude.say(f"Claude, question {n}")
    await proxy.shutdown()
    files = session_files(proxy.state_dir)
    assert len(files) == 2
    for client in (chat, claude):
        entries = files[file_of(files, client.request_ids[0])]
        assert shape(entries) == [("session_start", 1), *exchanges(1, 2, 3)]
        assert entries[-1]["is_stream"] is True


@pytest_twisted.ensureDeferred
async def test_editing_an_earlier_message_forks_from_the_right_seq(boot_proxy: Any) -> None:
    proxy = boot_proxy()
    chat = Chat(proxy)
    for question in ("Plan a trip", "Make it shorter", "Add a museum", "Any food tips?"):
        await chat.say(question)
    # The user edits their third message ("Add a museum"): turns 1-2 are kept.
    edited = chat.fork(keep=4)
    await edited.say("Add a park instead")
    await edited.say("Great")
    await proxy.shutdown()
    files = session_files(proxy.state_dir)
    parent = file_of(files, chat.request_ids[0])
    branch = file_of(files, edited.request_ids[0])
    assert branch != parent
    assert shape(files[parent]) == [("session_start", 1), *exchanges(1, 2, 3, 4)]
    assert shape(files[branch]) == [("fork", 3), *exchanges(3, 4)]
    fork = files[branch][0]
    assert (fork["from_seq"], fork["parent_session"]) == (2, parent)
    assert fork["reason"] == "message_history_diverged"
    assert fork["_meta"]["request_id"] == edited.request_ids[0]


@pytest_twisted.ensureDeferred
async def test_regenerating_a_reply_forks(boot_proxy: Any) -> None:
    proxy = boot_proxy()
    claude = Claude(proxy)
    for question in ("Write a haiku", "About autumn", "Make it sadder"):
        await claude.say(question)
    # Regenerate the last reply: the same request as turn 3 once more.
    again = Claude(proxy, [dict(m) for m in claude.messages[:4]])
    await again.say("Make it sadder")
    await proxy.shutdown()
    files = session_files(proxy.state_dir)
    parent = file_of(files, claude.request_ids[0])
    branch = file_of(files, again.request_ids[0])
    assert shape(files[branch]) == [("fork", 3), *exchanges(3)]
    assert files[branch][0]["from_seq"] == 2 and files[branch][0]["parent_session"] == parent
    assert shape(files[parent]) == [("session_start", 1), *exchanges(1, 2, 3)]


@pytest_twisted.ensureDeferred
async def test_interleaved_conversations_are_kept_apart(boot_proxy: Any) -> None:
    proxy = boot_proxy()
    alice, bob, carol = Chat(proxy), Chat(proxy, stream=True), Claude(proxy)
    for n in range(4):
        await defer.gatherResults(
            [
                defer.ensureDeferred(alice.say(f"alice {n}")),
                defer.ensureDeferred(bob.say(f"bob {n}")),
                defer.ensureDeferred(carol.say(f"carol {n}")),
            ]
        )
    await proxy.shutdown()
    files = session_files(proxy.state_dir)
    assert len(files) == 3
    for client in (alice, bob, carol):
        session = file_of(files, client.request_ids[0])
        assert all(file_of(files, rid) == session for rid in client.request_ids)
        assert shape(files[session]) == [("session_start", 1), *exchanges(1, 2, 3, 4)]


@pytest_twisted.ensureDeferred
async def test_client_supplied_ids_name_the_session(boot_proxy: Any) -> None:
    proxy = boot_proxy()
    header = Chat(proxy, headers={"X-Session-ID": "support-ticket-4711"})
    claude_code = Claude(
        proxy,
        metadata={
            "user_id": "user_0a1b2c_account_3f1e2d4c-5b6a"
            "_session_9d8c7b6a-5f4e-3d2c-1b0a-123456789abc"
        },
    )
    for n in range(2):
        await header.say(f"question {n}")
        await claude_code.say(f"task {n}")
    # The client's id wins even when it rewrites history: no fork.
    rewritten = Claude(proxy, [dict(m) for m in claude_code.messages[:2]], claude_code.metadata)
    await rewritten.say("a different task 1")
    await proxy.shutdown()
    files = session_files(proxy.state_dir)
    # Each id is kept within its tenant (the client's credentials): tag-id.
    chosen = {files[name][0]["client_session_id"]: name for name in files}
    claude_id = "9d8c7b6a-5f4e-3d2c-1b0a-123456789abc"
    assert set(chosen) == {"support-ticket-4711", claude_id}
    ticket, claude_session = chosen["support-ticket-4711"], chosen[claude_id]
    assert ticket.endswith("-support-ticket-4711") and claude_session.endswith("-" + claude_id)
    assert shape(files[ticket]) == [("session_start", 1), *exchanges(1, 2)]
    assert shape(files[claude_session]) == [("session_start", 1), *exchanges(1, 2, 3)]
    assert files[ticket][0]["id_source"] == "x-session-id"
    assert files[claude_session][0]["id_source"] == "metadata.user_id"


@pytest_twisted.ensureDeferred
async def test_a_conversation_continues_after_a_restart(boot_proxy: Any) -> None:
    first = boot_proxy()
    chat = Chat(first)
    await chat.say("Remember the number 42.")
    await chat.say("What number?")
    await first.shutdown()
    state_dir = first.state_dir

    second = boot_proxy()
    assert second.state_dir == state_dir
    chat.proxy = second
    await chat.say("Double it.")
    again = chat.fork(keep=2)  # and an edit of the second message, after the restart
    again.proxy = second
    await again.say("What colour?")
    await second.shutdown()

    files = session_files(state_dir)
    session = file_of(files, chat.request_ids[0])
    assert file_of(files, chat.request_ids[2]) == session
    # Before and after the restart: the same session file name (the fake upstream's
    # port, hence the host directory, changed with the restart).
    assert shape(files[session]) == [("session_start", 1), *exchanges(1, 2, 3)]
    branch = file_of(files, again.request_ids[0])
    assert shape(files[branch]) == [("fork", 2), *exchanges(2)]
    assert files[branch][0]["parent_session"] == session
