"""The dead-letter file: events a sink refused for good (tests: tests/unit/export/test_spool.py).

Append-only JSONL, one line per event:
``{"ts": <RFC 3339 UTC>, "sink": <name>, "reason": <text>, "event": {...}}``.
Lines of a spool segment that were not event JSON are kept too, as
``{"ts", "sink", "reason", "raw": <the line as text>}``, so nothing is lost silently.
One ``write`` and one ``fsync`` per call: the exporter calls it once per batch.
The file is opened for each call, its directory made first: a file or directory
removed at run time is simply created again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import orjson

from llmproxy.events.time import rfc3339

__all__ = ["DeadLetter"]


@attrs.define
class DeadLetter:
    """Appends refused events to one JSONL file (directories created on first use)."""

    _path: Path
    _sink: str

    @property
    def path(self) -> Path:
        return self._path

    def append(self, entries: Sequence[tuple[dict[str, Any], str]], now: float) -> None:
        """Write ``(event, reason)`` pairs.  Raises ``OSError`` when the write fails."""
        ts = rfc3339(now)
        self._write(
            [
                orjson.dumps({"ts": ts, "sink": self._sink, "reason": reason, "event": event})
                for event, reason in entries
            ]
        )

    def append_raw(self, lines: Sequence[bytes], reason: str, now: float) -> None:
        """Write lines that could not be read back as events, as text."""
        ts = rfc3339(now)
        self._write(
            [
                orjson.dumps(
                    {
                        "ts": ts,
                        "sink": self._sink,
                        "reason": reason,
                        "raw": line.decode("utf-8", errors="replace"),
                    }
                )
                for line in lines
            ]
        )

    def _write(self, lines: list[bytes]) -> None:
        if not lines:
            return
        with self._open() as f:
            f.write(b"\n".join(lines) + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def _open(self) -> BinaryIO:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return open(self._path, "ab")
        except FileNotFoundError:
            # The directory went between the mkdir and the open (``state_dir``
            # removed at run time): once more.
            self._path.parent.mkdir(parents=True, exist_ok=True)
            return open(self._path, "ab")
