"""Proxy tokens with ``[state] store = redis``: one token set, one quota count and
one rate bucket per token for every process and host (tests:
tests/unit/access/test_shared.py, tests/integration/test_shared_state.py).

- **The token set** lives in Redis (:class:`llmproxy.state.registry.RedisRegistry`
  ``tokens``): each token's stored form (its digest, never the secret) as a
  record, its revocation as the record's note.  ``llmproxy token create|revoke``
  writes there; every process polls the registry's version every
  :data:`POLL_INTERVAL` and takes the whole set when it changed, so a new or
  revoked token is seen everywhere within a second.  At its first contact a
  process adds the tokens of its ``tokens.json`` that Redis does not know yet
  (never replacing one, never lifting a revocation), so switching a running
  setup to ``store = redis`` keeps its tokens; and the counts of its own
  ``token-usage.json``, once per machine and file.
- **Quotas and rate limits**: a token with ``max_requests`` or ``rpm`` is
  admitted by one atomic :meth:`~llmproxy.state.counters.RedisCounters.admit`
  (the count checked against the quota, then one request taken from the bucket,
  then the count added): never more than ``max_requests`` requests get through,
  however many processes ask at once, and a process that dies after the
  admission has counted it.  The answers are today's: 403 for a spent quota,
  429 with ``Retry-After`` for an empty bucket.
- **Tokens without limits** cost no round trip: their requests are counted in
  memory and added to their Redis counts every :data:`FLUSH_INTERVAL` (for
  ``llmproxy token list``).

While Redis does not answer (``[state] on_unavailable``): ``fail_closed``
answers 503 to requests on token routes, ``fail_open`` lets them through on the
token set last read and adds them to the shared counts once Redis is back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Unpack

import attrs
import orjson
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.access.tokens import (
    Token,
    TokenFile,
    TokenFileError,
    TokenTerms,
    UnknownToken,
    UsageFile,
    new_token,
)
from llmproxy.state import SharedState
from llmproxy.state.counters import Admission, BucketTake, CounterCheck
from llmproxy.state.registry import Snapshot

__all__ = [
    "FLUSH_INTERVAL",
    "POLL_INTERVAL",
    "SharedTokenStore",
    "SharedTokens",
    "quota_key",
    "rate_key",
    "token_from_registry",
    "token_to_registry",
]

log = Logger()

POLL_INTERVAL = 0.5
FLUSH_INTERVAL = 1.0
# Requests that come before the first read of the token set wait this long for it.
START_GRACE = 3.0


def quota_key(token_id: str) -> str:
    """The counter of a token's requests over its life."""
    return "quota:" + token_id


def rate_key(token_id: str) -> str:
    """A token's rate bucket: level, stamp and rpm as three little-endian doubles
    (a 24-byte string; llmproxy.state.counters.ADMIT).  Earlier versions
    kept a hash under ``rate:<token id>``: a new name, so that no process meets the
    other format (an upgrade forgets at most a minute of a bucket's history; while
    old and new processes run side by side, each kind has its own bucket)."""
    return "bucket:" + token_id


def token_to_registry(token: Token) -> tuple[str, bytes, bytes | None]:
    """``(id, record, note)``: the token without its revocation, which is the note."""
    doc = token.to_json()
    doc.pop("revoked", None)
    note = None if token.revoked is None else repr(token.revoked).encode()
    return token.id, orjson.dumps(doc), note


