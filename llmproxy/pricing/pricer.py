"""The cost of an exchange, from its usage and a price table
(tests: tests/unit/pricing/test_pricer.py).

Prices come, first match wins, from:

1. the route's ``price_input`` / ``price_output`` / ``price_cache_read`` /
   ``price_cache_write`` keys (a negotiated price for everything on that route);
2. the ``[prices]`` section: ``MODEL = input 2.5, output 10, cache_read 1.25,
   cache_write 3.75`` (USD per million tokens; ``MODEL`` matches the model name
   case-insensitively, a trailing ``*`` matches names that start with the rest);
3. the installed genai-prices table, provider found from the upstream host
   (``api.openai.com``...), else the route's provider, else the model's name.

An OpenAI answer's ``service_tier`` (``flex``, ``priority``...; kept in its
usage, llmproxy/events/usage.py) selects the table's prices for that tier, as
genai-prices' ``price_context`` does; a tier the table does not name, and
prices from the ini, are the standard ones.

A model in none of them has no cost: ``cost`` is null in its event and the
exchange is counted in ``llmproxy_cost_unknown_total``; nothing fails.

The :class:`Pricer` runs in the capture pump, off the request path, once per
answer.  Each (host, provider, model) is looked up once and its rates kept
(llmproxy/pricing/rates.py), so pricing an answer is a dict lookup and a few
Decimal operations (``benchmarks/bench_pricing.py``).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from importlib.metadata import version
from typing import Any

import attrs
from genai_prices import data_snapshot
from genai_prices import types as gp

from llmproxy.config.model import RouteSettings, Settings
from llmproxy.pricing.rates import Rates, TieredRates, dated_prices, tiered_rates_of

__all__ = [
    "PRICE_KEYS",
    "TABLE_SOURCE",
    "TABLE_VERSION",
    "Override",
    "Pricer",
    "build_pricer",
    "parse_rates",
    "price_problems",
]

TABLE_SOURCE = "genai-prices"
TABLE_VERSION = version("genai-prices")
CONFIG_SOURCE = "config"
# The words of a price line, and the route keys: USD per million tokens.
PRICE_KEYS = ("input", "output", "cache_read", "cache_write")
_LINE_ITEM = re.compile(r"\s*([a-z_]+)\s*[ =:]\s*([^,\s]+)\s*")
# Keys of the lookup cache kept at most: models are few, but a client names them.
_MAX_LOOKUPS = 4096


def _table_tiers() -> frozenset[str]:
    """The service tiers some price of the installed table depends on: any other
    tier an answer names is priced as the standard one (and cannot grow the
    lookup cache)."""
    return frozenset(
        variant.when["service_tier"]
        for provider in data_snapshot.get_snapshot().providers
        for model in provider.models
        for variant in model.price_variants or ()
        if "service_tier" in variant.when
    )


TABLE_TIERS = _table_tiers()


def parse_rates(text: str) -> Rates:
    """``input 2.5, output 10[, cache_read 1.25][, cache_write 3.75]`` (USD per
    million tokens; cache prices default to the input price).  Raises ValueError."""
    found: dict[str, Decimal] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        m = _LINE_ITEM.fullmatch(item.lower())
        if m is None:
            raise ValueError(f"{item.strip()!r} is not 'KIND PRICE'")
        kind, number = m.groups()
        if kind not in PRICE_KEYS:
            raise ValueError(f"unknown price kind {kind!r} (one of {', '.join(PRICE_KEYS)})")
        if kind in found:
            raise ValueError(f"{kind} given twice")
        found[kind] = _price(number)
    for kind in ("input", "output"):
        if kind not in found:
            raise ValueError(f"missing the {kind} price (USD per million tokens)")
    return Rates(
        input=found["input"],
        cache_read=found.get("cache_read", found["input"]),
        cache_write=found.get("cache_write", found["input"]),
        output=found["output"],
    )


def _price(text: str) -> Decimal:
    try:
        value = Decimal(text.strip().lstrip("$"))
    except InvalidOperation:
        raise ValueError(f"{text.strip()!r} is not a number") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"{text.strip()!r} is not a price (a number >= 0)")
    return value


def route_rates(route: RouteSettings) -> Rates | None:
    """The route's own prices (``price_*`` keys), None when it has none.  Raises ValueError."""
    given = {
        kind: getattr(route, f"price_{kind}")
        for kind in PRICE_KEYS
        if getattr(route, f"price_{kind}").strip()
    }
    if not given:
        return None
    return parse_rates(", ".join(f"{kind} {value}" for kind, value in given.items()))


