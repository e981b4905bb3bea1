"""Atomic counting shared by every process: counters checked against limits, and
rate buckets (tests: tests/unit/state/test_counters.py, tests/unit/state/test_redis_state.py).

The one primitive is :meth:`admit`: given some counters, each with an optional
limit and an amount to add, and optionally one rate bucket, either *all* of it
happens or none of it, atomically with respect to every other admission:

- a :class:`CounterCheck` ``(key, limit, add, expire_at)`` passes when
  ``used + add <= limit`` (with ``add = 0``: while ``used < limit``, i.e.
  something is left); ``limit = None`` always passes (counting only);
- the first check that does not pass refuses the admission (403 for a quota):
  ``Admission.refused_by`` is its index, ``counts`` the values as found;
- then a :class:`BucketTake` takes one request from a token bucket that holds
  ``per_minute`` and refills ``per_minute / 60`` per second; an empty bucket
  refuses with ``retry_after``, the seconds until one request has refilled
  (429 with ``Retry-After``);
- otherwise every ``add`` is added and the bucket loses one: ``counts`` are the
  values after the add.

``expire_at`` (epoch seconds) makes a counter vanish at the end of its period.
It is set when the counter is made (its first add, to nothing or 0) and kept by
later adds: a counter's key names its period, so every add to it gives the same
``expire_at`` (one per key is the callers' part; setting it once costs Redis
one command per period instead of one per add).
This is the building block for budgets per period (issue 19): a counter per
token, unit and period, keyed for example ``budget:tok_ab12:usd:2025-06`` with
``expire_at`` a little after the month ends; a request is admitted with
``add = 0`` while its budget is not spent, and its cost, known once the answer
ended, is added with :meth:`add`.  Amounts are whole numbers (Redis ``INCRBY``
is exact; count money in micro-units).

:meth:`RedisCounters.charge` adds to counters *and* to one row of tables kept
per window (:class:`TableAdd`: a Redis hash per window, a field per row and column)
in the same script run (the charges of one reactor turn summed per counter and
per row, as :meth:`RedisCounters.add_many`'s are): how the spend per project and
model that ``llmproxy spend`` reads is kept with ``[state] store = redis``, at no
extra round trip.  A
table that holds ``max_rows`` rows already counts a new row under ``overflow``
(so a client or upstream naming endless models cannot grow it without bound).

Two implementations with the same answers: :class:`LocalCounters` (one process,
in memory: the reference the tests compare against) and :class:`RedisCounters`
(one Lua script per batch: the admissions asked for in one reactor turn go to
Redis in one ``EVALSHA`` and are decided there one after the other).  Times
(``now``) come from the caller's clock: hosts sharing a Redis need their clocks
synchronised (NTP) for rate buckets to refill at the same pace everywhere.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from llmproxy.interfaces import RedisExecutor
from llmproxy.state.scripts import Script

__all__ = [
    "Admission",
    "BucketTake",
    "CounterCheck",
    "LocalCounters",
    "RedisCounters",
    "TableAdd",
    "bucket_take",
    "table_rows",
]

_pack_now = struct.Struct("<d").pack  # ADMIT's first number

# A bucket untouched this long is full again: its key may go (60 s refill, plus slack).
BUCKET_TTL_MS = 61_000  # (the ADMIT script's SET PX)


@attrs.frozen(cache_hash=True)
class CounterCheck:
    key: str
    limit: int | None = None  # None: count only
    add: int = 1
    expire_at: float | None = None  # epoch seconds: the counter vanishes then


@attrs.frozen(cache_hash=True)
class BucketTake:
    key: str
    per_minute: int


class TableAdd(NamedTuple):
    """Add ``amounts`` to the ``columns`` (names without spaces) of ``row`` in each
    table ``(key, expire_at)``: one hash per table, a field per row and column
    (``<row> TAB <column>``; every column written, zeros too, so a table's rows are
    its fields over the number of columns).  A table that holds ``max_rows`` rows
    and not ``row`` adds to ``overflow`` instead (which may make it one more).
    (A named tuple: one is made per answer.)"""

    row: str
    overflow: str
    columns: tuple[str, ...]
    amounts: tuple[int, ...]
    tables: tuple[tuple[str, float | None], ...]
    max_rows: int


def table_rows(fields: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """A table's hash, ``<row> TAB <column> -> amount``, as ``row -> {column: amount}``."""
    rows: dict[str, dict[str, int]] = {}
    for field, amount in fields.items():
        row, _, column = field.rpartition("\t")
        rows.setdefault(row, {})[column] = amount
    return rows


