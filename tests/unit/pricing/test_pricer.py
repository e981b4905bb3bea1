"""Pricing answers: the same figures as genai-prices' own ``calc_price``, the
ini's prices first, unknown models without a cost, and never a network access."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from genai_prices import Usage, calc_price, data_snapshot

from llmproxy.config.loader import ConfigError
from llmproxy.pricing import build_pricer
from llmproxy.pricing.pricer import TABLE_VERSION, Pricer, parse_rates
from llmproxy.pricing.rates import dated_prices, tiered_rates_of
from llmproxy.runtime.checks import load_checked

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC).timestamp()


def usage(
    input_tokens: int, output_tokens: int, cache_read: int = 0, cache_write: int = 0
) -> dict[str, Any]:
    """Our usage dict (an event's), as llmproxy/events/usage.py normalises it."""
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
        "cache_read_tokens": cache_read,
        "cache_creation_tokens": cache_write,
    }


def reference(
    model: str,
    provider: str,
    u: dict[str, Any],
    when: float = NOW,
    context: dict[str, str] | None = None,
) -> tuple[float, float, float]:
    calc = calc_price(
        Usage(
            input_tokens=u["input_tokens"],
            output_tokens=u["output_tokens"],
            cache_read_tokens=u["cache_read_tokens"] or None,
            cache_write_tokens=u["cache_creation_tokens"] or None,
        ),
        model,
        provider_id=provider,
        genai_request_timestamp=datetime.fromtimestamp(when, UTC),
        price_context=context,
    )
    return float(calc.input_price), float(calc.output_price), float(calc.total_price)


