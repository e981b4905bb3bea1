"""Each HTTP sink end to end: the real daemon (twistd subprocess) proxies OpenAI and
Anthropic exchanges, JSON and streamed, to the fake upstream, and delivers them to
a fake of the service on a real port; each test asserts what the service would
show: provider, model, usage and the inputs of its cost, and how it groups a
conversation, its next turn and a fork of it.

The fakes read what they store as the services do (tests/fakes/*.py docstrings):
Helicone's provider by route and its stream processors, Lunary's runs, the OTLP
Collector's id parsing, Loki's limits.

The OpenAI route takes proxy tokens (``auth = token``): every sink must say which
token (``token_id``, never the secret) and project made those exchanges, and
nothing of the kind for the Anthropic ones, made without a token."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool

from llmproxy.access.tokens import TokenFile
from llmproxy.export.sinks.helicone import helicone_request_id
from llmproxy.export.sinks.lunary import run_id
from tests.fakes import helicone as fake_helicone
from tests.fakes import lunary as fake_lunary
from tests.fakes.helicone import FakeHelicone, HeliconeUsage, listen_fake_helicone
from tests.fakes.loki import FakeLoki, listen_fake_loki
from tests.fakes.lunary import FakeLunary, listen_fake_lunary
from tests.fakes.otlp import FakeCollector, listen_fake_collector
from tests.fakes.upstream import CHAT_COMPLETION, FakeUpstream
from tests.integration.daemon import DaemonProtocol, kill, spawn, terminate
from tests.integration.harness import wait_until

pytestmark = pytest.mark.integration

OPENAI_REPLY = CHAT_COMPLETION["choices"][0]["message"]["content"]  # type: ignore[index]
EXCHANGES = 6  # see Conversation.run
OPENAI = ("turn1", "turn2", "fork", "openai-stream")  # made with the proxy token
ANTHROPIC = ("anthropic-json", "anthropic-stream")  # made without one
PROJECT = "team-billing"


def write_config(tmp_path: Path, upstream_port: int, exporter: str) -> Path:
    cfg = tmp_path / "llmproxy.ini"
    cfg.write_text(
        f"""
[server]
listen = tcp:0:interface=127.0.0.1
admin_listen = tcp:0:interface=127.0.0.1
state_dir = {tmp_path / "state"}
drain_timeout = 3
environment = e2e

[route:openai]
prefix = /openai
upstream = http://127.0.0.1:{upstream_port}
provider = openai
auth = token
api_key = sk-upstream-test-key

[route:anthropic]
prefix = /anthropic
upstream = http://127.0.0.1:{upstream_port}
provider = anthropic

