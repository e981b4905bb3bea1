"""Body capture: decoding for capture only, text or base64, caps and true sizes."""

from __future__ import annotations

import base64
import gzip
import zlib

import brotli
from hypothesis import given
from hypothesis import strategies as st

from llmproxy.capture.body import (
    CapturedBody,
    ContentDecoder,
    capture_body,
    content_codings,
    decode_content,
    is_binary_type,
    media_type,
)

TEXT = ('{"model":"gpt-4o","choices":[{"message":{"content":"Grüße 👋"}}]}' * 50).encode()


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


def capture(raw: bytes, **kw: object) -> CapturedBody:
    args: dict[str, object] = {
        "size": len(raw),
        "truncated": False,
        "content_type": "application/json",
        "content_encoding": None,
        "limit": 1 << 20,
    }
    args.update(kw)
    return capture_body(raw, **args)  # type: ignore[arg-type]


def test_codings_are_undone_last_applied_first() -> None:
    assert content_codings("gzip, br") == ["br", "gzip"]
    assert content_codings("identity") == []
    assert content_codings(None) == []
    assert content_codings(" GZIP ") == ["gzip"]


def test_gzip_is_decoded() -> None:
    assert decode_content(gzip.compress(TEXT), "gzip", 1 << 20).data == TEXT


def test_zlib_wrapped_deflate_is_decoded() -> None:
    assert decode_content(zlib.compress(TEXT), "deflate", 1 << 20).data == TEXT


def test_raw_deflate_is_decoded() -> None:
    assert decode_content(raw_deflate(TEXT), "deflate", 1 << 20).data == TEXT


def test_brotli_is_decoded() -> None:
    assert decode_content(brotli.compress(TEXT), "br", 1 << 20).data == TEXT


def test_stacked_encodings_are_all_undone() -> None:
    encoded = brotli.compress(gzip.compress(TEXT))
    assert decode_content(encoded, "gzip, br", 1 << 20).data == TEXT


def test_concatenated_gzip_members_are_one_body() -> None:
    encoded = gzip.compress(TEXT[:100]) + gzip.compress(TEXT[100:])
    assert decode_content(encoded, "gzip", 1 << 20).data == TEXT


def test_identity_passes_bytes_through() -> None:
    assert decode_content(TEXT, "identity", 1 << 20) == decode_content(TEXT, None, 1 << 20)
    assert decode_content(TEXT, None, 1 << 20).data == TEXT


def test_corrupt_gzip_gives_raw_bytes_and_a_note() -> None:
    result = decode_content(b"not gzip at all", "gzip", 1 << 20)
    assert result.data == b"not gzip at all"
    assert result.error is not None and "corrupt" in result.error


def test_corrupt_brotli_gives_raw_bytes_and_a_note() -> None:
    result = decode_content(b"\xff\xff\xff\xff garbage", "br", 1 << 20)
    assert result.data == b"\xff\xff\xff\xff garbage"
    assert result.error is not None


def test_unsupported_encoding_gives_raw_bytes_and_a_note() -> None:
    result = decode_content(b"abc", "zstd", 1 << 20)
    assert result.data == b"abc"
    assert result.error == "unsupported content-encoding 'zstd'"


def test_decoded_output_is_capped_against_bombs() -> None:
    bomb = gzip.compress(b"\0" * 5_000_000)
    result = decode_content(bomb, "gzip", 4096)
    assert len(result.data) == 4096 and result.truncated
    br_bomb = brotli.compress(b"\0" * 5_000_000)
    result = decode_content(br_bomb, "br", 4096)
    assert len(result.data) == 4096 and result.truncated


def test_intermediate_layer_is_capped_too() -> None:
    inner = gzip.compress(b"\0" * 5_000_000)
    result = decode_content(brotli.compress(inner), "gzip, br", 1000)
    assert len(result.data) <= 1000 and result.truncated and result.error is None


