"""The audit log: one JSON line a decision, and a file that follows its path
(moved aside, deleted, its directory removed)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from llmproxy.access.audit import AuditLog


def actions(path: Path) -> list[str]:
    return [orjson.loads(line)["action"] for line in path.read_bytes().splitlines()]


@pytest.fixture
def info_lines() -> Iterator[list[str]]:
    seen: list[str] = []

    def observer(e: dict[str, Any]) -> None:
        if e.get("log_level") == LogLevel.info:
            seen.append(formatEvent(e))

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def test_each_decision_is_one_json_line(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit" / "audit.jsonl")
    audit.write("token_refused", outcome="denied")
    audit.write("config_reload", outcome="applied")
    audit.close()
    assert actions(tmp_path / "audit" / "audit.jsonl") == ["token_refused", "config_reload"]
    assert (audit.lines, audit.errors) == (2, 0)


def test_without_a_path_nothing_is_written(tmp_path: Path) -> None:
    audit = AuditLog(None)
    audit.write("x")
    assert (audit.lines, list(tmp_path.iterdir())) == (0, [])


def test_a_log_moved_aside_goes_on_in_a_new_file_at_its_path(
    tmp_path: Path, info_lines: list[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.write("first")
    path.rename(tmp_path / "audit.jsonl.1")  # logrotate, no copytruncate, no SIGHUP
    audit.write("second")
    audit.write("third")
    audit.close()
    assert actions(tmp_path / "audit.jsonl.1") == ["first"]
    assert actions(path) == ["second", "third"]
    assert audit.reopens == {"moved": 1}
    assert [x for x in info_lines if "reopening" in x] == [f"audit log {path}: reopening (moved)"]


def test_a_deleted_log_is_created_again(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.write("first")
    path.unlink()
    audit.write("second")
    audit.close()
    assert actions(path) == ["second"]
    assert audit.reopens == {"unlinked": 1}


def test_a_removed_directory_is_made_again(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit.jsonl"
    audit = AuditLog(path)
    audit.write("first")
    shutil.rmtree(tmp_path / "state")
    audit.write("second")
    audit.close()
    assert actions(path) == ["second"]
    assert (audit.lines, audit.errors) == (2, 0)


def test_a_failed_write_is_counted_and_the_next_line_opens_the_path_afresh(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the directory should be")
    audit = AuditLog(blocker / "audit.jsonl")
    audit.write("lost")
    assert (audit.lines, audit.errors) == (0, 1)
    blocker.unlink()
    audit.write("kept")
    audit.close()
    assert actions(blocker / "audit.jsonl") == ["kept"]
    assert (audit.lines, audit.errors) == (1, 1)
