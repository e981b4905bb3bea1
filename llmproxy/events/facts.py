"""Reading a response event back: its captured reply text and the facts of it
(model, usage, finish reasons, the merged reply), for the sinks and the session
tracker that start from an event dict, e.g. one read back from the spool or Redis,
in either shape of a stream's chunks (tests: tests/unit/events/test_facts.py,
tests/unit/capture/test_events.py)."""

from __future__ import annotations

from typing import Any

from llmproxy.events.sse import SSEParser
from llmproxy.events.usage import EMPTY_FACTS, ResponseFacts, facts_from_json, facts_from_sse

__all__ = ["chunk_texts", "facts_of", "response_text"]


def chunk_texts(payload: dict[str, Any]) -> list[str] | None:
    """The texts of a stream's reads in a ``response`` event, in order; None when
    the event holds no stream.

    Takes both shapes of ``response_chunks``: a list of texts (with the offsets in
    ``response_chunk_offsets_ms``), and the one written before it, a dict per read
    (``{"offset_ms": ..., "data": ...}``), which events already in a spool, a
    dead-letter file or a Redis stream still have after an upgrade.
    """
    chunks = payload.get("response_chunks")
    if not isinstance(chunks, list):
        return None
    texts: list[str] = []
    for chunk in chunks:
        if isinstance(chunk, str):
            texts.append(chunk)
        elif isinstance(chunk, dict):
            texts.append(str(chunk.get("data", "")))
    return texts


def response_text(payload: dict[str, Any]) -> str | None:
    """The captured response body text of a ``response`` event, stream or not."""
    texts = chunk_texts(payload)
    if texts is not None:
        return "".join(texts)
    body = payload.get("response_body")
    text = body.get("text") if isinstance(body, dict) else None
    return text if isinstance(text, str) else None


def facts_of(payload: dict[str, Any]) -> ResponseFacts:
    """Response facts of a ``response`` event dict (e.g. one read back from the spool).

    Sinks that need the reply or the merged response object (Lunary, Helicone,
    the session tracker) call this; it never raises.
    """
    try:
        text = response_text(payload)
        if text is None:
            return EMPTY_FACTS
        if isinstance(payload.get("response_chunks"), list):
            parser = SSEParser()
            data = text.encode("utf-8")
            return facts_from_sse(parser.feed(data) + parser.close())
        return facts_from_json(text)
    except Exception:
        return EMPTY_FACTS
