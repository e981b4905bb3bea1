"""Event timestamps: RFC 3339 in UTC with nanoseconds, and epoch nanoseconds; and
the events' durations and offsets, in milliseconds to the microsecond
(tests: tests/unit/events/test_time.py, tests/unit/capture/test_events.py)."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from math import floor

__all__ = ["epoch_ns", "ms3", "ms3_each", "rfc3339", "rfc3339_ns", "s3"]


@functools.lru_cache(maxsize=1024)
def _utc_second(second: int) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    except (OverflowError, OSError, ValueError):
        return "1970-01-01T00:00:00"


# The last stamp made: an exchange's start is asked for twice in a row (its
# request side, then its session event).
_last_stamp: tuple[int, str] = (-1, "")


def rfc3339_ns(ns: int) -> str:
    """Epoch nanoseconds -> ``2026-11-23T07:40:12.123456789Z``."""
    global _last_stamp
    last = _last_stamp
    if last[0] == ns:
        return last[1]
    second, fraction = divmod(ns, 1_000_000_000)
    text = f"{_utc_second(second)}.{fraction:09d}Z"
    _last_stamp = (ns, text)
    return text


def epoch_ns(seconds: float) -> int:
    # Through microseconds: a float epoch holds no more, and scaling it by 1e9
    # directly would invent digits past 2**53.
    return round(seconds * 1_000_000) * 1000


def rfc3339(epoch_seconds: float) -> str:
    """``2026-11-23T07:40:12.123456Z`` for an epoch time (microseconds)."""
    when = datetime.fromtimestamp(epoch_seconds, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# Rounding to three decimals.  ``round(x, 3)`` goes through a correctly rounded
# decimal conversion (~0.7 µs a value on CPython 3.11 here); a multiply, ``floor``
# and a divide cost ~0.15-0.2 µs, and a stream's event rounds an offset per read
# (101 for the recorded 100-chunk reply).  ``floor``, not ``int``: ``int``
# truncates towards zero, which is wrong below zero (a wall clock stepped back
# can make an offset negative), and ``floor`` is no slower.  The result is
# ``n / 1000`` for the integer ``n`` nearest to ``x * 1000`` (ties up): the float
# ``round(x, 3)`` gives, but for exact ties and one-ulp differences in the product.


def ms3(seconds: float) -> float:
    """Seconds -> milliseconds to the microsecond: ``0.00123456`` -> ``1.235``.

    ``round(seconds * 1000.0, 3)`` but for exact half-microsecond ties, which
    round up here; right for negative seconds too.  ``seconds`` is finite.
    """
    return floor(seconds * 1e6 + 0.5) / 1000


def ms3_each(seconds: Iterable[float]) -> list[float]:
    """``[ms3(s) for s in seconds]`` without a call per item (a stream's offsets)."""
    return [floor(s * 1e6 + 0.5) / 1000 for s in seconds]


def s3(seconds: float) -> float:
    """Seconds to the millisecond: ``round(seconds, 3)`` as :func:`ms3` rounds."""
    return floor(seconds * 1000.0 + 0.5) / 1000