@attrs.frozen
class Admission:
    admitted: bool
    counts: tuple[int, ...] = ()
    refused_by: int | None = None  # index of the check whose limit refused
    retry_after: float = 0.0  # the bucket was empty: seconds until one request fits


def _passes(used: int, check: CounterCheck) -> bool:
    limit = check.limit
    if limit is None:
        return True
    if check.add == 0:
        return used < limit
    return used + check.add <= limit


def bucket_take(
    level: float, stamp: float, per_minute: int, now: float
) -> tuple[float, float, float]:
    """One request from a bucket found at ``level`` at time ``stamp``: the new
    ``(level, stamp, wait)``; ``wait`` 0.0 when taken, else the seconds until one
    request's worth has refilled (the level is then refilled, not taken from)."""
    rate = per_minute / 60.0
    # A clock that steps back (NTP) must not drain the bucket.
    elapsed = now - stamp
    if elapsed < 0.0:
        elapsed = 0.0
    level = min(float(per_minute), level + elapsed * rate)
    if level >= 1.0:
        return level - 1.0, now, 0.0
    return level, now, (1.0 - level) / rate


@attrs.define
class LocalCounters:
    """:meth:`admit` and :meth:`add` in one process's memory (also the budgets'
    ``SpendCounters`` with local state: :meth:`value` reads at once, for the
    request path)."""

    _values: dict[str, tuple[int, float | None]] = attrs.Factory(dict)
    _buckets: dict[str, tuple[float, float, int]] = attrs.Factory(dict)

    def value(self, key: str, now: float) -> int:
        """The counter's value now, at once (0 when absent or expired)."""
        found = self._values.get(key)
        if found is None:
            return 0
        value, expire_at = found
        if expire_at is not None and now >= expire_at:
            del self._values[key]
            return 0
        return value

    def admit(
        self, checks: Sequence[CounterCheck], bucket: BucketTake | None, now: float
    ) -> Deferred[Admission]:
        return succeed(self.admit_now(checks, bucket, now))

    def admit_now(
        self, checks: Sequence[CounterCheck], bucket: BucketTake | None, now: float
    ) -> Admission:
        found = [self.value(c.key, now) for c in checks]
        for index, (used, check) in enumerate(zip(found, checks, strict=True)):
            if not _passes(used, check):
                return Admission(False, tuple(found), refused_by=index)
        if bucket is not None:
            level, stamp, per_minute = self._buckets.get(
                bucket.key, (float(bucket.per_minute), now, bucket.per_minute)
            )
            if per_minute != bucket.per_minute:
                level, stamp = float(bucket.per_minute), now
            level, stamp, wait = bucket_take(level, stamp, bucket.per_minute, now)
            if wait > 0.0:
                return Admission(False, tuple(found), retry_after=wait)
            self._buckets[bucket.key] = (level, stamp, bucket.per_minute)
        counts = []
        for used, check in zip(found, checks, strict=True):
            value = used + check.add
            if check.add:
                self._values[check.key] = (value, self._expiry(check.key, used, check.expire_at))
            counts.append(value)
        return Admission(True, tuple(counts))

    def _expiry(self, key: str, used: int, expire_at: float | None) -> float | None:
        """A counter's expire_at after an add: the one given when the add makes it
        (``used`` 0), else the one it has (as RedisCounters' scripts keep it)."""
        if used == 0 and expire_at is not None:
            return expire_at
        previous = self._values.get(key)
        return previous[1] if previous is not None else None

    def add(
        self, key: str, amount: int, now: float, expire_at: float | None = None
    ) -> Deferred[int]:
        return succeed(self.add_now(key, amount, now, expire_at))

    def add_now(self, key: str, amount: int, now: float, expire_at: float | None = None) -> int:
        """:meth:`add` at once; its value after the add."""
        used = self.value(key, now)
        self._values[key] = (used + amount, self._expiry(key, used, expire_at))
        return used + amount

    def add_many(
        self, amounts: Sequence[tuple[str, int, float | None]], now: float
    ) -> Deferred[None]:
        for key, amount, expire_at in amounts:
            self.add_now(key, amount, now, expire_at)
        return succeed(None)

    def read(self, keys: Sequence[str], now: float) -> Deferred[list[int]]:
        return succeed([self.value(k, now) for k in keys])


