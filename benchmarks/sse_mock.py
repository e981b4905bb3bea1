"""A fast mock OpenAI streaming upstream for the benchmarks (no tests: benchmark tool).

Serves ``POST /v1/chat/completions`` with a fixed OpenAI-style SSE stream: 20
content chunks, a final usage chunk and ``data: [DONE]``, in chunked transfer
encoding on a keep-alive connection. Any other path is a 404.

    python benchmarks/sse_mock.py --port 8001 [--gap-ms 0] [--hold]

By default the whole stream is written in one reactor turn, so the mock costs as
little CPU as it can and the proxy under test is what gets measured. With
``--gap-ms N`` each event is written N ms after the previous one (``0`` still
gives one reactor turn per event), closer to a real model's pacing.  With
``--hold`` the first event is sent and the stream then stays open, a comment line
every 15 s (``benchmarks/idle_streams.py``: many idle streams at once).
"""

# twisted.web's Request and Resource are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import argparse
import json
import sys

from recorded import recorded_stream  # the script's folder is on sys.path
from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IReactorCore, IReactorTCP, IReactorTime
from twisted.web.http import Request as HTTPRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

STREAM_ID = "chatcmpl-bench0000000000000000000000000"
CREATED = 1763884800
MODEL = "gpt-4o-mini-2024-07-18"
SENTENCE = "Hello! How can I help you today? I can answer questions or explain code."
WORDS = SENTENCE.split()


def _chunk(delta: dict[str, str], finish_reason: str | None) -> dict[str, object]:
    return {
        "id": STREAM_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def build_events(content_chunks: int = 20) -> list[bytes]:
    """The SSE events of one stream, each a complete ``data: ...\\n\\n`` frame."""
    payloads: list[object] = [_chunk({"role": "assistant", "content": ""}, None)]
    for i in range(content_chunks - 2):
        payloads.append(_chunk({"content": WORDS[i % len(WORDS)] + " "}, None))
    payloads.append(_chunk({}, "stop"))
    payloads.append(
        {
            "id": STREAM_ID,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 18, "total_tokens": 27},
        }
    )
    frames = [b"data: " + json.dumps(p, separators=(",", ":")).encode() + b"\n\n" for p in payloads]
    frames.append(b"data: [DONE]\n\n")
    return frames


class CompletionStream(Resource):
    isLeaf = True

    def __init__(
        self, events: list[bytes], gap_s: float | None, clock: IReactorTime, hold: bool = False
    ) -> None:
        super().__init__()
        self._hold = hold
        self._held: set[Request] = set()
        self._ticking = False
        self._events = events
        self._whole = b"".join(events)
        self._gap_s = gap_s
        self._clock = clock

    def render_POST(self, request: Request) -> int | bytes:
        if request.path != b"/v1/chat/completions":
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"application/json")
            return b'{"error":{"message":"not found","type":"invalid_request_error","code":null}}'
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-request-id", b"req_bench_sse")
        if self._hold:
            request.write(self._events[0])
            self._held.add(request)
            request.notifyFinish().addBoth(lambda _: self._held.discard(request))
            if not self._ticking:
                self._ticking = True
                self._clock.callLater(15.0, self._keepalive)
        elif self._gap_s is None:
            request.write(self._whole)
            request.finish()
        else:
            self._write_from(request, 0)
        return NOT_DONE_YET

    def _keepalive(self) -> None:
        for request in list(self._held):
            request.write(b": keep-alive\n\n")
        self._ticking = bool(self._held)
        if self._ticking:
            self._clock.callLater(15.0, self._keepalive)

    def _write_from(self, request: Request, index: int) -> None:
        if request.finished or request.channel is None:  # client went away
            return
        if index >= len(self._events):
            request.finish()
            return
        request.write(self._events[index])
        assert self._gap_s is not None
        self._clock.callLater(self._gap_s, self._write_from, request, index + 1)


class QuietSite(Site):
    """No access log: the mock must cost as little as nginx with ``access_log off``."""

    def log(self, request: HTTPRequest) -> None:
        pass


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    parser.add_argument(
        "--recorded", action="store_true", help="send the recorded 100-chunk stream (17.8 KB)"
    )
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=None,
        help="write events one by one, this many ms apart (default: all at once)",
    )
    parser.add_argument(
        "--hold", action="store_true", help="send the first event, then keep the stream open"
    )
    parser.add_argument("--backlog", type=int, default=1024)
    args = parser.parse_args(argv)
    reactor: IReactorCore = _reactor
    tcp: IReactorTCP = _reactor
    clock: IReactorTime = _reactor
    gap_s = None if args.gap_ms is None else args.gap_ms / 1000.0
    events = recorded_stream() if args.recorded else build_events(args.chunks)
    site = QuietSite(CompletionStream(events, gap_s, clock, args.hold))
    site.timeOut = None  # held streams are idle by design
    tcp.listenTCP(args.port, site, backlog=args.backlog, interface="127.0.0.1")  # type: ignore[arg-type]
    print(f"sse_mock listening on 127.0.0.1:{args.port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
