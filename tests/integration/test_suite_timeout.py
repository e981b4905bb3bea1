"""The suite's per-test timeout (pytest-timeout, configured in pyproject.toml, made
to work with pytest-twisted's reactor greenlet in tests/conftest.py): it is on, and
a hung test fails with a clear message while the run goes on."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

HANGING_TESTS = """
import time

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred


def test_blocking_call():
    time.sleep(60)


@pytest_twisted.inlineCallbacks
def test_deferred_never_fires():
    yield Deferred()


@pytest_twisted.ensureDeferred
async def test_awaited_deferred_never_fires():
    await Deferred()


@pytest_twisted.ensureDeferred
async def test_reactor_callback_blocks():
    reactor.callLater(0, time.sleep, 60)
    await Deferred()


@pytest_twisted.inlineCallbacks
def test_the_reactor_still_runs():
    yield task.deferLater(reactor, 0.01, lambda: None)


def test_the_run_goes_on():
    pass
"""


def test_every_test_has_a_timeout_that_fails_only_that_test(
    pytestconfig: pytest.Config,
) -> None:
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert pytestconfig.getini("timeout") == "120"
    assert pytestconfig.getini("timeout_method") == "signal"


def test_hung_tests_fail_with_the_timeout_and_the_next_ones_run(tmp_path: Path) -> None:
    (tmp_path / "test_hangs.py").write_text(HANGING_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\ntimeout = 1\ntimeout_method = signal\n")
    report = tmp_path / "report.xml"
    # The suite's conftest as a plugin, on a run of its own (a hang must not hang us).
    run = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
            "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path),
            f"--junitxml={report}", str(tmp_path / "test_hangs.py"),
        ],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},
        capture_output=True,
        timeout=90,
    )  # fmt: skip
    output = run.stdout.decode(errors="replace") + run.stderr.decode(errors="replace")
    assert run.returncode == 1, output
    outcomes: dict[str, str] = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        # A test that also errs at teardown is a second element of the same name.
        problems = [c.get("message", "") for c in case if c.tag in ("failure", "error")]
        name = case.get("name", "")
        outcomes[name] = " | ".join(filter(None, [outcomes.get(name), *problems])) or "passed"
    timeout = "Timeout (>1s) from pytest-timeout"
    never_fired = f"{timeout}: a Deferred the test waits on never fired"
    assert outcomes["test_blocking_call"].startswith(f"Failed: {timeout}"), outcomes
    assert never_fired in outcomes["test_deferred_never_fires"], outcomes
    assert never_fired in outcomes["test_awaited_deferred_never_fires"], outcomes
    assert timeout in outcomes["test_reactor_callback_blocks"], outcomes
    assert outcomes["test_the_reactor_still_runs"] == "passed", outcomes
    assert outcomes["test_the_run_goes_on"] == "passed", outcomes
