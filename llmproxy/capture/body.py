"""Turning captured body bytes into what an event carries (tests: tests/unit/capture/test_body.py).

Content-Encoding is undone *for capture only* (the client always gets the bytes
the upstream sent): gzip, deflate (zlib-wrapped or raw, as servers disagree),
br, identity, and stacks of them (``gzip, br`` is decoded br first).  Decoded
output is capped, so a decompression bomb costs at most the cap.  A corrupt or
unsupported encoding never raises: the raw bytes are kept, with a note saying why.

A body becomes text when it is valid UTF-8 and its content type is not obviously
binary; otherwise base64.
"""

from __future__ import annotations

import base64
import functools
import zlib
from collections.abc import Sequence
from typing import Protocol

import attrs
import brotli  # type: ignore[import-untyped]

__all__ = [
    "CapturedBody",
    "ContentDecoder",
    "DecodedBytes",
    "capture_body",
    "content_codings",
    "content_headers",
    "decode_content",
    "is_binary_type",
    "media_type",
    "utf8_text",
]


@attrs.frozen
class CapturedBody:
    """A body as an event carries it.

    ``size`` is the true size on the wire (all bytes the peer sent, encoded as
    sent); ``captured_bytes`` is how many (decoded) bytes ``text`` or ``base64``
    hold; ``truncated`` says the capture does not hold the whole body.
    """

    text: str | None = None
    base64: str | None = None
    size: int = 0
    captured_bytes: int = 0
    truncated: bool = False
    content_encoding: str | None = None
    decode_error: str | None = None


class _Layer(Protocol):
    # Output stopped at the limit with more to come.
    capped: bool

    def feed(self, data: bytes, limit: int) -> bytes: ...

    def complete(self) -> bool: ...


class _ZlibLayer:
    """gzip and deflate; ``deflate`` picks zlib-wrapped or raw from the first bytes."""

    def __init__(self, coding: str) -> None:
        self._coding = coding
        self._head = b""
        self._wbits = 47 if coding != "deflate" else 0  # 47: gzip or zlib header
        self._obj: zlib._Decompress | None = None
        self._done = False
        self.capped = False

    def feed(self, data: bytes, limit: int) -> bytes:
        if self._obj is None:
            self._head += data
            if self._wbits == 0:
                if len(self._head) < 2:
                    return b""
                first, second = self._head[0], self._head[1]
                zlib_wrapped = (first & 0x0F) == 8 and ((first << 8) | second) % 31 == 0
                self._wbits = 15 if zlib_wrapped else -15
            self._obj = zlib.decompressobj(self._wbits)
            data, self._head = self._head, b""
        out: list[bytes] = []
        produced = 0
        while data and produced < limit:
            if self._done:
                # Another gzip member (concatenated members are one valid stream).
                if self._wbits == 47:
                    self._obj = zlib.decompressobj(self._wbits)
                    self._done = False
                else:
                    break  # trailing garbage after a deflate stream: ignored
            chunk = self._obj.decompress(data, limit - produced)
            out.append(chunk)
            produced += len(chunk)
            if self._obj.eof:
                self._done = True
                data = self._obj.unused_data
            else:
                data = self._obj.unconsumed_tail
        if produced >= limit and not (self._done and not data):
            self.capped = True
        return b"".join(out)

    def complete(self) -> bool:
        return self._done


class _BrotliLayer:
    def __init__(self) -> None:
        self._obj = brotli.Decompressor()
        self.capped = False

    def feed(self, data: bytes, limit: int) -> bytes:
        if self.capped or not data:
            return b""
        out: bytes = self._obj.process(data, output_buffer_limit=limit)
        if len(out) >= limit and not self._obj.is_finished():
            # Output stopped at the limit with more pending; brotli accepts no
            # more input until that is drained, and we want none of it.
            self.capped = True
        return out

    def complete(self) -> bool:
        return bool(self._obj.is_finished())


@attrs.frozen
class DecodedBytes:
    data: bytes
    # The cap cut the decoded output short.
    truncated: bool = False
    # The encoded stream ended before its end marker (a capped capture, or a
    # connection cut mid-body).
    incomplete: bool = False
    error: str | None = None


def content_codings(content_encoding: str | None) -> list[str]:
    """The codings of a Content-Encoding value in the order they must be undone."""
    if not content_encoding:
        return []
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    return [c for c in reversed(codings) if c and c != "identity"]


