"""Response cache hits per second, memory and Redis stores (no tests: benchmark tool).

    .venv/bin/python benchmarks/bench_cache.py [--duration 10] [--connections 50]
                                               [--stores memory,redis] [--no-pin]

For each store it starts one llmproxy process (the real ``ProxyService`` with a
file exporter on, so instrumentation is live for misses) whose routes point at a
small upstream inside the same process; fills the cache with one request per
case; checks the next answer says ``X-PROXY-CACHE: hit``; then runs
``wrk -t2 -c50`` for ``--duration`` seconds per case:

- ``GET /v1/models`` (``Cache-Control: max-age=3600`` from the upstream), and
- ``POST /v1/chat/completions`` on a ``cache = on`` route (the LLM case: an
  identical prompt answered from the cache).

Every request carries the same ``Authorization`` (one tenant).  The upstream
counts its calls: the count must not move during a measured run (every request
was a hit; a non-2xx answer is reported too).  The upstream shares the proxy's
process but is idle during the measurement.  With two or more CPUs the proxy is
pinned alone to the first one and wrk (and redis-server) to the others, so the
figure is one core's.

The Redis store talks to a private ``redis-server`` on a free port (no
persistence).  Results: a table on stdout and ``benchmarks/results/cache-*.json``.
If llmproxy/runtime/service.py already builds the cache from ``[cache]``, the service's
own cache is used; otherwise the cache is wired in here as the service would.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
POST_LUA = BENCH_DIR / "post.lua"
AUTH = "Bearer sk-bench-not-a-real-key"
CHAT_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'

CONFIG = """
[server]
listen = tcp:0:interface=127.0.0.1
admin_listen = tcp:0:interface=127.0.0.1
state_dir = {state}
drain_timeout = 5

[route:models]
prefix = /v1/models
upstream = http://127.0.0.1:{upstream}/v1/models

[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:{upstream}/v1/chat
cache = on

[passthrough]
enabled = false

[cache]
enabled = true
store = {store}
redis_url = {redis_url}
max_bytes = 64MiB

[exporter:events]
type = file
path = events.jsonl
"""

GET_LUA = """
wrk.method = "GET"
wrk.headers["Authorization"] = "{auth}"
done = function(summary, latency, requests)
  local e = summary.errors
  local seconds = summary.duration / 1e6
  io.write(string.format(
    'WRK_RESULT {{"requests":%d,"duration_s":%.6f,"rps":%.2f,"ok":%d,'
      .. '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},'
      .. '"latency_us":{{"p50":%d,"p99":%d}}}}\\n',
    summary.requests, seconds, summary.requests / seconds, summary.requests - e.status,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


# -- the proxy process (``serve``) ---------------------------------------------------------


def serve(store: str, redis_url: str, state: Path, ports_file: Path) -> None:
    from twisted.internet import reactor
    from twisted.web import server
    from twisted.web.resource import Resource

    from llmproxy.cache import build_cache
    from llmproxy.config.loader import load_settings
    from llmproxy.runtime.service import ProxyService

    class Upstream(Resource):
        isLeaf = True
        calls = 0

        def render(self, request: Any) -> bytes:
            if request.path == b"/count":
                return b"%d" % Upstream.calls
            Upstream.calls += 1
            request.setHeader(b"content-type", b"application/json")
            if request.path.startswith(b"/v1/models"):
                request.setHeader(b"cache-control", b"max-age=3600")
                return json.dumps(
                    {"object": "list", "data": [{"id": f"model-{i}"} for i in range(8)]}
                ).encode()
            return json.dumps(
                {
                    "id": "chatcmpl-bench",
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "Hello! " * 20},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 9, "completion_tokens": 40, "total_tokens": 49},
                }
            ).encode()

    site = server.Site(Upstream())
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    upstream = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    text = CONFIG.format(
        state=state, upstream=upstream.getHost().port, store=store, redis_url=redis_url
    )
    settings = load_settings(text=text, env={})
    service = ProxyService(settings, reactor)
    proxy: Any = service.proxy
    if getattr(proxy, "cache", None) is None:
        cache = build_cache(settings, reactor)
        assert cache is not None
        proxy.cache = cache
        cache.start()
    service.startService()
    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
        "before", "shutdown", service.stopService
    )
    assert service.port is not None and service.admin_port is not None
    ports_file.write_text(
        json.dumps(
            {
                "proxy": service.port.getHost().port,  # type: ignore[attr-defined]
                "upstream": upstream.getHost().port,
                "pid": os.getpid(),
            }
        )
    )
    reactor.run()  # type: ignore[attr-defined]


# -- the harness ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def request(
    port: int, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        # No Accept-Encoding, as wrk sends none: it is part of the cache key.
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.putheader("Authorization", AUTH)
        if body is not None:
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_for(check: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout:g}s")
        time.sleep(0.05)


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def pong() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    wait_for(pong, "redis-server")
    return process, port


