"""The configuration reference names every key the loader accepts."""

from __future__ import annotations

from pathlib import Path

import attrs

from llmproxy import settings as s

DOC = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()


def test_every_settings_key_is_documented() -> None:
    missing = []
    for cls in (
        s.ServerSettings,
        s.RouteSettings,
        s.PassthroughSettings,
        s.CaptureSettings,
        s.EventsSettings,
        s.ExporterSettings,
        s.SessionSettings,
        s.CacheSettings,
    ):
        for f in attrs.fields(cls):
            if f.name != "name" and f"`{f.name}`" not in DOC:
                missing.append(f"{cls.__name__}.{f.name}")
    assert missing == []
