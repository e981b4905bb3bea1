"""The events' millisecond rounding (llmproxy/events/time.py): ``ms3``, ``ms3_each``
and ``s3`` give what ``round(x * 1000.0, 3)`` / ``round(x, 3)`` gave before them,
but for exact ties, below zero as above it."""

from __future__ import annotations

import math

from hypothesis import example, given
from hypothesis import strategies as st

from llmproxy.events.time import ms3, ms3_each, s3

# Offsets and durations of an exchange, either sign (a wall clock stepped back),
# up to ~11 days.
seconds = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


def _is_thousandths(value: float) -> bool:
    """``value`` is the float nearest to some integer / 1000."""
    return value == round(value * 1000) / 1000


def _near_half(x: float) -> bool:
    """``x`` lies at a tie of rounding to an integer (up to float error)."""
    return abs(abs(x - math.floor(x)) - 0.5) <= 1e-6 * max(1.0, abs(x))


@given(seconds)
@example(0.0003)
@example(-0.0000006)  # int() would give -0.0: it truncates towards zero
@example(-0.0012345678)
@example(0.0)
@example(1e6)
def test_ms3_is_milliseconds_to_the_microsecond(x: float) -> None:
    a = ms3(x)
    b = round(x * 1000.0, 3)
    assert abs(a - b) <= 0.001 + 4 * math.ulp(b)
    assert _is_thousandths(a)
    # The microsecond count is the nearest integer to x in microseconds.
    assert abs(a * 1000 - x * 1e6) <= 0.5 + 4 * math.ulp(x * 1e6)
    if abs(x) < 1000:
        assert abs(a * 1000 - round(a * 1000)) <= 1e-6
    if a != b:
        assert _near_half(x * 1e6)


@given(seconds)
def test_ms3_is_round_but_at_ties(x: float) -> None:
    if not _near_half(x * 1e6):
        assert ms3(x) == round(x * 1000.0, 3)


def test_ms3_rounds_below_zero_as_above() -> None:
    assert ms3(-0.0000006) == -0.001
    assert ms3(-0.0000004) == 0.0
    assert ms3(-1.2345678) == -1234.568
    assert ms3(1.2345678) == 1234.568


@given(st.lists(seconds, max_size=50))
def test_ms3_each_is_ms3_of_each(xs: list[float]) -> None:
    assert ms3_each(xs) == [ms3(x) for x in xs]
    assert ms3_each(iter(xs)) == [ms3(x) for x in xs]


@given(seconds)
@example(12.3456)
@example(-0.0006)
def test_s3_is_seconds_to_the_millisecond(x: float) -> None:
    a = s3(x)
    b = round(x, 3)
    assert abs(a - b) <= 0.001 + 4 * math.ulp(b)
    assert _is_thousandths(a)
    assert abs(a * 1000 - x * 1000) <= 0.5 + 4 * math.ulp(x * 1000)
    if not _near_half(x * 1000):
        assert a == b
