"""A Loki push endpoint that can be switched into an outage, for benchmarks/outage.py.

    .venv/bin/python benchmarks/loki_switch.py --port 3100

``POST /loki/api/v1/push`` answers 204 and counts what it received (every entry,
and the distinct ``(type, request_id)`` pairs of the events in them), or 503
without reading a line while the outage is on.  ``POST /control?outage=1|0``
switches; ``GET /control`` answers the counts as JSON.  Loopback only; not a test
fake (tests/fakes/loki.py is the strict one): it checks nothing a real Loki
would, it only counts, cheaply enough to keep up with a daemon under load.
"""

from __future__ import annotations

import argparse
import gzip
import json
from typing import Any

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

EXCHANGE_KINDS = ("request", "response")  # two per exchange; sessions add their own


class Switch(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.outage = False
        self.pushes = 0
        self.refused = 0
        self.entries = 0
        self.seen: set[tuple[str, str]] = set()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {
                "outage": self.outage,
                "pushes": self.pushes,
                "refused": self.refused,
                "entries": self.entries,
                "unique": len(self.seen),
                "exchange_events": sum(1 for kind, _ in self.seen if kind in EXCHANGE_KINDS),
            }
        ).encode()

    def render_POST(self, request: Request) -> bytes:
        if request.path == b"/control":
            args: dict[bytes, list[bytes]] = request.args or {}
            self.outage = args.get(b"outage", [b"0"])[0] == b"1"
            return self.render_GET(request)
        if self.outage:
            self.refused += 1
            request.setResponseCode(503)
            return b"outage\n"
        body = request.content.read() if request.content is not None else b""
        if request.getHeader("content-encoding") == "gzip":
            body = gzip.decompress(body)
        push: dict[str, Any] = json.loads(body)
        self.pushes += 1
        for stream in push.get("streams", []):
            for value in stream.get("values", []):
                self.entries += 1
                try:
                    event = json.loads(value[1])
                except (ValueError, IndexError):
                    continue
                self.seen.add((str(event.get("type")), str(event.get("request_id"))))
        request.setResponseCode(204)
        return b""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    site = Site(Switch())
    site.noisy = False
    reactor.listenTCP(args.port, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
