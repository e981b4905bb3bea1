"""The systemd units are valid and agree with the daemon's behaviour."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from llmproxy.config.model import ServerSettings

UNITS = Path(__file__).resolve().parents[3] / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))
SYSUSERS = UNITS / "llmproxy.sysusers"


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value, in order (units repeat keys like Environment=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text("utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _one(section: dict[str, list[str]], key: str) -> str:
    values = section[key]
    assert len(values) == 1, f"{key} is set {len(values)} times"
    return values[0]


def test_units_pass_systemd_analyze_verify() -> None:
    units = [str(p) for p in sorted(UNITS.iterdir()) if p.suffix in (".service", ".socket")]
    assert len(units) == 4
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_service_units_are_hardened_and_outlast_the_drain(path: Path) -> None:
    service = _unit(path)["Service"]
    assert _one(service, "Type") == "notify"
    assert float(_one(service, "TimeoutStopSec")) > ServerSettings().drain_timeout
    assert _one(service, "RestartPreventExitStatus") == "64"
    assert _one(service, "ExecReload").endswith("-HUP $MAINPID")
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RestrictSUIDSGID": "yes",
        "RemoveIPC": "yes",
        "StateDirectory": "llmproxy",
        "SystemCallFilter": "@system-service",
    }.items():
        assert _one(service, key) == value, key
    assert "AF_INET" in _one(service, "RestrictAddressFamilies")
    assert "DynamicUser" not in service  # the static user below, shared by every unit
    env = dict(v.split("=", 1) for v in service["Environment"])
    assert env["LLMPROXY_SERVER_STATE_DIR"] == "/var/lib/llmproxy"
    assert env["PATH"].split(":")[0] == "/opt/llmproxy/bin"  # scripts/install's prefix


def test_the_proxy_and_dispatcher_units_share_one_static_user() -> None:
    identities = {
        path.name: (_one(_unit(path)["Service"], "User"), _one(_unit(path)["Service"], "Group"))
        for path in SERVICES
    }
    assert set(identities) == {
        "llmproxy.service",
        "llmproxy-activated.service",
        "llmproxy-dispatcher.service",
    }
    assert set(identities.values()) == {("llmproxy", "llmproxy")}


def test_the_sysusers_file_creates_that_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    proc = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    users = {
        fields[0]: fields
        for fields in (
            line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
        )
    }
    groups = {line.split(":")[0] for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    _, _, uid, _, _, home, shell = users["llmproxy"]
    assert (home, shell.endswith("nologin")) == ("/var/lib/llmproxy", True)
    assert 0 < int(uid) < 1000  # a system user
    assert "llmproxy" in groups


def test_activated_service_adopts_the_socket_by_name() -> None:
    service = _unit(UNITS / "llmproxy-activated.service")["Service"]
    socket = _unit(UNITS / "llmproxy-activated.socket")["Socket"]
    name = _one(socket, "FileDescriptorName")
    assert f"LLMPROXY_SERVER_LISTEN=systemd:domain=INET6:name={name}" in service["Environment"]
