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


# ARGV: the key prefix, the TTL in ms, then the operations one after the other,
# each a kind and its words (every word its own argument: decoding JSON was the
# script's largest cost):
# - an assignment: "a" ("aw": asked with ``wait``; "ac", "awc": with a client
#   id, which comes next), the client id (for "ac", "awc"), the new session's id,
#   the number of lookups and the lookups;
# - a record: "r" ("rf": ``fresh``; "ri", "rfi": its session is the result of
#   the assignment at the index, from 0, that comes next), the session and seq
#   (for "r", "rf") or the index (for "ri", "rfi"), the number of keys and the keys.
_APPLY = Script(
    "sessions_apply",
    b"""
local P = ARGV[1]
local ttl = ARGV[2]
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

local a = 3
local i = 0
while a <= #ARGV do
  i = i + 1
  local kind = ARGV[a]
  if kind == 'a' or kind == 'aw' or kind == 'ac' or kind == 'awc' then
    local client = nil
    if kind == 'ac' or kind == 'awc' then
      client = ARGV[a + 1]
      a = a + 1
    end
    local new_id = ARGV[a + 1]
    local n = tonumber(ARGV[a + 2])
    local first = a + 3  -- lookup m: ARGV[first + m - 1]
    a = first + n
    if (kind == 'aw' or kind == 'awc') and n > 0
        and redis.call('EXISTS', P .. 's:' .. ARGV[first]) == 0 then
      results[i] = {'', 0, 'miss', 0, '', 0}
    else
      local found = nil
      for m = first, first + n - 1 do
        local key = P .. 's:' .. ARGV[m]
        local v = redis.call('GET', key)
        if v then
          redis.call('PEXPIRE', key, ttl)
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
          set_head(new_id, seq, from_seq)
          results[i] = {new_id, seq, 'fork', from_seq, parent, from_seq}
        end
      elseif client then
        local last, st = head(client)
        if last then
          results[i] = continue(client, last, st)
        else
          results[i] = start(client)
        end
      else
        results[i] = start(new_id)
      end
    end
  else
    local fresh = kind == 'rf' or kind == 'rfi'
    local sid, seq, seq_text
    if kind == 'ri' or kind == 'rfi' then
      local r = results[tonumber(ARGV[a + 1]) + 1]
      sid, seq = r[1], r[2]
      seq_text = string.format('%d', seq)
      a = a + 2
    else
      sid, seq_text = ARGV[a + 1], ARGV[a + 2]
      seq = tonumber(seq_text)
      a = a + 3
    end
    local n = tonumber(ARGV[a])
    if seq > 0 then
      local value = seq_text .. ' ' .. sid
      for m = a + 1, a + n do
        redis.call('SET', P .. 's:' .. ARGV[m], value, 'PX', ttl)
      end
      -- A fresh session has no head yet (unless this record comes again): SET NX
      -- makes it in one call; one found is moved up as any session's is.
      if not (fresh and redis.call('SET', P .. 'h:' .. sid, seq_text .. ' ' .. seq_text,
          'PX', ttl, 'NX')) then
        local last, st = head(sid)
        if last and seq > st then set_head(sid, last, seq) end
      end
    end
    a = a + n + 1
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
        args: list[str | int] = [self._prefix, self._ttl_ms]
        for op in ops:
            if isinstance(op, AssignOp):
                kind = "aw" if op.wait and op.lookups else "a"
                if op.client is not None:
                    args += [kind + "c", op.client]
                else:
                    args.append(kind)
                args += [op.new_id, len(op.lookups)]
                args += [state_key_text(k) for k in op.lookups]
            else:
                kind = "rf" if op.fresh else "r"
                known = op.target()
                if known is not None:
                    args += [kind, known[0], known[1]]
                else:
                    assert op.assign is not None
                    args += [kind + "i", index[id(op.assign)]]
                args.append(len(op.keys))
                args += [state_key_text(k) for k in op.keys]
        d = _APPLY.run(self._redis, [], args)

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
