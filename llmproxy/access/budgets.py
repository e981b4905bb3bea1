"""Spend per proxy token, and budgets that refuse a token once it is spent
(tests: tests/unit/access/test_budgets.py, tests/integration/test_budgets.py).

A token may carry ``max_usd`` (USD) and ``max_tokens`` (input + output tokens)
over a ``period``: ``day`` and ``month`` (UTC calendar day and month; the budget
is whole again at the next one) or ``total`` (the token's life).

- **Checked on the request path**, before forwarding (:meth:`SpendBook.refusal`):
  two dict lookups.  A token whose spend for the period is at or over its budget
  is refused with 429, ``code: budget_exceeded``, a message naming the budget
  and when it resets, and ``Retry-After`` until then (day and month).
- **Charged after the exchange ended** (:meth:`SpendBook.charge`, from the
  capture pump, which priced the answer): so a request already let through when
  the budget is crossed completes and is counted, and concurrent requests can
  overshoot a budget by at most what the requests in flight at that moment cost.

Counts are whole numbers (cost in nano-USD), kept per token and window under
keys ``budget:<token id>:usd|tokens:<window>`` (window ``2026-12-07``,
``2026-12`` or ``total``), the key scheme of the shared counters of
llmproxy/state (issue 16): :class:`llmproxy.interfaces.SpendCounters` is the seam a Redis-backed
counter plugs into, so that with ``[state] store = redis`` the budgets hold
across workers and hosts: with ``[state] store = redis`` the book is given the
shared state's counters (``shared``), every charge is added there too, and
llmproxy/access/policy.py reads them (:meth:`SpendBook.shared_refusal`) before
the shared admission.  With local state, counts are per process, as request
quotas are.

Spend is also kept per token, project, model and day in ``<state_dir>/
token-spend.json`` for ``llmproxy spend`` and ``llmproxy token list``: written
every few seconds and at a clean stop (a crash loses at most the last few
seconds of spend), read back at start.  With ``[state] store = redis`` each
charge also adds the answer's cost, tokens, request and unpriced count to its
(project, model) row of a table per window in Redis (``spend:<window>``, a hash
that vanishes with its day or month), in the same script run as the budget
counters (:meth:`llmproxy.state.counters.RedisCounters.charge`): that table is
what ``llmproxy spend`` reads then, for every worker of every host.

Model names come from answers (and so, through the upstream, from clients): a
name longer than :data:`MODEL_NAME_MAX` characters or with a non-printable
character counts as model ``other``, and so does any (project, model) beyond the
first ``[state] spend_rows`` of a day in this process's file, or of a window in
Redis (there exactly, across every process).
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from llmproxy.access.tokens import (
    StateFile,
    Token,
    TokenFileError,
    read_entry,
    write_atomically,
)
from llmproxy.interfaces import SpendCounters
from llmproxy.state.counters import LocalCounters, TableAdd

__all__ = [
    "MODEL_NAME_MAX",
    "NANO",
    "OTHER_MODEL",
    "PERIODS",
    "SPEND_FILE",
    "BudgetRefusal",
    "SpendBook",
    "SpendFile",
    "SpendRow",
    "Window",
    "budget_key",
    "read_spend",
    "spend_model",
    "spend_table_key",
    "spent_by_token",
    "summarize",
    "summarize_table",
    "window",
]

log = Logger()

PERIODS = ("day", "month", "total")
SPEND_FILE = "token-spend.json"
NANO = 1_000_000_000  # nano-USD per USD: counters are whole numbers
MODEL_NAME_MAX = 128
OTHER_MODEL = "other"
SPEND_ROWS = 1000  # [state] spend_rows' default
# The columns of a spend row, as SpendRow and the shared table name them.
SPEND_COLUMNS = ("usd_nanos", "tokens", "requests", "unpriced")


@attrs.frozen
class Window:
    """One period's window: its key and when the next one starts (None: never)."""

    key: str
    resets_at: float | None


def window(period: str, now: float) -> Window:
    """The window of ``period`` that holds ``now`` (epoch seconds, UTC)."""
    if period == "total":
        return Window("total", None)
    t = time.gmtime(now)
    if period == "day":
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        return Window(f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}", start + 86400.0)
    if period == "month":
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        return Window(
            f"{t.tm_year:04d}-{t.tm_mon:02d}", float(calendar.timegm((year, month, 1, 0, 0, 0)))
        )
    raise ValueError(f"unknown period {period!r} (one of {', '.join(PERIODS)})")


def budget_key(token_id: str, unit: str, window_key: str) -> str:
    """``budget:tok_ab12:usd:2026-12``: a counter of ``unit`` (``usd`` in nano-USD,
    ``tokens``) spent by a token in one window."""
    return f"budget:{token_id}:{unit}:{window_key}"