class ContentDecoder:
    """Undo a Content-Encoding stack incrementally, with the output capped at ``limit``.

    ``feed`` raises nothing: after the first error it returns ``b""`` and
    ``error`` says what went wrong (callers then fall back to the raw bytes).
    """

    def __init__(self, content_encoding: str | None, limit: int) -> None:
        self._limit = max(limit, 0)
        self._produced = 0
        self._layers: list[_Layer] = []
        self.error: str | None = None
        self.truncated = False
        for coding in content_codings(content_encoding):
            if coding in ("gzip", "x-gzip", "deflate"):
                self._layers.append(_ZlibLayer("deflate" if coding == "deflate" else "gzip"))
            elif coding == "br":
                self._layers.append(_BrotliLayer())
            else:
                self.error = f"unsupported content-encoding {coding!r}"
                self._layers = []
                break

    def feed(self, data: bytes) -> bytes:
        if self.error is not None or self.truncated or not data:
            return b""
        remaining = self._limit - self._produced
        if remaining <= 0:
            self.truncated = True
            return b""
        try:
            for layer in self._layers:
                # Every layer is capped: an intermediate bomb is a bomb too.
                data = layer.feed(data, remaining)
                if layer.capped:
                    self.truncated = True
                if not data:
                    return b""
        except Exception as exc:  # zlib.error, brotli.error, anything else: a note
            self.error = f"corrupt content-encoding: {exc}"
            return b""
        if len(data) > remaining:
            data = data[:remaining]
            self.truncated = True
        self._produced += len(data)
        return data

    def complete(self) -> bool:
        """Every layer saw its end marker."""
        return all(layer.complete() for layer in self._layers)


def decode_content(raw: bytes, content_encoding: str | None, limit: int) -> DecodedBytes:
    """Undo ``content_encoding`` on a whole captured body.

    On any failure the raw bytes come back unchanged, with ``error`` set.
    """
    if not content_codings(content_encoding):
        return DecodedBytes(raw[:limit] if len(raw) > limit else raw, truncated=len(raw) > limit)
    decoder = ContentDecoder(content_encoding, limit)
    data = decoder.feed(raw)
    if decoder.error is not None:
        return DecodedBytes(raw, error=decoder.error)
    return DecodedBytes(
        data,
        truncated=decoder.truncated,
        incomplete=not decoder.truncated and not decoder.complete(),
    )


# Content types whose bodies are never shown as text, even when they happen to
# be valid UTF-8.
_BINARY_TYPE_PREFIXES = ("image/", "audio/", "video/", "font/", "model/")
_BINARY_TYPES = frozenset(
    {
        "application/octet-stream",
        "application/pdf",
        "application/zip",
        "application/gzip",
        "application/x-gzip",
        "application/x-tar",
        "application/x-brotli",
        "application/zstd",
        "application/wasm",
        "application/protobuf",
        "application/x-protobuf",
        "application/vnd.google.protobuf",
        "application/grpc",
        "application/msgpack",
        "application/x-msgpack",
        "application/cbor",
        "application/vnd.apache.arrow.stream",
        "application/vnd.apache.parquet",
    }
)


@functools.lru_cache(maxsize=256)
def media_type(content_type: str | None) -> str:
    """``"Application/JSON; charset=utf-8"`` -> ``"application/json"``."""
    if not content_type:
        return ""
    return content_type.partition(";")[0].strip().lower()


def is_binary_type(content_type: str | None) -> bool:
    mt = media_type(content_type)
    return mt in _BINARY_TYPES or mt.startswith(_BINARY_TYPE_PREFIXES)


def utf8_text(data: bytes, cut_short: bool) -> str | None:
    """``data`` as text when it is valid UTF-8, else None.

    ``cut_short``: the bytes were cut at a cap, so an incomplete character at the
    very end is dropped rather than making the whole body binary.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if cut_short and exc.end == len(data) and len(data) - exc.start < 4:
            try:
                return data[: exc.start].decode("utf-8")
            except UnicodeDecodeError:
                return None
        return None


def capture_body(
    raw: bytes,
    *,
    size: int,
    truncated: bool,
    content_type: str | None,
    content_encoding: str | None,
    limit: int,
) -> CapturedBody:
    """The event form of a captured body.

    ``raw`` is what was captured (already capped, still encoded), ``size`` the
    true wire size, ``truncated`` whether the capture was cut; ``limit`` caps the
    decoded bytes.
    """
    encoding = content_encoding.strip() if content_encoding else None
    decoded = decode_content(raw, encoding, limit)
    data = decoded.data
    truncated = truncated or decoded.truncated or size > len(raw)
    note = decoded.error
    if note is None and decoded.incomplete and not truncated:
        note = "compressed stream ended early"
    cut_short = truncated or decoded.incomplete
    text = None if is_binary_type(content_type) else utf8_text(data, cut_short)
    if text is not None:
        return CapturedBody(
            text=text,
            size=size,
            # A dropped partial character at the end is not captured.
            captured_bytes=len(data) if len(text) == len(data) else len(text.encode("utf-8")),
            truncated=truncated,
            content_encoding=encoding or None,
            decode_error=note,
        )
    return CapturedBody(
        base64=base64.b64encode(data).decode("ascii"),
        size=size,
        captured_bytes=len(data),
        truncated=truncated,
        content_encoding=encoding or None,
        decode_error=note,
    )


def content_headers(headers: Sequence[tuple[bytes, bytes]]) -> tuple[str | None, str | None]:
    """``Content-Type`` and ``Content-Encoding`` (first of each), in one pass."""
    content_type = content_encoding = None
    for raw_name, raw_value in headers:
        size = len(raw_name)
        # Compare lengths first: most headers are neither, and lower() copies.
        if size == 12:
            if content_type is None and raw_name.lower() == b"content-type":
                content_type = raw_value.decode("latin-1")
        elif size == 16 and content_encoding is None and raw_name.lower() == b"content-encoding":
            content_encoding = raw_value.decode("latin-1")
    return content_type, content_encoding
