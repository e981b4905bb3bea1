"""The session log sink, in the Go llm-proxy's file layout
(tests: tests/unit/export/sinks/test_sessions.py).

Every event with a ``session_id`` is appended to
``{log_dir}/{upstream_host}/{YYYY-MM-DD}/{session_id}.jsonl``: the
``session_start`` or ``fork`` entry the session tracker published, then the
``request`` and ``response`` entries of each exchange.  An entry is the
canonical event (``type`` and all its fields) plus the Go llm-proxy's
``_meta {ts, machine, host, session, request_id}`` (the proxy llmproxy replaces:
tools that read its session logs read these).  Events without a session
(non-conversation requests) are skipped.

The date is the day (UTC) the exchange started (``start``, else ``ts``), so an
exchange's request and response stay in one file; a session that runs past
midnight goes on in the next day's directory under the same file name.  Host
and id are sanitised into file names (``[A-Za-z0-9._-]``, no dot segments,
long ids shortened with a hash).

One ``write`` per file per batch.  A failed write cuts every file the batch
touched back to where it was and answers ``Retry``, so a retry never duplicates
lines.  ``fsync`` (the exporter key) is ``never`` or per batch (``batch`` and
``always``: each file written is fsynced once).  Descriptors are cached: a file
idle for ``idle_close`` seconds (on the injected clock) is closed, and at most
``max_open`` stay open (the least recently used is closed first).  The I/O is
blocking, in the reactor thread, as with the file sink.

The sink follows its paths, as the file sink does: a cached file whose path no
longer names it (moved aside, deleted, ``log_dir`` removed) is reopened at its
path before the batch is written, directories made again; ``reopen()`` (SIGHUP)
closes every cached file.  Reopens are logged at info level, one line a batch,
and counted by reason in ``reopens``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from llmproxy.events.time import rfc3339_ns
from llmproxy.export.appendfile import displaced, open_append
from llmproxy.export.verdict import Delivered, Retry, Verdict

__all__ = [
    "MAX_STEM",
    "SessionsSink",
    "safe_name",
    "session_entry",
]

log = Logger()

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_DATE = re.compile(r"\d{4}-\d\d-\d\d")
# Longest file-name stem before the id is shortened: NAME_MAX is 255 bytes and
# ".jsonl" takes 6.
MAX_STEM = 200


def safe_name(text: str, fallback: str) -> str:
    """``text`` as one safe path segment: other characters become ``_``, dot
    segments are refused, and a long name keeps its start plus a hash of the whole."""
    name = _UNSAFE.sub("_", text)
    if not name.strip("."):
        name = fallback
    if len(name) > MAX_STEM:
        digest = hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:16]
        name = f"{name[: MAX_STEM - 17]}-{digest}"
    return name


def _day(event: dict[str, Any]) -> str | None:
    for key in ("start", "ts"):
        value = event.get(key)
        if isinstance(value, str) and _DATE.match(value):
            return value[:10]
    ts_ns = event.get("ts_ns")
    if isinstance(ts_ns, int) and not isinstance(ts_ns, bool) and ts_ns > 0:
        return rfc3339_ns(ts_ns)[:10]
    return None


def session_entry(event: dict[str, Any]) -> dict[str, Any]:
    """A session log entry: the event's fields plus ``_meta`` (the Go llm-proxy's)."""
    entry = dict(event)
    entry["_meta"] = {
        "ts": event.get("ts"),
        "machine": event.get("machine"),
        "host": event.get("upstream_host"),
        "session": event.get("session_id"),
        "request_id": event.get("request_id"),
    }
    return entry


@attrs.define(slots=True, eq=False)
class _OpenFile:
    fd: int
    last_used: float
    identity: tuple[int, int]  # (st_dev, st_ino): the path still names it while equal


@attrs.define(eq=False)
class SessionsSink:
    """Appends session entries to one JSONL file per session and day."""

    name: str
    _log_dir: Path
    _clock: IReactorTime
    _fsync: str = "batch"
    _idle_close: float = 60.0
    _max_open: int = attrs.field(default=256, validator=attrs.validators.gt(0))
    _files: OrderedDict[Path, _OpenFile] = attrs.field(init=False, factory=OrderedDict)
    _idle_timer: IDelayedCall | None = attrs.field(init=False, default=None)
    _reopens: dict[str, int] = attrs.field(init=False, factory=dict)

    @property
    def log_dir(self) -> Path:
        return self._log_dir

    @property
    def open_files(self) -> int:
        return len(self._files)

    @property
    def reopens(self) -> dict[str, int]:
        """Files reopened, by reason (``moved``, ``unlinked``, ``SIGHUP``)."""
        return dict(self._reopens)

    def path_for(self, event: dict[str, Any]) -> Path | None:
        """Where an event goes, or None when it belongs to no session."""
        session_id = event.get("session_id")
        if not isinstance(session_id, str) or not session_id:
            return None
        host = event.get("upstream_host")
        host_dir = safe_name(host if isinstance(host, str) else "", "unknown-host")
        day = _day(event) or rfc3339_ns(int(self._now() * 1_000_000_000))[:10]
        return self._log_dir / host_dir / day / f"{safe_name(session_id, 'unknown')}.jsonl"

    def deliver(self, events: Sequence[dict[str, Any]]) -> Deferred[Verdict]:
        groups: dict[Path, list[bytes]] = {}
        rejected: dict[int, str] = {}
        for index, event in enumerate(events):
            path = self.path_for(event)
            if path is None:
                continue
            try:
                line = orjson.dumps(session_entry(event)) + b"\n"
            except TypeError as e:
                rejected[index] = f"not JSON-serialisable: {e}"
                continue
            groups.setdefault(path, []).append(line)
        try:
            self._write(groups)
        except OSError as e:
            return succeed(Retry(f"session file write failed: {e.strerror or type(e).__name__}"))
        return succeed(Delivered(rejected))

    def reopen(self) -> Deferred[None]:
        """Close every open file (SIGHUP): the next batch opens the paths again.
        Batches are written synchronously, so none is half done."""
        if self._files:
            self._reopened({"SIGHUP": len(self._files)})
            for path in list(self._files):
                self._close(path)
        return succeed(None)

    def close(self) -> Deferred[None]:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        for path in list(self._files):
            self._close(path)
        return succeed(None)

    # -- files -------------------------------------------------------------------

    def _write(self, groups: dict[Path, list[bytes]]) -> None:
        self._follow_paths(groups)
        written: list[tuple[Path, int]] = []
        try:
            for path, lines in groups.items():
                fd = self._open(path)
                start = os.fstat(fd).st_size
                written.append((path, start))
                _write_all(fd, b"".join(lines))
                if self._fsync != "never":
                    os.fsync(fd)
        except OSError:
            self._roll_back(written)
            raise

    def _roll_back(self, written: list[tuple[Path, int]]) -> None:
        """Cut the files of a failed batch back, so its retry writes each line once."""
        for path, start in written:
            entry = self._files.get(path)
            try:
                if entry is None:
                    raise OSError("closed")
                os.ftruncate(entry.fd, start)
            except OSError:
                self._close(path)

    def _follow_paths(self, paths: Iterable[Path]) -> None:
        """Close the open files of this batch whose path no longer names them
        (moved aside, deleted, ``log_dir`` removed): ``_open`` opens them anew,
        directories made again.  One ``os.stat`` per file per batch."""
        reasons: dict[str, int] = {}
        for path in paths:
            entry = self._files.get(path)
            if entry is None:
                continue
            reason = displaced(path, entry.fd, entry.identity)
            if reason is not None:
                reasons[reason] = reasons.get(reason, 0) + 1
                self._close(path)
        if reasons:
            self._reopened(reasons)

    def _reopened(self, reasons: dict[str, int]) -> None:
        for reason, n in reasons.items():
            self._reopens[reason] = self._reopens.get(reason, 0) + n
        log.info(
            "sessions sink {name}: reopening {files} under {log_dir} ({reasons})",
            name=self.name,
            files=sum(reasons.values()),
            log_dir=str(self._log_dir),
            reasons=", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())),
        )

    def _open(self, path: Path) -> int:
        now = self._now()
        entry = self._files.get(path)
        if entry is not None:
            entry.last_used = now
            self._files.move_to_end(path)
            return entry.fd
        while len(self._files) >= self._max_open:
            self._close(next(iter(self._files)))
        opened = open_append(path, 0o640)
        self._files[path] = _OpenFile(opened.fd, now, opened.identity)
        self._arm_idle_timer()
        return opened.fd

    def _close(self, path: Path) -> None:
        entry = self._files.pop(path, None)
        if entry is not None:
            with contextlib.suppress(OSError):
                os.close(entry.fd)

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is None or not self._idle_timer.active():
            self._idle_timer = self._clock.callLater(self._idle_close, self._close_idle)

    def _close_idle(self) -> None:
        self._idle_timer = None
        cutoff = self._now() - self._idle_close
        for path, entry in list(self._files.items()):
            if entry.last_used <= cutoff:
                self._close(path)
        if self._files:
            oldest = next(iter(self._files.values())).last_used  # most recently used last
            delay = max(0.0, oldest + self._idle_close - self._now())
            self._idle_timer = self._clock.callLater(delay, self._close_idle)

    def _now(self) -> float:
        return float(self._clock.seconds())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
