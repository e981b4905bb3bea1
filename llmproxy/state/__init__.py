"""What the proxy processes share: ``[state] store = local | redis``
(tests: tests/unit/state/, tests/integration/test_shared_state.py).

With ``local`` (the default) each process keeps its own token usage counts,
rate buckets and session tracker: exact for one process.  With ``redis`` every
worker of every host keeps them in one Redis (``[redis] url``), so N workers on
M hosts behave as one proxy:

- token quotas and rate limits: :mod:`llmproxy.state.counters` (one atomic
  check-and-count per request, the checks of one reactor turn in one round trip);
- the token set: :mod:`llmproxy.state.registry` (each process polls a version
  key every half second);
- sessions: :mod:`llmproxy.state.sessions` (the tracker's operations run in Redis,
  off the request path);
- the response cache's coalescing of identical misses across processes lives
  with the Redis cache store (llmproxy/cache/redis_store.py).

:class:`SharedState` is one process's connection to all of it, and
:mod:`llmproxy.state.health` what happens while Redis does not answer
(``[state] on_unavailable``).
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred

from llmproxy.config.model import Settings
from llmproxy.deferreds import within
from llmproxy.interfaces import RedisClient
from llmproxy.state.counters import RedisCounters
from llmproxy.state.health import StateHealth
from llmproxy.state.registry import RedisRegistry
from llmproxy.state.sessions import RedisSessionState

__all__ = ["STORES", "SharedState", "build_shared_state", "state_problems"]

STORES = ("local", "redis")


@attrs.define(eq=False)
class SharedState:
    """One process's Redis connection for the shared state, and what runs on it."""

    redis: RedisClient
    _clock: Any
    prefix: str = attrs.field(kw_only=True)
    _session_ttl: float = attrs.field(kw_only=True)
    health: StateHealth = attrs.field(kw_only=True)
    counters: RedisCounters = attrs.field(init=False)
    tokens: RedisRegistry = attrs.field(init=False)
    sessions: RedisSessionState = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.counters = RedisCounters(self.redis, self._clock, self.prefix)
        self.tokens = RedisRegistry(self.redis, self.prefix, "tokens")
        self.sessions = RedisSessionState(self.redis, self.prefix, self._session_ttl)

    @property
    def usable(self) -> bool:
        return self.redis.usable

    def start(self) -> None:
        self.redis.start()

    def stop(self, timeout: float) -> Deferred[None]:
        # The charges still held for this turn go out, and are answered (within
        # the timeout), before the connection closes.
        charged = within(self.counters.flush(), timeout, self._clock)
        return charged.addCallback(lambda _: self.redis.stop())


def build_shared_state(settings: Settings, reactor: Any, health: StateHealth) -> SharedState | None:
    """The process's shared state, or None with ``[state] store = local``.  Call
    ``start()`` when the service starts and ``stop()`` after the last user."""
    state = settings.state
    if state.store != "redis":
        return None
    from llmproxy.redis.connection import RedisConnection, parse_redis_url

    connection = RedisConnection(
        reactor, parse_redis_url(settings.redis.url), state.timeout, "llmproxy-state"
    )
    return SharedState(
        connection, reactor, prefix=state.prefix, session_ttl=state.session_ttl, health=health
    )


def state_problems(settings: Settings) -> list[str]:
    """What is wrong with ``[state]``, as ``section.key: reason`` lines."""
    state = settings.state
    problems = []
    for key in ("timeout", "session_ttl"):
        if getattr(state, key) <= 0:
            problems.append(f"state.{key}: must be greater than 0")
    if state.spend_rows < 1:
        problems.append("state.spend_rows: must be 1 or more")
    if not state.prefix or any(c.isspace() for c in state.prefix):
        problems.append("state.prefix: must be a non-empty name without spaces")
    return problems
