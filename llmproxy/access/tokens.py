"""The proxy-token store (tests: tests/unit/access/test_tokens.py).

Two files under ``server.state_dir``:

- ``tokens.json`` -- the tokens, written only by ``llmproxy token create|revoke``
  (under an exclusive lock, atomically: temp file, fsync, rename, fsync of the
  directory) and only read by the proxy, which picks changes up live.  A token
  is ``llmp_`` + 43 url-safe characters (256 random bits), shown once at
  creation; the file keeps only its SHA-256 digest.  The token's id
  (``tok_`` + the first 12 hex digits of the digest) is a public handle for
  ``token list``/``token revoke`` and the audit log: it cannot be turned back
  into the token, so it is the token's obfuscated name everywhere.
- ``token-usage.json`` -- requests counted per token id, written only by the
  proxy.  See :class:`UsageLedger` for how counts survive restarts without a
  write per request.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, TypedDict, Unpack, cast

import attrs
import orjson
from twisted.logger import Logger

__all__ = [
    "MAX_TOKEN_LENGTH",
    "TOKENS_FILE",
    "TOKEN_PREFIX",
    "USAGE_FILE",
    "Stamp",
    "StateFile",
    "Token",
    "TokenFile",
    "TokenFileError",
    "TokenTerms",
    "UnknownToken",
    "UsageFile",
    "UsageLedger",
    "UsageStore",
    "digest_of",
    "id_for",
    "lease_size",
    "new_secret",
    "read_entry",
    "write_atomically",
]

log = Logger()

TOKEN_PREFIX = "llmp_"
TOKENS_FILE = "tokens.json"
USAGE_FILE = "token-usage.json"
_ID_PREFIX = "tok_"
_ID_HEX = 12
# Longer credentials are not ours; do not spend time hashing them.
MAX_TOKEN_LENGTH = 256


class TokenFileError(Exception):
    """The token file exists but cannot be used (unreadable, not our format)."""


class UnknownToken(KeyError):
    pass


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest_of(secret: str | bytes) -> str:
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hashlib.sha256(raw).hexdigest()


def id_for(digest: str) -> str:
    return _ID_PREFIX + digest[:_ID_HEX]


@attrs.frozen
class Token:
    """One proxy token as stored: never the secret itself, only its digest."""

    id: str
    sha256: str = attrs.field(repr=False)
    project: str
    created: float  # epoch seconds
    expires: float | None = None  # epoch seconds; None: never
    max_requests: int | None = None  # request quota over the token's life
    rpm: int | None = None  # requests per minute
    revoked: float | None = None  # epoch seconds when revoked
    # Budgets over ``period`` (day | month | total; llmproxy/access/budgets.py).
    max_usd: float | None = None
    max_tokens: int | None = None  # input + output tokens
    period: str = "total"
    # Upstream paths (prefixes or globs) and methods the token may use; empty: all
    # (within the route's own allowed_paths / allowed_methods).
    allowed_paths: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ()

    def state(self, now: float) -> str:
        """``active``, ``revoked`` or ``expired``."""
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return "active"

    def terms(self) -> TokenTerms:
        """What the token may do, as it was created with."""
        return cast(TokenTerms, {key: getattr(self, key) for key in TokenTerms.__annotations__})

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["allowed_paths"] = list(self.allowed_paths)
        data["allowed_methods"] = list(self.allowed_methods)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Token:
        def number(key: str) -> float | None:
            v = data.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise TokenFileError(f"token field {key!r} is not a number")
            return float(v)

        def strings(key: str) -> tuple[str, ...]:
            v = data.get(key) or []
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise TokenFileError(f"token field {key!r} is not a list of strings")
            return tuple(v)

        def count(key: str) -> int | None:
            v = data.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TokenFileError(f"token field {key!r} is not a whole number")
            return v

        digest = data.get("sha256")
        project = data.get("project")
        if not isinstance(digest, str) or len(digest) != 64:
            raise TokenFileError("token without a sha256 digest")
        if not isinstance(project, str):
            raise TokenFileError("token without a project")
        created = number("created")
        period = data.get("period", "total")
        if period not in ("day", "month", "total"):
            raise TokenFileError("token field 'period' is not day, month or total")
        return cls(
            id=id_for(digest),
            sha256=digest,
            project=project,
            created=created if created is not None else 0.0,
            expires=number("expires"),
            max_requests=count("max_requests"),
            rpm=count("rpm"),
            revoked=number("revoked"),
            max_usd=number("max_usd"),
            max_tokens=count("max_tokens"),
            period=period,
            allowed_paths=strings("allowed_paths"),
            allowed_methods=strings("allowed_methods"),
        )


class TokenTerms(TypedDict, total=False):
    """What a new token may do, as ``Token`` spells it (every key optional)."""

    expires: float | None
    max_requests: int | None
    rpm: int | None
    max_usd: float | None
    max_tokens: int | None
    period: str
    allowed_paths: tuple[str, ...]
    allowed_methods: tuple[str, ...]


def new_token(project: str, now: float, **terms: Unpack[TokenTerms]) -> tuple[str, Token]:
    """A new secret and the token stored for it."""
    secret = new_secret()
    digest = digest_of(secret)
    token = Token(id=id_for(digest), sha256=digest, project=project, created=now, **terms)
    return secret, token


def read_entry(path: Path, key: str, kind: type, what: str) -> Any:
    """The ``key`` entry (a ``kind``) of the JSON document at ``path``; None when
    there is no file yet.  ``TokenFileError`` naming the file and ``what`` was
    wanted when it cannot be read or has no such entry."""
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as e:
        raise TokenFileError(f"cannot read {path}: {e}") from None
    entry = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(entry, kind):
        raise TokenFileError(f"{path} has no {what}")
    return entry


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new file, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


Stamp = tuple[int, int, int]  # (inode, mtime ns, size): changes on every atomic replace


@attrs.define(eq=False)
class StateFile:
    """A JSON file of the proxy's state: ``<state_dir>/<NAME>`` by default."""

    NAME: ClassVar[str]
    path: Path

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> Self:
        return cls(state_dir / cls.NAME)