def priced(
    pricer: Pricer,
    model: str,
    u: dict[str, Any] | None,
    *,
    provider: str = "openai",
    host: str = "127.0.0.1:9",
    route: str = "r",
    when: float = NOW,
) -> dict[str, Any] | None:
    return pricer.cost(
        route=route, provider=provider, upstream_host=host, model=model, usage=u, when=when
    )


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Any, ...]]]:
    """Any socket made or name looked up while pricing fails the test."""
    attempts: list[tuple[Any, ...]] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise AssertionError(f"network access while pricing: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert attempts == []


def test_openai_chat_with_cached_tokens_costs_what_calc_price_says() -> None:
    u = usage(12_000, 800, cache_read=9_000)
    cost = priced(Pricer(), "gpt-4o", u, host="api.openai.com")
    assert cost is not None
    assert (cost["input"], cost["output"], cost["total"]) == pytest.approx(
        reference("gpt-4o", "openai", u), rel=1e-12
    )
    # Cached tokens cost less than uncached ones: the cache price was used.
    assert cost["total"] < priced(Pricer(), "gpt-4o", usage(12_000, 800))["total"]  # type: ignore[index]
    assert cost["currency"] == "USD"
    assert cost["source"] == "genai-prices" and cost["version"] == TABLE_VERSION
    assert cost["priced_as"] == "openai:gpt-4o"


@pytest.mark.parametrize("input_tokens", [5_000, 200_000, 250_000])
def test_anthropic_with_cache_read_and_creation_costs_what_calc_price_says(
    input_tokens: int,
) -> None:
    """Above 200k input tokens Claude Sonnet 4.5 has dearer tier prices: both sides."""
    u = usage(input_tokens, 1_500, cache_read=3_000, cache_write=1_000)
    cost = priced(Pricer(), "claude-sonnet-4-5", u, provider="anthropic")
    assert cost is not None
    assert (cost["input"], cost["output"], cost["total"]) == pytest.approx(
        reference("claude-sonnet-4-5", "anthropic", u), rel=1e-12
    )
    assert cost["priced_as"] == "anthropic:claude-sonnet-4-5"


def test_a_model_whose_price_changes_on_a_date_is_priced_by_the_request_date() -> None:
    snapshot = data_snapshot.get_snapshot()
    _, model = snapshot.find_provider_model("claude-sonnet-4-6", None, "anthropic", None)
    dated = dated_prices(model)
    assert dated is not None and len(dated[0]) >= 2
    change = dated[0][-1]
    u = usage(50_000, 2_000, cache_read=10_000)
    pricer = Pricer()
    for when in (change - 86400, change, change + 86400 * 40):
        cost = priced(pricer, "claude-sonnet-4-6", u, provider="anthropic", when=when)
        assert cost is not None
        assert cost["total"] == pytest.approx(
            reference("claude-sonnet-4-6", "anthropic", u, when)[2], rel=1e-12
        )


# The table's OpenAI tier prices start on this date (genai-prices 0.2.5).
TIERS_PRICED = datetime(2026, 11, 1, 12, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("model", "tier", "input_tokens"),
    [
        ("gpt-5-mini", "flex", 20_000),
        ("gpt-5-mini", "priority", 20_000),
        ("gpt-4o", "priority", 20_000),
        ("gpt-5.4", "flex", 300_000),  # a tiered flex price, above its tier
    ],
)
def test_an_openai_service_tier_is_priced_as_calc_price_prices_it(
    model: str, tier: str, input_tokens: int
) -> None:
    u = usage(input_tokens, 900, cache_read=4_000) | {"service_tier": tier}
    pricer = Pricer()
    cost = priced(pricer, model, u, host="api.openai.com", when=TIERS_PRICED)
    assert cost is not None and cost["priced_as"] == f"openai:{model}@{tier}"
    want = reference(model, "openai", u, TIERS_PRICED, {"service_tier": tier})
    assert (cost["input"], cost["output"], cost["total"]) == pytest.approx(want, rel=1e-12)
    standard = reference(model, "openai", u, TIERS_PRICED)
    assert cost["total"] != pytest.approx(standard[2])  # the tier changed the price
    # Before the table prices the tier, the standard price, as calc_price says.
    before = TIERS_PRICED - 60 * 86400
    early = priced(pricer, model, u, host="api.openai.com", when=before)
    assert early is not None
    assert early["total"] == pytest.approx(
        reference(model, "openai", u, before, {"service_tier": tier})[2], rel=1e-12
    )


@pytest.mark.parametrize("tier", ["default", "auto", "scale", "x" * 40, None, ["flex"]])
def test_a_tier_without_prices_of_its_own_is_the_standard_price(tier: Any) -> None:
    u = usage(20_000, 900) | {"service_tier": tier}
    cost = priced(Pricer(), "gpt-5-mini", u, host="api.openai.com", when=TIERS_PRICED)
    assert cost is not None and cost["priced_as"] == "openai:gpt-5-mini"
    assert cost["total"] == pytest.approx(
        reference("gpt-5-mini", "openai", u, TIERS_PRICED)[2], rel=1e-12
    )


def test_a_flex_answer_end_to_end_is_priced_at_flex() -> None:
    """From the answer's bytes (JSON and a stream) through the usage to the cost."""
    from llmproxy.events.usage import summary_from_json, summary_from_sse_text, usage_dict

    body = (
        b'{"id": "c", "object": "chat.completion", "model": "gpt-5-mini", "service_tier": '
        b'"flex", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, '
        b'"finish_reason": "stop"}], "usage": {"prompt_tokens": 1000, "completion_tokens": 50, '
        b'"total_tokens": 1050}}'
    )
    stream = (
        'data: {"id": "c", "object": "chat.completion.chunk", "model": "gpt-5-mini", '
        '"service_tier": "flex", "choices": [{"index": 0, "delta": {"content": "hi"}, '
        '"finish_reason": "stop"}]}\n\n'
        'data: {"id": "c", "object": "chat.completion.chunk", "model": "gpt-5-mini", '
        '"service_tier": "flex", "choices": [], "usage": {"prompt_tokens": 1000, '
        '"completion_tokens": 50, "total_tokens": 1050}}\n\n'
        "data: [DONE]\n\n"
    )
    for model, found, _ in (summary_from_json(body), summary_from_sse_text(stream)):
        u = usage_dict(found)
        assert u is not None and u["service_tier"] == "flex"
        cost = priced(Pricer(), str(model), u, host="api.openai.com", when=TIERS_PRICED)
        assert cost is not None and cost["priced_as"] == "openai:gpt-5-mini@flex"


def test_rates_are_exact_decimals_of_the_table() -> None:
    """The rates are measured with genai-prices' own arithmetic: in Decimal, equal
    to the digit."""
    snapshot = data_snapshot.get_snapshot()
    _, model = snapshot.find_provider_model("gpt-4o", None, "openai", None)
    rates = tiered_rates_of(model.get_prices(datetime.fromtimestamp(NOW, UTC)))
    assert not hasattr(rates, "bands")
    calc = calc_price(
        Usage(input_tokens=12_345, output_tokens=678, cache_read_tokens=2_000),
        "gpt-4o",
        provider_id="openai",
    )
    assert rates.cost(12_345, 678, 2_000, 0) == (  # type: ignore[union-attr]
        calc.input_price,
        calc.output_price,
        calc.total_price,
    )


def test_the_provider_comes_from_the_upstream_host_before_the_route() -> None:
    """A route that says openai but points at api.anthropic.com prices as Anthropic."""
    u = usage(1_000, 100)
    cost = priced(Pricer(), "claude-3-5-haiku", u, provider="openai", host="api.anthropic.com")
    assert cost is not None and cost["priced_as"].startswith("anthropic:")


def test_an_unknown_model_has_no_cost_and_no_error(no_network: list[Any]) -> None:
    pricer = Pricer()
    assert priced(pricer, "my-own-finetune-xyz", usage(10, 10)) is None
    assert priced(pricer, "my-own-finetune-xyz", usage(10, 10), provider="") is None
    assert priced(pricer, "", usage(10, 10)) is None
    # No usage (an error answer): nothing to price, whatever the model.
    assert priced(pricer, "gpt-4o", None) is None


def test_strange_usage_values_never_raise() -> None:
    pricer = Pricer()
    weird = {"input_tokens": None, "output_tokens": "12", "cache_read_tokens": -5}
    cost = priced(pricer, "gpt-4o", weird)
    assert cost is not None and cost["total"] == 0.0
    # More cached than input (a confused upstream): uncached counts as 0, not negative.
    cost = priced(pricer, "gpt-4o", usage(10, 0, cache_read=50))
    assert cost is not None and cost["total"] >= 0


def test_a_cache_hit_costs_nothing() -> None:
    cost = Pricer().cost(
        route="r",
        provider="openai",
        upstream_host="api.openai.com",
        model="gpt-4o",
        usage=usage(1000, 100),
        when=NOW,
        cache_hit=True,
    )
    assert cost is not None and cost["total"] == 0.0 and cost["source"] == "cache"


INI = """
[route:negotiated]
prefix = /neg
upstream = https://api.openai.com
price_input = 1.5
price_output = 6
price_cache_read = 0.5

[route:list]
prefix = /list
upstream = https://api.openai.com

[prices]
gpt-4o = input 2, output 8, cache_read 1
gpt-4o-2024-* = input 2.2, output 8.8
ft* = input 0.3, output 1.2
"""


def test_a_route_price_wins_over_the_prices_section_and_the_table() -> None:
    pricer = build_pricer(load_checked(text=INI))
    u = usage(1_000_000, 1_000_000, cache_read=400_000)
    cost = priced(pricer, "gpt-4o", u, route="negotiated", host="api.openai.com")
    assert cost is not None
    assert cost["input"] == pytest.approx(600_000 * 1.5e-6 + 400_000 * 0.5e-6)
    assert cost["output"] == pytest.approx(6.0)
    assert (cost["source"], cost["version"]) == ("config", "route:negotiated")


def test_a_prices_line_wins_over_the_table_exact_names_before_prefixes() -> None:
    pricer = build_pricer(load_checked(text=INI))
    u = usage(1_000_000, 1_000_000)
    exact = priced(pricer, "GPT-4o", u, route="list", host="api.openai.com")
    assert exact is not None and exact["total"] == pytest.approx(10.0)
    assert exact["version"] == "prices.gpt-4o"
    dated = priced(pricer, "gpt-4o-2024-08-06", u, route="list", host="api.openai.com")
    assert dated is not None and dated["total"] == pytest.approx(11.0)
    assert dated["version"] == "prices.gpt-4o-2024-*"
    # A fine-tuned model no table knows gets the ini's price (':' ends an ini key:
    # a prefix before it and '*').
    tuned = priced(pricer, "ft:gpt-4o-mini:acme::abc123", u, route="list")
    assert tuned is not None and tuned["total"] == pytest.approx(1.5)
    # Anything else: the table.
    other = priced(pricer, "gpt-4o-mini", u, route="list", host="api.openai.com")
    assert other is not None and other["source"] == "genai-prices"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[prices]\nm = input x, output 1\n", "prices.m: 'x' is not a number"),
        ("[prices]\nm = output 1\n", "prices.m: missing the input price"),
        ("[prices]\nm = input 1, output -2\n", "prices.m: '-2' is not a price"),
        ("[prices]\nm = input 1, output 2, speed 3\n", "prices.m: unknown price kind 'speed'"),
        ("[prices]\nm = input 1, input 2, output 2\n", "prices.m: input given twice"),
        ("[prices]\n* = input 1, output 2\n", "prices.*: a model name"),
        (
            "[route:r]\nprefix = /r\nupstream = http://h\nprice_output = 3\n",
            "route:r.price_input: price_input and price_output go together",
        ),
        (
            "[route:r]\nprefix = /r\nupstream = http://h\nprice_input = 1\nprice_output = lots\n",
            "route:r.price_output: 'lots' is not a number",
        ),
    ],
)
def test_check_config_names_the_bad_price(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_checked(text=text)
    assert any(line.startswith(problem) for line in e.value.problems), e.value.problems


def test_a_price_line_defaults_its_cache_prices_to_the_input_price() -> None:
    rates = parse_rates("input 3, output 15")
    assert rates.cache_read == rates.input == rates.cache_write
    assert parse_rates(" Input $3 , output: 15 ").output == 15


def test_pricing_never_touches_the_network(no_network: list[Any]) -> None:
    """The table is the installed package's: looking models up and pricing them
    (known, unknown, by host) opens no socket and resolves no name."""
    pricer = Pricer()
    for model, provider, host in (
        ("gpt-4o", "openai", "api.openai.com"),
        ("claude-sonnet-4-5", "anthropic", "api.anthropic.com"),
        ("gemini-2.5-pro", "", "generativelanguage.googleapis.com"),
        ("nobody-knows-me", "openai", "127.0.0.1:1"),
    ):
        priced(pricer, model, usage(1000, 100), provider=provider, host=host)


def test_importing_and_pricing_in_a_fresh_process_opens_no_socket() -> None:
    """From the import of genai-prices on (its updater module included): a fresh
    interpreter whose socket module refuses everything prices a few answers."""
    import subprocess
    import sys

    code = """
import socket
def refuse(*a, **k):
    raise SystemExit("network access: %r" % (a,))
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from llmproxy.pricing import Pricer
p = Pricer()
u = {"input_tokens": 100, "output_tokens": 10}
assert p.cost(route="r", provider="openai", upstream_host="api.openai.com",
              model="gpt-4o", usage=u, when=1.8e9) is not None
assert p.cost(route="r", provider="", upstream_host="x", model="zzz", usage=u, when=1.8e9) is None
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
