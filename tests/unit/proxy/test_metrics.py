"""The proxy's request counters: outcomes apart from statuses, and the per-project
families with their bounded label set (llmproxy/proxy/metrics.py)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.proxy.forward import answered_outcome
from llmproxy.proxy.metrics import (
    OTHER_PROJECTS,
    MetricsCollector,
    ProjectLabels,
    ProxyMetrics,
    make_registry,
)


def scrape(metrics: ProxyMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(make_registry(MetricsCollector(metrics.families))).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def finish(metrics: ProxyMetrics, status: int, outcome: str, project: str | None = None) -> None:
    metrics.finished("r", status, outcome, 0.1, 0.05, 10, 20, project=project)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "ok"),
        (204, "ok"),
        (304, "ok"),
        (None, "ok"),
        (400, "client_error"),
        (404, "client_error"),
        (429, "upstream_rate_limited"),
        (500, "upstream_error"),
        (503, "upstream_error"),
    ],
)
def test_an_answer_that_reached_the_client_whole_has_the_outcome_its_status_says(
    status: int | None, outcome: str
) -> None:
    assert answered_outcome(status) == outcome


def test_requests_by_project_and_outcome_and_tokens_by_kind() -> None:
    metrics = ProxyMetrics(max_projects=5)
    finish(metrics, 200, "ok", "team-a")
    finish(metrics, 500, "upstream_error", "team-a")
    finish(metrics, 200, "ok")  # no proxy token: not in the project families
    metrics.usage("team-a", {"input_tokens": 9, "output_tokens": 2, "total_tokens": 11})
    metrics.usage("team-a", {"input_tokens": 1, "output_tokens": None, "cache_read_tokens": 4})
    samples = scrape(metrics)
    requests = {
        labels: v
        for (name, labels), v in samples.items()
        if name == "llmproxy_project_requests_total"
    }
    assert requests == {
        (("outcome", "ok"), ("project", "team-a")): 1.0,
        (("outcome", "upstream_error"), ("project", "team-a")): 1.0,
    }
    tokens = {
        labels: v
        for (name, labels), v in samples.items()
        if name == "llmproxy_project_tokens_total"
    }
    assert tokens == {
        (("kind", "input"), ("project", "team-a")): 10.0,
        (("kind", "output"), ("project", "team-a")): 2.0,
        (("kind", "cache_read"), ("project", "team-a")): 4.0,
    }
    assert metrics.snapshot()["projects"] == {
        "team-a": {
            "requests": 2,
            "by_outcome": {"ok": 1, "upstream_error": 1},
            "tokens": {"cache_read": 4, "input": 10, "output": 2},
        }
    }


def test_projects_past_the_bound_are_counted_as_other() -> None:
    metrics = ProxyMetrics(max_projects=2)
    for project in ("a", "b", "c", "d", "a", "c"):
        finish(metrics, 200, "ok", project)
        metrics.usage(project, {"input_tokens": 1})
    samples = scrape(metrics)
    requests = {
        dict(labels)["project"]: v
        for (name, labels), v in samples.items()
        if name == "llmproxy_project_requests_total"
    }
    assert requests == {"a": 2.0, "b": 1.0, OTHER_PROJECTS: 3.0}
    tokens = {
        dict(labels)["project"]: v
        for (name, labels), v in samples.items()
        if name == "llmproxy_project_tokens_total"
    }
    assert tokens == {"a": 2.0, "b": 1.0, OTHER_PROJECTS: 3.0}


def test_zero_projects_counts_every_project_as_other() -> None:
    metrics = ProxyMetrics(max_projects=0)
    finish(metrics, 200, "ok", "a")
    assert metrics.snapshot()["projects"] == {
        OTHER_PROJECTS: {"requests": 1, "by_outcome": {"ok": 1}, "tokens": {}}
    }


@given(st.lists(st.text(max_size=3), max_size=300), st.integers(0, 6))
def test_a_projects_label_never_changes_and_at_most_n_names_are_labels(
    projects: list[str], limit: int
) -> None:
    labels = ProjectLabels(limit)
    first: dict[str, str] = {}
    for project in projects:
        label = labels(project)
        assert first.setdefault(project, label) == label
    # (Names of at most 3 characters: none is "other" itself.)
    named = set(first.values()) - {OTHER_PROJECTS}
    assert named == set(list(dict.fromkeys(projects))[:limit])


def test_usage_ignores_what_is_not_a_count() -> None:
    metrics = ProxyMetrics()
    bad: dict[str, Any] = {"input_tokens": "9", "output_tokens": True, "cache_read_tokens": -3}
    metrics.usage("p", bad)
    assert metrics.project_tokens == {}


def _answer(project: str | None, model: str, cost: float | None, **usage: int) -> tuple[Any, Any]:
    from llmproxy.capture.record import ExchangeRecord

    record = ExchangeRecord("r", 0.0, "POST", "/", "", "r", "openai", "", "", "", [])
    record.project = project
    event = {"model": model, "usage": usage, "cost": None if cost is None else {"total": cost}}
    return record, event


def test_cost_and_tokens_by_project_and_model_and_unpriced_answers_by_model() -> None:
    metrics = ProxyMetrics(max_projects=5)
    metrics.spent(*_answer("team-a", "gpt-4o", 0.25, input_tokens=100, output_tokens=10))
    metrics.spent(*_answer("team-a", "gpt-4o", 0.5, input_tokens=1, cache_read_tokens=7))
    metrics.spent(*_answer(None, "gpt-4o", 0.125, output_tokens=3))  # no proxy token
    metrics.spent(*_answer("team-a", "my-finetune", None, input_tokens=5))
    # No usage (an error answer): nothing counted.
    metrics.spent(_answer("team-a", "gpt-4o", None)[0], {"model": "gpt-4o", "usage": None})
    samples = scrape(metrics)

    def family(name: str) -> dict[Any, float]:
        return {labels: v for (n, labels), v in samples.items() if n == name}

    assert family("llmproxy_cost_usd_total") == {
        (("model", "gpt-4o"), ("project", "team-a")): 0.75,
        (("model", "gpt-4o"), ("project", "-")): 0.125,
    }
    assert family("llmproxy_cost_unknown_total") == {(("model", "my-finetune"),): 1.0}
    tokens = family("llmproxy_model_tokens_total")
    assert tokens[(("kind", "input"), ("model", "gpt-4o"), ("project", "team-a"))] == 101.0
    assert tokens[(("kind", "cache_read"), ("model", "gpt-4o"), ("project", "team-a"))] == 7.0
    assert tokens[(("kind", "output"), ("model", "gpt-4o"), ("project", "-"))] == 3.0
    assert metrics.snapshot()["cost"] == {
        "-": {"gpt-4o": {"usd": 0.125}},
        "team-a": {"gpt-4o": {"usd": 0.75}},
    }


def test_models_past_the_bound_are_counted_as_other() -> None:
    metrics = ProxyMetrics(max_projects=2)
    for i in range(6):
        metrics.spent(*_answer("p", f"model-{i}", 1.0, input_tokens=1))
    assert metrics.cost_usd == {
        ("p", "model-0"): 1.0,
        ("p", "model-1"): 1.0,
        ("p", OTHER_PROJECTS): 4.0,
    }
