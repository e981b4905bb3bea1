"""Lua scripts run by their SHA, sent whole once Redis has forgotten them
(tests: tests/unit/state/test_redis_state.py).

Every shared-state operation that reads and then writes is one script, so it is
atomic across every process and host (Redis runs one script at a time) and costs
one round trip.  :meth:`Script.run` sends ``EVALSHA``; a Redis that does not
know the script (a restart, ``SCRIPT FLUSH``, a failover) answers ``NOSCRIPT``
and gets the ``EVAL`` of the whole body instead, which also caches it again.

The scripts build no key names of their own beyond those derived from the ones
they are given, and expect a single Redis (or a primary with replicas), not a
Redis Cluster.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from llmproxy.interfaces import RedisExecutor
from llmproxy.redis.connection import is_response_error

__all__ = ["Script"]

Arg = bytes | str | int | float


@attrs.frozen
class Script:
    """One Lua script: its name (for messages), body and SHA-1."""

    name: str
    body: bytes
    sha: bytes = attrs.field(init=False)

    @sha.default
    def _sha(self) -> bytes:
        return hashlib.sha1(self.body, usedforsecurity=False).hexdigest().encode()

    def run(
        self,
        redis: RedisExecutor,
        keys: Sequence[Arg],
        args: Sequence[Arg],
        timeout: float | None = None,
    ) -> Deferred[Any]:
        """The script's reply; fails as ``redis.execute`` does."""
        if timeout is None:
            d = redis.execute(b"EVALSHA", self.sha, len(keys), *keys, *args)
        else:
            d = redis.execute(b"EVALSHA", self.sha, len(keys), *keys, *args, timeout=timeout)

        def unknown(failure: Failure) -> Any:
            if not is_response_error(failure, "NOSCRIPT"):
                return failure
            if timeout is None:
                return redis.execute(b"EVAL", self.body, len(keys), *keys, *args)
            return redis.execute(b"EVAL", self.body, len(keys), *keys, *args, timeout=timeout)

        return d.addErrback(unknown)
