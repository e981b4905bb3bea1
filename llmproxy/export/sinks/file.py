"""The JSONL file sink, the embedded default (tests: tests/unit/test_file_sink.py).

One event a line, appended.  ``fsync``: ``never`` (the OS flushes when it likes),
``batch`` (once per delivered batch) or ``always`` (after each line).  Size-based
rotation: before a batch would take the file past ``rotate_bytes`` it is renamed
``<name>.1`` (older ones shift to ``.2`` ... ``.<rotate_keep>``, the oldest deleted).

The file I/O is blocking and runs in the reactor thread: acceptable for a local
file, and kept to one ``write`` per batch (except with ``fsync = always``).  A
failing write (disk full, permission) is answered with ``Retry``; what the failed
write left in the file is cut off again, so a retry does not duplicate lines.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson
from twisted.internet.defer import Deferred, succeed

from llmproxy.export.sink import Delivered, Retry, Verdict

FSYNC_POLICIES = ("never", "batch", "always")


@attrs.define
class FileSink:
    """Appends events as JSON lines to ``path``, rotating by size."""

    name: str
    _path: Path
    _fsync: str = attrs.field(default="batch", validator=attrs.validators.in_(FSYNC_POLICIES))
    _rotate_bytes: int = 100 * 1024 * 1024  # 0 or less: never rotate
    _rotate_keep: int = 5
    _fd: int | None = attrs.field(init=False, default=None)
    _size: int = attrs.field(init=False, default=0)

    @property
    def path(self) -> Path:
        return self._path

    def deliver(self, events: Sequence[dict[str, Any]]) -> Deferred[Verdict]:
        lines: list[bytes] = []
        rejected: dict[int, str] = {}
        for index, event in enumerate(events):
            try:
                lines.append(orjson.dumps(event) + b"\n")
            except TypeError as e:
                rejected[index] = f"not JSON-serialisable: {e}"
        try:
            self._append(lines)
        except OSError as e:
            return succeed(Retry(f"file write failed: {e.strerror or type(e).__name__}"))
        return succeed(Delivered(rejected))

    def close(self) -> Deferred[None]:
        self._close_file()
        return succeed(None)

    def _append(self, lines: list[bytes]) -> None:
        if not lines:
            return
        data = b"".join(lines)
        fd = self._open()
        if self._size and 0 < self._rotate_bytes < self._size + len(data):
            self._rotate()
            fd = self._open()
        start = self._size
        try:
            if self._fsync == "always":
                for line in lines:
                    self._write_all(fd, line)
                    os.fsync(fd)
            else:
                self._write_all(fd, data)
                if self._fsync == "batch":
                    os.fsync(fd)
        except OSError:
            # Cut off what the failed write left (a half line would corrupt the file,
            # whole lines would be written twice by the retry).
            try:
                os.ftruncate(fd, start)
                self._size = start
            except OSError:
                self._close_file()  # reopened, size re-read, on the next batch
            raise
        self._size = start + len(data)

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def _open(self) -> int:
        if self._fd is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._size = os.fstat(self._fd).st_size
        return self._fd

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
