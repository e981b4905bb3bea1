"""The recorded OpenAI stream the streaming benchmarks send (no tests: benchmark data).

``benchmarks/run.py`` serves it from nginx (the SSE mock), ``sse_mock.py
--recorded`` from Twisted, and ``bench_capture.py`` feeds it to the capture
pipeline.  Plain data, no Twisted import: run.py builds its nginx config from it.
"""

from __future__ import annotations

import json

CREATED = 1763884800
SENTENCE = "Hello! How can I help you today? I can answer questions or explain code."
WORDS = SENTENCE.split()

# A 100-chunk OpenAI chat stream as gpt-4o-mini sends it with
# ``stream_options: {"include_usage": true}`` (the role chunk, 97 content
# deltas, the finish chunk and the usage chunk), then ``data: [DONE]``.  17.8 KB.
RECORDED_ID = "chatcmpl-b01"
RECORDED_MODEL = "gpt-4o-mini"


def recorded_stream() -> list[bytes]:
    """The frames of the recorded 100-chunk stream (101 with ``[DONE]``)."""

    def chunk(delta: dict[str, str], finish_reason: str | None) -> dict[str, object]:
        return {
            "id": RECORDED_ID,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": RECORDED_MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    payloads: list[object] = [chunk({"role": "assistant", "content": ""}, None)]
    payloads += [chunk({"content": WORDS[i % len(WORDS)] + " "}, None) for i in range(97)]
    payloads.append(chunk({}, "stop"))
    payloads.append(
        {
            "id": RECORDED_ID,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": RECORDED_MODEL,
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 98, "total_tokens": 107},
        }
    )
    frames = [b"data: " + json.dumps(p, separators=(",", ":")).encode() + b"\n\n" for p in payloads]
    frames.append(b"data: [DONE]\n\n")
    return frames
