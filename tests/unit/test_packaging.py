"""The hand-kept package list in setup.cfg is complete: every package under
``llmproxy/`` ships (``twisted.plugins`` has no ``__init__.py``, so package
discovery cannot be used and a missing line would silently leave a package out
of an installed wheel)."""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def listed_packages() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return {line.strip() for line in cfg["options"]["packages"].splitlines() if line.strip()}


def packages_on_disk() -> set[str]:
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "llmproxy").rglob("__init__.py")
    }
    return found | {"twisted.plugins"}


def test_every_package_on_disk_is_listed_in_setup_cfg() -> None:
    assert packages_on_disk() - listed_packages() == set()


def test_every_listed_package_exists() -> None:
    assert listed_packages() - packages_on_disk() == set()


def test_package_data_ships_the_embedded_default_and_the_plugin() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    data = cfg["options.package_data"]
    assert "default.ini" in data["llmproxy.config"]
    assert (ROOT / "llmproxy" / "config" / "default.ini").is_file()
    assert "plugins/llmproxy_plugin.py" in data["twisted"]
