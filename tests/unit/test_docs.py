"""docs/configuration.md is generated from the settings model and never drifts."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import attrs
import pytest

from llmproxy.config import reference as config_doc
from llmproxy.config.loader import _converter, load_settings
from llmproxy.config.model import ExporterSettings, Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_md_is_the_generated_reference() -> None:
    assert DOC.read_text("utf-8") == config_doc.render(), (
        f"docs/configuration.md is stale: regenerate it with `{config_doc.REGENERATE}`"
    )


def test_every_settings_key_has_a_meaning() -> None:
    assert config_doc.undocumented() == [], (
        "add a one-line meaning to MEANINGS in llmproxy/config/reference.py for each key, then "
        f"run `{config_doc.REGENERATE}`"
    )
    assert config_doc.unused_meanings() == []


def test_every_settings_section_is_in_the_reference() -> None:
    """A new section on Settings (a new attrs class) must be added to the generator."""
    documented = {cls for _, _, cls in config_doc.SECTIONS} | {ExporterSettings}
    hints = typing.get_type_hints(Settings)
    for f in attrs.fields(Settings):
        if f.name == "source":  # where the settings came from, not an ini key
            continue
        if f.name == "audit_path":
            assert [r.ref for r in config_doc.audit_rows()] == ["audit.path"]
            continue
        tp = hints[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else tp
        assert inner in documented, f"Settings.{f.name} ({tp}) is not in the reference"


def test_every_exporter_group_names_real_keys() -> None:
    names = {f.name for f in attrs.fields(ExporterSettings)}
    for _, group, keys in config_doc.EXPORTER_GROUPS:
        assert set(keys) <= names, group


def test_every_key_appears_as_a_row_of_its_section() -> None:
    text = DOC.read_text("utf-8")
    for row in config_doc.all_rows():
        assert f"| `{row.key}` | {row.type} | {row.default} |" in text, row.ref


@pytest.mark.parametrize("row", config_doc.all_rows(), ids=lambda r: r.ref)
def test_each_default_as_written_parses_back_to_the_settings_default(
    row: config_doc.KeyDoc,
) -> None:
    """The default column is what a user writes: fed to the loader's own parser it
    gives the settings' default (sizes as 64KiB, durations as seconds, lists...)."""
    if row.ref in config_doc.DEFAULTS:
        return  # computed defaults (spool/NAME, ...) and required keys
    section, _, key = row.ref.partition(".")
    cls, field = _field_of(section, key)
    hints = typing.get_type_hints(cls)
    text = "" if row.default == "empty" else row.default.strip("`")
    assert _converter(field, hints[field])(text) == _default(cls, field)


def _field_of(section: str, key: str) -> tuple[type, str]:
    if section == "audit":
        return Settings, "audit_path"
    if section.startswith("exporter"):
        return ExporterSettings, key
    classes = {prefix: cls for _, prefix, cls in config_doc.SECTIONS}
    return classes[section], key


def _default(cls: type, name: str) -> object:
    return next(f.default for f in attrs.fields(cls) if f.name == name)


def test_sizes_and_durations_render_as_users_write_them() -> None:
    assert config_doc.format_size(32 * 1024 * 1024) == "32MiB"
    assert config_doc.format_size(1024**3) == "1GiB"
    assert config_doc.format_size(256 * 1024) == "256KiB"
    assert config_doc.format_size(1000) == "1000"
    assert config_doc.format_default("drain_timeout", float, 30.0) == "`30`"
    assert config_doc.format_default("flush_interval", float, 0.1) == "`0.1`"
    assert config_doc.format_default("labels", tuple[tuple[str, str], ...], ()) == "empty"


def test_the_example_in_the_reference_loads(tmp_path: Path) -> None:
    blocks = re.findall(r"```ini\n(.*?)```", DOC.read_text("utf-8"), re.S)
    assert blocks
    for block in blocks:
        text = block.replace("/var/lib/llmproxy", str(tmp_path))
        settings = load_settings(text=text, env={"OPENAI_API_KEY": "sk-test-example"})
        assert settings.routes


def test_the_generator_writes_and_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "configuration.md"
    monkeypatch.setattr(config_doc, "DOC_PATH", target)
    assert config_doc.main(["--check"]) == 1
    assert "regenerate" in capsys.readouterr().err
    assert config_doc.main(["--write"]) == 0
    assert target.read_text("utf-8") == config_doc.render()
    assert config_doc.main(["--check"]) == 0
    assert config_doc.main([]) == 0
    assert capsys.readouterr().out == config_doc.render()


def test_a_key_without_a_meaning_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    meanings = dict(config_doc.MEANINGS)
    del meanings["server.listen"]
    monkeypatch.setattr(config_doc, "MEANINGS", meanings)
    assert config_doc.undocumented() == ["server.listen"]
    assert config_doc.main([]) == 1
