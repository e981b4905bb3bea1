"""Which LLM API a request path names, by its last segments (tests:
tests/unit/events/test_endpoints.py).

One reading of a path for everything that sorts exchanges by API: the session
tracker (the conversation endpoints) and the OTLP sink (the GenAI operation
name).  Any route prefix before the API's own path is ignored
(``/openai/v1/chat/completions`` is ``chat``), and so are a query and a
trailing slash.
"""

from __future__ import annotations

__all__ = ["CONVERSATIONS", "endpoint_kind"]

# Endpoints whose request carries a conversation (a message history).
CONVERSATIONS = frozenset({"chat", "responses", "messages"})


def endpoint_kind(path: str) -> str | None:
    """``chat`` (OpenAI chat completions), ``responses`` (OpenAI Responses),
    ``messages`` (Anthropic Messages), ``completions`` (OpenAI legacy
    completions), ``embeddings``, ``generate_content`` and ``embed_content``
    (Gemini, ``models/M:method``); None for any other path."""
    p = path.split("?", 1)[0].rstrip("/")
    if p.endswith("/chat/completions"):
        return "chat"
    if p.endswith("/responses"):
        return "responses"
    if p.endswith("/messages"):
        return "messages"
    if p.endswith("/completions"):
        return "completions"
    if p.endswith("/embeddings"):
        return "embeddings"
    last = p.rsplit("/", 1)[-1]
    if last.endswith((":generateContent", ":streamGenerateContent")):
        return "generate_content"
    if last.endswith((":embedContent", ":batchEmbedContents")):
        return "embed_content"
    return None
