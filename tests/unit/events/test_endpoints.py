"""Which LLM API a request path names (llmproxy/events/endpoints.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmproxy.events.endpoints import endpoint_kind


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/v1/chat/completions", "chat"),
        ("/openai/v1/chat/completions/", "chat"),
        ("/azure/openai/deployments/gpt/chat/completions?api-version=2024-10-21", "chat"),
        ("/openai/v1/responses", "responses"),
        ("/anthropic/api.anthropic.com/v1/messages", "messages"),
        ("/v1/completions", "completions"),
        ("/openai/v1/embeddings", "embeddings"),
        ("/v1beta/models/gemini-2.5-pro:generateContent", "generate_content"),
        ("/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", "generate_content"),
        ("/v1beta/models/text-embedding-004:embedContent", "embed_content"),
        ("/v1beta/models/text-embedding-004:batchEmbedContents", "embed_content"),
    ],
)
def test_each_api_is_known_by_its_last_segments(path: str, kind: str) -> None:
    assert endpoint_kind(path) == kind


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "",
        "/v1/models",
        "/v1/messages/count_tokens",
        "/v1/responses/resp_1/input_items",
        "/v1/chat/completions/extra",
        "/v1/audio/speech",
        "/v1/files",
        "/v1/chatcompletions",
        "/v1beta/models/gemini-2.5-pro",
        "/v1/x?next=/v1/chat/completions",
    ],
)
def test_any_other_path_is_no_api(path: str) -> None:
    assert endpoint_kind(path) is None


@given(st.text())
def test_any_text_gets_a_kind_or_none_and_never_an_exception(path: str) -> None:
    assert endpoint_kind(path) in {
        None,
        "chat",
        "responses",
        "messages",
        "completions",
        "embeddings",
        "generate_content",
        "embed_content",
    }
