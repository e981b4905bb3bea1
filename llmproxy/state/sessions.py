"""The session tracker's state as operations, and their Redis implementation
(tests: tests/unit/state/test_redis_state.py, tests/unit/capture/test_sessions.py,
tests/integration/test_shared_state.py).

The tracker (llmproxy/capture/sessions.py) reads requests and replies; what it
remembers is two maps: *states* (a conversation's fingerprint, or ``r:<response
id>`` -> the session and seq it was recorded at) and *heads* (a session -> the
last seq given out and the seq of its latest recorded state).  Everything it
does to them is one of two operations:

- :class:`AssignOp`: find the session of a new request.  The first of its
  ``lookups`` that is a recorded state is *followed*: the request continues that
  state's session when the state is the session's latest (the next seq), and
  forks it otherwise (a new session, ``new_id``, whose seq goes on from the
  state's).  No state found: the ``client`` id's session continues (or starts),
  or, without one, a new session ``new_id`` starts at seq 1.  The result,
  :data:`Assigned`, is ``(session, seq, kind, from_seq, parent, head_state)``
  with ``kind`` ``start``, ``continue`` or ``fork``;
- :class:`RecordOp`: a reply ended well: record its state keys at the request's
  session and seq, and move the session's latest state up to that seq.  A first
  turn (no history, no client id) always starts a new session, so a process
  decides it on its own and sends no assignment; its record, ``fresh``, makes
  the session's head where there is none.

A continuation (an assignment with ``lookups``) may be asked with ``wait``: when
its first lookup (its whole history: the reply it answers) is not a recorded
state, nothing is decided and nothing written, even when an older state is
(that reply's turn may not be decided yet: continuing the older state would
give this turn its seq); the assignment comes back *missed* (``result`` None,
``missed`` True) and the tracker asks again a little later.  A next turn that
reaches another process before the previous reply's state is recorded (the
record is sent once the reply has ended) thus finds it rather than starting a
new session.  A record in the same batch naming a missed assignment is not
applied (the tracker sends it again once the assignment is decided).

The tracker applies them to its own maps (one process) or sends them here
(``[state] store = redis``): :meth:`RedisSessionState.apply` runs a batch of
operations in order in one Lua script, so the decisions are atomic across every
process and host, and a record in the batch may name an assignment earlier in
the same batch (its session is only known inside Redis).  States and heads are
Redis strings under ``prefix`` with a TTL (``[state] session_ttl``), refreshed
whenever one is used: ``s:<fingerprint hex or r:id>`` = ``"<seq> <session>"``,
``h:<session>`` = ``"<last seq> <state seq>"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import attrs
import orjson
from twisted.internet.defer import Deferred

from llmproxy.interfaces import RedisClient
from llmproxy.state.scripts import Script

__all__ = ["AssignOp", "Assigned", "RecordOp", "RedisSessionState", "StateKey", "state_key_text"]

StateKey: TypeAlias = bytes | str  # a 32-byte digest, or "r:<response id>"
# (session id, seq, "start" | "continue" | "fork", from_seq, parent session, head's state seq)
Assigned: TypeAlias = tuple[str, int, str, int, str, int]


@attrs.define(slots=True, eq=False)
class AssignOp:
    lookups: Sequence[StateKey]  # first hit wins
    client: str | None  # a client-supplied session id
    new_id: str  # the id of a session this starts (or forks)
    result: Assigned | None = None
    # No recorded state found: decide nothing, report a miss (``missed``).
    wait: bool = False
    missed: bool = False


@attrs.define(slots=True, eq=False)
class RecordOp:
    keys: Sequence[StateKey]
    session_id: str = ""
    seq: int = 0
    # Whose session: an assignment (its result, or the same batch's decision).
    assign: AssignOp | None = None
    # A session a process started on its own (a first turn): its head is made
    # here if the shared state has none yet.
    fresh: bool = False

    def target(self) -> tuple[str, int] | None:
        """The session and seq to record at, when known here."""
        if self.assign is None:
            return self.session_id, self.seq
        result = self.assign.result
        return None if result is None else (result[0], result[1])


def state_key_text(key: StateKey) -> str:
    return key.hex() if isinstance(key, bytes) else key


_APPLY = Script(
    "sessions_apply",
    b"""
local P = ARGV[2]
local ttl = tonumber(ARGV[3])
local ops = cjson.decode(ARGV[1])
local results = {}

