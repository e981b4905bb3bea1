"""Prices of one model as a handful of numbers, read once from genai-prices
(tests: tests/unit/pricing/test_rates.py).

``genai_prices.calc_price`` costs ~90-200 µs per call: it finds the provider
and model, then decomposes the usage into priced units through its unit
registry.  The proxy prices every answer, so it looks a model up once and keeps
its prices as :class:`Rates`: USD per million tokens for each kind of token our
usage tells apart (uncached input, cache reads, cache writes, output) and a
price per request.  A price is linear in the token counts (and piecewise
linear for tiered prices, whose tier is chosen by the total input), so the
rates are *measured* by asking genai-prices' own ``ModelPrice.calc_price`` for
a few probe usages: whatever its decomposition does (a model without a
cache-read price charges cache reads as input...), the rates say the same, and
:meth:`Rates.cost` equals ``calc_price`` to the last decimal digit.

Nothing here fetches anything: the prices are those of the installed
genai-prices (``genai_prices.data``); an update is a package upgrade.  Its
updater (``genai_prices.UpdatePrices``) is never started.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import attrs
from genai_prices import types as gp

__all__ = ["MTOK", "Rates", "TieredRates", "dated_prices", "rates_of", "tiered_rates_of"]

MTOK = Decimal(1_000_000)
_ZERO = Decimal(0)


@attrs.frozen
class Rates:
    """USD per million tokens of each kind, and USD per request."""

    input: Decimal  # uncached input tokens
    cache_read: Decimal
    cache_write: Decimal
    output: Decimal
    request: Decimal = _ZERO
    # The same as floats, for the pricer: Decimal arithmetic cost ~2 µs per
    # answer, floats ~0.3 µs (and agree to ~1e-15 relative).
    _floats: tuple[float, float, float, float, float] = attrs.field(
        init=False, eq=False, repr=False
    )

    def __attrs_post_init__(self) -> None:
        floats = (self.input, self.cache_read, self.cache_write, self.output, self.request)
        object.__setattr__(self, "_floats", tuple(float(x) for x in floats))

    def cost_usd(
        self, input_tokens: int, output_tokens: int, cache_read: int, cache_write: int
    ) -> tuple[float, float, float]:
        """:meth:`cost` in floats."""
        p_in, p_read, p_write, p_out, p_request = self._floats
        uncached = input_tokens - cache_read - cache_write
        if uncached < 0:
            uncached = 0
        price_in = (uncached * p_in + cache_read * p_read + cache_write * p_write) / 1e6
        price_out = output_tokens * p_out / 1e6
        return price_in, price_out, price_in + price_out + p_request

    def cost(
        self, input_tokens: int, output_tokens: int, cache_read: int, cache_write: int
    ) -> tuple[Decimal, Decimal, Decimal]:
        """``(input, output, total)`` USD.  ``input_tokens`` counts all input,
        cached included (as our usage and genai-prices both do)."""
        uncached = input_tokens - cache_read - cache_write
        if uncached < 0:
            uncached = 0
        price_in = (
            uncached * self.input + cache_read * self.cache_read + cache_write * self.cache_write
        ) / MTOK
        price_out = output_tokens * self.output / MTOK
        return price_in, price_out, price_in + price_out + self.request


@attrs.frozen
class TieredRates:
    """Rates by band of total input tokens: ``bands[i]`` applies while the input
    is above ``starts[i - 1]`` (genai-prices' rule: crossing a tier's start
    prices every token at the tier's rate)."""

    starts: tuple[int, ...]
    bands: tuple[Rates, ...]

    def rates_for(self, input_tokens: int) -> Rates:
        return self.bands[bisect.bisect_left(self.starts, input_tokens)]


def _total(model_price: gp.ModelPrice, **usage: int) -> tuple[Decimal, Decimal, Decimal]:
    price = model_price.calc_price(gp.Usage(**usage))
    return price["input_price"], price["output_price"], price["total_price"]


def rates_of(model_price: gp.ModelPrice) -> Rates:
    """Measure the rates of a price without tiers (see the module's docstring)."""
    m = 1_000_000
    _, _, base = _total(model_price)
    in_only, _, _ = _total(model_price, input_tokens=m)
    _, out_only, _ = _total(model_price, output_tokens=m)
    read, _, _ = _total(model_price, input_tokens=m, cache_read_tokens=m)
    write, _, _ = _total(model_price, input_tokens=m, cache_write_tokens=m)
    return Rates(input=in_only, cache_read=read, cache_write=write, output=out_only, request=base)


def _at(value: Any, input_tokens: int) -> Any:
    """A tiered price's rate for ``input_tokens`` of total input; a plain price as is."""
    if not isinstance(value, gp.TieredPrices):
        return value
    rate = value.base
    for tier in reversed(value.tiers):
        if input_tokens > tier.start:
            rate = tier.price
            break
    return rate


def tiered_rates_of(model_price: gp.ModelPrice) -> Rates | TieredRates:
    """:class:`Rates`, or per band of input tokens when some price has tiers."""
    prices = {k: v for k, v in vars(model_price).items() if not k.startswith("_")}
    starts = sorted(
        {t.start for v in prices.values() if isinstance(v, gp.TieredPrices) for t in v.tiers}
    )
    if not starts:
        return rates_of(model_price)
    bands = []
    for band in range(len(starts) + 1):
        at = 0 if band == 0 else starts[band - 1] + 1
        plain = gp.ModelPrice(**{k: _at(v, at) for k, v in prices.items()})
        bands.append(rates_of(plain))
    return TieredRates(tuple(starts), tuple(bands))


def dated_prices(
    model: gp.ModelInfo, context: Mapping[str, str] | None = None
) -> tuple[Sequence[float], Sequence[gp.ModelPrice]] | None:
    """A model's prices by start date (epoch seconds, ascending), when they change
    only on dates; None when some price depends on the time of day.  With
    ``context`` (``{"service_tier": "flex"}``), the prices of the variants that
    match it (genai-prices' ``price_context``), which start on dates of their own."""
    if context is None and isinstance(model.prices, gp.ModelPrice):
        return (float("-inf"),), (model.prices,)
    listed: list[tuple[float, gp.ModelPrice]] = []
    conditionals = [] if isinstance(model.prices, gp.ModelPrice) else model.prices
    for conditional in conditionals:
        constraint = conditional.constraint
        if constraint is None:
            listed.append((float("-inf"), conditional.prices))
        elif isinstance(constraint, gp.StartDateConstraint):
            listed.append((_epoch(constraint.start_date), conditional.prices))
        else:
            return None
    starts_at = {s for s, _ in listed if s != float("-inf")}
    if context is not None:
        for variant in model.price_variants or ():
            if not all(context.get(k) == v for k, v in variant.when.items()):
                continue
            constraint = variant.constraint
            if isinstance(constraint, gp.StartDateConstraint):
                starts_at.add(_epoch(constraint.start_date))
            elif constraint is not None:
                return None
    # genai-prices' rule: the last listed entry whose start has come, else the
    # first entry (then the variants' overrides).  It changes only at the start
    # dates: evaluate it once per span.
    starts = [float("-inf"), *sorted(starts_at)]
    if context is not None:
        return starts, [model.get_prices(_moment(span), context) for span in starts]
    chosen = []
    for span in starts:
        price = conditionals[0].prices
        for since, candidate in reversed(listed):
            if since <= span:
                price = candidate
                break
        chosen.append(price)
    return starts, chosen


def _moment(epoch: float) -> datetime:
    """``epoch`` as genai-prices' request timestamp (-inf: before every start date)."""
    if epoch == float("-inf"):
        return datetime(1970, 1, 1, tzinfo=UTC)
    return datetime.fromtimestamp(epoch, UTC)


def _epoch(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
