"""Append-only files that follow their path (tests: tests/unit/export/test_appendfile.py).

A daemon that keeps a log file open writes, by default, wherever the descriptor
points: after logrotate moves the file aside (without ``copytruncate``) or
someone removes ``state_dir``, every later line goes to a file nobody will read
again.  The writers that hold a file open (the file and sessions sinks, the
audit log, the session journal) open it with :func:`open_append`, which makes
the directory first and remembers the file's identity (device, inode), and ask
:func:`displaced` before they write: one ``os.stat`` of the path, and an
``fstat`` only when the path no longer names the open file, to tell why.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

__all__ = ["MOVED", "UNLINKED", "OpenedFile", "displaced", "open_append"]

MOVED = "moved"  # renamed away (or another file put at the path): still on disk
UNLINKED = "unlinked"  # deleted: what is written through the descriptor is gone


@attrs.frozen
class OpenedFile:
    """A descriptor opened for appending, with what :func:`displaced` compares."""

    fd: int
    size: int  # bytes in the file when it was opened
    identity: tuple[int, int]  # (st_dev, st_ino)


def open_append(path: Path, mode: int = 0o640) -> OpenedFile:
    """Open ``path`` for appending (created with ``mode``), its directory made
    first (again, when it was removed).  Raises ``OSError``."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, flags, mode)
    except FileNotFoundError:  # the directory went again in between: once more
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, mode)
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    return OpenedFile(fd, st.st_size, (st.st_dev, st.st_ino))


def displaced(path: Path, fd: int, identity: tuple[int, int]) -> str | None:
    """``None`` while ``path`` names the file open as ``fd``; else why not:
    :data:`UNLINKED` (no name left) or :data:`MOVED`.  A path that cannot be
    looked up for another reason (permissions) counts as still naming it: the
    descriptor is kept rather than thrown away on a guess."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError:
        return None
    else:
        if (st.st_dev, st.st_ino) == identity:
            return None
    try:
        links = os.fstat(fd).st_nlink
    except OSError:
        return UNLINKED
    return UNLINKED if links == 0 else MOVED