def spend_table_key(window_key: str) -> str:
    """``spend:2026-12``: the shared table of spend per (project, model) in one window."""
    return f"spend:{window_key}"


def spend_model(model: str | None) -> str:
    """The name ``model`` is counted under: ``-`` when absent, :data:`OTHER_MODEL`
    when too long or not printable (it is a column of a table a person reads)."""
    if not model:
        return "-"
    if len(model) > MODEL_NAME_MAX or not model.isprintable():
        return OTHER_MODEL
    return model


@attrs.define
class SpendRow:
    """What one token spent on one model on one UTC day."""

    token_id: str
    project: str
    model: str
    day: str  # YYYY-MM-DD (UTC)
    usd_nanos: int = 0
    tokens: int = 0
    requests: int = 0
    unpriced: int = 0  # answers with usage but no price (unknown model)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SpendRow:
        def text(key: str) -> str:
            v = data.get(key)
            if not isinstance(v, str):
                raise TokenFileError(f"spend row without {key!r}")
            return v

        def count(key: str) -> int:
            v = data.get(key, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TokenFileError(f"spend row field {key!r} is not a whole number")
            return v

        return cls(
            text("token_id"),
            text("project"),
            text("model"),
            text("day"),
            count("usd_nanos"),
            count("tokens"),
            count("requests"),
            count("unpriced"),
        )

    def in_window(self, period: str, window_key: str) -> bool:
        if period == "total":
            return True
        if period == "month":
            return self.day[:7] == window_key
        return self.day == window_key


class SpendFile(StateFile):
    """``<state_dir>/token-spend.json``: ``{"version": 1, "rows": [SpendRow...]}``."""

    NAME = SPEND_FILE

    def read(self) -> list[SpendRow]:
        rows = read_entry(self.path, "rows", list, "spend rows")
        if rows is None:
            return []
        try:
            return [SpendRow.from_json(r) for r in rows if isinstance(r, dict)]
        except TokenFileError as e:
            raise TokenFileError(f"{self.path}: {e}") from None

    def write(self, rows: Iterable[SpendRow]) -> None:
        doc = {"version": 1, "rows": [r.to_json() for r in rows]}
        write_atomically(self.path, orjson.dumps(doc))


@attrs.frozen
class BudgetRefusal:
    """Why a token may not spend more: which budget, and when it is whole again."""

    unit: str  # "usd" | "tokens"
    spent: float  # USD or tokens
    budget: float
    period: str
    resets_at: float | None

    def message(self) -> str:
        if self.unit == "usd":
            what = (
                f"the USD budget of this proxy token is spent (${self.spent:.6f} of "
                f"${self.budget:g}"
            )
        else:
            what = (
                f"the token budget of this proxy token is spent ({int(self.spent)} of "
                f"{int(self.budget)} tokens"
            )
        if self.resets_at is None:
            return f"{what} over its life); it does not reset"
        when = datetime.fromtimestamp(self.resets_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"{what} this {self.period}); it resets at {when}"

    def retry_after(self, now: float) -> int | None:
        if self.resets_at is None:
            return None
        return max(1, int(self.resets_at - now + 0.999))


class SpendBook:
    """Spend per token: the budget counters (request path) and the per-model
    rows (reports), persisted in a :class:`SpendFile`."""

    def __init__(
        self, file: SpendFile, shared: SpendCounters | None = None, max_rows: int = SPEND_ROWS
    ) -> None:
        self._file = file
        # (project, model) rows a day may hold; later ones count as model "other".
        self.max_rows = max_rows
        self._seen: dict[str, set[tuple[str, str]]] = {}  # day -> (project, model)s
        self._tables: tuple[tuple[str, float | None], ...] = ()
        self.counters = LocalCounters()
        # Counters every process shares ([state] store = redis): charges are added
        # there too, and :meth:`shared_refusal` / :meth:`budget_checks` read them.
        self.shared = shared
        self.shared_errors = 0
        self._rows: dict[tuple[str, str, str, str], SpendRow] = {}
        self._day = -1
        self._windows: list[Window] = []
        self._day_keys: dict[str, tuple[str, list[tuple[str, str, float | None]]]] = {}
        self._dirty = False
        self.write_errors = 0
        self.charged = 0
        self.loaded = False  # a book never loaded must not overwrite the file

    def load(self) -> None:
        self.loaded = True
        try:
            rows = self._file.read()
        except TokenFileError as e:
            log.warn("token spend not loaded, starting from 0: {err}", err=str(e))
            rows = []
        self._rows = {}
        self.counters = LocalCounters()
        for row in rows:
            self._merge(row)

    def _merge(self, row: SpendRow) -> None:
        self._seen.setdefault(row.day, set()).add((row.project, row.model))
        key = (row.token_id, row.project, row.model, row.day)
        mine = self._rows.get(key)
        if mine is None:
            self._rows[key] = attrs.evolve(row)
        else:
            mine.usd_nanos += row.usd_nanos
            mine.tokens += row.tokens
            mine.requests += row.requests
            mine.unpriced += row.unpriced
        now = calendar.timegm(time.strptime(row.day, "%Y-%m-%d")) + 1.0
        self._count(row.token_id, row.usd_nanos, row.tokens, now)

    def _keys(self, token_id: str, now: float) -> tuple[str, list[tuple[str, str, float | None]]]:
        """The day's key and, per window holding ``now``, ``(usd key, tokens key,
        expire_at)`` of ``token_id``: made once per token and UTC day (formatting
        them per answer cost ~15 µs)."""
        day = int(now // 86400)
        if day != self._day:
            self._day = day
            self._day_keys = {}
            self._windows = [window(period, now) for period in PERIODS]
            self._tables = tuple((spend_table_key(w.key), w.resets_at) for w in self._windows)
        found = self._day_keys.get(token_id)
        if found is None:
            found = self._day_keys[token_id] = (
                self._windows[0].key,
                [
                    (
                        budget_key(token_id, "usd", w.key),
                        budget_key(token_id, "tokens", w.key),
                        w.resets_at,
                    )
                    for w in self._windows
                ],
            )
        return found

    def _count(self, token_id: str, usd_nanos: int, tokens: int, now: float) -> None:
        add = self.counters.add_now
        for usd_key, tokens_key, expire_at in self._keys(token_id, now)[1]:
            if usd_nanos:
                add(usd_key, usd_nanos, now, expire_at)
            if tokens:
                add(tokens_key, tokens, now, expire_at)

    # -- the request path ---------------------------------------------------------

    def refusal(self, token: Token, now: float) -> BudgetRefusal | None:
        """Why ``token`` may not go on now, or None."""
        if token.max_usd is None and token.max_tokens is None:
            return None
        checks = self.budget_checks(token, now)
        value = self.counters.value
        return self.refusal_of(token, now, [value(key, now) for key, _, _ in checks])

    # -- after the exchange ------------------------------------------------------

    def charge(
        self,
        token_id: str,
        project: str,
        model: str | None,
        usage: Mapping[str, Any] | None,
        cost: Mapping[str, Any] | None,
        now: float,
    ) -> None:
        """Count an answer of ``token_id`` (its event's usage and cost)."""
        tokens = 0
        hit = cost is not None and cost.get("source") == "cache"
        if usage is not None and not hit:
            for field in ("input_tokens", "output_tokens"):
                n = usage.get(field)
                if type(n) is int and n > 0:
                    tokens += n
        total = cost.get("total") if cost is not None else None
        usd_nanos = round(total * NANO) if isinstance(total, float | int) and total > 0 else 0
        day, windows = self._keys(token_id, now)
        name = spend_model(model)
        seen = self._seen.get(day)
        if seen is None:
            # A new day: the days before it are bounded no more.
            self._seen = {d: rows for d, rows in self._seen.items() if d > day}
            seen = self._seen[day] = set()
        if (project, name) not in seen:
            if len(seen) >= self.max_rows:
                name = OTHER_MODEL
            seen.add((project, name))
        key = (token_id, project, name, day)
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = SpendRow(token_id, project, name, day)
        row.requests += 1
        row.usd_nanos += usd_nanos
        row.tokens += tokens
        unpriced = 1 if usage is not None and cost is None else 0
        row.unpriced += unpriced
        self._count(token_id, usd_nanos, tokens, now)
        self._dirty = True
        self.charged += 1
        shared = self.shared
        if shared is not None:
            # Every window's counters and spend table row in one round trip (a
            # script run costs the proxy far more CPU than its counters do).
            amounts = [
                (counter, amount, expire_at)
                for usd_key, tokens_key, expire_at in windows
                for counter, amount in ((usd_key, usd_nanos), (tokens_key, tokens))
                if amount
            ]
            table = TableAdd(
                f"{project}\t{name}",
                f"{project}\t{OTHER_MODEL}",
                SPEND_COLUMNS,
                (usd_nanos, tokens, 1, unpriced),
                self._tables,
                self.max_rows,
            )
            shared.charge(amounts, table, now).addErrback(self._shared_failed)

    def _shared_failed(self, failure: Any) -> None:
        self.shared_errors += 1
        log.warn("token spend not added to the shared counters: {err}", err=str(failure.value))

    # -- shared state (issue 16's counters) ------------------------------------------

    def budget_checks(self, token: Token, now: float) -> list[tuple[str, int, float | None]]:
        """``(key, limit, expire_at)`` per budget of ``token``: what a shared
        admission checks with ``add = 0`` (admitted while ``used < limit``), in the
        order :meth:`refusal_of` reads their counts."""
        w = window(token.period, now)
        checks = []
        if token.max_usd is not None:
            checks.append(
                (budget_key(token.id, "usd", w.key), round(token.max_usd * NANO), w.resets_at)
            )
        if token.max_tokens is not None:
            checks.append((budget_key(token.id, "tokens", w.key), token.max_tokens, w.resets_at))
        return checks

    def refusal_of(self, token: Token, now: float, counts: Sequence[int]) -> BudgetRefusal | None:
        """The refusal the counts of :meth:`budget_checks`' keys call for, or None."""
        w = window(token.period, now)
        for (key, limit, _), used in zip(self.budget_checks(token, now), counts, strict=True):
            if used >= limit:
                if key.split(":")[2] == "usd":
                    assert token.max_usd is not None
                    return BudgetRefusal(
                        "usd", used / NANO, token.max_usd, token.period, w.resets_at
                    )
                return BudgetRefusal("tokens", float(used), float(limit), token.period, w.resets_at)
        return None

    def shared_refusal(self, token: Token, now: float) -> Deferred[BudgetRefusal | None]:
        """:meth:`refusal` against the shared counters (one read)."""
        checks = self.budget_checks(token, now)
        if self.shared is None or not checks:
            return succeed(self.refusal(token, now))
        d = self.shared.read([key for key, _, _ in checks], now)
        return d.addCallback(lambda counts: self.refusal_of(token, now, counts))

    # -- reports --------------------------------------------------------------------

    def spent(self, token_id: str, period: str, now: float) -> tuple[float, int]:
        """(USD, tokens) ``token_id`` spent in the current window of ``period``."""
        w = window(period, now)
        return (
            self.counters.value(budget_key(token_id, "usd", w.key), now) / NANO,
            self.counters.value(budget_key(token_id, "tokens", w.key), now),
        )

    def rows(self) -> list[SpendRow]:
        return list(self._rows.values())

    # -- persistence ----------------------------------------------------------------

    def flush(self) -> None:
        if self._dirty:
            self._write()

    def close(self) -> None:
        self._write()

    def _write(self) -> None:
        try:
            self._file.write(self._rows.values())
            self._dirty = False
        except OSError as e:
            self.write_errors += 1
            log.warn(
                "token spend not written to {path}: {err}",
                path=str(self._file.path),
                err=e.strerror or str(e),
            )


def summarize(
    rows: Iterable[SpendRow], period: str, now: float
) -> dict[tuple[str, str], dict[str, int]]:
    """Per (project, model): usd_nanos, tokens, requests, unpriced in the current
    window of ``period``."""
    w = window(period, now)
    out: dict[tuple[str, str], dict[str, int]] = {}
    for row in rows:
        if not row.in_window(period, w.key):
            continue
        sums = out.setdefault(
            (row.project, row.model), {"usd_nanos": 0, "tokens": 0, "requests": 0, "unpriced": 0}
        )
        sums["usd_nanos"] += row.usd_nanos
        sums["tokens"] += row.tokens
        sums["requests"] += row.requests
        sums["unpriced"] += row.unpriced
    return out


def summarize_table(
    table: Mapping[str, Mapping[str, int]],
) -> dict[tuple[str, str], dict[str, int]]:
    """A shared spend table (``project TAB model -> {column: amount}``, one window) as
    :func:`summarize` gives the local rows."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for row, columns in table.items():
        project, _, model = row.partition("\t")
        out[(project, model)] = {column: columns.get(column, 0) for column in SPEND_COLUMNS}
    return out


def read_spend(state_dir: Path) -> list[SpendRow]:
    """Every process's spend rows under ``state_dir``: the proxy's own file and,
    with ``workers > 1``, each worker's (``worker-I/token-spend.json``).
    Raises TokenFileError for a file that cannot be read."""
    rows = SpendFile.in_state_dir(state_dir).read()
    for worker_dir in sorted(state_dir.glob("worker-*")):
        rows.extend(SpendFile.in_state_dir(worker_dir).read())
    return rows


def spent_by_token(rows: Iterable[SpendRow], now: float) -> dict[tuple[str, str], tuple[int, int]]:
    """(token id, period) -> (nano-USD, tokens) in the current window of each period."""
    windows = {p: window(p, now).key for p in PERIODS}
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for row in rows:
        for period, key in windows.items():
            if row.in_window(period, key):
                usd, tokens = out.get((row.token_id, period), (0, 0))
                out[(row.token_id, period)] = (usd + row.usd_nanos, tokens + row.tokens)
    return out
