"""The ``llmproxy`` command's top level (llmproxy/cli/main.py, __main__.py, args.py):
the help names every subcommand and nothing of the source tree, ``--version``
reads the installed metadata, ``python -m llmproxy.cli`` runs it, the shared argument
types refuse what they should, and the package's imports point one way only."""

from __future__ import annotations

import argparse
import ast
import configparser
import subprocess
import sys
from collections.abc import Iterator
from importlib import import_module
from importlib.metadata import version
from pathlib import Path

import pytest

from llmproxy.cli.args import positive_duration, positive_int, positive_seconds
from llmproxy.cli.main import main

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "llmproxy"
CLI = PACKAGE / "cli"
SUBCOMMANDS = ("check-config", "token", "dispatcher", "cache", "benchmark", "plugin-cache")


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(argv)`` as the console script runs it: (exit code, stdout, stderr)."""
    try:
        code: int | str | None = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return int(code or 0), out, err


# -- help and version --------------------------------------------------------------------


def test_help_names_every_subcommand_and_no_source_path(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    assert out.startswith("usage: llmproxy ")
    listed = [out.find(f"\n    {name}") for name in SUBCOMMANDS]
    assert -1 not in listed and listed == sorted(listed), listed
    assert "twistd" in out  # says where the proxy itself runs
    assert "docs/" in out and "configuration.md" in out
    assert "tests/" not in out and "test_" not in out and ".py" not in out


def test_every_subcommand_has_its_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    for name in SUBCOMMANDS:
        code, out, _ = run_main([name, "--help"], capsys)
        assert code == 0, name
        assert out.startswith(f"usage: llmproxy {name} "), out


def test_no_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main([], capsys)
    assert code == 2
    assert out == ""
    assert "required: COMMAND" in err


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    declared = configparser.ConfigParser()
    declared.read(ROOT / "setup.cfg")
    code, out, err = run_main(["--version"], capsys)
    assert code == 0
    assert out == f"llmproxy {declared['metadata']['version']}\n"
    assert out == f"llmproxy {version('llmproxy')}\n"
    assert err == ""


@pytest.mark.integration
def test_python_m_llmproxy_cli_runs_the_command() -> None:
    helped = subprocess.run(
        [sys.executable, "-m", "llmproxy.cli", "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert helped.returncode == 0, helped.stderr
    assert all(name in helped.stdout for name in SUBCOMMANDS)
    bad = subprocess.run(
        [sys.executable, "-m", "llmproxy.cli", "token", "create", "--rpm", "0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "argument --rpm: must be greater than 0" in bad.stderr


@pytest.mark.integration
def test_the_console_script_prints_the_version() -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "llmproxy"), "--version"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, f"llmproxy {version('llmproxy')}\n")


# -- the shared argument types -------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [("1", 1), ("250", 250), (" 7 ", 7)])
def test_positive_int_accepts_whole_numbers_above_zero(text: str, value: int) -> None:
    assert positive_int(text) == value


@pytest.mark.parametrize("text", ["0", "-3", "1.5", "", "ten", "1e3"])
def test_positive_int_refuses_the_rest(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        positive_int(text)


@pytest.mark.parametrize(("text", "value"), [("2.5", 2.5), ("60", 60.0), ("1e-3", 0.001)])
def test_positive_seconds_accepts_plain_numbers(text: str, value: float) -> None:
    assert positive_seconds(text) == value


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "5s", ""])
def test_positive_seconds_refuses_the_rest(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        positive_seconds(text)


@pytest.mark.parametrize(("text", "value"), [("30", 30.0), ("500ms", 0.5), ("2m", 120.0)])
def test_positive_duration_reads_the_ini_forms(text: str, value: float) -> None:
    assert positive_duration(text) == value


@pytest.mark.parametrize("text", ["0", "0s", "-1s", "soon", "5 parsecs", ""])
def test_positive_duration_refuses_the_rest(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        positive_duration(text)


@pytest.mark.parametrize("timeout", ["inf", "nan", "0", "-1", "soon"])
def test_cache_purge_refuses_a_timeout_it_cannot_wait(
    timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before the check, inf crashed with OverflowError from the socket and 0 made
    # the socket non-blocking ("cannot reach ...: Operation now in progress").
    argv = ["cache", "purge", "--all", "--admin-url", "http://127.0.0.1:9", "--timeout", timeout]
    code, out, err = run_main(argv, capsys)
    assert (code, out) == (2, "")
    assert "argument --timeout:" in err
    assert "Traceback" not in err and "cannot reach" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["token", "create", "--project", "p"],
        ["token", "list"],
        ["token", "revoke", "tok_000000000000"],
        ["spend"],
        ["cache", "purge", "--all"],
    ],
)
def test_a_local_command_with_a_config_that_does_not_load_names_the_problem_and_does_nothing(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.ini"
    config.write_text(f"[server]\nstate_dir = {tmp_path / 'state'}\nlisten_backlog = many\n")
    code, out, err = run_main([*argv, "--config", str(config)], capsys)
    assert (code, out) == (1, "")
    assert "server.listen_backlog" in err and "Traceback" not in err
    assert not (tmp_path / "state").exists()


# -- the import graph --------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> Iterator[tuple[str, str | None]]:
    """(module, name) for every import in ``path``, function-level ones included;
    ``name`` is what a ``from`` import takes from the module, else None."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            module = node.module or ""
            if node.level:
                module = ".".join([*base, *([module] if module else [])])
            for alias in node.names:
                yield module, alias.name


def targets(path: Path) -> set[str]:
    """The modules ``path`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    out = set()
    for module, name in imported(path):
        out.add(module)
        if name is not None:
            out.add(f"{module}.{name}")
    return out


CLI_MODULES = {module_name(p): p for p in sorted(CLI.glob("*.py"))}


def test_only_the_entry_points_import_main() -> None:
    importers = [m for m, p in CLI_MODULES.items() if "llmproxy.cli.main" in targets(p)]
    assert importers == ["llmproxy.cli.__main__"]


def test_nothing_outside_the_cli_imports_it() -> None:
    offenders = [
        (module_name(path), target)
        for path in sorted(PACKAGE.rglob("*.py"))
        if CLI not in path.parents
        for target in targets(path)
        if target == "llmproxy.cli" or target.startswith("llmproxy.cli.")
    ]
    assert offenders == []


def test_the_cli_modules_import_each_other_without_a_cycle() -> None:
    graph = {
        name: sorted(t for t in targets(path) if t in CLI_MODULES and t != name)
        for name, path in CLI_MODULES.items()
    }
    assert graph["llmproxy.cli.args"] == []  # the bottom: every subcommand may use it
    done: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, " -> ".join([*trail, name])
        if name in done:
            return
        for nxt in graph[name]:
            visit(nxt, (*trail, name))
        done.add(name)

    for name in graph:
        visit(name, ())


def test_the_cli_imports_no_private_names_of_other_modules() -> None:
    private = [
        (name, module, imported_name)
        for name, path in CLI_MODULES.items()
        for module, imported_name in imported(path)
        if imported_name is not None
        and imported_name.startswith("_")
        and module.startswith("llmproxy")
    ]
    assert private == []


# The package's __init__ holds only its docstring; __main__ runs the command.
@pytest.mark.parametrize(
    "name", sorted(set(CLI_MODULES) - {"llmproxy.cli", "llmproxy.cli.__main__"})
)
def test_every_cli_module_declares_what_it_exports(name: str) -> None:
    module = import_module(name)
    exported = module.__all__
    assert exported, name
    assert [n for n in exported if not hasattr(module, n)] == []
    assert (module.__doc__ or "").strip(), name