def test_truncated_compressed_stream_gives_its_prefix() -> None:
    encoded = gzip.compress(TEXT)
    result = decode_content(encoded[: len(encoded) // 2], "gzip", 1 << 20)
    assert result.error is None and result.incomplete
    assert TEXT.startswith(result.data) and result.data


def test_streaming_decoder_across_many_chunks() -> None:
    encoded = brotli.compress(gzip.compress(TEXT))
    decoder = ContentDecoder("gzip, br", 1 << 20)
    out = b"".join(decoder.feed(encoded[i : i + 5]) for i in range(0, len(encoded), 5))
    assert out == TEXT and decoder.complete() and decoder.error is None


def test_streaming_decoder_splits_deflate_header() -> None:
    encoded = zlib.compress(TEXT)
    decoder = ContentDecoder("deflate", 1 << 20)
    assert decoder.feed(encoded[:1]) == b""
    assert decoder.feed(encoded[1:]) == TEXT


@given(st.binary(max_size=300), st.sampled_from(["gzip", "deflate", "br", "gzip, br", "x"]))
def test_decoding_arbitrary_bytes_never_raises(data: bytes, encoding: str) -> None:
    result = decode_content(data, encoding, 1000)
    assert result.error is not None or len(result.data) <= 1000


def test_json_body_is_text_with_true_sizes() -> None:
    body = capture(TEXT)
    assert body.text == TEXT.decode()
    assert body.base64 is None
    assert body.size == body.captured_bytes == len(TEXT)
    assert not body.truncated and body.decode_error is None


def test_compressed_body_is_captured_decoded_with_wire_size() -> None:
    encoded = gzip.compress(TEXT)
    body = capture(encoded, content_encoding="gzip")
    assert body.text == TEXT.decode()
    assert body.size == len(encoded)
    assert body.captured_bytes == len(TEXT)
    assert body.content_encoding == "gzip"


def test_capped_body_is_truncated_with_true_size() -> None:
    body = capture(TEXT[:100], size=len(TEXT), truncated=True)
    assert body.text == TEXT[:100].decode()
    assert body.truncated and body.size == len(TEXT) and body.captured_bytes == 100


def test_cap_inside_a_multibyte_character_keeps_text() -> None:
    data = "ab👋".encode()[:4]  # cut inside the emoji
    body = capture(data, size=6, truncated=True)
    assert body.text == "ab"
    assert body.captured_bytes == 2


def test_invalid_utf8_becomes_base64() -> None:
    data = b"\x89PNG\r\n\x1a\n\x00\x00"
    body = capture(data, content_type="application/json")
    assert body.text is None
    assert body.base64 is not None and base64.b64decode(body.base64) == data


def test_binary_content_type_is_base64_even_if_utf8() -> None:
    body = capture(b"plain ascii", content_type="audio/mpeg")
    assert body.text is None and base64.b64decode(body.base64 or "") == b"plain ascii"


def test_unknown_type_valid_utf8_is_text() -> None:
    assert capture(b"hello", content_type=None).text == "hello"


def test_corrupt_encoding_captures_raw_bytes_with_note() -> None:
    body = capture(b"\x1f\x8b\x08garbage\xff", content_encoding="gzip")
    assert body.text is None
    assert base64.b64decode(body.base64 or "") == b"\x1f\x8b\x08garbage\xff"
    assert body.decode_error is not None


def test_stream_ending_early_without_cap_is_noted() -> None:
    encoded = gzip.compress(TEXT)
    body = capture(encoded[:-20], content_encoding="gzip")
    assert body.decode_error == "compressed stream ended early"


def test_empty_body() -> None:
    body = capture(b"")
    assert body == CapturedBody(text="", size=0, captured_bytes=0)


def test_media_types() -> None:
    assert media_type("Application/JSON; charset=utf-8") == "application/json"
    assert is_binary_type("image/png")
    assert is_binary_type("application/octet-stream")
    assert not is_binary_type("text/event-stream")
    assert not is_binary_type(None)
