"""Per-token request rate limits: a token bucket per token on the injected clock
(tests: tests/unit/access/test_policy.py).

``rpm = N`` allows a burst of up to N requests at once and N per minute
sustained: the bucket holds N and refills at N/60 per second.  A request that
finds the bucket empty is refused with the seconds until one request's worth has
refilled, which becomes the ``Retry-After`` of the 429.
"""

from __future__ import annotations

import math

import attrs

__all__ = ["RateLimiter", "TokenBucket", "retry_after_seconds"]


@attrs.define
class TokenBucket:
    rpm: int
    _level: float
    _stamp: float

    @classmethod
    def full(cls, rpm: int, now: float) -> TokenBucket:
        return cls(rpm, float(rpm), now)

    def take(self, now: float) -> float:
        """Take one request; 0.0 when allowed, else the seconds to wait."""
        rate = self.rpm / 60.0
        # A clock that steps back (NTP) must not drain the bucket.
        elapsed = max(0.0, now - self._stamp)
        self._level = min(float(self.rpm), self._level + elapsed * rate)
        self._stamp = now
        if self._level >= 1.0:
            self._level -= 1.0
            return 0.0
        return (1.0 - self._level) / rate


@attrs.define
class RateLimiter:
    """One bucket per token id; a changed ``rpm`` (token replaced) starts a new bucket."""

    _buckets: dict[str, TokenBucket] = attrs.Factory(dict)

    def take(self, token_id: str, rpm: int, now: float) -> float:
        bucket = self._buckets.get(token_id)
        if bucket is None or bucket.rpm != rpm:
            bucket = self._buckets[token_id] = TokenBucket.full(rpm, now)
        return bucket.take(now)

    def forget_all_but(self, token_ids: set[str]) -> None:
        for gone in self._buckets.keys() - token_ids:
            del self._buckets[gone]


def retry_after_seconds(wait: float) -> int:
    """Whole seconds for ``Retry-After``: rounded up, at least 1."""
    return max(1, math.ceil(wait - 1e-9))