# KEYS: per admission its counter keys, then its bucket key (if any).
# ARGV: per admission one binary argument, little-endian doubles (struct): now,
# the number of counters, per counter its limit (inf: none), add and expire_at
# in ms (0: none; no period ends at the epoch), then the bucket's per_minute (no
# bucket: nothing).  Binary because Lua's number parsing (strtod) and pattern
# matching were most of the script's CPU: `struct.unpack` reads three numbers
# for less than `tonumber` parses one.  (One argument per admission: Redis'
# argument parsing costs per argument.)
# A bucket is stored the same way: "<level><stamp><rpm>", three doubles (24
# bytes), exactly (as text each was a costly `string.format` and `tonumber`, and
# rounded).  Anything else found there counts as no bucket (a full one).
# Reply, per admission: {0, count...} admitted (counts after the add); {1, index,
# count...} refused by a limit; {2, "wait seconds", count...} refused by the bucket
# (counts as found).  The admissions of a batch are decided one after the other, as
# if each ran alone; a counter or bucket is read once per batch and written once at
# its end (one token's admissions repeat the same keys: 3x less Redis CPU for a
# batch of 50 than reading and writing them per admission).
ADMIT = Script(
    "admit",
    b"""
local unpack = struct.unpack
local out = {}
local k = 1
-- Within one batch the same counters and buckets come back again and again (one
-- token's admissions): each is read once, kept here, and written once at the end.
local used_of, expire_of, changed = {}, {}, {}
local buckets, bucket_order = {}, {}
for i = 1, #ARGV do
  local spec = ARGV[i]
  local now, n, p = unpack('<dd', spec)
  local keys, values, adds = {}, {}, {}
  local refused = nil
  for j = 1, n do
    local key = KEYS[k]
    k = k + 1
    keys[j] = key
    local used = used_of[key]
    if used == nil then
      used = tonumber(redis.call('GET', key) or '0') or 0
      used_of[key] = used
    end
    values[j] = used
    local limit, add, expire
    limit, add, expire, p = unpack('<ddd', spec, p)
    adds[j] = add
    if expire ~= 0 then expire_of[key] = expire end
    if refused == nil then
      if (add > 0 and used + add > limit) or (add == 0 and used >= limit) then
        refused = j
      end
    end
  end
  local per_minute = nil
  local bucket = nil
  if p <= #spec then
    per_minute = unpack('<d', spec, p)
    bucket = KEYS[k]
    k = k + 1
  end
  if refused ~= nil then
    local r = {1, refused - 1}
    for j = 1, n do r[j + 2] = values[j] end
    out[i] = r
  else
    local level, wait = 0, 0
    local b = nil
    if bucket then
      b = buckets[bucket]
      if b == nil then
        local v = redis.call('GET', bucket)
        if v and #v == 24 then
          local l, s, m = unpack('<ddd', v)
          b = {l, s, m, false}
        else
          b = {nil, nil, nil, false}
        end
        buckets[bucket] = b
        bucket_order[#bucket_order + 1] = bucket
      end
      level = b[1]
      local stamp = b[2]
      if level == nil or b[3] ~= per_minute then
        level = per_minute
        stamp = now
      end
      local rate = per_minute / 60.0
      local elapsed = now - stamp
      if elapsed < 0 then elapsed = 0 end
      level = math.min(per_minute, level + elapsed * rate)
      if level < 1 then wait = (1 - level) / rate end
    end
    if wait > 0 then
      local r = {2, string.format('%.6f', wait)}
      for j = 1, n do r[j + 2] = values[j] end
      out[i] = r
    else
      if b then
        -- Kept exactly as stored: the next admission decides as if it read it back.
        b[1] = level - 1
        b[2] = now
        b[3] = per_minute
        b[4] = true
      end
      local r = {0}
      for j = 1, n do
        local key, add = keys[j], adds[j]
        if add ~= 0 then
          values[j] = used_of[key] + add
          used_of[key] = values[j]
          changed[key] = (changed[key] or 0) + add
        end
        r[j + 1] = values[j]
      end
      out[i] = r
    end
  end
end
-- A counter's expire_at is the end of its period, the same for every add to it
-- (its key names the period): it is set when INCRBY makes the key (the result is
-- the amount added: nothing, or 0, was there) and stays.  A key made by this or
-- an older version always got it in the same run (a script runs whole: Redis
-- never runs another command inside it, does not refuse a later write of a run
-- that has written for memory, and replicas and the AOF get its writes as one
-- MULTI/EXEC), so none is found without it.
for key, add in pairs(changed) do
  if add ~= 0 and redis.call('INCRBY', key, add) == add then
    local expire = expire_of[key]
    if expire then redis.call('PEXPIREAT', key, expire) end
  end
end
for _, bucket in ipairs(bucket_order) do
  local b = buckets[bucket]
  if b[4] then
    redis.call('SET', bucket, struct.pack('<ddd', b[1], b[2], b[3]), 'PX', '61000')
  end
end
return out
""",
)

