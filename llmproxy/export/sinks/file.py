"""The JSONL file sink, the embedded default (tests: tests/unit/export/sinks/test_file.py).

One event a line, appended.  ``fsync``: ``never`` (the OS flushes when it likes),
``batch`` (once per delivered batch) or ``always`` (after each line).  Size-based
rotation: before a batch would take the file past ``rotate_bytes`` it is renamed
``<name>.1`` (older ones shift to ``.2`` ... ``.<rotate_keep>``, the oldest deleted).

The reactor thread never waits for the disk to sync.  With ``never`` and ``batch``
the batch is one ``writev`` in the reactor thread (a write to the page cache is
fast); the ``fsync`` of ``batch`` runs through the injected ``run_blocking``
(``deferToThread`` by default).  With ``always``, writing line by line with an
``fsync`` after each is all blocking, so all of it runs there.  A batch is
answered ``Delivered`` only once its ``fsync`` is done: the exporter counts
nothing as sent before it is durable.

Batches are handled one at a time, in order: a batch (or ``close``) arriving
while an ``fsync`` is in flight waits for it, so the file is never rotated,
closed or written by two hands at once, and the descriptor an ``fsync`` uses
stays open until it returns.  A failing write or ``fsync`` (disk full,
permission, I/O error) is answered with ``Retry``; what the batch left in the
file is cut off again, so a retry does not duplicate lines.

The sink follows its path, not its descriptor.  Before each batch one
``os.stat`` of the path (5-8 us against 45-90 us for writing 100 events;
benchmarks/bench_file_sink.py) is compared with the device and inode the
descriptor was opened on: when the file was moved aside or deleted (logrotate
without ``copytruncate``, or the whole ``state_dir`` removed) the batch goes to a
new file at the configured path, its directory created again if need be; what
was written before stays in the moved file.  ``reopen()`` (SIGHUP, logrotate's
``postrotate``) closes the file once the batches queued before it are done; the
next batch opens the path again.  Each reopen is logged once at info level with
its reason (``moved``, ``unlinked``, ``SIGHUP``) and counted in ``reopens``.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import orjson
from twisted.internet import threads
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.export.appendfile import displaced, open_append
from llmproxy.export.verdict import Delivered, Retry, Verdict
from llmproxy.interfaces import RunBlocking

__all__ = ["FSYNC_POLICIES", "FileSink"]

log = Logger()

FSYNC_POLICIES = ("never", "batch", "always")

_T = TypeVar("_T")


def _default_run_blocking() -> RunBlocking:
    # Looked up when a sink is made, not when this module is imported.
    return threads.deferToThread


# How many buffers one ``writev`` takes (POSIX IOV_MAX; 1024 on Linux).
_IOV_MAX = max(2, min(os.sysconf("SC_IOV_MAX"), 1024)) if hasattr(os, "sysconf") else 16
_NEWLINE = b"\n"
# A batch smaller than this is joined and written at once; a larger one goes out
# with ``writev``, never joined: a joined buffer much past this comes from
# ``mmap``, and faulting in its pages costs more than the write (on a VM, 5x for
# a megabyte; ``benchmarks/bench_file_sink.py``, "joined").
_JOIN_BELOW = 96 * 1024


def _write_lines(fd: int, lines: Sequence[bytes]) -> None:
    """Write ``lines``, each followed by a newline, carrying on after short writes."""
    if sum(map(len, lines)) < _JOIN_BELOW:
        pieces: list[bytes | memoryview] = [b"\n".join(lines) + _NEWLINE]
        _write_pieces(fd, pieces)
        return
    per_call = _IOV_MAX // 2
    for first in range(0, len(lines), per_call):
        pieces = []
        for line in lines[first : first + per_call]:
            pieces += (line, _NEWLINE)
        _write_pieces(fd, pieces)


def _write_pieces(fd: int, pieces: list[bytes | memoryview]) -> None:
    """One ``writev`` of ``pieces`` (at most ``_IOV_MAX``), then more for what a
    short write left."""
    while pieces:
        written = os.writev(fd, pieces)
        done = 0
        for piece in pieces:  # drop what was written, cut a half-written piece
            if written < len(piece):
                break
            written -= len(piece)
            done += 1
        del pieces[:done]
        if pieces and written:
            pieces[0] = memoryview(pieces[0])[written:]


def _write_lines_synced(fd: int, lines: Sequence[bytes]) -> None:
    """``fsync = always``: each line on disk before the next is written (blocking)."""
    for line in lines:
        _write_lines(fd, (line,))
        os.fsync(fd)


@attrs.define(eq=False)
class _Job:
    """One ``deliver`` (``lines`` set: each event's JSON, without its newline), or
    one ``close`` or ``reopen`` (``lines`` None; ``reopen`` says why), queued."""

    deferred: Deferred[Any]
    lines: Sequence[bytes] | None = None
    rejected: dict[int, str] = attrs.Factory(dict)
    reopen: str | None = None


@attrs.define
class FileSink:
    """Appends events as JSON lines to ``path``, rotating by size."""

    name: str
    _path: Path
    _fsync: str = attrs.field(default="batch", validator=attrs.validators.in_(FSYNC_POLICIES))
    _rotate_bytes: int = 100 * 1024 * 1024  # 0 or less: never rotate
    _rotate_keep: int = 5
    _run_blocking: RunBlocking = attrs.Factory(_default_run_blocking)
    _fd: int | None = attrs.field(init=False, default=None)
    # (st_dev, st_ino) of the open file: the path still names it while they match.
    _identity: tuple[int, int] = attrs.field(init=False, default=(0, 0))
    _size: int = attrs.field(init=False, default=0)
    _reopens: dict[str, int] = attrs.field(init=False, factory=dict)
    _jobs: deque[_Job] = attrs.field(init=False, factory=deque)
    # A job's blocking part (an fsync, or the writes of ``always``) is in flight.
    _busy: bool = attrs.field(init=False, default=False)
    # ``_run_jobs`` is on the stack (a synchronous ``run_blocking``, or a caller
    # answering a verdict with a new ``deliver``): the running loop goes on.
    _running: bool = attrs.field(init=False, default=False)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def reopens(self) -> dict[str, int]:
        """How often the file was reopened, by reason."""
        return dict(self._reopens)

    def deliver(self, events: Sequence[dict[str, Any]]) -> Deferred[Verdict]:
        lines: list[bytes] = []
        rejected: dict[int, str] = {}
        for index, event in enumerate(events):
            try:
                lines.append(orjson.dumps(event))
            except TypeError as e:
                rejected[index] = f"not JSON-serialisable: {e}"
        result: Deferred[Verdict] = Deferred(self._cancel)
        self._jobs.append(_Job(result, lines, rejected))
        self._run_jobs()
        return result

    def deliver_lines(
        self, events: Sequence[dict[str, Any]], lines: Sequence[bytes]
    ) -> Deferred[Verdict]:
        """``deliver`` for an exporter that holds each event's JSON already
        (``orjson.dumps(event)``, as ``deliver`` would write it): no second encoding."""
        result: Deferred[Verdict] = Deferred(self._cancel)
        # A list of its own: the job may wait for an fsync, and the lines are
        # written as they are, never copied into one buffer.
        self._jobs.append(_Job(result, list(lines), {}))
        self._run_jobs()
        return result

    def close(self) -> Deferred[None]:
        """Close the file once the batches before have been written (and synced)."""
        result: Deferred[None] = Deferred()
        self._jobs.append(_Job(result))
        self._run_jobs()
        return result

    def reopen(self) -> Deferred[None]:
        """Close the file once the batches before have been written (and synced);
        the next batch opens the configured path again (SIGHUP after logrotate)."""
        result: Deferred[None] = Deferred()
        self._jobs.append(_Job(result, reopen="SIGHUP"))
        self._run_jobs()
        return result

    # -- the queue ------------------------------------------------------------------

    def _cancel(self, deferred: Deferred[Any]) -> None:
        # A batch not started is never written: the exporter spools it or gives up on
        # it.  One started is written already; only the answer is lost.
        for job in self._jobs:
            if job.deferred is deferred:
                self._jobs.remove(job)
                break

    def _run_jobs(self) -> None:
        if self._running:
            return
        self._running = True
        try:
            while not self._busy and self._jobs:
                job = self._jobs.popleft()
                if job.lines is None:
                    if job.reopen is not None and self._fd is not None:
                        self._closed_for_reopen(job.reopen)
                    self._close_file()
                    _answer(job, None)
                else:
                    self._start(job)
        finally:
            self._running = False

    def _start(self, job: _Job) -> None:
        lines = job.lines
        assert lines is not None
        if not lines:
            _answer(job, Delivered(job.rejected))
            return
        length = sum(map(len, lines)) + len(lines)  # with the newlines
        try:
            self._follow_path()
            fd = self._open()
            if self._size and 0 < self._rotate_bytes < self._size + length:
                self._rotate()
                fd = self._open()
        except OSError as e:
            _answer(job, _write_failed(e))
            return
        start = self._size
        if self._fsync == "always":
            self._in_background(job, fd, start, length, lambda: _write_lines_synced(fd, lines))
            return
        try:
            _write_lines(fd, lines)
        except OSError as e:
            self._cut(fd, start)
            _answer(job, _write_failed(e))
            return
        self._size = start + length
        if self._fsync == "never":
            _answer(job, Delivered(job.rejected))
            return
        self._in_background(job, fd, start, length, lambda: os.fsync(fd))

    def _in_background(
        self, job: _Job, fd: int, start: int, length: int, work: Callable[[], None]
    ) -> None:
        """Run ``work`` through ``run_blocking``; answer ``job`` when it is done."""
        self._busy = True
        try:
            done: Deferred[None] = self._run_blocking(work)
        except Exception:
            done = fail()  # a broken runner: this job fails, the queue goes on

        def finished(result: Failure | None) -> None:
            self._busy = False
            verdict: Verdict | Failure
            if isinstance(result, Failure):
                self._cut(fd, start)
                if isinstance(result.value, OSError):
                    verdict = _write_failed(result.value)
                else:
                    verdict = result  # a bug: the exporter logs it and retries
            else:
                self._size = start + length
                verdict = Delivered(job.rejected)
            _answer(job, verdict)
            self._run_jobs()

        done.addBoth(finished)

    # -- the file -------------------------------------------------------------------

    def _cut(self, fd: int, start: int) -> None:
        """Cut off what a failed batch left (a half line would corrupt the file,
        whole lines would be written twice by the retry)."""
        try:
            os.ftruncate(fd, start)
            self._size = start
        except OSError:
            self._close_file()  # reopened, size re-read, on the next batch

    def _open(self) -> int:
        if self._fd is None:
            opened = open_append(self._path, 0o640)
            self._fd = opened.fd
            self._size = opened.size
            self._identity = opened.identity
        return self._fd

    def _follow_path(self) -> None:
        """Close the file when the path no longer names it (moved aside or
        deleted): ``_open`` then opens the path anew."""
        if self._fd is not None:
            reason = displaced(self._path, self._fd, self._identity)
            if reason is not None:
                self._closed_for_reopen(reason)
                self._close_file()

    def _closed_for_reopen(self, reason: str) -> None:
        self._reopens[reason] = self._reopens.get(reason, 0) + 1
        log.info(
            "file sink {name}: reopening {path} ({reason})",
            name=self.name,
            path=str(self._path),
            reason=reason,
        )

    def _close_file(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _rotate(self) -> None:
        self._close_file()
        if self._rotate_keep <= 0:
            self._path.unlink(missing_ok=True)
            return
        oldest = self._numbered(self._rotate_keep)
        oldest.unlink(missing_ok=True)
        for n in range(self._rotate_keep - 1, 0, -1):
            older = self._numbered(n)
            if older.exists():
                os.replace(older, self._numbered(n + 1))
        os.replace(self._path, self._numbered(1))

    def _numbered(self, n: int) -> Path:
        return self._path.with_name(f"{self._path.name}.{n}")


def _write_failed(error: OSError) -> Retry:
    return Retry(f"file write failed: {error.strerror or type(error).__name__}")


def _answer(job: _Job, result: object) -> None:
    # A cancelled Deferred has fired already (with CancelledError).
    if not job.deferred.called:
        if isinstance(result, Failure):
            job.deferred.errback(result)
        else:
            job.deferred.callback(result)
