"""How many Redis commands a request costs under load (no tests: benchmark tool).

Starts the same nginx mock and redis-server as ``run.py``, one llmproxy variant
that talks to Redis (default ``llmproxy-file-tokens-redis``: a token with a quota
and a rate limit, ``[state] store = redis``), and for each ``--connections``
count runs wrk against it and reads redis-server's ``INFO commandstats`` before
and after: the calls of each command per completed request.  ``evalsha`` is a
script run (the admission, the spend charge and the sessions script each count
one); the others are the commands those scripts ran inside.  Each run is
placed as ``ab.py`` and ``run.py`` place theirs (``run.Mocks.place``).

    .venv/bin/python benchmarks/redis_calls.py                      # c50, c10, c1
    .venv/bin/python benchmarks/redis_calls.py --variant llmproxy-file-tokens-redis-2w
    .venv/bin/python benchmarks/redis_calls.py --connections 50 --seconds 8

The counts, not the rates, are the figures: they move far less than throughput
with the machine's speed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # the harness next to this file

_CALLS = re.compile(r"cmdstat_(\w+):calls=(\d+)")


def command_calls(redis_port: str) -> dict[str, int]:
    """redis-server's calls so far, by command (``INFO commandstats``)."""
    out = subprocess.run(
        ["redis-cli", "-p", redis_port, "INFO", "commandstats"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {m.group(1): int(m.group(2)) for m in _CALLS.finditer(out)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variant", default="llmproxy-file-tokens-redis")
    p.add_argument("--connections", default="50,10,1", help="wrk -c values, comma-separated")
    p.add_argument("--seconds", type=int, default=4, help="per wrk run")
    args = p.parse_args(argv)
    if args.variant not in run.LLMPROXY_VARIANTS:
        p.error(f"unknown variant {args.variant!r}; known: {', '.join(run.LLMPROXY_VARIANTS)}")
    nginx, wrk = run.ensure_tools(allow_install=True)
    with tempfile.TemporaryDirectory(prefix="llmproxy-redis-calls-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers may run as another user
        mock_port, sse_port = run.free_port(), run.free_port()
        placement = run.Placement.choose(pin=True)
        mocks = run.Mocks(nginx, workdir, mock_port, sse_port, placement)
        conf = run.nginx_mock_conf(workdir, mock_port, sse_port)
        with mocks.stack, run.run_nginx("mock", nginx, workdir, conf, mock_port) as mock:
            mocks.servers.append(mock)
            key = args.variant
            twistd, port, admin = run.llmproxy_daemon(mocks, key, workdir / key)
            redis_port = str(urlsplit(mocks.redis_url()).port)
            with run.spawn(key, twistd, workdir, cwd=run.ROOT) as server:
                run.started(server, run.answers_200(f"http://127.0.0.1:{admin}/ready"))
                spread = run.WORKERS.get(key, 1) > 1
                url = f"http://127.0.0.1:{port}{run.CHAT_PATH}"
                for connections in (int(c) for c in args.connections.split(",")):
                    cpus = mocks.place(server.pids(), connections, spread)
                    before = command_calls(redis_port)
                    result = run.run_wrk(
                        wrk, url, min(2, connections), connections, args.seconds, cpus=cpus
                    )
                    after = command_calls(redis_port)
                    requests = result.requests
                    if requests == 0:
                        print(f"c{connections}: wrk completed nothing:\n{result.output}")
                        continue
                    per = {
                        name: (after[name] - before.get(name, 0)) / requests
                        for name in sorted(after)
                        if name != "info" and after[name] != before.get(name, 0)
                    }
                    shown = ", ".join(f"{name} {n:.2f}" for name, n in per.items())
                    print(f"c{connections}: {requests:,} requests; per request: {shown}")
                server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
