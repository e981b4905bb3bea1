"""What the proxy service says when it is ready (llmproxy/runtime/service.py)."""

from __future__ import annotations

from llmproxy.config.loader import load_settings
from llmproxy.runtime.service import counted, ready_summary

ROUTE = "[route:{name}]\nprefix = /{name}\nupstream = https://{name}.example\n"


def test_counts_are_said_in_the_singular_and_the_plural() -> None:
    assert [counted(n, "route") for n in (0, 1, 2)] == ["0 routes", "1 route", "2 routes"]


def test_the_ready_line_counts_and_names_the_routes() -> None:
    one = load_settings(text=ROUTE.format(name="main"), env={})
    assert ready_summary(one, 0) == "1 route (main), 0 exporters"
    two = load_settings(text=ROUTE.format(name="a") + ROUTE.format(name="b"), env={})
    assert ready_summary(two, 1) == "2 routes (a, b), 1 exporter"