@attrs.frozen
class Override:
    """A ``[prices]`` line: ``model`` (lower case; ``prefix`` when it ended in ``*``)."""

    model: str
    prefix: bool
    rates: Rates

    def matches(self, model: str) -> bool:
        return model.startswith(self.model) if self.prefix else model == self.model


def price_problems(settings: Settings) -> list[str]:
    """``section.key: reason`` lines for ``check-config``."""
    problems = []
    for name, text in settings.prices.items():
        try:
            parse_rates(text)
        except ValueError as e:
            problems.append(f"prices.{name}: {e}")
        if not name.rstrip("*").strip():
            problems.append(f"prices.{name}: a model name, or a prefix and '*'")
    for route in settings.routes:
        for kind in PRICE_KEYS:
            value = getattr(route, f"price_{kind}")
            if value.strip():
                try:
                    _price(value)
                except ValueError as e:
                    problems.append(f"route:{route.name}.price_{kind}: {e}")
        given = [k for k in PRICE_KEYS if getattr(route, f"price_{k}").strip()]
        if given and not {"input", "output"} <= set(given):
            problems.append(
                f"route:{route.name}.price_input: price_input and price_output go together "
                "(USD per million tokens)"
            )
    return problems


_Priced = tuple[Rates | TieredRates, str, str | None, str]  # rates, source, version, priced as


class _Dated:
    """A table model whose price changes on given dates."""

    __slots__ = ("context", "model", "priced_as", "prices", "provider", "rates", "starts")

    def __init__(
        self,
        provider: gp.Provider,
        model: gp.ModelInfo,
        context: Mapping[str, str] | None = None,
    ) -> None:
        self.provider = provider
        self.model = model
        self.context = context
        self.priced_as = f"{provider.id}:{model.id}"
        if context is not None:
            self.priced_as += f"@{context['service_tier']}"
        dated = dated_prices(model, context)
        if dated is None:
            self.starts: Sequence[float] = ()
            self.rates: list[Rates | TieredRates] = []
        else:
            self.starts = dated[0]
            self.rates = [tiered_rates_of(p) for p in dated[1]]

    def at(self, when: float) -> Rates | TieredRates:
        if self.starts:
            return self.rates[bisect.bisect_right(self.starts, when) - 1]
        # Prices by time of day: genai-prices decides, per answer (rare: not
        # OpenAI or Anthropic models).
        prices = self.model.get_prices(datetime.fromtimestamp(when, UTC), self.context)
        return tiered_rates_of(prices)


