"""Reading a response event back: its captured reply text and the facts of it
(model, usage, finish reasons, the merged reply), for the sinks and the session
tracker that start from an event dict, e.g. one read back from the spool or Redis
(tests: tests/unit/capture/test_events.py)."""

from __future__ import annotations

from typing import Any

from llmproxy.events.sse import SSEParser
from llmproxy.events.usage import EMPTY_FACTS, ResponseFacts, facts_from_json, facts_from_sse

__all__ = ["facts_of", "response_text"]


def response_text(payload: dict[str, Any]) -> str | None:
    """The captured response body text of a ``response`` event, stream or not."""
    chunks = payload.get("response_chunks")
    if isinstance(chunks, list):
        return "".join(str(c.get("data", "")) for c in chunks if isinstance(c, dict))
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
