"""Reading a response event back (llmproxy/events/facts.py): a stream's chunk
texts, its body text and its facts are the same from the current shape
(``response_chunks`` texts with ``response_chunk_offsets_ms``) and from the shape
an earlier version wrote (a ``{"offset_ms", "data"}`` dict per read), which events
in spools, dead-letter files and Redis streams still have after an upgrade."""

from __future__ import annotations

import gzip
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from llmproxy.capture.events import response_event
from llmproxy.capture.record import ExchangeRecord
from llmproxy.events.facts import chunk_texts, facts_of, response_text
from llmproxy.testing import older_chunk_shape
from tests.unit.capture.test_events import (
    CAPTURE,
    SSE_CHUNKS,
    finish_json,
    finish_stream,
    make_record,
)


def _stored(event: dict[str, Any]) -> dict[str, Any]:
    """The event as a sink gets it back from a spool or Redis: through JSON."""
    stored: dict[str, Any] = orjson.loads(orjson.dumps(event))
    return stored


def _streams() -> list[ExchangeRecord]:
    whole = b"".join(SSE_CHUNKS)
    cut = whole.index("👋".encode()) + 2  # a character split across two reads
    return [
        finish_stream(make_record()),
        finish_stream(make_record(), [whole[:cut], whole[cut:]]),
        finish_stream(make_record(), [gzip.compress(c) for c in SSE_CHUNKS], encoding=b"gzip"),
        finish_stream(make_record(), SSE_CHUNKS, encoding=b"gzip"),  # undecodable
    ]


def test_a_stream_reads_the_same_in_either_shape() -> None:
    for record in _streams():
        event = _stored(response_event(record, CAPTURE))
        older = _stored(older_chunk_shape(event))
        assert isinstance(older["response_chunks"][0], dict)
        texts = chunk_texts(event)
        assert texts is not None and len(texts) == len(record.response_chunks)
        assert chunk_texts(older) == texts
        assert response_text(older) == response_text(event) == "".join(texts)
        assert facts_of(older) == facts_of(event)
        assert facts_of(event).usage is not None


def test_the_chunk_texts_joined_are_the_body_text() -> None:
    event = response_event(finish_stream(make_record()), CAPTURE)
    assert chunk_texts(event) == [c.decode() for c in SSE_CHUNKS]
    assert response_text(event) == b"".join(SSE_CHUNKS).decode()


def test_a_body_that_is_not_a_stream_has_no_chunk_texts_in_either_shape() -> None:
    event = response_event(finish_json(make_record()), CAPTURE)
    older = older_chunk_shape(event)
    assert chunk_texts(event) is None and chunk_texts(older) is None
    assert response_text(older) == response_text(event) == event["response_body"]["text"]
    assert facts_of(older) == facts_of(event)


@given(
    st.lists(
        st.one_of(
            st.text(max_size=20),
            st.fixed_dictionaries({"offset_ms": st.floats(0, 1e4), "data": st.text(max_size=20)}),
            st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
            st.integers(),
            st.none(),
        ),
        max_size=8,
    )
)
def test_any_chunk_list_is_read_without_raising(chunks: list[Any]) -> None:
    event = {"response_chunks": chunks, "response_body": None}
    texts = chunk_texts(event)
    assert texts is not None and all(isinstance(t, str) for t in texts)
    assert response_text(event) == "".join(texts)
    facts_of(event)  # never raises


def test_what_is_not_a_chunk_list_has_no_chunk_texts() -> None:
    for chunks in (None, "data: x\n\n", {"data": "x"}, 3):
        assert chunk_texts({"response_chunks": chunks}) is None
    assert chunk_texts({}) is None
