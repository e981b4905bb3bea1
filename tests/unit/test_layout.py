"""The layout is the architecture (docs/architecture.md, "Packages, by role"):
imports point down the stack, packages import each other without cycles, and no
module imports another module's private name.  Imports made for the type
checker only (under ``if TYPE_CHECKING:``) are not run and do not count."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "llmproxy"

# Lower numbers are lower in the stack; a package imports its own tier or below.
TIERS = {
    "events": 0,
    "http": 0,
    "config": 0,
    "interfaces": 0,
    "pricing": 0,
    "deferreds": 0,
    "export": 1,
    "redis": 1,
    "state": 1,
    "capture": 2,
    "proxy": 3,
    "access": 3,
    "cache": 3,
    "admin": 3,
    "runtime": 4,
    "cli": 5,
    "tap": 5,
    "testing": 5,
}


def part_of(module: str) -> str:
    """``llmproxy.export.sinks.loki`` -> ``export``."""
    return module.split(".")[1]


def runtime_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that runs, at any depth (function bodies too)."""

    def walk(nodes: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from walk(node.orelse)
                continue
            if isinstance(node, ast.Import | ast.ImportFrom):
                yield node
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    yield from walk([child])

    yield from walk(tree.body)


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, ast.parse(path.read_text("utf-8"))


def edges() -> Iterator[tuple[str, str, str, int]]:
    """(importing module, imported module, name or '', line)."""
    for name, tree in modules():
        for node in runtime_imports(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("llmproxy."):
                        yield name, alias.name, "", node.lineno
            elif node.module and node.module.startswith("llmproxy") and node.level == 0:
                for alias in node.names:
                    yield name, node.module, alias.name, node.lineno


def test_every_package_has_a_tier() -> None:
    names = {part_of(name) for name, _ in modules() if name != "llmproxy"}
    assert names <= TIERS.keys(), names - TIERS.keys()


def test_imports_point_down_the_stack() -> None:
    upward = [
        f"{src}:{line} imports {dst}"
        for src, dst, _, line in edges()
        if src != "llmproxy" and dst != "llmproxy" and TIERS[part_of(dst)] > TIERS[part_of(src)]
    ]
    assert upward == []


def test_packages_import_each_other_without_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in edges():
        a, b = part_of(src), part_of(dst)
        if a != b:
            graph.setdefault(a, set()).add(b)
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in seen and (cycle := visit(nxt, [*path, node])):
                return cycle
        seen[node] = 2
        return None

    for start in sorted(graph):
        if start not in seen:
            assert visit(start, []) is None


def test_no_module_imports_another_modules_private_name() -> None:
    private = [
        f"{src}:{line} imports {name} from {dst}"
        for src, dst, name, line in edges()
        if name.startswith("_") and not name.startswith("__")
    ]
    assert private == []