class TokenFile(StateFile):
    """``<state_dir>/tokens.json``: read by the proxy, changed by the CLI."""

    NAME = TOKENS_FILE

    def stamp(self) -> Stamp | None:
        try:
            st = os.stat(self.path)
        except OSError:
            # Gone or unreachable: read() then says which, and the policy keeps
            # or drops its tokens accordingly.
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def read(self) -> tuple[Token, ...]:
        """All tokens; none when the file does not exist yet."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return ()
        except OSError as e:
            raise TokenFileError(f"cannot read {self.path}: {e.strerror}") from None
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise TokenFileError(f"{self.path} is not JSON ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("tokens"), list):
            raise TokenFileError(f"{self.path} has no token list")
        try:
            return tuple(Token.from_json(t) for t in doc["tokens"] if isinstance(t, dict))
        except TokenFileError as e:
            raise TokenFileError(f"{self.path}: {e}") from None

    def create(self, project: str, now: float, **terms: Unpack[TokenTerms]) -> tuple[str, Token]:
        """A new token: returns the secret (to show once) and what is stored."""
        with self._locked():
            tokens = list(self.read())
            taken = {t.id for t in tokens}
            while True:
                secret, token = new_token(project, now, **terms)
                if token.id not in taken:
                    break
            tokens.append(token)
            self._write(tokens)
        return secret, token

    def revoke(self, token_id: str, now: float) -> tuple[Token, bool]:
        """Mark a token revoked; returns it and whether it changed (False: already revoked)."""
        with self._locked():
            tokens = list(self.read())
            for i, t in enumerate(tokens):
                if t.id == token_id:
                    if t.revoked is not None:
                        return t, False
                    tokens[i] = attrs.evolve(t, revoked=now)
                    self._write(tokens)
                    return tokens[i], True
        raise UnknownToken(token_id)

    def _write(self, tokens: list[Token]) -> None:
        doc = {"version": 1, "tokens": [t.to_json() for t in tokens]}
        write_atomically(self.path, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Two CLI runs at once must not lose each other's change.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


class UsageFile(StateFile):
    """``<state_dir>/token-usage.json``: ``{"version": 1, "used": {token id: count}}``."""

    NAME = USAGE_FILE

    def read(self) -> dict[str, int]:
        used = read_entry(self.path, "used", dict, "usage counts")
        if used is None:
            return {}
        return {
            k: v
            for k, v in used.items()
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0
        }

    def write(self, used: Mapping[str, int]) -> None:
        write_atomically(self.path, orjson.dumps({"version": 1, "used": dict(used)}))


class UsageStore(Protocol):
    path: Path

    def read(self) -> dict[str, int]: ...

    def write(self, used: Mapping[str, int]) -> None: ...


def lease_size(max_requests: int) -> int:
    """How many requests of a quota one write of the usage file reserves.

    1 % of the quota (at least 1): at most ~100 writes over a token's life,
    and a crash forfeits at most 1 % of its quota.
    """
    return max(1, max_requests // 100)


class UsageLedger:
    """Requests counted per token id, exact in the running proxy, persisted so
    quotas survive restarts.

    The guarantee: a quota is never exceeded, not under concurrency (the reactor
    thread checks and counts in one step) and not across restarts or crashes.
    For a token with a quota, the count on disk is a *reservation*: before the
    request that would pass it is let through, the ledger writes
    ``used + lease_size(quota)`` (capped at the quota) synchronously.  A crash
    therefore loses at most that unused reservation -- the token may end up
    refused up to 1 % of its quota early, never late.  Counts of tokens without
    a quota are informational and are written by :meth:`flush` (every few
    seconds); a clean stop (:meth:`close`) writes the exact counts and releases
    the reservations.
    """

    def __init__(self, file: UsageStore) -> None:
        self._file = file
        self._used: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self._dirty = False
        self.write_errors = 0

    def load(self) -> None:
        try:
            on_disk = self._file.read()
        except TokenFileError as e:
            # Unreadable counts must not reset quotas silently: say so loudly.
            log.warn("token usage counts not loaded, starting from 0: {err}", err=str(e))
            on_disk = {}
        self._used = dict(on_disk)
        self._reserved = dict(on_disk)

    def used(self, token_id: str) -> int:
        return self._used.get(token_id, 0)

    def snapshot(self) -> dict[str, int]:
        return dict(self._used)

    def exhausted(self, token: Token) -> bool:
        return token.max_requests is not None and self.used(token.id) >= token.max_requests

    def consume(self, token: Token) -> None:
        """Count one request for ``token`` (the caller checked :meth:`exhausted`)."""
        n = self._used.get(token.id, 0) + 1
        self._used[token.id] = n
        self._dirty = True
        quota = token.max_requests
        if quota is not None and n > self._reserved.get(token.id, 0):
            self._reserved[token.id] = min(quota, n - 1 + lease_size(quota))
            self._write(self._on_disk_view())

    def flush(self) -> None:
        if self._dirty:
            self._write(self._on_disk_view())

    def close(self) -> None:
        """The proxy serves no more: write the exact counts, releasing reservations."""
        self._reserved = dict(self._used)
        self._write(self._used)

    def _on_disk_view(self) -> dict[str, int]:
        view = dict(self._used)
        for k, v in self._reserved.items():
            if v > view.get(k, 0):
                view[k] = v
        return view

    def _write(self, counts: Mapping[str, int]) -> None:
        try:
            self._file.write(counts)
            self._dirty = False
        except OSError as e:
            # Counting goes on in memory (quotas stay exact while running).
            self.write_errors += 1
            log.warn(
                "token usage counts not written to {path}: {err}",
                path=str(self._file.path),
                err=e.strerror or str(e),
            )
