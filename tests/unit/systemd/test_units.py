"""The systemd units are valid and agree with the daemon's behaviour.

systemd cannot run here, so what it would do is checked from its rules and the
real commands: the units' own ``ExecStart=`` and ``ExecReload=`` lines are run
(with llmproxy found on ``PATH`` as the units find it, the config path and the
state directory pointed at a temporary directory), and their exit statuses are
compared with what the units tell systemd about them.  The rules relied on
(systemd.service(5), systemd.unit(5)): ``Restart=on-failure`` restarts on an
unclean exit status of the main process unless it is listed in
``RestartPreventExitStatus=``, which is read from the main process only; a
failing ``ExecStartPre=`` is restarted all the same; a failing ``ExecReload=``
command fails the reload and the commands after it are not run; more than
``StartLimitBurst=`` starts within ``StartLimitIntervalSec=`` stop the unit.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llmproxy.config.model import ServerSettings
from llmproxy.runtime.exits import EX_CANNOT_LISTEN, EX_CONFIG

ROOT = Path(__file__).resolve().parents[3]
UNITS = ROOT / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))
SYSUSERS = UNITS / "llmproxy.sysusers"
CONFIG = "/etc/llmproxy/llmproxy.ini"
BIN = Path(sys.executable).parent  # where this checkout's llmproxy and twistd are
# (Not listen: the socket-activated unit sets it in its environment.)
BAD_CONFIG = "[server]\ndrain_timeout = soon\n[route:x]\nprefix = /x\n"
BAD_CONFIG_LINE = "server.drain_timeout: not a duration"


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
    assert str(EX_CONFIG) in _one(service, "RestartPreventExitStatus").split()
    assert service["ExecReload"][-1].endswith("-HUP $MAINPID")
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


def test_activated_service_adopts_the_socket_by_name_and_family() -> None:
    service = _unit(UNITS / "llmproxy-activated.service")["Service"]
    unit = _unit(UNITS / "llmproxy-activated.socket")["Socket"]
    name = _one(unit, "FileDescriptorName")
    address = _one(unit, "ListenStream")
    domain = "INET6" if address.startswith("[") else "INET"
    assert f"LLMPROXY_SERVER_LISTEN=systemd:domain={domain}:name={name}" in service["Environment"]


def test_the_activated_socket_listens_on_loopback_as_every_default_does() -> None:
    address = _one(_unit(UNITS / "llmproxy-activated.socket")["Socket"], "ListenStream")
    host, _, port = address.rpartition(":")
    assert host in ("127.0.0.1", "[::1]"), address
    assert ServerSettings().listen == f"tcp:{port}:interface=127.0.0.1"


# -- what systemd would do with the real commands' exit statuses --------------------------


def _environment(service: dict[str, list[str]], tmp_path: Path) -> dict[str, str]:
    """The unit's environment as its commands get it, for this checkout: PATH finds
    this venv's llmproxy and twistd first, the state directory is ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")}
    for assignment in service.get("Environment", []):
        key, _, value = assignment.partition("=")
        env[key] = value
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env["LLMPROXY_SERVER_STATE_DIR"] = str(tmp_path / "state")
    return env


def _command(line: str, config: Path, env: dict[str, str]) -> list[str]:
    """A unit's command line as systemd runs it: ``$VAR``/``${VAR}`` from the
    environment, the config file swapped for ``config``."""
    words = shlex.split(line.lstrip("-@:+!"))
    expanded = [
        re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), w)
        for w in words
    ]
    return [str(config) if w == CONFIG else w for w in expanded]


def _run(line: str, config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(line, config, env), env=env, capture_output=True, text=True, timeout=60
    )