class Pricer:
    """Prices response events: :meth:`cost` gives the event's ``cost`` object."""

    def __init__(
        self,
        *,
        routes: Mapping[str, Rates] | None = None,
        overrides: Sequence[Override] = (),
        table: bool = True,
    ) -> None:
        self._routes = dict(routes or {})
        self._overrides = tuple(overrides)
        self._table = table
        self._found: dict[tuple[str, str, str, str, str | None], _Dated | _Priced | None] = {}

    def cost(
        self,
        *,
        route: str,
        provider: str,
        upstream_host: str,
        model: str | None,
        usage: Mapping[str, Any] | None,
        when: float,
        cache_hit: bool = False,
    ) -> dict[str, Any] | None:
        """The ``cost`` object of an answer with ``usage`` (an event's usage dict),
        or None: no usage, or a model without a price."""
        if usage is None:
            return None
        if cache_hit:
            # Answered by the proxy: the provider was not asked and charges nothing.
            return {
                "total": 0.0,
                "input": 0.0,
                "output": 0.0,
                "currency": "USD",
                "source": "cache",
                "version": None,
                "priced_as": None,
            }
        if not model:
            return None
        tier = usage.get("service_tier")
        if type(tier) is not str or tier not in TABLE_TIERS:
            tier = None
        found = self._lookup(route, provider, upstream_host, model, tier)
        if found is None:
            return None
        table_version: str | None
        if isinstance(found, _Dated):
            rates: Rates | TieredRates = found.at(when)
            source, table_version = TABLE_SOURCE, TABLE_VERSION
            priced_as = found.priced_as
        else:
            rates, source, table_version, priced_as = found
        n_in = _count(usage.get("input_tokens"))
        if isinstance(rates, TieredRates):
            rates = rates.rates_for(n_in)
        price_in, price_out, total = rates.cost_usd(
            n_in,
            _count(usage.get("output_tokens")),
            _count(usage.get("cache_read_tokens")),
            _count(usage.get("cache_creation_tokens")),
        )
        return {
            "total": total,
            "input": price_in,
            "output": price_out,
            "currency": "USD",
            "source": source,
            "version": table_version,
            "priced_as": priced_as,
        }

    def _lookup(
        self, route: str, provider: str, upstream_host: str, model: str, tier: str | None
    ) -> _Dated | _Priced | None:
        key = (route, provider, upstream_host, model, tier)
        try:
            return self._found[key]
        except KeyError:
            pass
        found = self._find(route, provider, upstream_host, model, tier)
        if len(self._found) < _MAX_LOOKUPS:
            self._found[key] = found
        return found

    def _find(
        self, route: str, provider: str, upstream_host: str, model: str, tier: str | None
    ) -> _Dated | _Priced | None:
        rates = self._routes.get(route)
        if rates is not None:
            return rates, CONFIG_SOURCE, f"route:{route}", model
        name = model.lower()
        for override in self._overrides:
            if override.matches(name):
                label = override.model + ("*" if override.prefix else "")
                return override.rates, CONFIG_SOURCE, f"prices.{label}", model
        if not self._table:
            return None
        snapshot = data_snapshot.get_snapshot()
        attempts: list[tuple[str | None, str | None]] = []
        if upstream_host:
            attempts.append((None, f"https://{upstream_host}"))
        if provider:
            attempts.append((provider, None))
        attempts.append((None, None))
        for provider_id, api_url in attempts:
            try:
                found_provider, found_model = snapshot.find_provider_model(
                    model, None, provider_id, api_url
                )
            except LookupError:
                continue
            # genai-prices applies a context to a model of the provider it found
            # only; a tier without prices of its own ("default") is the standard.
            context = None
            if (
                tier is not None
                and any(found_model is m for m in found_provider.models)
                and any(
                    v.when.get("service_tier") == tier
                    and any(p is not None for p in vars(v.prices).values())
                    for v in found_model.price_variants or ()
                )
            ):
                context = {"service_tier": tier}
            return _Dated(found_provider, found_model, context)
        return None


def _count(value: Any) -> int:
    return value if type(value) is int and value > 0 else 0


def build_pricer(settings: Settings) -> Pricer:
    """The pricer of ``settings`` (checked by :func:`price_problems` at load time:
    a line that does not parse here is left out)."""
    routes: dict[str, Rates] = {}
    for route in settings.routes:
        try:
            rates = route_rates(route)
        except ValueError:
            continue
        if rates is not None:
            routes[route.name] = rates
    overrides = []
    for name, text in settings.prices.items():
        try:
            rates = parse_rates(text)
        except ValueError:
            continue
        pattern = name.strip().lower()
        prefix = pattern.endswith("*")
        overrides.append(Override(pattern.rstrip("*"), prefix, rates))
    # Exact names before prefixes, longer prefixes before shorter.
    overrides.sort(key=lambda o: (o.prefix, -len(o.model)))
    # The table's first read imports and builds it (~30 ms here): at start, not
    # on the reactor while the first answers are priced.
    data_snapshot.get_snapshot()
    return Pricer(routes=routes, overrides=overrides)