local function head(sid)
  local v = redis.call('GET', P .. 'h:' .. sid)
  if not v then return nil, nil end
  local sp = string.find(v, ' ', 1, true)
  return tonumber(string.sub(v, 1, sp - 1)), tonumber(string.sub(v, sp + 1))
end

local function set_head(sid, last, st)
  redis.call('SET', P .. 'h:' .. sid, string.format('%d %d', last, st), 'PX', ttl)
end

local function continue(sid, last, st)
  local seq = last + 1
  set_head(sid, seq, st)
  return {sid, seq, 'continue', 0, '', st}
end

local function start(sid)
  set_head(sid, 1, 0)
  return {sid, 1, 'start', 0, '', 0}
end

for i, op in ipairs(ops) do
  if op.w and redis.call('EXISTS', P .. 's:' .. op.a[1]) == 0 then
    results[i] = {'', 0, 'miss', 0, '', 0}
  elseif op.a then
    local found = nil
    for _, key in ipairs(op.a) do
      local v = redis.call('GET', P .. 's:' .. key)
      if v then
        redis.call('PEXPIRE', P .. 's:' .. key, ttl)
        local sp = string.find(v, ' ', 1, true)
        found = {string.sub(v, sp + 1), tonumber(string.sub(v, 1, sp - 1))}
        break
      end
    end
    if found then
      local parent, from_seq = found[1], found[2]
      local last, st = head(parent)
      if last and from_seq >= st then
        results[i] = continue(parent, last, st)
      else
        local seq = from_seq + 1
        set_head(op.n, seq, from_seq)
        results[i] = {op.n, seq, 'fork', from_seq, parent, from_seq}
      end
    elseif op.c then
      local last, st = head(op.c)
      if last then
        results[i] = continue(op.c, last, st)
      else
        results[i] = start(op.c)
      end
    else
      results[i] = start(op.n)
    end
  else
    local sid, seq = op.s, op.q
    if op.i then
      local r = results[op.i + 1]
      sid, seq = r[1], r[2]
    end
    if seq > 0 then
      local value = string.format('%d ', seq) .. sid
      for _, key in ipairs(op.r) do
        redis.call('SET', P .. 's:' .. key, value, 'PX', ttl)
      end
      local last, st = head(sid)
      if last then
        if seq > st then set_head(sid, last, seq) end
      elseif op.f then
        set_head(sid, seq, seq)
      end
    end
    results[i] = 0
  end
end
return results
""",
)


class RedisSessionState:
    """Session operations applied in Redis (see the module docstring)."""

    def __init__(self, redis: RedisClient, prefix: str, ttl: float) -> None:
        self._redis = redis
        self._prefix = prefix + "sessions:"
        self._ttl_ms = max(1, int(ttl * 1000))

    @property
    def usable(self) -> bool:
        return self._redis.usable

    def apply(self, ops: Sequence[AssignOp | RecordOp]) -> Deferred[None]:
        """Run ``ops`` in order; fills in each assignment's ``result`` (or, for one
        asked with ``wait`` that found no state, ``missed``).  A record must name
        an assignment that has its result or comes before it in ``ops``; one
        naming a missed assignment is not applied."""
        index = {id(op): i for i, op in enumerate(ops) if isinstance(op, AssignOp)}
        encoded: list[dict[str, Any]] = []
        for op in ops:
            if isinstance(op, AssignOp):
                one: dict[str, Any] = {"a": [state_key_text(k) for k in op.lookups], "n": op.new_id}
                if op.client is not None:
                    one["c"] = op.client
                if op.wait and op.lookups:
                    one["w"] = 1
            else:
                one = {"r": [state_key_text(k) for k in op.keys]}
                if op.fresh:
                    one["f"] = 1
                known = op.target()
                if known is not None:
                    one["s"], one["q"] = known
                else:
                    assert op.assign is not None
                    one["i"] = index[id(op.assign)]
            encoded.append(one)
        d = _APPLY.run(self._redis, [], [orjson.dumps(encoded), self._prefix, self._ttl_ms])

        def fill(reply: Sequence[Any]) -> None:
            for op, result in zip(ops, reply, strict=True):
                if isinstance(op, AssignOp):
                    if int(result[1]) == 0:  # a miss: nothing decided
                        op.result, op.missed = None, True
                        continue
                    op.missed = False
                    op.result = (
                        bytes(result[0]).decode(),
                        int(result[1]),
                        bytes(result[2]).decode(),
                        int(result[3]),
                        bytes(result[4]).decode(),
                        int(result[5]),
                    )

        return d.addCallback(fill)