def token_from_registry(record: bytes, note: bytes | None) -> Token:
    """Raises TokenFileError for a record that is not a token."""
    try:
        doc = orjson.loads(record)
    except orjson.JSONDecodeError as e:
        raise TokenFileError(f"not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise TokenFileError("not a token")
    if note is not None:
        try:
            doc["revoked"] = float(note)
        except ValueError:
            doc["revoked"] = 0.0  # a note of any form revokes
    return Token.from_json(doc)


def tokens_of(snapshot: Snapshot) -> tuple[tuple[Token, ...], int]:
    """The tokens of a registry snapshot, and how many records were not tokens."""
    tokens = []
    bad = 0
    for token_id, record in snapshot.records.items():
        try:
            token = token_from_registry(record, snapshot.notes.get(token_id))
        except TokenFileError:
            bad += 1
            continue
        if token.id != token_id:
            bad += 1  # an id that is not its digest's: not written by us
            continue
        tokens.append(token)
    return tuple(tokens), bad


@attrs.define(eq=False, kw_only=True)
class SharedTokens:
    """The shared side of :class:`llmproxy.access.policy.TokenAccess`."""

    state: SharedState
    _clock: IReactorTime
    _token_file: TokenFile
    _usage_file: UsageFile
    _on_tokens: Callable[[tuple[Token, ...], str], None]
    fail_open: bool
    _machine: str
    _version: bytes | None = attrs.field(init=False, default=None)
    _polling: Deferred[None] | None = attrs.field(init=False, default=None)
    _poll_waiters: list[Deferred[None]] = attrs.field(init=False, factory=list)
    _hooked: bool = attrs.field(init=False, default=False)
    # token id -> (the token, its counter checks, its bucket): the same each time.
    _asks: dict[str, tuple[Token, tuple[CounterCheck, ...], BucketTake | None]] = attrs.field(
        init=False, factory=dict
    )
    _imported: bool = attrs.field(init=False, default=False)
    _poll_failing: bool = attrs.field(init=False, default=False)
    loaded: bool = attrs.field(init=False, default=False)
    _poller: LoopingCall | None = attrs.field(init=False, default=None)
    _flusher: LoopingCall | None = attrs.field(init=False, default=None)
    # Requests admitted but not yet added to their Redis counts (tokens
    # without limits, and any admitted while Redis did not answer).
    _uncounted: dict[str, int] = attrs.field(init=False, factory=dict)
    _flushing: Deferred[None] | None = attrs.field(init=False, default=None)
    _started_at: float | None = attrs.field(init=False, default=None)
    _waiting: list[Deferred[None]] = attrs.field(init=False, factory=list)
    _grace_timer: IDelayedCall | None = attrs.field(init=False, default=None)
    polls_failed: int = attrs.field(init=False, default=0)
    bad_records: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self.state.health.watch("access")

    # -- life cycle --------------------------------------------------------------

    def start(self) -> None:
        if self._poller is not None:
            return
        self._started_at = self._clock.seconds()
        if not self._hooked:
            # A connection (re)established: read the token set and add what was
            # counted here meanwhile at once, not at the next tick.
            self._hooked = True
            self.state.redis.when_ready(self._connected)
        self._poller = LoopingCall(self.poll)
        self._poller.clock = self._clock
        self._poller.start(POLL_INTERVAL, now=True)
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = self._clock
        self._flusher.start(FLUSH_INTERVAL, now=False)

    def stop(self, timeout: float) -> Deferred[None]:
        """Stop polling; add what was counted here to Redis (bounded by the
        connection's own deadline)."""
        for loop in (self._poller, self._flusher):
            if loop is not None and loop.running:
                loop.stop()
        self._poller = self._flusher = None
        self._started_at = None
        self._release_waiting()
        if self._flushing is not None:
            return self._flushing
        return self.flush()

    # -- the token set -------------------------------------------------------------

    def current(self) -> bool:
        """Whether the token set is known and Redis answers its polls.  (Not
        judged by the time since the last poll: a process too busy to poll on
        time still has a connection that answers; a hung one is dropped at the
        command deadline and is not usable.)"""
        return self.loaded and not self._poll_failing and self.state.usable

    def _connected(self) -> None:
        if self._poller is None:
            return  # stopped
        self.poll()
        self.flush()

    def starting(self) -> bool:
        """Within :data:`START_GRACE` of the start, the token set not read yet."""
        started = self._started_at
        return (
            not self.loaded
            and started is not None
            and self._clock.seconds() - started < START_GRACE
        )

    def first_load(self) -> Deferred[None]:
        """Fires once the token set was first read, or the start grace is over."""
        d: Deferred[None] = Deferred()
        if not self.starting():
            d.callback(None)
            return d
        if not self._waiting:
            started = self._started_at or self._clock.seconds()
            left = max(0.0, started + START_GRACE - self._clock.seconds())
            self._grace_timer = self._clock.callLater(left, self._release_waiting)
        self._waiting.append(d)
        return d

    def _release_waiting(self) -> None:
        timer, self._grace_timer = self._grace_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def poll(self) -> Deferred[None]:
        """Ask Redis whether the token set changed; take it when it did.  Fires
        when this poll (or the one under way) is done; never fails."""
        if self._polling is not None:
            waiting: Deferred[None] = Deferred()
            self._poll_waiters.append(waiting)
            return waiting
        if not self.state.usable:
            return succeed(None)
        d = self._polling = ensureDeferred(self._poll())

        def done(_: object) -> None:
            self._polling = None
            waiters, self._poll_waiters = self._poll_waiters, []
            for waiting in waiters:
                waiting.callback(None)

        d.addErrback(self._poll_failed).addBoth(done)
        return d

    async def _poll(self) -> None:
        if not self._imported:
            await self._import()
        snapshot = await self.state.tokens.changed_since(self._version)
        self._poll_failing = False
        self.state.health.succeeded("access")
        if snapshot is None:
            return
        tokens, bad = tokens_of(snapshot)
        if bad and bad != self.bad_records:
            log.warn("shared token set: {bad} records are not tokens, ignored", bad=bad)
        self.bad_records = bad
        trigger = "start" if not self.loaded else "shared_change"
        self._version = snapshot.version
        self.loaded = True
        self._asks.clear()
        self._on_tokens(tokens, trigger)
        self._release_waiting()

    def _poll_failed(self, failure: Failure) -> None:
        self.polls_failed += 1
        self._poll_failing = True
        self.state.health.failed("access", None, failure.getErrorMessage())

    async def _import(self) -> None:
        """The first contact: add the token file's tokens and this state
        directory's counts that Redis does not have yet."""
        try:
            tokens = self._token_file.read()
        except TokenFileError as e:
            log.warn("tokens.json not imported into the shared state: {err}", err=str(e))
            tokens = ()
        try:
            used = self._usage_file.read()
        except TokenFileError as e:
            log.warn("token usage counts not imported into the shared state: {err}", err=str(e))
            used = {}
        if tokens:
            added = await self.state.tokens.add([token_to_registry(t) for t in tokens])
            if added:
                log.info(
                    "shared state: {n} tokens of {path} added to Redis",
                    n=added,
                    path=str(self._token_file.path),
                )
        counts = {quota_key(k): v for k, v in used.items() if v > 0}
        if counts:
            marker = f"imported:{self._machine}:{os.path.abspath(self._usage_file.path)}"
            await self.state.counters.add_once(marker, counts)
        self._imported = True

    # -- admission ---------------------------------------------------------------

    def admit(self, token: Token, now: float) -> Deferred[Admission] | None:
        """None: admitted without asking Redis (a token without limits; counted
        later).  Else the admission, or a failure when Redis did not answer."""
        if token.max_requests is None and token.rpm is None:
            self.count_later(token.id)
            return None
        asks = self._asks.get(token.id)
        if asks is None or asks[0] is not token:
            checks = (CounterCheck(quota_key(token.id), token.max_requests),)
            bucket = None if token.rpm is None else BucketTake(rate_key(token.id), token.rpm)
            asks = self._asks[token.id] = (token, checks, bucket)
        return self.state.counters.admit(asks[1], asks[2], now)

    def count_later(self, token_id: str) -> None:
        self._uncounted[token_id] = self._uncounted.get(token_id, 0) + 1

    def flush(self) -> Deferred[None]:
        """Add the requests counted here to their Redis counts (kept for the
        next flush when Redis does not answer)."""
        if self._flushing is not None:
            return self._flushing
        if not self._uncounted or not self.state.usable:
            return succeed(None)
        taken, self._uncounted = self._uncounted, {}
        d = self.state.counters.add_all({quota_key(k): n for k, n in taken.items()})

        def failed(failure: Failure) -> None:
            for token_id, n in taken.items():
                self._uncounted[token_id] = self._uncounted.get(token_id, 0) + n

        def done(_: object) -> None:
            self._flushing = None

        d.addErrback(failed).addBoth(done)
        if not d.called:
            self._flushing = d
        return d

    def stats(self) -> dict[str, int]:
        return {
            "uncounted": sum(self._uncounted.values()),
            "polls_failed": self.polls_failed,
            "bad_records": self.bad_records,
        }


class SharedTokenStore:
    """``llmproxy token create|list|revoke`` against the shared token set.

    Each command first adds the tokens of ``tokens.json`` that Redis does not
    know yet (as a proxy does at its start), so a setup switched to ``store =
    redis`` manages the same tokens whichever comes first.
    """

    def __init__(self, state: SharedState, token_file: TokenFile) -> None:
        self.state = state
        self._token_file = token_file

    async def _import(self) -> None:
        tokens = self._token_file.read()
        if tokens:
            await self.state.tokens.add([token_to_registry(t) for t in tokens])

    async def create(
        self, project: str, now: float, **terms: Unpack[TokenTerms]
    ) -> tuple[str, Token]:
        await self._import()
        while True:
            secret, token = new_token(project, now, **terms)
            # A record is never replaced: 0 means the id is taken (a 48-bit clash).
            if await self.state.tokens.add([token_to_registry(token)]):
                return secret, token

    async def list(self, now: float) -> tuple[tuple[Token, ...], dict[str, int]]:
        """The tokens and their request counts."""
        await self._import()
        snapshot = await self.state.tokens.snapshot()
        tokens, _ = tokens_of(snapshot)
        counts = await self.state.counters.read([quota_key(t.id) for t in tokens], now)
        return tokens, {t.id: n for t, n in zip(tokens, counts, strict=True)}

    async def revoke(self, token_id: str, now: float) -> tuple[Token, bool]:
        """The token and whether this revoked it (False: it was revoked before);
        ``UnknownToken`` when there is no such token."""
        await self._import()
        outcome = await self.state.tokens.note(token_id, repr(now).encode())
        if outcome < 0:
            raise UnknownToken(token_id)
        snapshot = await self.state.tokens.snapshot()
        record = snapshot.records[token_id]
        return token_from_registry(record, snapshot.notes.get(token_id)), outcome == 1
