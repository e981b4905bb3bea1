"""Microbenchmark: turning finished exchanges into their two events (no tests: benchmark tool).

Measures ``RecordEnvelope("request", ...).json()`` plus
``RecordEnvelope("response", ...).json()`` per exchange, the work every exporter
does for every exchange, for two typical shapes:

- ``json``: a small OpenAI chat completion (JSON request and response bodies);
- ``sse``: the same call streamed, 20 ``chat.completion.chunk`` events, a usage
  chunk and ``data: [DONE]``, each arriving as its own chunk.

    .venv/bin/python benchmarks/bench_events.py [--n 5000] [--profile]

Prints CPU microseconds per exchange (both events, including the orjson encoding);
``--profile`` adds a cProfile listing of each case.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from collections.abc import Callable

from llmproxy.capture.events import RecordEnvelope
from llmproxy.capture.record import ExchangeRecord
from llmproxy.config.model import CaptureSettings

CAPTURE = CaptureSettings()
MODEL = "gpt-4o-mini-2024-07-18"
STREAM_ID = "chatcmpl-bench0000000000000000000000000"
SENTENCE = "Hello! How can I help you today? I can answer questions or explain code."
WORDS = SENTENCE.split()

REQUEST_HEADERS = [
    (b"Host", b"127.0.0.1:8080"),
    (b"User-Agent", b"wrk"),
    (b"Content-Type", b"application/json"),
    (b"Authorization", b"Bearer sk-proj-abcdefghijklmnopqrstuvwxyz"),
]
CHAT_COMPLETION = {
    "id": "chatcmpl-abc123",
    "object": "chat.completion",
    "created": 1700000000,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
}


def _request_body(stream: bool) -> bytes:
    body: dict[str, object] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
    }
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def _sse_frames(content_chunks: int = 20) -> list[bytes]:
    def chunk(delta: dict[str, str], finish_reason: str | None) -> dict[str, object]:
        return {
            "id": STREAM_ID,
            "object": "chat.completion.chunk",
            "created": 1763884800,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }

    payloads: list[object] = [chunk({"role": "assistant", "content": ""}, None)]
    for i in range(content_chunks - 2):
        payloads.append(chunk({"content": WORDS[i % len(WORDS)] + " "}, None))
    payloads.append(chunk({}, "stop"))
    payloads.append(
        {
            "id": STREAM_ID,
            "object": "chat.completion.chunk",
            "created": 1763884800,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 18, "total_tokens": 27},
        }
    )
    frames = [b"data: " + json.dumps(p, separators=(",", ":")).encode() + b"\n\n" for p in payloads]
    frames.append(b"data: [DONE]\n\n")
    return frames


def _record(body: bytes, content_type: bytes, chunks: list[tuple[float, bytes]]) -> ExchangeRecord:
    return ExchangeRecord(
        request_id="d2c1a8e0f3b54a6c",
        started_at=time.time(),
        method="POST",
        path="/openai/v1/chat/completions",
        query="",
        route="openai",
        provider="openai",
        upstream_url="http://127.0.0.1:8001/v1/chat/completions",
        upstream_host="127.0.0.1:8001",
        client_addr="127.0.0.1:51234",
        request_headers=list(REQUEST_HEADERS),
        request_body=body,
        request_body_size=len(body),
        first_byte_at=0.001,
        ended_at=0.002,
        status=200,
        response_headers=[
            (b"Content-Type", content_type),
            (b"Date", b"Mon, 23 Nov 2026 07:40:12 GMT"),
            (b"Server", b"nginx"),
        ],
        response_chunks=chunks,
        response_body_size=sum(len(c) for _, c in chunks),
        environment="bench",
        machine="bench@host",
    )


def json_record() -> ExchangeRecord:
    response = json.dumps(CHAT_COMPLETION).encode()
    return _record(_request_body(False), b"application/json", [(0.001, response)])


def sse_record() -> ExchangeRecord:
    frames = _sse_frames()
    chunks = [(0.001 + i * 0.0001, frame) for i, frame in enumerate(frames)]
    return _record(_request_body(True), b"text/event-stream; charset=utf-8", chunks)


def build_both(records: list[ExchangeRecord]) -> None:
    for record in records:
        RecordEnvelope("request", record, CAPTURE).json()
        RecordEnvelope("response", record, CAPTURE).json()


def per_exchange_us(make: Callable[[], ExchangeRecord], n: int, rounds: int = 7) -> float:
    """The best of ``rounds`` runs over ``n`` fresh records (fresh: nothing memoised).

    CPU time of this process, not wall time: what an exchange costs the proxy's
    core, unaffected by whatever else the machine runs meanwhile.
    """
    best = float("inf")
    for _ in range(rounds):
        records = [make() for _ in range(n)]
        started = time.process_time()
        build_both(records)
        best = min(best, time.process_time() - started)
    return best / n * 1e6


def profile(make: Callable[[], ExchangeRecord], n: int) -> None:
    records = [make() for _ in range(n)]
    profiler = cProfile.Profile()
    profiler.enable()
    build_both(records)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="exchanges per round")
    parser.add_argument("--profile", action="store_true", help="print a cProfile listing")
    args = parser.parse_args()
    cases = {"json": json_record, "sse": sse_record}
    for name, make in cases.items():
        request_bytes = len(RecordEnvelope("request", make(), CAPTURE).json())
        response_bytes = len(RecordEnvelope("response", make(), CAPTURE).json())
        us = per_exchange_us(make, args.n)
        print(
            f"{name:5s} {us:8.2f} us per exchange"
            f"  (request event {request_bytes} B, response event {response_bytes} B)"
        )
        if args.profile:
            profile(make, min(args.n, 2000))


if __name__ == "__main__":
    main()