{exporter}
flush_interval = 0.1
batch_size = 50
backoff_min = 0.05
backoff_max = 0.2
"""
    )
    return cfg


@attrs.define
class Conversation:
    """The six exchanges every test sends, and the request id of each."""

    port: int
    client: Any
    token: str
    ids: dict[str, str] = attrs.Factory(dict)

    async def post(self, name: str, path: str, body: dict[str, Any]) -> str:
        key = self.token if path.startswith("/openai/") else "sk-test-key"
        resp = await self.client.post(
            f"http://127.0.0.1:{self.port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        text = (await resp.content()).decode()
        assert resp.code == 200, text
        self.ids[name] = resp.headers.getRawHeaders(b"x-llmproxy-request-id")[0].decode()
        return text

    async def run(self) -> None:
        """An OpenAI conversation (turn 1, turn 2, a fork editing turn 2), an
        OpenAI stream, and an Anthropic message, JSON and streamed."""
        chat = "/openai/v1/chat/completions"
        first = {"role": "user", "content": "What is Twisted?"}
        reply = {"role": "assistant", "content": OPENAI_REPLY}
        # No "user": the session tracker would take it as the conversation's id.
        model = {"model": "gpt-4o-mini", "temperature": 0.3, "max_tokens": 50}
        await self.post("turn1", chat, {**model, "messages": [first]})
        second = {"role": "user", "content": "And treq?"}
        await self.post("turn2", chat, {**model, "messages": [first, reply, second]})
        edited = {"role": "user", "content": "And klein?"}
        await self.post("fork", chat, {**model, "messages": [first, reply, edited]})
        await self.post(
            "openai-stream",
            chat,
            {**model, "stream": True, "messages": [{"role": "user", "content": "Stream it"}]},
        )
        message = {"model": "claude-sonnet-4-5", "max_tokens": 64, "metadata": {"user_id": "bob"}}
        hello = [{"role": "user", "content": "Hello Claude"}]
        await self.post("anthropic-json", "/anthropic/v1/messages", {**message, "messages": hello})
        bye = [{"role": "user", "content": "Stream a goodbye"}]
        await self.post(
            "anthropic-stream",
            "/anthropic/v1/messages",
            {**message, "stream": True, "messages": bye},
        )


@attrs.define
class Env:
    tmp_path: Path
    upstream: FakeUpstream
    upstream_port: int
    pool: HTTPConnectionPool
    client: Any
    procs: list[tuple[DaemonProtocol, Any]] = attrs.Factory(list)
    stops: list[Callable[[], Any]] = attrs.Factory(list)
    token_id: str = ""

    async def conversation(self, exporter: str) -> Conversation:
        secret, token = TokenFile.in_state_dir(self.tmp_path / "state").create(PROJECT, time.time())
        self.token_id = token.id
        proc, transport = spawn(write_config(self.tmp_path, self.upstream_port, exporter))
        self.procs.append((proc, transport))
        proxy_port, _admin = await proc.ready.addTimeout(30, reactor)
        talk = Conversation(int(proxy_port), self.client, secret)
        await talk.run()
        return talk

    async def stop_daemon(self) -> DaemonProtocol:
        proc, transport = self.procs[-1]
        terminate(transport)
        await proc.ended.addTimeout(30, reactor)
        assert proc.clean_stop, proc.output.decode(errors="replace")
        return proc

    async def close(self) -> None:
        for proc, transport in self.procs:
            if not proc.ended.called:
                kill(transport)
                await proc.ended
        for stop in self.stops:
            await stop()
        await self.pool.closeCachedConnections()
        await self.upstream.stop()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    upstream = FakeUpstream(reactor)
    port = upstream.listen()
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))  # type: ignore[attr-defined]
    e = Env(tmp_path, upstream, port, pool, client)
    yield e
    pytest_twisted.blockon(defer.ensureDeferred(e.close()))


@pytest_twisted.ensureDeferred
async def test_helicone_files_each_exchange_under_its_provider_priced_and_grouped(
    env: Env,
) -> None:
    fake = FakeHelicone()
    running = listen_fake_helicone(fake)
    env.stops.append(running.stop)
    talk = await env.conversation(
        f"[exporter:helicone]\ntype = helicone\nendpoint = {running.url}\n"
        f"api_key = {fake_helicone.DEFAULT_KEY}"
    )
    await wait_until(lambda: len(fake.logs) >= EXCHANGES, what="six Helicone logs")
    await env.stop_daemon()

    logs = {name: fake.by_id[helicone_request_id(rid)] for name, rid in talk.ids.items()}
    routes = {name: log.path for name, log in logs.items()}
    assert routes == {
        "turn1": "/oai/v1/log",
        "turn2": "/oai/v1/log",
        "fork": "/oai/v1/log",
        "openai-stream": "/oai/v1/log",
        "anthropic-json": "/anthropic/v1/log",
        "anthropic-stream": "/anthropic/v1/log",
    }
    # What Helicone prices each request with: provider, model, the usage it read.
    assert {name: log.cost_inputs for name, log in logs.items()} == {
        "turn1": ("OPENAI", "gpt-4o-mini", HeliconeUsage(9, 9)),
        "turn2": ("OPENAI", "gpt-4o-mini", HeliconeUsage(9, 9)),
        "fork": ("OPENAI", "gpt-4o-mini", HeliconeUsage(9, 9)),
        "openai-stream": ("OPENAI", "gpt-4o-mini", HeliconeUsage(5, 3)),
        "anthropic-json": ("ANTHROPIC", "claude-sonnet-4-5", HeliconeUsage(12, 6)),
        "anthropic-stream": ("ANTHROPIC", "claude-sonnet-4-5", HeliconeUsage(12, 6)),
    }
    # The streams went as their text, which Helicone's stream processors read.
    assert logs["openai-stream"].is_stream and logs["openai-stream"].response_json == {}
    assert logs["anthropic-stream"].response_body.startswith("event: message_start\n")
    assert logs["openai-stream"].time_to_first_token is not None
    # One Helicone session for the conversation, the fork a branch of it.
    conversation, path, name = logs["turn1"].session
    assert conversation is not None and (path, name) == (f"/{conversation}", "openai")
    assert logs["turn2"].session == (conversation, f"/{conversation}", "openai")
    fork_id, fork_path, _ = logs["fork"].session
    own = logs["fork"].properties["session-id"]
    assert own != conversation
    assert (fork_id, fork_path) == (conversation, f"/{conversation}/{own}")
    assert logs["openai-stream"].session[0] not in (None, conversation)
    assert logs["anthropic-json"].user_id == "bob"
    # Who made each exchange, and the provider's own id of it.
    attribution = {
        name: (log.properties.get("token-id"), log.properties.get("project"))
        for name, log in logs.items()
    }
    assert attribution == {
        **{name: (env.token_id, PROJECT) for name in OPENAI},
        **{name: (None, None) for name in ANTHROPIC},
    }
    assert {log.properties["upstream-request-id"][:4] for log in logs.values()} == {"req_"}


@pytest_twisted.ensureDeferred
async def test_lunary_stores_each_exchange_as_a_run_with_its_model_and_tokens(env: Env) -> None:
    fake = FakeLunary()
    running = listen_fake_lunary(fake)
    env.stops.append(running.stop)
    talk = await env.conversation(
        f"[exporter:lunary]\ntype = lunary\nendpoint = {running.url}\n"
        f"api_key = {fake_lunary.DEFAULT_KEY}"
    )
    await wait_until(
        lambda: sum(r.status == "success" for r in fake.runs.values()) >= EXCHANGES,
        what="six successful Lunary runs",
    )
    await env.stop_daemon()

    runs = {name: fake.runs[run_id(rid)] for name, rid in talk.ids.items()}
    # Lunary prices a run from its name (the model) and its token usage.
    assert {n: (r.name, r.prompt_tokens, r.completion_tokens) for n, r in runs.items()} == {
        "turn1": ("gpt-4o-mini-2024-07-18", 9, 9),
        "turn2": ("gpt-4o-mini-2024-07-18", 9, 9),
        "fork": ("gpt-4o-mini-2024-07-18", 9, 9),
        "openai-stream": ("gpt-4o-mini", 5, 3),
        "anthropic-json": ("claude-sonnet-4-5", 12, 6),
        "anthropic-stream": ("claude-sonnet-4-5", 12, 6),
    }
    assert {r.metadata["provider"] for r in runs.values() if r.metadata} == {"openai", "anthropic"}
    assert runs["anthropic-stream"].output == {
        "role": "assistant",
        "content": "You said: Stream a goodbye",
    }
    assert runs["anthropic-json"].user_id == "bob"
    assert runs["turn1"].params == {"temperature": 0.3, "maxTokens": 50}  # Lunary camelCases
    sessions = {n: (r.metadata or {}).get("sessionId") for n, r in runs.items()}
    assert sessions["turn1"] == sessions["turn2"] != sessions["fork"]
    assert fake.waits == 0
    attribution = {
        # Lunary camelCases metadata keys, as it does sessionId.
        name: ((r.metadata or {}).get("tokenId"), (r.metadata or {}).get("project"))
        for name, r in runs.items()
    }
    assert attribution == {
        **{name: (env.token_id, PROJECT) for name in OPENAI},
        **{name: (None, None) for name in ANTHROPIC},
    }
    assert {r.metadata["upstreamRequestId"][:4] for r in runs.values() if r.metadata} == {"req_"}


@pytest_twisted.ensureDeferred
async def test_otlp_exports_each_exchange_as_a_genai_span(env: Env) -> None:
    fake = FakeCollector()
    running = listen_fake_collector(fake)
    env.stops.append(running.stop)
    talk = await env.conversation(f"[exporter:otlp]\ntype = otlp\nendpoint = {running.url}")
    await wait_until(lambda: len(fake.spans) >= EXCHANGES, what="six spans")
    await env.stop_daemon()

    spans = {s.attributes["llmproxy.request_id"]: s for s in fake.spans}
    by_name = {name: spans[rid] for name, rid in talk.ids.items()}
    facts = {
        name: (
            s.name,
            s.attributes["gen_ai.provider.name"],
            s.attributes["gen_ai.usage.input_tokens"],
            s.attributes["gen_ai.usage.output_tokens"],
        )
        for name, s in by_name.items()
    }
    assert facts == {
        "turn1": ("chat gpt-4o-mini", "openai", 9, 9),
        "turn2": ("chat gpt-4o-mini", "openai", 9, 9),
        "fork": ("chat gpt-4o-mini", "openai", 9, 9),
        "openai-stream": ("chat gpt-4o-mini", "openai", 5, 3),
        "anthropic-json": ("chat claude-sonnet-4-5", "anthropic", 12, 6),
        "anthropic-stream": ("chat claude-sonnet-4-5", "anthropic", 12, 6),
    }
    turn1 = by_name["turn1"].attributes
    assert turn1["gen_ai.response.id"] == "chatcmpl-abc123"
    assert (turn1["gen_ai.request.temperature"], turn1["gen_ai.request.max_tokens"]) == (0.3, 50)
    assert (turn1["server.address"], turn1["server.port"]) == ("127.0.0.1", env.upstream_port)
    assert by_name["anthropic-stream"].attributes["gen_ai.response.id"] == "msg_fake01"
    assert by_name["openai-stream"].attributes["gen_ai.response.time_to_first_chunk"] > 0
    assert "gen_ai.response.time_to_first_chunk" not in turn1
    conversations = {n: s.attributes["gen_ai.conversation.id"] for n, s in by_name.items()}
    assert conversations["turn1"] == conversations["turn2"] != conversations["fork"]
    assert len({s.trace_id for s in by_name.values()}) == EXCHANGES
    attribution = {
        name: (s.attributes.get("llmproxy.token_id"), s.attributes.get("llmproxy.project"))
        for name, s in by_name.items()
    }
    assert attribution == {
        **{name: (env.token_id, PROJECT) for name in OPENAI},
        **{name: (None, None) for name in ANTHROPIC},
    }
    ids = {s.attributes["llmproxy.upstream_request_id"][:4] for s in by_name.values()}
    assert ids == {"req_"}


@pytest_twisted.ensureDeferred
async def test_loki_keeps_each_event_labelled_by_provider(env: Env) -> None:
    fake = FakeLoki()
    running = listen_fake_loki(fake)
    env.stops.append(running.stop)
    talk = await env.conversation(
        f"[exporter:loki]\ntype = loki\nurl = {running.url}\ntenant = team-a\n"
        "structured_metadata = true"
    )
    await wait_until(
        lambda: len(fake.entries({"log_type": "response"}, tenant="team-a")) >= EXCHANGES,
        what="six response entries",
    )
    await env.stop_daemon()

    responses = {
        e.metadata["request_id"]: (e.labels["provider"], e.json())
        for e in fake.entries({"log_type": "response"}, tenant="team-a")
    }
    by_name = {name: responses[rid] for name, rid in talk.ids.items()}
    assert {
        n: (p, line["model"], line["usage"]["input_tokens"]) for n, (p, line) in by_name.items()
    } == {
        "turn1": ("openai", "gpt-4o-mini-2024-07-18", 9),
        "turn2": ("openai", "gpt-4o-mini-2024-07-18", 9),
        "fork": ("openai", "gpt-4o-mini-2024-07-18", 9),
        "openai-stream": ("openai", "gpt-4o-mini", 5),
        "anthropic-json": ("anthropic", "claude-sonnet-4-5", 12),
        "anthropic-stream": ("anthropic", "claude-sonnet-4-5", 12),
    }
    sessions = {n: line["session_id"] for n, (_, line) in by_name.items()}
    assert sessions["turn1"] == sessions["turn2"] != sessions["fork"]
    forks = [e.json() for e in fake.entries({"log_type": "fork"}, tenant="team-a")]
    assert [(f["session_id"], f["parent_session"]) for f in forks] == [
        (sessions["fork"], sessions["turn1"])
    ]
    # In the line and, for LogQL without parsing it, in the structured metadata.
    metadata = {
        e.metadata["request_id"]: (e.metadata.get("token_id"), e.metadata.get("project"))
        for e in fake.entries({"log_type": "response"}, tenant="team-a")
    }
    expected = {
        **{name: (env.token_id, PROJECT) for name in OPENAI},
        **{name: (None, None) for name in ANTHROPIC},
    }
    assert {name: metadata[rid] for name, rid in talk.ids.items()} == expected
    in_lines = {n: (line["token_id"], line["project"]) for n, (_, line) in by_name.items()}
    assert in_lines == expected


@pytest_twisted.ensureDeferred
async def test_the_file_and_sessions_sinks_carry_who_made_each_exchange(env: Env) -> None:
    events = env.tmp_path / "events.jsonl"
    logs = env.tmp_path / "sessions"
    talk = await env.conversation(
        f"[exporter:file]\ntype = file\npath = {events}\n\n"
        f"[exporter:sessions]\ntype = sessions\nlog_dir = {logs}"
    )
    await env.stop_daemon()

    lines = [json.loads(line) for line in events.read_text().splitlines()]
    expected = {
        **{name: (env.token_id, PROJECT) for name in OPENAI},
        **{name: (None, None) for name in ANTHROPIC},
    }
    for kind in ("request", "response"):
        by_id = {e["request_id"]: e for e in lines if e["type"] == kind}
        found = {n: (by_id[r]["token_id"], by_id[r]["project"]) for n, r in talk.ids.items()}
        assert found == expected, kind
    entries = [
        json.loads(line)
        for path in sorted(logs.rglob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    responses = {e["request_id"]: e for e in entries if e["type"] == "response"}
    found = {n: (responses[r]["token_id"], responses[r]["project"]) for n, r in talk.ids.items()}
    assert found == expected
