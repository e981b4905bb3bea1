"""Event timestamps: RFC 3339 in UTC with nanoseconds, and epoch nanoseconds
(tests: tests/unit/capture/test_events.py)."""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime

__all__ = ["epoch_ns", "rfc3339", "rfc3339_ns"]


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