# KEYS[1]: the counter; ARGV: amount, expire_at in ms or ''.
ADD = Script(
    "add",
    b"""
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
-- Set when INCRBY made the key (see ADMIT: an expire_at is its key's for good).
if v == tonumber(ARGV[1]) and ARGV[2] ~= '' then redis.call('PEXPIREAT', KEYS[1], ARGV[2]) end
return v
""",
)


# KEYS: counters, then per group of tables its tables (hashes).  ARGV: the number
# of counters, per counter its amount and expire_at in ms or ''; then the number
# of groups, and per group: its number of tables, per table its expire_at in ms or
# '', its number of columns, the column names, its number of rows, and per row:
# the row, the overflow row, max_rows and an amount per column (no groups:
# counters only).  Every word its own argument: splitting word lists in Lua
# (string.gmatch) cost more than Redis' parsing of the arguments.  The first
# column's field tells whether a table holds the row already.
CHARGE = Script(
    "charge",
    b"""
local n = tonumber(ARGV[1])
for i = 1, n do
  -- An expire_at is set when INCRBY makes the key, and kept (see ADMIT).
  local amount = ARGV[2 * i]
  if redis.call('INCRBY', KEYS[i], amount) == tonumber(amount) then
    local e = ARGV[2 * i + 1]
    if e ~= '' then redis.call('PEXPIREAT', KEYS[i], e) end
  end
end
local a = 2 * n + 2
local k = n + 1
local groups = tonumber(ARGV[a])
a = a + 1
for g = 1, groups do
  local t = tonumber(ARGV[a])
  local expires = a  -- table j's expire_at: ARGV[expires + j]
  a = a + t + 1
  local c = tonumber(ARGV[a])
  local names = a  -- column m: ARGV[names + m]
  local rows = tonumber(ARGV[a + c + 1])
  a = a + c + 2
  for r = 1, rows do
    local row = ARGV[a]
    local fields = {}
    for m = 1, c do fields[m] = row .. '\\t' .. ARGV[names + m] end
    for j = 1, t do
      local h = KEYS[k + j - 1]
      local into = fields
      local new = redis.call('HEXISTS', h, fields[1]) == 0
      if new and redis.call('HLEN', h) >= tonumber(ARGV[a + 2]) * c then
        into = {}
        for m = 1, c do into[m] = ARGV[a + 1] .. '\\t' .. ARGV[names + m] end
      end
      for m = 1, c do
        -- A row found holds every column already (all are written when it is
        -- made): adding 0 to one changes nothing.
        local amount = ARGV[a + 2 + m]
        if new or amount ~= '0' then redis.call('HINCRBY', h, into[m], amount) end
      end
      -- A table is made with its first row and its expire_at is its window's end
      -- for good: set then (and when a row is new, which is rare), as a counter's.
      local e = ARGV[expires + j]
      if new and e ~= '' then redis.call('PEXPIREAT', h, e) end
    end
    a = a + 3 + c
  end
  k = k + t
end
return #KEYS
""",
)


