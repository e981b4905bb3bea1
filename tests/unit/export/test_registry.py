"""From exporter settings to a sink and an exporter: dispatch and default paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from llmproxy.config.model import ExporterSettings
from llmproxy.events.envelope import StoredEvent
from llmproxy.export.registry import SINK_FACTORIES, build_exporter, build_sink
from llmproxy.export.sinks.file import FileSink
from llmproxy.export.spool import Spool


def build(tmp_path: Path, **settings: Any) -> Any:
    config = ExporterSettings(**{"name": "main", "type": "file", **settings})
    return build_exporter(config, clock=Clock(), http_client=None, state_dir=tmp_path)  # type: ignore[arg-type]


def test_file_type_builds_a_file_sink_writing_to_state_dir_events_jsonl(tmp_path: Path) -> None:
    sink = build_sink(
        ExporterSettings(name="main", type="file"),
        clock=Clock(),
        http_client=None,  # type: ignore[arg-type]
        state_dir=tmp_path,
    )
    assert isinstance(sink, FileSink)
    assert (sink.name, sink.path) == ("main", tmp_path / "events.jsonl")


def test_relative_file_path_is_under_state_dir_and_absolute_is_kept(tmp_path: Path) -> None:
    def path_for(path: Path) -> Path:
        sink = build_sink(
            ExporterSettings(name="main", type="file", path=path),
            clock=Clock(),
            http_client=None,  # type: ignore[arg-type]
            state_dir=tmp_path,
        )
        assert isinstance(sink, FileSink)
        return sink.path

    assert path_for(Path("logs/x.jsonl")) == tmp_path / "logs" / "x.jsonl"
    assert path_for(Path("/var/log/x.jsonl")) == Path("/var/log/x.jsonl")


def test_unknown_type_is_a_value_error_naming_the_exporter_and_known_types(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match=r"exporter:main: unknown type 'kafka' \(known: .*file"):
        build_sink(
            ExporterSettings(name="main", type="kafka"),
            clock=Clock(),
            http_client=None,  # type: ignore[arg-type]
            state_dir=tmp_path,
        )


def test_bad_fsync_policy_is_a_value_error_naming_the_exporter(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exporter:main: fsync must be one of"):
        build(tmp_path, fsync="sometimes")


def test_file_is_a_registered_sink_type() -> None:
    assert "file" in SINK_FACTORIES


def test_exporter_spools_and_dead_letters_under_state_dir_by_default(tmp_path: Path) -> None:
    exporter = build(tmp_path, spool_max_bytes=1000)
    exporter.stop(1.0)
    exporter.publish(StoredEvent({"type": "request", "i": 1}))  # after close: spooled
    assert [s.count for s in Spool(tmp_path / "spool" / "main", 10**6).segments()] == [1]
    assert exporter.dead_letter.path == tmp_path / "deadletter" / "main.jsonl"


def test_configured_spool_and_dead_letter_paths_are_used(tmp_path: Path) -> None:
    exporter = build(tmp_path, spool_dir=Path("q"), dead_letter_path=Path("/x/dl.jsonl"))
    exporter.stop(1.0)
    exporter.publish(StoredEvent({"type": "request", "i": 1}))
    assert (tmp_path / "q").is_dir()
    assert exporter.dead_letter.path == Path("/x/dl.jsonl")


def test_spool_max_bytes_zero_disables_the_spool(tmp_path: Path) -> None:
    exporter = build(tmp_path, spool_max_bytes=0)
    exporter.stop(1.0)
    exporter.publish(StoredEvent({"type": "request", "i": 1}))
    assert exporter.stats()["dropped_by_reason"] == {"closed": 1}
    assert not (tmp_path / "spool").exists()
