"""Whether the shared state answers, part by part, and what was done when it did
not (tests: tests/unit/state/test_health.py).

Three parts use Redis as shared state, each with its own policy when Redis does
not answer (no connection, no reply within ``[state] timeout``, an error):

- ``access``: token quotas, rate limits and the token set.  ``[state]
  on_unavailable = fail_closed`` (the default) answers requests on token routes
  with 503; ``fail_open`` lets them through on the token set last read,
  uncounted by Redis (the requests are added to the shared counts once Redis
  answers again);
- ``sessions``: always open: the process's own tracker state (and its journal)
  decides, so conversations continue within the process;
- ``coalescing``: always open: a miss goes upstream without waiting for other
  processes.

Each part is *up* until an operation fails and *down* until one succeeds again.
A transition is logged once (never per request), every decision taken while
down is counted per part and outcome, and ``llmproxy_state_connected{part}`` is
1 while the part is up.  Recovery needs nothing: the connection reconnects with
backoff and the next operation that succeeds brings the part up.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["PARTS", "StateHealth"]

log = Logger()

PARTS = ("access", "sessions", "coalescing")
# What each part does while Redis does not answer, for the log line.
_WHILE_DOWN = {
    ("access", "fail_closed"): "requests on token routes are answered 503 "
    "(on_unavailable = fail_closed)",
    ("access", "fail_open"): "requests on token routes pass on the token set last read, "
    "counted in Redis once it is back (on_unavailable = fail_open)",
    ("sessions", "fail_closed"): "sessions are tracked by this process alone",
    ("sessions", "fail_open"): "sessions are tracked by this process alone",
    ("coalescing", "fail_closed"): "cache misses are coalesced within this process only",
    ("coalescing", "fail_open"): "cache misses are coalesced within this process only",
}


class StateHealth:
    """Up or down per part, transitions logged once, decisions while down counted."""

    def __init__(self, clock: IReactorTime, policy: str = "fail_closed") -> None:
        self._clock = clock
        self.policy = policy
        self._down_since: dict[str, float] = {}
        self._parts: set[str] = set()
        # (part, outcome) -> decisions taken while the part was down
        self.decisions: dict[tuple[str, str], int] = {}
        self.outages: dict[str, int] = {}

    def watch(self, part: str) -> None:
        """``part`` is in use by this process (reported in stats and metrics)."""
        self._parts.add(part)

    def up(self, part: str) -> bool:
        return part not in self._down_since

    def failed(self, part: str, outcome: str | None, why: str) -> None:
        """An operation of ``part`` failed; ``outcome``: what was done instead
        (``refused``, ``admitted``, ``local``), None when nothing was decided
        (a background poll)."""
        if outcome is not None:
            key = (part, outcome)
            self.decisions[key] = self.decisions.get(key, 0) + 1
        if part in self._down_since:
            return
        self._parts.add(part)
        self._down_since[part] = self._clock.seconds()
        self.outages[part] = self.outages.get(part, 0) + 1
        log.warn(
            "shared state ({part}): Redis unavailable ({why}); {action}",
            part=part,
            why=why[:200],
            action=_WHILE_DOWN.get((part, self.policy), "falling back"),
        )

    def succeeded(self, part: str) -> None:
        """An operation of ``part`` succeeded (cheap when the part is up)."""
        if part not in self._down_since:
            return
        since = self._down_since.pop(part)
        log.info(
            "shared state ({part}): Redis answers again after {down:.1f}s",
            part=part,
            down=self._clock.seconds() - since,
        )

    def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for part in sorted(self._parts):
            counts = {o: n for (p, o), n in self.decisions.items() if p == part}
            out[part] = {
                "connected": int(self.up(part)),
                "outages": self.outages.get(part, 0),
                **{f"unavailable_{o}": n for o, n in sorted(counts.items())},
            }
        return out

    def families(self) -> Iterator[Metric]:
        connected = GaugeMetricFamily(
            "llmproxy_state_connected",
            "1 while the shared state (Redis) answers this part",
            labels=["part"],
        )
        for part in sorted(self._parts):
            connected.add_metric([part], 1.0 if self.up(part) else 0.0)
        yield connected
        decided = CounterMetricFamily(
            "llmproxy_state_unavailable",
            "Decisions taken while the shared state did not answer, by part and outcome",
            labels=["part", "outcome"],
        )
        for (part, outcome), n in sorted(self.decisions.items()):
            decided.add_metric([part, outcome], float(n))
        yield decided
        outages = CounterMetricFamily(
            "llmproxy_state_outages",
            "Times a part of the shared state went from answering to not",
            labels=["part"],
        )
        for part, n in sorted(self.outages.items()):
            outages.add_metric([part], float(n))
        yield outages
