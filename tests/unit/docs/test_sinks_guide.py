"""Every ``ini`` example in docs/sinks.md loads, builds its exporter, and delivers
to a fake of the service it names (the file and session examples to disk)."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock

from llmproxy.config.loader import load_settings
from llmproxy.config.model import EXPORTER_TYPES, ExporterSettings, Settings
from llmproxy.export.registry import build_exporter, build_sink
from llmproxy.export.sinks.lunary import run_id
from llmproxy.export.verdict import Delivered
from tests.fakes import helicone as fake_helicone
from tests.fakes import lunary as fake_lunary
from tests.fakes.loki import FakeLoki
from tests.fakes.otlp import FakeCollector
from tests.unit.export.sinks.test_lunary import at_now, openai_json

GUIDE = Path(__file__).resolve().parents[3] / "docs" / "sinks.md"
BLOCKS = re.findall(r"```ini\n(.*?)```", GUIDE.read_text("utf-8"), re.S)
# Values for the env:NAME secrets the examples reference: what the fakes accept.
SECRETS = {
    "LUNARY_PUBLIC_KEY": fake_lunary.DEFAULT_KEY,
    "HELICONE_API_KEY": fake_helicone.DEFAULT_KEY,
}


def _env(block: str, state_dir: Path) -> dict[str, str]:
    env = {"LLMPROXY_SERVER_STATE_DIR": str(state_dir)}
    for name in re.findall(r"=\s*env:([A-Za-z_][A-Za-z0-9_]*)", block):
        env[name] = SECRETS.get(name, f"secret-{name.lower()}")
    return env


def _load(block: str, tmp_path: Path) -> Settings:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "llmproxy.ini"
    path.write_text(block, "utf-8")
    return load_settings(path, env=_env(block, tmp_path / "state"))


def _name(block: str) -> str:
    return ",".join(re.findall(r"^\[exporter:([^\]]+)\]", block, re.M))


class _NoClient:
    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        raise AssertionError("building an exporter must not send anything")


def test_the_guide_has_an_example_for_every_sink_type(tmp_path: Path) -> None:
    types = set()
    for i, block in enumerate(BLOCKS):
        types |= {e.type for e in _load(block, tmp_path / str(i)).exporters}
    assert types == set(EXPORTER_TYPES)


@pytest.mark.parametrize("block", BLOCKS, ids=_name)
def test_each_example_loads_and_builds_its_exporters(block: str, tmp_path: Path) -> None:
    settings = _load(block, tmp_path)
    assert settings.exporters, "an example without an [exporter:NAME] section"
    state = settings.server.state_dir
    assert state == tmp_path / "state"
    for e in settings.exporters:
        for p in (e.spool_dir, e.dead_letter_path, e.path, e.log_dir):
            assert p is None or p.is_relative_to(state), f"{e.name}: {p} is outside state_dir"
        exporter = build_exporter(e, clock=Clock(), http_client=_NoClient(), state_dir=state)
        assert exporter.name == e.name
        assert exporter.stats()["accepted"] == 0


# -- delivered to the fakes -----------------------------------------------------------


def _examples(kind: str, tmp_path: Path) -> list[tuple[ExporterSettings, Settings]]:
    out = []
    for i, block in enumerate(BLOCKS):
        settings = _load(block, tmp_path / f"ex{i}")
        out += [(e, settings) for e in settings.exporters if e.type == kind]
    assert out, f"no {kind} example"
    return out


def _events() -> list[dict[str, Any]]:
    """A request event and the response event of one exchange, as the proxy makes them."""
    response = openai_json("req-guide-1")
    request = {**response, "type": "request"}
    return [request, response]


async def _deliver(settings: ExporterSettings, state: Path, client: Any, clock: Clock) -> None:
    sink = build_sink(settings, clock=clock, http_client=client, state_dir=state)
    verdict = await sink.deliver(_events())
    assert isinstance(verdict, Delivered), verdict
    assert not verdict.rejected, verdict
    await sink.close()


@pytest_twisted.ensureDeferred
async def test_the_file_example_writes_jsonl(tmp_path: Path) -> None:
    for e, settings in _examples("file", tmp_path):
        await _deliver(e, settings.server.state_dir, _NoClient(), at_now())
        assert e.path is not None
        lines = [orjson.loads(line) for line in e.path.read_bytes().splitlines()]
        assert [line["type"] for line in lines] == ["request", "response"]


@pytest_twisted.ensureDeferred
async def test_the_sessions_example_writes_a_session_file(tmp_path: Path) -> None:
    for e, settings in _examples("sessions", tmp_path):
        await _deliver(e, settings.server.state_dir, _NoClient(), at_now())
        assert e.log_dir is not None
        files = list(e.log_dir.glob("api.openai.com/*/sess-1.jsonl"))
        assert len(files) == 1
        assert len(files[0].read_bytes().splitlines()) == 2


@pytest_twisted.ensureDeferred
async def test_the_loki_example_pushes_with_its_tenant_auth_and_labels(tmp_path: Path) -> None:
    for e, settings in _examples("loki", tmp_path):
        basic = base64.b64encode(f"{e.username}:{e.password}".encode()).decode()
        clock = at_now()
        fake = FakeLoki(clock=clock, expected_authorization=f"Basic {basic}")
        await _deliver(e, settings.server.state_dir, StubTreq(fake), clock)
        entries = fake.entries({"app": "llmproxy"}, tenant=e.tenant)
        assert {entry.labels["log_type"] for entry in entries} == {"request", "response"}
        for name, value in e.labels:
            assert all(entry.labels[name] == value for entry in entries)
        if e.structured_metadata:
            assert all(entry.metadata["request_id"] == "req-guide-1" for entry in entries)


@pytest_twisted.ensureDeferred
async def test_the_lunary_example_ingests_a_run(tmp_path: Path) -> None:
    for e, settings in _examples("lunary", tmp_path):
        clock = at_now()
        fake = fake_lunary.FakeLunary(clock=clock, public_key=e.api_key)
        await _deliver(e, settings.server.state_dir, StubTreq(fake), clock)
        assert list(fake.runs) == [run_id("req-guide-1")]
        assert fake.runs[run_id("req-guide-1")].status == "success"


@pytest_twisted.ensureDeferred
async def test_the_helicone_example_logs_the_exchange(tmp_path: Path) -> None:
    for e, settings in _examples("helicone", tmp_path):
        clock = at_now()
        path = re.sub(r"^https?://[^/]+", "", e.endpoint)
        prefix = re.sub(r"/(custom|oai|anthropic)/v1/log/?$", "", path).encode()
        fake = fake_helicone.FakeHelicone(clock=clock, api_key=e.api_key, prefix=prefix)
        await _deliver(e, settings.server.state_dir, StubTreq(fake), clock)
        assert len(fake.logs) == 1
        assert fake.logs[0].provider == "OPENAI"
        assert fake.logs[0].cost_inputs is not None


@pytest_twisted.ensureDeferred
async def test_the_otlp_examples_export_spans_and_log_records(tmp_path: Path) -> None:
    kinds = set()
    for e, settings in _examples("otlp", tmp_path):
        clock = at_now()
        fake = FakeCollector(clock=clock)
        await _deliver(e, settings.server.state_dir, StubTreq(fake), clock)
        if e.endpoint.endswith("/v1/logs"):
            assert len(fake.log_records) == 2 and not fake.spans
            kinds.add("logs")
        else:
            assert len(fake.spans) == 1 and not fake.log_records
            kinds.add("traces")
    assert kinds == {"logs", "traces"}