# KEYS[1]: a marker, then counters; ARGV: an amount per counter.  Adds the amounts
# only when the marker is new (an import done once, whoever does it first).
ADD_ONCE = Script(
    "add_once",
    b"""
if not redis.call('SET', KEYS[1], '1', 'NX') then return 0 end
for i = 2, #KEYS do redis.call('INCRBY', KEYS[i], ARGV[i - 1]) end
return 1
""",
)


@attrs.define(slots=True, eq=False)
class _Asked:
    keys: tuple[bytes, ...]
    spec: bytes  # the ADMIT argument
    answer: Deferred[Admission]


class RedisCounters:
    """:meth:`admit` and :meth:`add` in Redis, under ``prefix``; the admissions
    asked for in one reactor turn share one round trip."""

    def __init__(self, redis: RedisExecutor, clock: IReactorTime, prefix: str) -> None:
        self._redis = redis
        self._clock = clock
        self._prefix = prefix
        self._asked: list[_Asked] = []
        self._call: IDelayedCall | None = None
        # (checks, bucket) -> their keys and the ADMIT words after "now": a token
        # asks the same each time.
        self._specs: dict[
            tuple[tuple[CounterCheck, ...], BucketTake | None], tuple[tuple[bytes, ...], bytes]
        ] = {}
        self.batches = 0
        self.admissions = 0
        # add_many's amounts of this reactor turn, summed per (key, expire_at in
        # ms or b""): answers of one token charge the same few counters, so a
        # turn's charges are one script run however many answers ended in it.
        self._adding: dict[tuple[bytes, bytes], int] = {}
        self._add_waiters: list[Deferred[None]] = []
        # charge's table rows of this turn, summed: per (tables, columns), per
        # (row, overflow, max_rows) the amounts.
        self._rows: dict[
            tuple[tuple[tuple[str, float | None], ...], tuple[str, ...]],
            dict[tuple[str, str, int], list[int]],
        ] = {}
        self._last_group: tuple[object, object, dict[tuple[str, str, int], list[int]]] | None = None
        self._add_call: IDelayedCall | None = None
        self.add_batches = 0
        # (key, expire_at) -> its slot in ``_adding``: one token's answers charge
        # the same few counters, encoded once (per answer: a few µs each time).
        self._slots: dict[tuple[str, float | None], tuple[bytes, bytes]] = {}

    def key(self, name: str) -> str:
        return self._prefix + name

    def admit(
        self, checks: Sequence[CounterCheck], bucket: BucketTake | None, now: float
    ) -> Deferred[Admission]:
        frozen = checks if isinstance(checks, tuple) else tuple(checks)
        specs = self._specs
        found = specs.get((frozen, bucket))
        if found is None:
            if len(specs) > 10_000:
                specs.clear()  # tokens come and go; the live ones are made again
            found = specs[(frozen, bucket)] = self._spec(frozen, bucket)
        keys, tail = found
        d: Deferred[Admission] = Deferred()
        self._asked.append(_Asked(keys, _pack_now(now) + tail, d))
        if self._call is None:
            self._call = self._clock.callLater(0, self._send)
        return d

    def _spec(
        self, checks: Sequence[CounterCheck], bucket: BucketTake | None
    ) -> tuple[tuple[bytes, ...], bytes]:
        prefix = self._prefix
        keys = [(prefix + c.key).encode() for c in checks]
        numbers: list[float] = [len(checks)]
        for c in checks:
            numbers.append(math.inf if c.limit is None else c.limit)
            numbers.append(c.add)
            numbers.append(0 if c.expire_at is None else int(c.expire_at * 1000))
        if bucket is not None:
            keys.append((prefix + bucket.key).encode())
            numbers.append(bucket.per_minute)
        return tuple(keys), struct.pack(f"<{len(numbers)}d", *numbers)

    def _send(self) -> None:
        self._call = None
        asked, self._asked = self._asked, []
        if not asked:
            return
        keys: list[bytes] = []
        for one in asked:
            keys.extend(one.keys)
        self.batches += 1
        self.admissions += len(asked)
        ADMIT.run(self._redis, keys, [one.spec for one in asked]).addCallbacks(
            self._answered, self._failed, callbackArgs=(asked,), errbackArgs=(asked,)
        )

    def _answered(self, reply: Any, asked: list[_Asked]) -> None:
        for one, answer in zip(asked, reply, strict=True):
            one.answer.callback(_admission(answer))

    def _failed(self, failure: Failure, asked: list[_Asked]) -> None:
        for one in asked:
            one.answer.errback(failure)

    def add(
        self, key: str, amount: int, now: float, expire_at: float | None = None
    ) -> Deferred[int]:
        expire = "" if expire_at is None else int(expire_at * 1000)
        return ADD.run(self._redis, [self._prefix + key], [amount, expire]).addCallback(int)

    def add_many(
        self, amounts: Sequence[tuple[str, int, float | None]], now: float
    ) -> Deferred[None]:
        """:meth:`add` for each ``(key, amount, expire_at)``.  The adds asked for
        in one reactor turn are summed per counter and sent in one script run
        (:meth:`flush` sends them at once); the result fires when that run is done."""
        if not amounts:
            return succeed(None)
        self._hold(amounts)
        return self._held()

    def charge(
        self,
        amounts: Sequence[tuple[str, int, float | None]],
        table: TableAdd,
        now: float,
    ) -> Deferred[None]:
        """:meth:`add_many`, and ``table``'s row added to: summed with the other
        charges of this reactor turn and sent in the same script run."""
        self._hold(amounts)
        tables, columns = table.tables, table.columns
        last = self._last_group
        # The same tables and columns objects come with every answer of a day.
        if last is not None and last[0] is tables and last[1] is columns:
            group = last[2]
        else:
            found = self._rows.get((tables, columns))
            if found is None:
                found = self._rows[(tables, columns)] = {}
            group = found
            self._last_group = (tables, columns, group)
        slot = (table.row, table.overflow, table.max_rows)
        sums = group.get(slot)
        if sums is None:
            group[slot] = list(table.amounts)
        else:
            for i, amount in enumerate(table.amounts):
                sums[i] += amount
        return self._held()

    def _hold(self, amounts: Sequence[tuple[str, int, float | None]]) -> None:
        adding = self._adding
        slots = self._slots
        for key, amount, expire_at in amounts:
            slot = slots.get((key, expire_at))
            if slot is None:
                if len(slots) > 10_000:
                    slots.clear()  # windows end and tokens go; the live ones come back
                slot = slots[(key, expire_at)] = (
                    (self._prefix + key).encode(),
                    b"" if expire_at is None else b"%d" % int(expire_at * 1000),
                )
            adding[slot] = adding.get(slot, 0) + amount

    def _held(self) -> Deferred[None]:
        if self._add_call is None:
            self._add_call = self._clock.callLater(0, self.flush)
        d: Deferred[None] = Deferred()
        self._add_waiters.append(d)
        return d

    def flush(self) -> Deferred[None]:
        """Send the adds and table rows held for this turn now (one script run);
        fires when they are done (or failed: the adds' own Deferreds say how)."""
        call, self._add_call = self._add_call, None
        if call is not None and call.active():
            call.cancel()
        adding, self._adding = self._adding, {}
        rows, self._rows = self._rows, {}
        self._last_group = None
        waiters, self._add_waiters = self._add_waiters, []
        if not adding and not rows:
            for d in waiters:
                d.callback(None)
            return succeed(None)
        keys: list[bytes | str] = [key for key, _ in adding]
        args: list[bytes | int | str] = []
        for (_, expire), amount in adding.items():
            args += [amount, expire]
        self.add_batches += 1

        def done(_: object) -> None:
            for d in waiters:
                d.callback(None)

        def failed(failure: Failure) -> None:
            for d in waiters:
                d.errback(failure)

        args.insert(0, len(adding))
        args.append(len(rows))
        prefix = self._prefix
        for (tables, columns), group in rows.items():
            keys += [prefix + key for key, _ in tables]
            args.append(len(tables))
            args += [b"" if e is None else int(e * 1000) for _, e in tables]
            args.append(len(columns))
            args += columns
            args.append(len(group))
            for (row, overflow, max_rows), sums in group.items():
                args += [row, overflow, max_rows, *sums]
        return CHARGE.run(self._redis, keys, args).addCallbacks(done, failed)

    def read_table(self, key: str) -> Deferred[dict[str, dict[str, int]]]:
        """A table of :meth:`charge`: ``row -> {column: amount}`` (empty when absent)."""

        def parsed(reply: Sequence[bytes]) -> dict[str, dict[str, int]]:
            fields = {
                reply[i].decode("utf-8", "replace"): int(reply[i + 1])
                for i in range(0, len(reply), 2)
            }
            return table_rows(fields)

        return self._redis.execute(b"HGETALL", self._prefix + key).addCallback(parsed)

    def add_all(self, amounts: Mapping[str, int]) -> Deferred[None]:
        """Add each amount to its counter, in one round trip (not atomically
        checked against anything: counts that were admitted already)."""
        return self.add_many([(key, n, None) for key, n in amounts.items()], 0.0)

    def add_once(self, marker: str, amounts: Mapping[str, int]) -> Deferred[bool]:
        """Add ``amounts`` to their counters unless ``marker`` was set before
        (by anyone); whether they were added now."""
        keys = [self._prefix + marker, *(self._prefix + k for k in amounts)]
        return ADD_ONCE.run(self._redis, keys, list(amounts.values())).addCallback(bool)

    def read(self, keys: Sequence[str], now: float) -> Deferred[list[int]]:
        if not keys:
            return succeed([])
        d = self._redis.execute(b"MGET", *(self._prefix + k for k in keys))
        return d.addCallback(lambda values: [int(v) if v is not None else 0 for v in values])


def _admission(answer: Sequence[Any]) -> Admission:
    status = int(answer[0])
    if status == 0:
        return Admission(True, tuple(int(v) for v in answer[1:]))
    counts = tuple(int(v) for v in answer[2:])
    if status == 1:
        return Admission(False, counts, refused_by=int(answer[1]))
    wait = float(answer[1])
    return Admission(False, counts, retry_after=wait if wait > 0 else math.ulp(1.0))
