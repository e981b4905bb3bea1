"""The systemd units are valid and agree with the daemon's behaviour."""

from __future__ import annotations

import configparser
import subprocess
from pathlib import Path

import pytest

from llmproxy.settings import ServerSettings

UNITS = Path(__file__).resolve().parents[2] / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def test_units_pass_systemd_analyze_verify() -> None:
    units = [str(p) for p in sorted(UNITS.iterdir())]
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_service_units_are_hardened_and_outlast_the_drain(path: Path) -> None:
    service = _unit(path)["Service"]
    assert service["Type"] == "notify"
    assert float(service["TimeoutStopSec"]) > ServerSettings().drain_timeout
    assert service["RestartPreventExitStatus"] == "64"
    assert service["ExecReload"].endswith("-HUP $MAINPID")
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "DynamicUser": "yes",
        "StateDirectory": "llmproxy",
        "SystemCallFilter": "@system-service",
    }.items():
        assert service[key] == value, key
    assert "AF_INET" in service["RestrictAddressFamilies"]


def test_activated_service_adopts_the_socket_by_name() -> None:
    service = _unit(UNITS / "llmproxy-activated.service")["Service"]
    socket = _unit(UNITS / "llmproxy-activated.socket")["Socket"]
    name = socket["FileDescriptorName"]
    assert f"LLMPROXY_SERVER_LISTEN=systemd:domain=INET6:name={name}" in service["Environment"]