def _not_restarted(service: dict[str, list[str]]) -> set[int]:
    assert _one(service, "Restart") == "on-failure"
    return {int(code) for code in _one(service, "RestartPreventExitStatus").split()}


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_no_unit_checks_the_config_in_exec_start_pre(path: Path) -> None:
    # A failing ExecStartPre= is restarted every RestartSec= for ever: the main
    # process checks the config itself and exits with a status systemd reads.
    assert "ExecStartPre" not in _unit(path)["Service"]


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_a_bad_config_stops_the_main_process_with_a_status_that_is_not_restarted(
    path: Path, tmp_path: Path
) -> None:
    service = _unit(path)["Service"]
    config = tmp_path / "llmproxy.ini"
    config.write_text(BAD_CONFIG)
    env = _environment(service, tmp_path)
    proc = _run(_one(service, "ExecStart"), config, env)
    assert proc.returncode == EX_CONFIG, proc.stdout + proc.stderr
    assert proc.returncode in _not_restarted(service)
    assert BAD_CONFIG_LINE in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "path", [UNITS / "llmproxy.service", UNITS / "llmproxy-activated.service"], ids=lambda p: p.name
)
def test_a_listener_that_cannot_open_stops_the_main_process_with_one_line_not_restarted(
    path: Path, tmp_path: Path
) -> None:
    service = _unit(path)["Service"]
    env = _environment(service, tmp_path)
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    config = tmp_path / "llmproxy.ini"
    # The plain unit: its port is held by another program. The socket-activated one:
    # started without its socket (LISTEN_FDS unset), as when the .socket unit is not.
    config.write_text(
        f"[server]\nlisten = tcp:{held.getsockname()[1]}:interface=127.0.0.1\nadmin_listen = off\n"
    )
    try:
        proc = _run(_one(service, "ExecStart"), config, env)
    finally:
        held.close()
    output = proc.stdout + proc.stderr
    assert proc.returncode == EX_CANNOT_LISTEN, output
    assert proc.returncode in _not_restarted(service)
    assert "Traceback" not in output
    assert len([line for line in output.splitlines() if "cannot listen on" in line]) == 1


@pytest.mark.parametrize(
    "path", [UNITS / "llmproxy.service", UNITS / "llmproxy-activated.service"], ids=lambda p: p.name
)
def test_reload_checks_the_config_before_it_signals_the_daemon(path: Path, tmp_path: Path) -> None:
    service = _unit(path)["Service"]
    check, signal = service["ExecReload"]
    assert signal == "/bin/kill -HUP $MAINPID"
    env = _environment(service, tmp_path)
    config = tmp_path / "llmproxy.ini"
    config.write_text(BAD_CONFIG)
    refused = _run(check, config, env)
    # Non-zero: systemd fails the reload here and never runs the kill.
    assert refused.returncode == EX_CONFIG, refused.stderr
    assert BAD_CONFIG_LINE in refused.stderr
    config.write_text("[server]\nlisten = tcp:8080\n")
    accepted = _run(check, config, env)
    assert accepted.returncode == 0, accepted.stderr


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_a_repeating_failure_trips_the_start_limit(path: Path) -> None:
    unit = _unit(path)
    interval = float(_one(unit["Unit"], "StartLimitIntervalSec"))
    burst = int(_one(unit["Unit"], "StartLimitBurst"))
    restart_sec = float(_one(unit["Service"], "RestartSec"))
    # Each failed start takes at least RestartSec=: the limit must be reachable
    # (systemd's default, 5 starts in 10 s, never is with RestartSec=2).
    assert burst * restart_sec < interval
    assert "StartLimitIntervalSec" not in unit["Service"]  # [Unit] only since systemd 230


def test_the_units_documentation_is_what_scripts_install_puts_there(tmp_path: Path) -> None:
    install = (ROOT / "scripts" / "install").read_text()
    (docdir,) = re.findall(r"^docdir=(\S+)$", install, re.M)
    assert '"$root/scripts/install-docs" "$docdir"' in install
    subprocess.run(
        [str(ROOT / "scripts" / "install-docs"), str(tmp_path / "doc")], check=True, timeout=60
    )
    for path in SERVICES:
        for url in _unit(path)["Unit"]["Documentation"]:
            assert url.startswith(f"file://{docdir}/"), url
            installed = tmp_path / "doc" / url.removeprefix(f"file://{docdir}/")
            assert installed.is_file(), (path.name, url)
    # The rules file's own header says where to load it from.
    rules = (ROOT / "docs" / "prometheus" / "llmproxy-alerts.yml").read_text()
    (named,) = re.findall(r"- (/\S+llmproxy-alerts\.yml)", rules)
    assert (tmp_path / "doc" / named.removeprefix(f"{docdir}/")).is_file()