def pin(pid: int, cpus: set[int]) -> None:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(pid, cpus)


def run_wrk(
    wrk: str, url: str, script: Path, duration: int, connections: int, cpus: set[int] | None
) -> dict[str, Any]:
    argv = [wrk, "-t2", f"-c{connections}", f"-d{duration}s", "-s", str(script), url]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if cpus:
        pin(process.pid, cpus)
    out, _ = process.communicate(timeout=duration + 60)
    text = out.decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("WRK_RESULT "):
            result: dict[str, Any] = json.loads(line[len("WRK_RESULT ") :])
            return result
    raise RuntimeError(f"wrk printed no result:\n{text}")


def bench_store(
    store: str, args: argparse.Namespace, workdir: Path, wrk: str, get_lua: Path
) -> dict[str, Any]:
    state = workdir / store
    state.mkdir()
    redis: subprocess.Popen[bytes] | None = None
    redis_url = ""
    pin_it = not args.no_pin and (os.cpu_count() or 1) >= 2
    proxy_cpus, load_cpus = ({0}, set(range(1, os.cpu_count() or 1))) if pin_it else (None, None)
    if store == "redis":
        redis, redis_port = start_redis(state)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        if load_cpus:
            pin(redis.pid, load_cpus)
    ports_file = state / "ports.json"
    log = open(state / "proxy.log", "wb")  # noqa: SIM115 - handed to the child
    proxy = subprocess.Popen(
        [sys.executable, __file__, "serve", store, redis_url or "-", str(state), str(ports_file)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    log.close()
    try:
        ports = wait_for(
            lambda: ports_file.exists() and json.loads(ports_file.read_text()), "proxy"
        )
        if proxy_cpus:
            pin(proxy.pid, proxy_cpus)
        port = ports["proxy"]
        cases = {
            "GET /v1/models": ("GET", "/v1/models", None, get_lua),
            "POST /v1/chat/completions": ("POST", "/v1/chat/completions", CHAT_BODY, POST_LUA),
        }
        out: dict[str, Any] = {}
        for name, (method, path, body, script) in cases.items():
            # Until Redis is connected a lookup is a bypass: ask until it is a hit.
            marks = [request(port, method, path, body)[1].get("x-proxy-cache") for _ in range(2)]
            while marks[-1] != "hit" and len(marks) < 50:
                time.sleep(0.1)
                marks.append(request(port, method, path, body)[1].get("x-proxy-cache"))
            if marks[-1] != "hit":
                raise RuntimeError(f"{store} {name}: answers say {marks}, never a hit")
            run_wrk(wrk, f"http://127.0.0.1:{port}{path}", script, 1, args.connections, load_cpus)
            # The upstream is called only while filling the cache, never during wrk.
            before = int(request(ports["upstream"], "GET", "/count")[2])
            result = run_wrk(
                wrk,
                f"http://127.0.0.1:{port}{path}",
                script,
                args.duration,
                args.connections,
                load_cpus,
            )
            calls = int(request(ports["upstream"], "GET", "/count")[2]) - before
            if calls:
                raise RuntimeError(f"{store} {name}: {calls} upstream calls during the run")
            out[name] = result
        return out
    finally:
        proxy.send_signal(signal.SIGTERM)
        try:
            proxy.wait(15)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
        if redis is not None:
            redis.terminate()
            redis.wait(10)


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        store, redis_url, state, ports_file = argv[1:5]
        serve(store, "" if redis_url == "-" else redis_url, Path(state), Path(ports_file))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--stores", default="memory,redis")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    args = parser.parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 1
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="llmproxy-bench-cache-") as tmp:
        workdir = Path(tmp)
        get_lua = workdir / "get.lua"
        get_lua.write_text(GET_LUA.format(auth=AUTH))
        for store in args.stores.split(","):
            print(f"-- {store} store", file=sys.stderr)
            results[store] = bench_store(store, args, workdir, wrk, get_lua)
    rows = [
        f"| {store} | {case} | {r['rps']:,.0f} | {r['latency_us']['p50'] / 1000:.2f} | "
        f"{r['latency_us']['p99'] / 1000:.2f} | {r['requests'] - r['ok']} |"
        for store, cases in results.items()
        for case, r in cases.items()
        if isinstance(r, dict)
    ]
    print(
        f"\nCache hits, wrk -t2 -c{args.connections} -d{args.duration}s, one llmproxy process"
        f" ({os.cpu_count()} CPUs{'' if args.no_pin else ', proxy pinned to CPU 0'}):\n"
    )
    print("| store | request | hits/s | p50 ms | p99 ms | non-2xx |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"cache-{stamp}.json"
    path.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"\nraw figures: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
