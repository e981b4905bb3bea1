"""An incremental server-sent events parser (tests: tests/unit/events/test_sse.py).

Follows the WHATWG "event stream interpretation" rules closely enough for
capture: lines end in CRLF, LF or CR; ``:`` starts a comment; ``data`` lines of
one event are joined with ``\\n``; a blank line dispatches the event.  Bytes may be
split anywhere between ``feed`` calls, even inside a CRLF pair or a multi-byte
UTF-8 character (lines are only decoded once complete).  Invalid UTF-8 becomes
U+FFFD; nothing here raises on garbage, because what it parses is whatever an
upstream sent.

Two deliberate departures, both for capture: an event with an ``event`` field
but no data is still dispatched (it happened, and is worth recording), and
``close()`` dispatches a last event not followed by a blank line.
"""

from __future__ import annotations

import attrs

__all__ = [
    "SSEEvent",
    "SSEParser",
    "block_fields",
    "parse_sse",
    "sse_blocks",
    "sse_fields",
    "sse_fields_of_text",
]

_BOM = b"\xef\xbb\xbf"


@attrs.frozen
class SSEEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None


@attrs.define
class SSEParser:
    """Feed it bytes as they arrive; it returns the events each feed completed."""

    # Pieces of the current unterminated line (joined only once it ends, so a long
    # line arriving in many small chunks is not re-copied on every feed).
    _partial: list[bytes] = attrs.field(factory=list, init=False)
    # The last byte fed was a CR: a LF opening the next feed belongs to it.
    _after_cr: bool = attrs.field(default=False, init=False)
    _at_start: bool = attrs.field(default=True, init=False)
    _event: str | None = attrs.field(default=None, init=False)
    _data: list[str] = attrs.field(factory=list, init=False)
    _id: str | None = attrs.field(default=None, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._closed or not chunk:
            return []
        if self._after_cr:
            self._after_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return []
        if b"\n" not in chunk and b"\r" not in chunk:
            self._partial.append(chunk)
            return []
        if self._partial:
            self._partial.append(chunk)
            chunk = b"".join(self._partial)
            self._partial = []
        lines = chunk.splitlines(keepends=True)
        last = lines[-1]
        if not last.endswith((b"\n", b"\r")):
            self._partial.append(lines.pop())
        elif last.endswith(b"\r"):
            self._after_cr = True
        events: list[SSEEvent] = []
        for line in lines:
            if line.endswith(b"\r\n"):
                self._line(line[:-2], events)
            else:
                self._line(line[:-1], events)
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: flush an unterminated last line and a pending event."""
        if self._closed:
            return []
        events: list[SSEEvent] = []
        if self._partial:
            line = b"".join(self._partial)
            self._partial = []
            self._line(line, events)
        self._dispatch(events)
        self._closed = True
        return events

    def _line(self, raw: bytes, events: list[SSEEvent]) -> None:
        if self._at_start:
            self._at_start = False
            if raw.startswith(_BOM):
                raw = raw[3:]
        if not raw:
            self._dispatch(events)
            return
        if raw[:1] == b":":
            return  # a comment (keep-alive)
        line = raw.decode("utf-8", "replace")
        field, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._id = value
        # "retry" and unknown fields are ignored, as the spec says.

    def _dispatch(self, events: list[SSEEvent]) -> None:
        if self._data or self._event is not None:
            events.append(
                SSEEvent(
                    event=self._event or "message",
                    data="\n".join(self._data),
                    id=self._id,
                )
            )
        self._event = None
        self._data = []
        self._id = None


def parse_sse(stream: bytes) -> list[SSEEvent]:
    """All events of a complete stream."""
    parser = SSEParser()
    return parser.feed(stream) + parser.close()


def sse_fields(stream: bytes) -> list[tuple[str, str]]:
    """``[(e.event, e.data) for e in parse_sse(stream)]``, much faster for streams
    with LF line endings only (nearly all), and without ``SSEEvent`` objects.

    Decoding the whole once equals decoding line by line: a LF never belongs to
    a UTF-8 sequence, valid or not.  The line rules are ``SSEParser._line``'s.
    """
    if b"\r" in stream:
        return [(event.event, event.data) for event in parse_sse(stream)]
    return sse_fields_of_text(stream.decode("utf-8", "replace"))


def sse_fields_of_text(text: str) -> list[tuple[str, str]]:
    """``sse_fields`` of a stream already decoded (with "replace"), without CR."""
    if text[:1] == "\ufeff":
        text = text[1:]
    events: list[tuple[str, str]] = []
    for block in sse_blocks(text):
        if block[:6] == "data: " and "\n" not in block:
            events.append(("message", block[6:]))  # the usual event: one data line
        elif block:
            events.extend(block_fields(block))
    return events


def sse_blocks(text: str) -> list[str]:
    """The texts between blank lines of a decoded stream without CR (and BOM).

    A blank line ends an event, so each is one event's lines (among which more
    blank lines, when there were several in a row); what follows the last one is
    the unterminated rest, which ``close()`` dispatches too.
    """
    return text.split("\n\n")


def block_fields(block: str) -> list[tuple[str, str]]:
    """The events of ``block``, one of ``sse_blocks``: the line rules of
    ``SSEParser._line``, and a dispatch at its end."""
    events: list[tuple[str, str]] = []
    event: str | None = None
    data: list[str] = []
    for line in block.split("\n"):
        if line[:6] == "data: ":
            # The usual line, and what the general rule below makes of it, with
            # one copy of the value instead of two.
            data.append(line[6:])
            continue
        if not line:
            if data or event is not None:
                events.append((event or "message", "\n".join(data)))
            event, data = None, []
            continue
        field, colon, value = line.partition(":")
        if not field:
            continue  # a comment (keep-alive)
        if colon and value[:1] == " ":
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
    if data or event is not None:
        events.append((event or "message", "\n".join(data)))
    return events
