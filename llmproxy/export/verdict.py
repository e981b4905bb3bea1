"""How a sink says how a batch went (tests: tests/unit/export/test_exporter.py).

A sink answers every batch with a *verdict*, and the delivery engine
(:mod:`llmproxy.export.exporter`) acts on it:

- ``Delivered(rejected={index: reason})`` — the batch arrived; the events listed in
  ``rejected`` were refused for good (they go to the dead-letter file);
- ``Retry(reason, after)`` — try the whole batch again later, not before ``after``
  seconds when the server said so (``Retry-After``);
- ``Rejected(reason)`` — the whole batch is refused for good (dead-letter file,
  never retried).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

import attrs

__all__ = ["Delivered", "Rejected", "Retry", "Verdict"]


@attrs.frozen
class Delivered:
    """The batch arrived.  ``rejected`` maps batch indexes to permanent per-event errors."""

    rejected: Mapping[int, str] = attrs.field(factory=dict)


@attrs.frozen
class Retry:
    """Send the whole batch again later; ``after`` is the server's Retry-After in seconds."""

    reason: str
    after: float | None = None


@attrs.frozen
class Rejected:
    """The whole batch is refused for good: dead-letter it, never retry it."""

    reason: str


Verdict: TypeAlias = Delivered | Retry | Rejected
