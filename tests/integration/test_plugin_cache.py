"""``llmproxy plugin-cache`` makes a read-only install work: after it ran, twistd
finds the plugin without trying to write ``twisted/plugins/dropin.cache``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
# The test venv's site-packages: Twisted and llmproxy's dependencies (pip's
# --target install below has llmproxy alone).
SITE = sysconfig.get_paths()["purelib"]

# Run with -S (no site-packages, so no editable checkout from a .pth) and
# PYTHONPATH=<install>:<SITE>.  An audit hook refuses, and records, every write
# under the watched directory, the way a read-only file system would; Twisted
# logs its "Unable to write to plugin cache" warning to stderr.
_PROBE = """
import json, os, sys
watched = os.path.realpath(sys.argv[1])
attempts = []
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def hook(event, args):
    if event == "open" and isinstance(args[2], int) and args[2] & WRITE:
        target = args[0]
    elif event in ("os.rename", "os.remove", "os.truncate", "os.utime"):
        target = args[1] if event == "os.rename" else args[0]
    else:
        return
    if not isinstance(target, (str, bytes)):
        return
    target = os.path.realpath(os.fsdecode(target))
    if target.startswith(watched + os.sep):
        attempts.append(target)
        raise PermissionError(13, "Read-only file system (test)", target)

sys.addaudithook(hook)
from twisted.python import log
log.startLogging(sys.stderr, setStdout=False)
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
names = sorted(p.tapname for p in getPlugins(IServiceMaker))
plugin = sys.modules["twisted.plugins.llmproxy_plugin"].__file__
print(json.dumps({"tapnames": names, "plugin": plugin, "attempts": attempts}))
"""


def _env(*paths: Path | str) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(map(str, (*paths, SITE))), "PATH": "/usr/bin:/bin"}


def _probe(site: Path, cwd: Path) -> tuple[dict[str, Any], str]:
    out = subprocess.run(
        [sys.executable, "-S", "-c", _PROBE, str(site / "twisted" / "plugins")],
        cwd=cwd, env=_env(site), capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def _plugin_cache(cwd: Path, *paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-S", "-m", "llmproxy.cli", "plugin-cache"],
        cwd=cwd, env=_env(*paths), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _set_writable(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        path.chmod(mode | 0o200 if writable else mode & ~0o222)


def _install(site: Path) -> Path:
    """llmproxy installed the packaging way (non-editable) into its own directory."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
         "--target", str(site), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    assert (site / "twisted" / "plugins" / "llmproxy_plugin.py").is_file()
    assert not (site / "twisted" / "plugins" / "dropin.cache").exists()
    return site


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[Path]:
    """A fresh install, no plugin cache yet."""
    site = _install(tmp_path / "site")
    try:
        yield site
    finally:
        _set_writable(site, True)  # so tmp_path can be cleaned up


@pytest.fixture(scope="module")
def shared_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An install for the tests that only need the plugin on the path."""
    return _install(tmp_path_factory.mktemp("shared") / "site")


def test_after_plugin_cache_a_read_only_install_finds_the_plugin_without_writing(
    installed: Path, tmp_path: Path
) -> None:
    cache = installed / "twisted" / "plugins" / "dropin.cache"
    # Control: without the cache, discovery tries to write it (and warns).
    _set_writable(installed, False)
    before, stderr = _probe(installed, tmp_path)
    assert "llmproxy" in before["tapnames"]
    assert before["attempts"], "the probe should have seen Twisted try to write its cache"
    assert "Unable to write to plugin cache" in stderr
    assert not cache.exists()
    _set_writable(installed, True)

    done = _plugin_cache(tmp_path, installed)
    assert done.returncode == 0, done.stderr
    assert f"fresh: {cache}" in done.stdout.splitlines()
    assert cache.is_file()
    stamp, content = cache.stat().st_mtime_ns, cache.read_bytes()

    _set_writable(installed, False)
    after, stderr = _probe(installed, tmp_path)
    assert "llmproxy" in after["tapnames"]
    assert after["plugin"].startswith(str(installed))
    assert after["attempts"] == []
    assert "Unable to write" not in stderr
    assert "Traceback" not in stderr
    assert (cache.stat().st_mtime_ns, cache.read_bytes()) == (stamp, content)


def test_plugin_cache_fails_clearly_when_a_cache_cannot_be_written(
    shared_install: Path, tmp_path: Path
) -> None:
    # A plugin directory whose cache path cannot be replaced (a directory is in
    # the way: unwritable even for root, which ignores file modes).
    extra = tmp_path / "extra"
    plugins = extra / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "extra_plugin.py").write_text("# no plugins here\n")
    (plugins / "dropin.cache").mkdir()
    done = _plugin_cache(tmp_path, shared_install, extra)
    assert done.returncode == 1
    assert f"{plugins / 'dropin.cache'} is missing" in done.stderr
    assert "could not write the twistd plugin cache" in done.stderr
    # The writable install's cache was still written.
    assert (shared_install / "twisted" / "plugins" / "dropin.cache").is_file()


def test_plugin_cache_fails_when_the_llmproxy_plugin_is_not_on_the_path(tmp_path: Path) -> None:
    # llmproxy importable, but no twisted/plugins/llmproxy_plugin.py beside it:
    # the symptom of a default (PEP 660) editable install.
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "llmproxy").symlink_to(ROOT / "llmproxy", target_is_directory=True)
    done = _plugin_cache(tmp_path, lib)
    assert done.returncode == 1
    assert "the 'llmproxy' twistd plugin was not found" in done.stderr


def test_a_cache_is_made_newer_than_a_module_with_a_future_mtime(
    shared_install: Path, tmp_path: Path
) -> None:
    # Clock skew (or a coarse file system) would leave a fresh cache looking older
    # than its modules, and Twisted would try to rewrite it at every start.
    extra = tmp_path / "extra"
    plugins = extra / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    module = plugins / "extra_plugin.py"
    module.write_text("# no plugins here\n")
    future = time.time() + 3600
    os.utime(module, (future, future))
    done = _plugin_cache(tmp_path, shared_install, extra)
    assert done.returncode == 0, done.stderr
    cache = plugins / "dropin.cache"
    assert f"fresh: {cache}" in done.stdout.splitlines()
    assert cache.stat().st_mtime > module.stat().st_mtime
