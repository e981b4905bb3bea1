"""Twisted's stock ``ReverseProxyResource`` as a Python reference proxy (no tests: benchmark tool).

    python benchmarks/twisted_proxy.py --port 8002 --upstream-port 8000 [--sse-upstream-port 8001]

``/`` is forwarded to ``127.0.0.1:<upstream-port>`` and, when given, ``/sse/...``
to ``127.0.0.1:<sse-upstream-port>/...``. This is the plainest proxy Twisted
ships: one new upstream connection per request (HTTP/1.0, no pool), no capture,
no access log. It shows what a Python proxy on the same reactor costs before
llmproxy does anything clever or anything extra.
"""

# twisted.web's Request and Resource are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import argparse
import sys

from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IReactorCore, IReactorTCP
from twisted.web.http import Request as HTTPRequest
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import Site


class QuietSite(Site):
    """No access log, like nginx with ``access_log off`` and llmproxy."""

    def log(self, request: HTTPRequest) -> None:
        pass


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--sse-upstream-port", type=int, default=None)
    args = parser.parse_args(argv)
    reactor: IReactorCore = _reactor
    tcp: IReactorTCP = _reactor
    root = ReverseProxyResource("127.0.0.1", args.upstream_port, b"")
    if args.sse_upstream_port is not None:
        sse = ReverseProxyResource("127.0.0.1", args.sse_upstream_port, b"")
        root.putChild(b"sse", sse)
    site = QuietSite(root)
    tcp.listenTCP(args.port, site, backlog=1024, interface="127.0.0.1")  # type: ignore[arg-type]
    print(f"twisted_proxy listening on 127.0.0.1:{args.port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
