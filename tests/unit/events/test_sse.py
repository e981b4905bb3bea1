"""The incremental SSE parser: any split, any line ending, never an exception."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llmproxy.events.sse import SSEEvent, SSEParser, parse_sse, sse_fields

# An OpenAI chat stream, with a multi-byte character, a comment and [DONE].
OPENAI_STREAM = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    b": keep-alive\n\n"
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"content":"Gr\xc3\xbc\xc3\x9fe \xf0\x9f\x91\x8b"},"finish_reason":null}]}\n\n'
    b"data: [DONE]\n\n"
)
# Anthropic names its events.
ANTHROPIC_STREAM = (
    b"event: message_start\r\n"
    b'data: {"type":"message_start","message":{"id":"msg_1"}}\r\n\r\n'
    b"event: ping\r\n"
    b'data: {"type": "ping"}\r\n\r\n'
    b"event: message_stop\r\n"
    b'data: {"type":"message_stop"}\r\n\r\n'
)


def feed_in_pieces(stream: bytes, cuts: list[int]) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    start = 0
    for cut in sorted(set(cuts)):
        events += parser.feed(stream[start:cut])
        start = cut
    events += parser.feed(stream[start:])
    return events + parser.close()


def test_openai_stream_events_in_order() -> None:
    events = parse_sse(OPENAI_STREAM)
    assert [e.event for e in events] == ["message", "message", "message"]
    assert "Grüße 👋" in events[1].data
    assert events[2].data == "[DONE]"


def test_named_events_with_crlf() -> None:
    events = parse_sse(ANTHROPIC_STREAM)
    assert [e.event for e in events] == ["message_start", "ping", "message_stop"]
    assert events[1].data == '{"type": "ping"}'


def test_bare_cr_line_endings() -> None:
    events = parse_sse(b"event: a\rdata: 1\r\rdata: 2\r\r")
    assert events == [SSEEvent("a", "1"), SSEEvent("message", "2")]


def test_crlf_split_between_feeds_is_one_line_ending() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\r") == []
    # The LF completes the CRLF; it is not an empty line dispatching the event.
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r\n") == [SSEEvent("message", "x")]


def test_multi_line_data_is_joined_with_newlines() -> None:
    events = parse_sse(b"data: first\ndata:second\ndata\n\n")
    assert events == [SSEEvent("message", "first\nsecond\n")]


def test_comments_and_unknown_fields_are_ignored() -> None:
    events = parse_sse(b": hello\nretry: 100\nfoo: bar\ndata: x\n\n:only a comment\n\n")
    assert events == [SSEEvent("message", "x")]


def test_only_one_space_after_the_colon_is_dropped() -> None:
    assert parse_sse(b"data:  two\n\n") == [SSEEvent("message", " two")]


def test_id_belongs_to_its_event() -> None:
    events = parse_sse(b"id: 7\ndata: a\n\ndata: b\n\n")
    assert events == [SSEEvent("message", "a", "7"), SSEEvent("message", "b", None)]


def test_id_with_nul_is_ignored() -> None:
    assert parse_sse(b"id: a\x00b\ndata: x\n\n") == [SSEEvent("message", "x", None)]


def test_event_without_data_is_still_recorded() -> None:
    assert parse_sse(b"event: done\n\n") == [SSEEvent("done", "")]


def test_close_dispatches_an_event_without_trailing_blank_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n\ndata: last") == [SSEEvent("message", "a")]
    assert parser.close() == [SSEEvent("message", "last")]
    assert parser.close() == []
    assert parser.feed(b"data: late\n\n") == []


def test_leading_bom_is_dropped_even_when_split() -> None:
    parser = SSEParser()
    assert parser.feed(b"\xef") == []
    assert parser.feed(b"\xbb\xbfdata: x\n\n") == [SSEEvent("message", "x")]


def test_multi_byte_character_split_across_feeds() -> None:
    stream = "data: ü👋\n\n".encode()
    for cut in range(1, len(stream)):
        assert feed_in_pieces(stream, [cut]) == [SSEEvent("message", "ü👋")]


def test_invalid_utf8_is_replaced() -> None:
    assert parse_sse(b"data: \xff\xfeok\n\n") == [SSEEvent("message", "\ufffd\ufffdok")]


def test_long_line_in_many_small_feeds() -> None:
    payload = b"x" * 50_000
    parser = SSEParser()
    for i in range(0, len(payload), 7):
        assert parser.feed(b"data: " + payload[i : i + 7] if i == 0 else payload[i : i + 7]) == []
    assert parser.feed(b"\n\n") == [SSEEvent("message", payload.decode())]


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    lines = draw(
        st.lists(
            st.one_of(
                st.builds(
                    lambda t: "data: " + t,
                    st.text(
                        alphabet=st.characters(
                            blacklist_characters="\r\n", blacklist_categories=("Cs",)
                        )
                    ),
                ),
                st.builds(lambda t: "event: " + t, st.sampled_from(["a", "ping", "émoji👋"])),
                st.builds(lambda t: "id: " + t, st.text(alphabet="0123456789", max_size=3)),
                st.just(": comment"),
                st.just(""),
            ),
            max_size=30,
        )
    )
    ending = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return ending.join(lines).encode("utf-8") + ending.encode() * draw(st.integers(0, 2))


@given(streams(), st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_any_split_gives_the_same_events_as_one_feed(stream: bytes, cuts: list[int]) -> None:
    whole = parse_sse(stream)
    assert feed_in_pieces(stream, [c % (len(stream) + 1) for c in cuts]) == whole


@given(streams())
def test_byte_by_byte_feeding_gives_the_same_events(stream: bytes) -> None:
    assert feed_in_pieces(stream, list(range(len(stream)))) == parse_sse(stream)


@given(st.lists(st.binary(max_size=200), max_size=20))
def test_arbitrary_bytes_never_raise(chunks: list[bytes]) -> None:
    parser = SSEParser()
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.close()
    assert all(isinstance(e.data, str) and isinstance(e.event, str) for e in events)


@settings(max_examples=500)
@given(streams(), st.sampled_from(["", "\ufeff"]))
def test_sse_fields_are_the_parsers_events(stream: bytes, bom: str) -> None:
    """The splitter for whole streams, which takes an event's text between blank
    lines at once, gives the incremental parser's events (and with CR, uses it)."""
    stream = bom.encode() + stream
    assert sse_fields(stream) == [(event.event, event.data) for event in parse_sse(stream)]
