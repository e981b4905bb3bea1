"""Short-lived commands against the shared state (``[state] store = redis``):
``llmproxy token`` and ``llmproxy spend`` (tests: tests/integration/test_shared_state.py,
tests/unit/access/test_shared_spend.py).

:func:`run_on_shared_state` connects to ``[redis] url`` on a reactor of its own,
runs one piece of work against the process's :class:`~llmproxy.state.SharedState`
and stops.  A Redis that does not answer within the deadline is a
:class:`SharedStateError` naming the URL without its credentials; :func:`failed`
is the one line a command prints for any error (no traceback, no secret).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

from llmproxy.config.model import Settings

if TYPE_CHECKING:
    from llmproxy.state import SharedState

__all__ = ["SharedStateError", "failed", "run_on_shared_state", "shared_state_url"]

_T = TypeVar("_T")


class SharedStateError(Exception):
    """Redis did not answer a command's work."""


def shared_state_url(settings: Settings) -> str:
    """``[redis] url`` as it may be shown: without user name or password."""
    from llmproxy.redis.connection import parse_redis_url

    return parse_redis_url(settings.redis.url).safe


def run_on_shared_state(settings: Settings, work: Callable[[SharedState], Awaitable[_T]]) -> _T:
    """Run ``work`` against the shared state, on a reactor of its own (the commands
    are short-lived processes): its result, or its exception raised here."""
    from twisted.internet import reactor

    from llmproxy.redis.connection import RedisConnection, parse_redis_url
    from llmproxy.state import SharedState
    from llmproxy.state.health import StateHealth

    r: Any = reactor
    url = parse_redis_url(settings.redis.url)
    # A person waits for this: the bus's longer deadline, not the request path's.
    timeout = max(settings.state.timeout, settings.redis.timeout)
    connection = RedisConnection(r, url, timeout, "llmproxy-cli")
    state = SharedState(
        connection,
        r,
        prefix=settings.state.prefix,
        session_ttl=settings.state.session_ttl,
        health=StateHealth(r),
    )
    outcome: list[Any] = []

    async def run() -> None:
        ready: defer.Deferred[None] = defer.Deferred()

        def connected() -> None:
            if not ready.called:
                ready.callback(None)

        connection.when_ready(connected)
        connection.start()
        try:
            await ready.addTimeout(timeout, r)
        except defer.TimeoutError:
            raise SharedStateError(
                f"the shared state at {url.safe} does not answer ([state] store = redis)"
            ) from None
        outcome.append(await work(state))

    def done(result: object) -> None:
        if isinstance(result, Failure):
            outcome.append(result)
        connection.stop().addBoth(lambda _: r.stop())

    defer.ensureDeferred(run()).addBoth(done)
    r.run(installSignalHandlers=False)
    found = outcome[0] if outcome else SharedStateError("no answer")
    if isinstance(found, Failure):
        found.raiseException()
    if isinstance(found, BaseException):
        raise found
    result: _T = found
    return result


def failed(error: Exception) -> str:
    """One line for a command that could not be done (no traceback, no secret)."""
    from llmproxy.access.tokens import TokenFileError
    from llmproxy.redis.connection import RedisUnavailable

    if isinstance(error, (SharedStateError, TokenFileError)):
        return str(error)
    if isinstance(error, RedisUnavailable):
        return f"the shared state (Redis) did not answer: {error}"
    return f"{type(error).__name__}: {error}"
