"""The session log sink: the Go llm-proxy's files and entries, descriptor caching,
all-or-nothing batches, and following its paths (moved, deleted, SIGHUP)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from llmproxy.capture.events import RecordEnvelope
from llmproxy.capture.record import ExchangeRecord
from llmproxy.capture.sessions import SessionTracker
from llmproxy.config.loader import load_settings
from llmproxy.config.model import CaptureSettings, ExporterSettings
from llmproxy.events.envelope import Envelope
from llmproxy.export import registry
from llmproxy.export.sink import Sink
from llmproxy.export.sinks import sessions as sink_module
from llmproxy.export.sinks.sessions import MAX_STEM, SessionsSink, safe_name
from llmproxy.export.verdict import Delivered, Retry, Verdict

NOW = 1_795_419_612.0  # 2026-11-23T07:40:12Z
DAY = "2026-11-23"


def event(
    kind: str = "request",
    session: str | None = "sess-1",
    seq: int | None = 1,
    host: str = "api.anthropic.com",
    ts: str = f"{DAY}T07:40:12.000000000Z",
    **extra: Any,
) -> dict[str, Any]:
    e: dict[str, Any] = {
        "schema": 1,
        "type": kind,
        "ts": ts,
        "ts_ns": 1_795_419_612_000_000_000,
        "request_id": f"req-{seq}",
        "session_id": session,
        "seq": seq,
        "route": "anthropic",
        "provider": "anthropic",
        "upstream_host": host,
        "environment": "prod",
        "machine": "alice@box",
    }
    e.update(extra)
    return e


def verdict_of(d: Deferred[Verdict]) -> Verdict:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "no verdict yet"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    result: Verdict = out[0]
    return result


def make_sink(tmp_path: Path, clock: Clock | None = None, **kw: Any) -> SessionsSink:
    if clock is None:
        clock = Clock()
        clock.advance(NOW)
    return SessionsSink(name="sessions", log_dir=tmp_path / "sessions", clock=clock, **kw)


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_it_is_a_sink(tmp_path: Path) -> None:
    assert isinstance(make_sink(tmp_path), Sink)


def test_entries_go_to_one_file_per_host_day_and_session(tmp_path: Path) -> None:
    sink = make_sink(tmp_path)
    batch = [
        event("session_start", seq=1, id_source="fingerprint"),
        event("request", seq=1, method="POST", path="/v1/messages"),
        event("request", session="sess-2", seq=1, host="api.openai.com"),
        event("response", seq=1, status=200, start=f"{DAY}T07:40:12.000000000Z"),
    ]
    assert verdict_of(sink.deliver(batch)) == Delivered()
    one = tmp_path / "sessions" / "api.anthropic.com" / DAY / "sess-1.jsonl"
    two = tmp_path / "sessions" / "api.openai.com" / DAY / "sess-2.jsonl"
    assert sorted((tmp_path / "sessions").rglob("*.jsonl")) == [one, two]
    entries = lines(one)
    assert [e["type"] for e in entries] == ["session_start", "request", "response"]
    assert entries[1]["path"] == "/v1/messages"
    assert entries[0]["_meta"] == {
        "ts": f"{DAY}T07:40:12.000000000Z",
        "machine": "alice@box",
        "host": "api.anthropic.com",
        "session": "sess-1",
        "request_id": "req-1",
    }
    # The entry is the event plus _meta: nothing dropped.
    assert {k: v for k, v in entries[1].items() if k != "_meta"} == batch[1]
    sink.close()


def test_events_without_a_session_are_skipped(tmp_path: Path) -> None:
    sink = make_sink(tmp_path)
    batch = [event(session=None, seq=None), event(session="", seq=None)]
    assert verdict_of(sink.deliver(batch)) == Delivered()
    assert not (tmp_path / "sessions").exists()


def test_a_response_after_midnight_stays_with_its_request(tmp_path: Path) -> None:
    sink = make_sink(tmp_path)
    start = f"{DAY}T23:59:59.500000000Z"
    batch = [
        event("request", ts=start, start=start),
        event("response", ts="2026-11-24T00:00:03.000000000Z", start=start),
    ]
    verdict_of(sink.deliver(batch))
    path = tmp_path / "sessions" / "api.anthropic.com" / DAY / "sess-1.jsonl"
    assert [e["type"] for e in lines(path)] == ["request", "response"]
    sink.close()


def test_one_write_per_file_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[int] = []
    real = sink_module._write_all

    def counting(fd: int, data: bytes) -> None:
        writes.append(data.count(b"\n"))
        real(fd, data)

    monkeypatch.setattr(sink_module, "_write_all", counting)
    sink = make_sink(tmp_path)
    batch = [event(seq=n, session=f"sess-{n % 3}") for n in range(30)]
    verdict_of(sink.deliver(batch))
    assert sorted(writes) == [10, 10, 10]
    sink.close()


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.openai.com", "api.openai.com"),
        ("127.0.0.1:8080", "127.0.0.1_8080"),
        ("..", "unknown-host"),
        ("", "unknown-host"),
        ("evil/../../etc", "evil_.._.._etc"),
    ],
)
def test_host_directories_are_sanitised(host: str, expected: str) -> None:
    assert safe_name(host, "unknown-host") == expected


def test_file_names_stay_inside_the_log_dir_and_under_name_max(tmp_path: Path) -> None:
    sink = make_sink(tmp_path)
    root = tmp_path / "sessions"
    for session in ("../../escape", "x" * 255, "a/b\\c\x00d"):
        path = sink.path_for(event(session=session))
        assert path is not None
        assert path.resolve().is_relative_to(root.resolve())
        assert len(path.name.encode()) <= 255
        assert path.name.endswith(".jsonl") and "/" not in path.name
    long_a = sink.path_for(event(session="y" * 250 + "a"))
    long_b = sink.path_for(event(session="y" * 250 + "b"))
    assert long_a != long_b  # shortened names keep a hash of the whole id
    assert long_a is not None and len(long_a.stem) == MAX_STEM


def test_idle_files_are_closed_on_the_clock_and_reopened_to_append(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(NOW)
    sink = make_sink(tmp_path, clock, idle_close=60.0)
    verdict_of(sink.deliver([event(session="a"), event(session="b")]))
    assert sink.open_files == 2
    clock.advance(30)
    verdict_of(sink.deliver([event(session="a", seq=2)]))
    clock.advance(31)  # b idle for 61 s, a for 31 s
    assert sink.open_files == 1
    clock.advance(30)
    assert sink.open_files == 0
    assert clock.getDelayedCalls() == []
    verdict_of(sink.deliver([event(session="a", seq=3)]))
    path = tmp_path / "sessions" / "api.anthropic.com" / DAY / "a.jsonl"
    assert [e["seq"] for e in lines(path)] == [1, 2, 3]
    sink.close()
    assert sink.open_files == 0 and clock.getDelayedCalls() == []


def test_open_files_are_bounded(tmp_path: Path) -> None:
    sink = make_sink(tmp_path, max_open=3)
    batch = [event(session=f"s{n}", seq=1) for n in range(10)]
    assert verdict_of(sink.deliver(batch)) == Delivered()
    assert sink.open_files == 3
    assert len(list((tmp_path / "sessions").rglob("*.jsonl"))) == 10
    sink.close()


def test_a_failed_write_rolls_back_the_batch_and_the_retry_writes_each_line_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sink_module._write_all
    calls = {"n": 0}

    def disk_full_on_second_file(fd: int, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            real(fd, data[:7])  # a partial line reached the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    sink = make_sink(tmp_path)
    verdict_of(sink.deliver([event(session="a", seq=1), event(session="b", seq=1)]))
    monkeypatch.setattr(sink_module, "_write_all", disk_full_on_second_file)
    batch = [event(session="a", seq=2), event(session="b", seq=2)]
    verdict = verdict_of(sink.deliver(batch))
    assert isinstance(verdict, Retry)
    assert "No space left on device" in verdict.reason
    verdict = verdict_of(sink.deliver(batch))
    assert verdict == Delivered()
    day = tmp_path / "sessions" / "api.anthropic.com" / DAY
    assert [e["seq"] for e in lines(day / "a.jsonl")] == [1, 2]
    assert [e["seq"] for e in lines(day / "b.jsonl")] == [1, 2]
    sink.close()


def test_an_unserialisable_event_is_rejected_alone(tmp_path: Path) -> None:
    sink = make_sink(tmp_path)
    verdict = verdict_of(sink.deliver([event(seq=1), event(seq=2, odd={1, 2}), event(seq=3)]))
    assert isinstance(verdict, Delivered) and list(verdict.rejected) == [1]
    path = tmp_path / "sessions" / "api.anthropic.com" / DAY / "sess-1.jsonl"
    assert [e["seq"] for e in lines(path)] == [1, 3]
    sink.close()


@pytest.mark.parametrize(("policy", "syncs"), [("never", 0), ("batch", 2), ("always", 2)])
def test_fsync_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str, syncs: int
) -> None:
    synced: list[int] = []
    monkeypatch.setattr(sink_module.os, "fsync", synced.append)
    sink = make_sink(tmp_path, fsync=policy)
    verdict_of(sink.deliver([event(session="a"), event(session="a"), event(session="b")]))
    assert len(synced) == syncs
    sink.close()


def session_path(sink: SessionsSink, session: str) -> Path:
    path = sink.path_for(event(session=session))
    assert path is not None
    return path


def test_a_removed_log_dir_is_made_again_and_its_files_reopened(tmp_path: Path) -> None:
    sink = make_sink(tmp_path)
    verdict_of(sink.deliver([event(session="a"), event(session="b")]))
    assert sink.open_files == 2
    shutil.rmtree(sink.log_dir)  # the descriptors still point at deleted files
    assert verdict_of(sink.deliver([event(session="a", seq=2), event(session="b", seq=2)])) == (
        Delivered()
    )
    assert [e["seq"] for e in lines(session_path(sink, "a"))] == [2]
    assert [e["seq"] for e in lines(session_path(sink, "b"))] == [2]
    assert sink.reopens == {"unlinked": 2}
    sink.close()


def test_a_session_file_moved_aside_is_reopened_at_its_path(tmp_path: Path) -> None:
    sink = make_sink(tmp_path)
    verdict_of(sink.deliver([event(seq=1)]))
    path = session_path(sink, "sess-1")
    path.rename(path.with_name("moved.jsonl"))
    verdict_of(sink.deliver([event(seq=2)]))
    assert [e["seq"] for e in lines(path.with_name("moved.jsonl"))] == [1]
    assert [e["seq"] for e in lines(path)] == [2]
    assert sink.reopens == {"moved": 1}
    sink.close()


def test_reopen_closes_every_file_for_the_next_batch_to_open_its_path(tmp_path: Path) -> None:
    sink = make_sink(tmp_path)
    verdict_of(sink.deliver([event(session="a"), event(session="b")]))
    path = session_path(sink, "a")
    path.rename(path.with_name("rotated.jsonl"))
    sink.reopen()
    assert sink.open_files == 0 and sink.reopens == {"SIGHUP": 2}
    verdict_of(sink.deliver([event(session="a", seq=2)]))
    assert [e["seq"] for e in lines(path.with_name("rotated.jsonl"))] == [1]
    assert [e["seq"] for e in lines(path)] == [2]
    sink.close()


def test_the_registry_builds_it_with_log_dir_under_state_dir(tmp_path: Path) -> None:
    clock = Clock()
    default = registry.build_sink(
        ExporterSettings(name="s", type="sessions"),
        clock=clock,
        http_client=None,  # type: ignore[arg-type]
        state_dir=tmp_path,
    )
    assert isinstance(default, SessionsSink) and default.log_dir == tmp_path / "sessions"
    configured = registry.build_sink(
        ExporterSettings(name="s", type="sessions", log_dir=Path("logs/conv")),
        clock=clock,
        http_client=None,  # type: ignore[arg-type]
        state_dir=tmp_path,
    )
    assert isinstance(configured, SessionsSink)
    assert configured.log_dir == tmp_path / "logs" / "conv"
    settings = load_settings(
        text=f"[server]\nstate_dir = {tmp_path}\n[exporter:conv]\ntype = sessions\n"
        "log_dir = /var/log/llm-sessions\n",
        env={},
    )
    assert settings.exporters[0].log_dir == Path("/var/log/llm-sessions")
    assert not (tmp_path / "sessions").exists()  # building a sink does no I/O


def test_a_tracked_conversation_becomes_session_files_in_the_go_layout(tmp_path: Path) -> None:
    """Tracker -> events -> sink: the parent's file and the fork's file."""
    clock = Clock()
    clock.advance(NOW)
    published: list[Envelope] = []
    tracker = SessionTracker(published.append, None, 100, clock)
    tracker.start()
    capture = CaptureSettings()
    messages: list[dict[str, Any]] = []
    records = []

    def turn(history: list[dict[str, Any]], text: str, answer: str) -> ExchangeRecord:
        history.append({"role": "user", "content": text})
        body = orjson.dumps({"model": "claude-sonnet-4-5", "messages": history})
        n = len(records) + 1
        record = ExchangeRecord(
            request_id=f"req-{n}",
            started_at=NOW + n,
            method="POST",
            path="/anthropic/api.anthropic.com/v1/messages",
            query="",
            route="passthrough",
            provider="anthropic",
            upstream_url="https://api.anthropic.com/v1/messages",
            upstream_host="api.anthropic.com",
            client_addr="10.0.0.7:5000",
            request_headers=[(b"x-api-key", b"sk-ant-api03-secretsecretsecret")],
            request_body=body,
            request_body_size=len(body),
            environment="prod",
            machine="alice@box",
        )
        tracker.assign(record, body)
        published.append(RecordEnvelope("request", record, capture))
        reply = {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": answer}],
            "stop_reason": "end_turn",
        }
        record.status = 200
        record.response_headers = [(b"content-type", b"application/json")]
        record.response_chunks = [(0.5, orjson.dumps(reply))]
        record.ended_at = 0.6
        tracker.finished(record)
        published.append(RecordEnvelope("response", record, capture))
        history.append({"role": "assistant", "content": answer})
        records.append(record)
        return record

    turn(messages, "Hi", "Hello!")
    turn(messages, "What's 2+2?", "4.")
    turn(messages, "And 3+3?", "6.")
    fork = turn(messages[:2], "What's 2+3?", "5.")
    tracker.stop(0)

    sink = make_sink(tmp_path, clock)
    assert verdict_of(sink.deliver([e.payload() for e in published])) == Delivered()
    day = tmp_path / "sessions" / "api.anthropic.com" / DAY
    parent = lines(day / f"{records[0].session_id}.jsonl")
    assert [(e["type"], e["seq"]) for e in parent] == [
        ("session_start", 1),
        ("request", 1),
        ("response", 1),
        ("request", 2),
        ("response", 2),
        ("request", 3),
        ("response", 3),
    ]
    branch = lines(day / f"{fork.session_id}.jsonl")
    assert [(e["type"], e["seq"]) for e in branch] == [("fork", 2), ("request", 2), ("response", 2)]
    assert branch[0]["from_seq"] == 1 and branch[0]["parent_session"] == records[0].session_id
    assert all(e["_meta"]["session"] == fork.session_id for e in branch)
    assert all(e["_meta"]["request_id"] == fork.request_id for e in branch)
    text = b"".join(p.read_bytes() for p in day.iterdir())
    assert b"secretsecretsecret" not in text
    sink.close()
    assert os.listdir(day) and len(os.listdir(day)) == 2
