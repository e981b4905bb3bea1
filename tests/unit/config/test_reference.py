"""docs/configuration.md is generated from the settings model and never drifts."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import attrs
import pytest

from llmproxy.config import reference as config_doc
from llmproxy.config.converter import structure_value
from llmproxy.config.loader import load_settings
from llmproxy.config.model import Duration, ExporterSettings, Settings, setting

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def test_configuration_md_is_the_generated_reference() -> None:
    assert DOC.read_text("utf-8") == config_doc.render(), (
        f"docs/configuration.md is stale: regenerate it with `{config_doc.REGENERATE}`"
    )


def test_every_settings_key_has_a_meaning() -> None:
    assert config_doc.undocumented() == [], (
        "give each key its meaning, setting(..., doc=...) in llmproxy/config/model.py, then "
        f"run `{config_doc.REGENERATE}`"
    )


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
        if f.name == "prices":  # its keys are model names: one row stands for them
            assert [r.ref for r in config_doc.prices_rows()] == ["prices.MODEL"]
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
        shown_type = row.type.replace("|", "\\|")  # a bare | would end the cell
        assert f"| `{row.key}` | {shown_type} | {row.default} |" in text, row.ref


@pytest.mark.parametrize("row", config_doc.all_rows(), ids=lambda r: r.ref)
def test_each_default_as_written_parses_back_to_the_settings_default(
    row: config_doc.KeyDoc,
) -> None:
    """The default column is what a user writes: fed to the loader's own converter it
    gives the settings' default (sizes as 64KiB, durations as seconds, lists...)."""
    if row.computed_default or row.default == "required":
        return  # computed defaults (spool/NAME, ...) and required keys
    if row.ref == "prices.MODEL":
        assert row.default == "empty" and Settings().prices == {}
        return
    section, _, key = row.ref.partition(".")
    cls, field = _field_of(section, key)
    text = "" if row.default == "empty" else row.default.strip("`")
    assert structure_value(text, attrs.fields_dict(cls)[field].type) == _default(cls, field)


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
    assert config_doc.format_default(Duration, 30.0) == "`30`"
    assert config_doc.format_default(Duration, 0.1) == "`0.1`"
    assert config_doc.format_default(tuple[tuple[str, str], ...], ()) == "empty"


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
    @attrs.frozen
    class Section:
        documented: int = setting(1, doc="Has a meaning.")
        bare: int = 2

    rows = config_doc.section_rows("extra", Section)
    assert config_doc.undocumented(rows) == ["extra.bare"]
    monkeypatch.setattr(config_doc, "all_rows", lambda: [*rows])
    assert config_doc.main([]) == 1


def test_a_setting_without_its_meaning_is_refused_where_it_is_declared() -> None:
    with pytest.raises(ValueError, match="needs its meaning"):
        setting(1, doc=" ")


def test_every_type_in_the_model_has_a_name_in_the_reference() -> None:
    names = {row.type for row in config_doc.all_rows()}
    assert {"duration", "size", "endpoint", "URL", "URL path", "int | `auto`"} <= names
    assert "`openai` | `anthropic`" in names
    with pytest.raises(TypeError, match="no documented type"):
        config_doc.type_name(dict[str, int])
