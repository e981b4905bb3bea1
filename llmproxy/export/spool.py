"""A bounded disk spool of undelivered batches, one per sink
(tests: tests/unit/export/test_spool.py).

The spool is a directory of *segments*, one batch per file, each line the JSON of
one event.  A segment's name carries what the exporter needs without reading it:
``<first>-<last>-<count>.jsonl``, where ``first``/``last`` are the exporter's
ordinals of its first and last event (publish order, never reused across restarts)
and ``count`` the number of events.  Segments sort by ``first``, so replaying them
in name order is replaying them oldest first, whatever order they were written in
(a batch that exhausted its retries is older than a chunk spilled while it waited).

A segment is written to a hidden temporary name, fsynced, then renamed (and the
directory fsynced): after a ``kill -9`` a segment is either complete or absent, and
leftover temporary files are deleted at start.

Writing in two phases.  ``append`` writes synchronously.  So that the reactor
thread never waits for a disk, the exporter uses ``begin`` (reactor thread:
reserve room, name the segment), ``write`` (any thread: the file itself) and
``commit`` or ``abort`` (reactor thread: the segment is tracked, or the
reservation released).  A segment being written is *pending*: it is not offered
for replay and its bytes count against the bound.

A directory removed at run time is made again by the next write (once; a second
failure is raised).  The segments that vanished with it are lost: reading one
raises ``OSError`` and the exporter counts its events (``spool_read_failed``).

The spool is bounded by ``max_bytes``: making room discards the oldest segments,
and the caller counts their events as dropped.  The segment being replayed is
*checked out*: it stays on disk until its delivery is confirmed (at-least-once
across crashes) but is neither discarded nor offered again meanwhile.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson

__all__ = [
    "PendingSegment",
    "Segment",
    "SegmentContents",
    "Spool",
]

_SEGMENT_NAME = re.compile(r"^(\d+)-(\d+)-(\d+)\.jsonl$")
_TEMP_PREFIX = ".tmp-"


@attrs.frozen
class Segment:
    """One spooled batch on disk."""

    first: int  # exporter ordinal of its first event: the sort key
    last: int
    count: int  # events in it, as written
    size: int  # bytes on disk
    path: Path


@attrs.frozen
class PendingSegment:
    """A segment reserved by ``begin``: written by ``write``, then ``commit``-ted."""

    first: int
    last: int
    count: int
    data: bytes = attrs.field(repr=False)
    path: Path


@attrs.frozen
class SegmentContents:
    """What reading a segment back gave: events, and lines that were not event JSON."""

    events: list[dict[str, Any]]
    lines: list[bytes]  # the raw JSON of each event in ``events``, for rewriting
    corrupt: list[bytes]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@attrs.define
class Spool:
    """The segments of one sink's spool directory, recovered from disk at construction."""

    _directory: Path
    _max_bytes: int
    _segments: dict[int, Segment] = attrs.field(init=False, factory=dict)
    # The segments' first ordinals, sorted: a long outage leaves thousands of
    # segments, and sorting them for every write or replay would grow with it.
    _order: list[int] = attrs.field(init=False, factory=list)
    _checked_out: set[int] = attrs.field(init=False, factory=set)
    _pending: dict[int, PendingSegment] = attrs.field(init=False, factory=dict)
    _bytes: int = attrs.field(init=False, default=0)
    _events: int = attrs.field(init=False, default=0)
    _next_ordinal: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._directory.mkdir(parents=True, exist_ok=True)
        for path in self._directory.iterdir():
            if path.name.startswith(_TEMP_PREFIX):
                # A write interrupted before its rename: never a valid segment.
                path.unlink(missing_ok=True)
                continue
            match = _SEGMENT_NAME.match(path.name)
            if match is None or not path.is_file():
                continue
            first, last, count = (int(g) for g in match.groups())
            self._add(Segment(first, last, count, path.stat().st_size, path))

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def size_bytes(self) -> int:
        """Bytes on disk, checked-out segment included (pending ones not)."""
        return self._bytes

    @property
    def event_count(self) -> int:
        """Events on disk that are not checked out (waiting to be replayed)."""
        return self._events - sum(self._segments[f].count for f in self._checked_out)

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def next_ordinal(self) -> int:
        """The first ordinal the exporter may use: above every spooled one."""
        return self._next_ordinal

    def segments(self) -> list[Segment]:
        """Every segment, oldest first."""
        return [self._segments[f] for f in self._order]

    def oldest(self) -> Segment | None:
        """The oldest segment that is not checked out, or ``None``."""
        checked_out = self._checked_out
        for first in self._order:
            if first not in checked_out:
                return self._segments[first]
        return None

    def append(self, lines: Sequence[bytes], first: int, last: int) -> int:
        """Write one batch (the JSON of each event) as a segment, synchronously.

        Returns how many events the size bound discarded: the oldest segments (not
        checked out) go first, and the new batch itself when it is the oldest or
        alone bigger than the bound.  Raises ``OSError`` when the write fails
        (nothing is then added).
        """
        pending, discarded = self.begin(lines, first, last)
        if pending is None:
            return discarded
        try:
            self.write(pending)
        except OSError:
            self.abort(pending)
            raise
        self.commit(pending)
        return discarded

    def begin(
        self, lines: Sequence[bytes], first: int, last: int
    ) -> tuple[PendingSegment | None, int]:
        """Reserve room for a segment (reactor thread).

        Returns the pending segment (``None`` when the batch itself was discarded
        by the bound, or is empty) and how many events the bound discarded,
        counting the batch's own when it does not fit.
        """
        if not lines:
            return None, 0
        if first in self._segments or first in self._pending:
            raise ValueError(f"spool already holds a segment starting at ordinal {first}")
        data = b"\n".join([*lines, b""])  # one copy: "+ newline" would be a second
        discarded, fits = self._make_room(len(data), first)
        if not fits:
            return None, discarded + len(lines)
        path = self._directory / f"{first}-{last}-{len(lines)}.jsonl"
        pending = PendingSegment(first, last, len(lines), data, path)
        self._pending[first] = pending
        self._next_ordinal = max(self._next_ordinal, last + 1)
        return pending, discarded

    def write(self, pending: PendingSegment) -> None:
        """Write a pending segment's file; safe in any thread (it touches only the
        file system).  Raises ``OSError``."""
        self._write_atomically(pending.path, pending.data)

    def commit(self, pending: PendingSegment) -> Segment:
        """The pending segment is on disk: track it (reactor thread)."""
        del self._pending[pending.first]
        segment = Segment(
            pending.first, pending.last, pending.count, len(pending.data), pending.path
        )
        self._add(segment)
        return segment

    def abort(self, pending: PendingSegment) -> None:
        """The write failed: release the reservation (reactor thread)."""
        self._pending.pop(pending.first, None)

    def read(self, segment: Segment) -> SegmentContents:
        """Read a segment back; lines that are not a JSON object are returned apart."""
        events: list[dict[str, Any]] = []
        lines: list[bytes] = []
        corrupt: list[bytes] = []
        for line in segment.path.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                corrupt.append(line)
                continue
            if isinstance(event, dict):
                events.append(event)
                lines.append(line)
            else:
                corrupt.append(line)
        return SegmentContents(events, lines, corrupt)

    def rewrite(self, segment: Segment, lines: Sequence[bytes]) -> Segment | None:
        """Replace a segment's content (after its corrupt lines were set apart).

        Returns the new segment, or ``None`` when ``lines`` is empty (the segment is
        removed).  Raises ``OSError`` on failure, leaving the old file in place.
        """
        if not lines:
            self.remove(segment)
            return None
        data = b"\n".join([*lines, b""])  # one copy: "+ newline" would be a second
        path = self._directory / f"{segment.first}-{segment.last}-{len(lines)}.jsonl"
        self._write_atomically(path, data)
        was_checked_out = segment.first in self._checked_out
        self._drop(segment.first)
        if path != segment.path:
            segment.path.unlink(missing_ok=True)
        new = Segment(segment.first, segment.last, len(lines), len(data), path)
        self._add(new)
        if was_checked_out:
            self._checked_out.add(new.first)
        return new

    def checkout(self, segment: Segment) -> None:
        """Mark a segment as being replayed: not offered by ``oldest`` nor discarded."""
        self._checked_out.add(segment.first)

    def checkin(self, segment: Segment) -> None:
        """The replay did not deliver: the segment waits again, at its place."""
        self._checked_out.discard(segment.first)

    def remove(self, segment: Segment) -> None:
        """Stop tracking a segment and delete its file (delivered, dead-lettered,
        discarded or unreadable).  A file that cannot be deleted is replayed again
        after a restart: a duplicate, never a loss."""
        self._drop(segment.first)
        with contextlib.suppress(OSError):
            segment.path.unlink(missing_ok=True)

    def _make_room(self, size: int, first: int) -> tuple[int, bool]:
        """Discard the oldest segments until ``size`` more bytes fit.

        Returns the events discarded and whether the new batch fits; it does not when
        it is alone over the bound or becomes the oldest left to discard.
        """
        if size > self._max_bytes:
            return 0, False
        reserved = sum(len(p.data) for p in self._pending.values())
        discarded = 0
        order = self._order
        i = 0  # the oldest not checked out: the next to go
        while self._bytes + reserved + size > self._max_bytes and i < len(order):
            oldest = order[i]
            if oldest in self._checked_out:
                i += 1
                continue
            if first < oldest:
                return discarded, False
            discarded += self._segments[oldest].count
            self.remove(self._segments[oldest])  # takes it out of ``order``
        return discarded, self._bytes + reserved + size <= self._max_bytes

    def _write_atomically(self, path: Path, data: bytes) -> None:
        try:
            self._write_once(path, data)
        except FileNotFoundError:
            # The directory vanished (``state_dir`` removed at run time): make it
            # again and write once more; a second failure is the caller's.
            self._directory.mkdir(parents=True, exist_ok=True)
            self._write_once(path, data)

    def _write_once(self, path: Path, data: bytes) -> None:
        temp = self._directory / f"{_TEMP_PREFIX}{path.name}"
        try:
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        except OSError:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            raise
        _fsync_dir(self._directory)

    @property
    def oldest_pending(self) -> int | None:
        """The first ordinal of the oldest segment being written, or ``None``."""
        return min(self._pending) if self._pending else None

    def _add(self, segment: Segment) -> None:
        if segment.first not in self._segments:
            order = self._order
            if not order or order[-1] < segment.first:
                order.append(segment.first)  # as good as always: ordinals grow
            else:
                bisect.insort(order, segment.first)
        self._segments[segment.first] = segment
        self._bytes += segment.size
        self._events += segment.count
        self._next_ordinal = max(self._next_ordinal, segment.last + 1)

    def _drop(self, first: int) -> None:
        segment = self._segments.pop(first, None)
        self._checked_out.discard(first)
        if segment is not None:
            del self._order[bisect.bisect_left(self._order, first)]
            self._bytes -= segment.size
            self._events -= segment.count
