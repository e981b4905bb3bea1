"""The llmproxy benchmark harness: one command, every run, one table (no tests: benchmark tool).

    .venv/bin/python benchmarks/run.py [--quick] [--duration S]

Against a fast local mock upstream (nginx serving a fixed chat completion; a
small Twisted SSE mock for streams) it measures, each with the same wrk load:

1. direct to the mock,
2. through llmproxy with no exporter,
3. through llmproxy with one file exporter,
4. through Twisted's stock ``ReverseProxyResource`` (a Python reference),
5. through nginx as a reverse proxy (upstream keep-alive; the native reference).

For each: requests/s at concurrency 50, latency p50/p99 at concurrency 1 and the
latency each proxy adds over direct, SSE streams/s at concurrency 50, server CPU
per request and peak RSS. The table is printed, written to docs/performance.md
with the machine and versions, and the raw figures go to benchmarks/results/.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import http.client
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DOCS_PATH = ROOT / "docs" / "performance.md"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
VENV_TWISTD = ROOT / ".venv" / "bin" / "twistd"
POST_LUA = BENCH_DIR / "post.lua"
SSE_MOCK = BENCH_DIR / "sse_mock.py"
TWISTED_PROXY = BENCH_DIR / "twisted_proxy.py"

CHAT_PATH = "/v1/chat/completions"
SSE_PREFIX = "/sse"  # every proxy serves the SSE mock under this prefix
REQUEST_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],'
    b'"stream":true,"stream_options":{"include_usage":true}}'
)

# What the nginx mock answers: a realistic non-streaming chat.completion (~650 bytes).
CHAT_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion",
    "created": 1763884800,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": (
                    "Hello! How can I help you today? I can answer questions, write and "
                    "summarise text, explain code or help you plan something."
                ),
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 9,
        "completion_tokens": 27,
        "total_tokens": 36,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_06737a9306",
}

START_TRIES = 200  # x START_POLL_S: how long a server may take to come up
START_POLL_S = 0.05
FILE_SINK_ROTATE_KEEP = 5  # llmproxy's default: events.jsonl.1 ... .5 are kept
STOP_TIMEOUT_S = 45.0  # llmproxy drains its exporters on SIGTERM


def warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def say(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- tools


def find_binary(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def _apt_candidate(package: str) -> bool:
    out = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        if line.strip().startswith("Candidate:"):
            return line.split(":", 1)[1].strip() not in ("", "(none)")
    return False


def ensure_tools(allow_install: bool) -> tuple[str, str]:
    """Paths of nginx and wrk, installing the Debian packages when either is missing."""
    nginx, wrk = find_binary("nginx"), find_binary("wrk")
    if nginx and wrk:
        return nginx, wrk
    missing = [n for n, p in (("nginx", nginx), ("wrk", wrk)) if p is None]
    if not allow_install:
        raise SystemExit(f"missing {', '.join(missing)} (and --no-install was given)")
    if find_binary("apt-get") is None:
        raise SystemExit(f"missing {', '.join(missing)}; install them (no apt-get here)")
    packages = []
    if wrk is None:
        packages.append("wrk")
    if nginx is None:
        packages.append("nginx-light" if _apt_candidate("nginx-light") else "nginx")
    prefix: list[str] = [] if os.geteuid() == 0 else ["sudo"]
    env_cmd = ["env", "DEBIAN_FRONTEND=noninteractive"]
    install = [*prefix, *env_cmd, "apt-get", "install", "-y", "--no-install-recommends", *packages]
    say(f"installing {' '.join(packages)}: {shlex.join(install)}")
    if subprocess.run(install, check=False).returncode != 0:
        say("install failed; running apt-get update and trying once more")
        subprocess.run([*prefix, *env_cmd, "apt-get", "update"], check=False)
        if subprocess.run(install, check=False).returncode != 0:
            raise SystemExit(f"could not install {' '.join(packages)}")
    nginx, wrk = find_binary("nginx"), find_binary("wrk")
    if not (nginx and wrk):
        raise SystemExit("nginx or wrk still missing after installing")
    return nginx, wrk


# ----------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) comes after the parenthesised command name.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and its direct children (nginx: master and workers)."""
    return [pid, *_children(pid)]


def peak_rss_kib(pids: Sequence[int]) -> int | None:
    """Sum of VmHWM (peak resident set) over ``pids``, in KiB."""
    total, seen = 0, False
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
                seen = True
    return total if seen else None


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time used so far by ``pids``."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def other_processes_cpu() -> dict[int, float]:
    """CPU seconds so far of every process that is not ours and not a kernel thread.

    Ours: this script and everything it started (wrk, mocks, servers). Kernel
    threads (children of kthreadd, pid 2) are left out: their work (networking,
    writeback) is mostly caused by the load itself.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / ticks
    ours = {os.getpid()}
    for _ in range(64):  # depth-bounded walk down our process tree
        more = {pid for pid, ppid in parent.items() if ppid in ours} - ours
        if not more:
            break
        ours |= more
    return {
        pid: seconds
        for pid, seconds in cpu.items()
        if pid not in ours and pid != 2 and parent.get(pid) != 2
    }


def other_cpu_since(before: dict[int, float]) -> float:
    """CPU seconds other processes used since the ``before`` snapshot (see above)."""
    after = other_processes_cpu()
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def wait_for_quiet(max_wait_s: float, sample_s: float = 2.0) -> float:
    """Wait, at most ``max_wait_s``, until other processes use under NOISE_LIMIT of a
    CPU over ``sample_s``; return the last share seen."""
    share = 0.0
    for n in range(max(1, math.ceil(max_wait_s / sample_s))):
        before = other_processes_cpu()
        time.sleep(sample_s)
        share = other_cpu_since(before) / sample_s
        if share <= NOISE_LIMIT:
            return share
        if n % 15 == 0:  # every 30 s or so
            say(f"other processes use {share:.0%} of a CPU; waiting for a quieter moment")
    return share


def set_affinity(pids: Sequence[int], cpus: frozenset[int]) -> None:
    """Pin every thread of ``pids`` to ``cpus`` (processes that went away are skipped)."""
    for pid in pids:
        try:
            tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)


@dataclass(frozen=True)
class Placement:
    """Which CPUs the server under test gets, and which wrk and the mocks get.

    Throughput runs give the server under test a CPU of its own and everything
    else the rest, so wrk and the mocks do not eat into what is measured. The c1
    latency runs put every process on one CPU: on a VM a wake-up across CPUs costs
    tens of µs, at random, which would swamp the overhead being measured.
    """

    server: frozenset[int]
    client: frozenset[int]
    enabled: bool

    @classmethod
    def choose(cls, pin: bool) -> Placement:
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < 2:
            return cls(frozenset(cpus), frozenset(cpus), enabled=False)
        return cls(frozenset(cpus[:1]), frozenset(cpus[1:]), enabled=True)

    def describe(self) -> str:
        if not self.enabled:
            return "no CPU pinning"
        return (
            f"throughput runs: server under test on CPU {_cpus(self.server)}, wrk and mocks "
            f"on CPU {_cpus(self.client)}; c1 latency runs: everything on CPU "
            f"{_cpus(self.server)}"
        )


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


@dataclass
class Server:
    """A subprocess we started, with its output going to a log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc.poll() is None else []

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                warn(f"{self.name} did not stop within {STOP_TIMEOUT_S:.0f}s; killing it")
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@contextlib.contextmanager
def spawn(
    name: str,
    argv: Sequence[str],
    workdir: Path,
    cwd: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[Server]:
    log_path = workdir / f"{name}.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")}
    env.update(extra_env or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, env=env,
        )  # fmt: skip
    server = Server(name, proc, log_path)
    try:
        yield server
    finally:
        server.stop()


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_call(
    method: str, url: str, body: bytes | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """One request to a 127.0.0.1 URL, ignoring any proxy settings of the environment."""
    assert url.startswith("http://127.0.0.1:"), url
    # As post.lua: the key a passthrough route forwards, the token of a token route.
    headers = (
        {"Content-Type": "application/json", "Authorization": f"Bearer {BENCH_TOKEN}"}
        if body is not None
        else {}
    )
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with _NO_PROXY_OPENER.open(req, timeout=timeout) as resp:
            status: int = resp.status
            return status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


OVERHEAD_HEADER = "X-LLMProxy-Overhead-Ms"


def overhead_header_sample(url: str, count: int) -> list[float]:
    """``count`` sequential requests on one keep-alive connection; llmproxy's own
    overhead figure from each response (empty if the header is not there)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname == "127.0.0.1" and parts.port, url
    values: list[float] = []
    conn = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=5)
    try:
        for _ in range(count):
            conn.request(
                "POST",
                parts.path,
                body=REQUEST_BODY,
                headers={
                    "Content-Type": "application/json",
                    "Authorization": f"Bearer {BENCH_TOKEN}",
                },
            )
            resp = conn.getresponse()
            resp.read()
            value = resp.getheader(OVERHEAD_HEADER)
            if value is None:
                break
            values.append(float(value))
    finally:
        conn.close()
    return values


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(pct / 100 * len(ordered)) - 1)]


def wait_until(server: Server, ready: Callable[[], bool]) -> bool:
    for _ in range(START_TRIES):
        if server.proc.poll() is not None:
            return False
        try:
            if ready():
                return True
        except OSError:
            pass
        time.sleep(START_POLL_S)
    return False


def port_open(port: int) -> Callable[[], bool]:
    def check() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True

    return check


def answers_200(url: str) -> Callable[[], bool]:
    def check() -> bool:
        return http_call("GET", url, timeout=1.0)[0] == 200

    return check


def started(server: Server, ready: Callable[[], bool]) -> Server:
    if not wait_until(server, ready):
        tail = server.tail()
        last = next((ln.strip() for ln in reversed(tail.splitlines()) if ln.strip()), "")
        raise RuntimeError(
            f"{server.name} did not come up (exit code {server.proc.poll()}): {last}\n{tail}"
        )
    return server


# -------------------------------------------------------------------------- nginx

_NGINX_MAIN = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
{body}
}}
"""


def _nginx_literal(text: str) -> str:
    # nginx expands $variables and ends the string at a quote; the mock body has neither.
    if any(c in text for c in "'$\\"):
        raise ValueError("the mock body must not contain quotes, $ or backslashes")
    return text


def nginx_mock_conf(workdir: Path, port: int, sse_port: int | None = None) -> str:
    """The nginx mock: the JSON answer on ``port``; with ``sse_port``, the recorded
    stream there too (``nginx_sse_server``), from the same worker."""
    body_json = json.dumps(CHAT_COMPLETION, separators=(",", ":"))
    server = f"""\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = {CHAT_PATH} {{
            default_type application/json;
            return 200 '{_nginx_literal(body_json)}';
        }}
        # A Loki stand-in for the loki sink runs: accepts every push.
        location = /loki/api/v1/push {{
            return 204;
        }}
        location / {{
            default_type application/json;
            return 404 '{{"error":{{"message":"not found","type":"invalid_request_error"}}}}';
        }}
    }}"""
    if sse_port is not None:
        server += "\n" + nginx_sse_server(workdir, sse_port)
    return _NGINX_MAIN.format(dir=workdir, body=server)


def nginx_sse_server(workdir: Path, port: int) -> str:
    """A server block answering every POST with the recorded 100-chunk stream
    (``recorded.recorded_stream()``, 17.8 KB) as ``text/event-stream``, from a
    file in ``workdir`` (a ``return`` string is capped at 4 KB).  nginx answers a
    POST to a file with 405; ``error_page 405 =200 $uri`` serves it as a GET."""
    from recorded import recorded_stream  # the script's folder is on sys.path

    workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
    stream = workdir / "stream.sse"
    stream.write_bytes(b"".join(recorded_stream()))
    return f"""\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = {CHAT_PATH} {{
            default_type text/event-stream;
            add_header Cache-Control no-cache;
            alias {stream};
            error_page 405 =200 $uri;
        }}
    }}"""


def nginx_proxy_conf(workdir: Path, port: int, mock_port: int, sse_port: int) -> str:
    server = f"""\
    upstream mock {{ server 127.0.0.1:{mock_port}; keepalive 64; }}
    upstream sse {{ server 127.0.0.1:{sse_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        location {SSE_PREFIX}/ {{ proxy_pass http://sse/; }}
        location / {{ proxy_pass http://mock; }}
    }}"""
    return _NGINX_MAIN.format(dir=workdir, body=server)


@contextlib.contextmanager
def run_nginx(name: str, nginx: str, workdir: Path, conf: str, port: int) -> Iterator[Server]:
    ndir = workdir / name
    ndir.mkdir(mode=0o755, exist_ok=True)  # the SSE mock may have put its file there
    conf_path = ndir / "nginx.conf"
    conf_path.write_text(conf)
    argv = [nginx, "-p", str(ndir), "-e", str(ndir / "error.log"), "-c", str(conf_path)]
    with spawn(name, argv, workdir) as server:
        yield started(server, port_open(port))


# ---------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    threads: int
    connections: int
    duration_s: float
    requests: int
    ok: int
    rps: float
    ok_rps: float
    errors: dict[str, int]
    latency_us: dict[str, float]
    server_cpu_s: float | None = None
    # CPU time used meanwhile by processes that are not ours (and not kernel
    # threads): someone else's work on the machine. The lower, the cleaner the run.
    foreign_cpu_s: float | None = None
    attempts: int = 1
    output: str = field(default="", repr=False)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.server_cpu_s is None or self.requests == 0:
            return None
        return self.server_cpu_s * 1e6 / self.requests


def run_wrk(
    wrk: str,
    url: str,
    threads: int,
    connections: int,
    seconds: int,
    stream: bool = False,
    cpus: frozenset[int] | None = None,
) -> WrkResult:
    """One wrk run (on ``cpus`` if given); the caller fills in the CPU accounting."""
    assert url.startswith("http://127.0.0.1:"), url
    argv = [
        wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
        "--latency", "-s", str(POST_LUA), url,
    ]  # fmt: skip
    env = dict(os.environ, WRK_STREAM="1" if stream else "0")

    def pin() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=env,
        timeout=seconds + 60,
        check=False,
        preexec_fn=pin,
    )
    result_line = next(
        (ln for ln in proc.stdout.splitlines() if ln.startswith("WRK_RESULT ")), None
    )
    if proc.returncode != 0 or result_line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    data = json.loads(result_line.removeprefix("WRK_RESULT "))
    duration = float(data["duration_s"])
    return WrkResult(
        threads=threads,
        connections=connections,
        duration_s=duration,
        requests=int(data["requests"]),
        ok=int(data["ok"]),
        rps=float(data["rps"]),
        ok_rps=int(data["ok"]) / duration if duration else 0.0,
        errors={k: int(v) for k, v in data["errors"].items()},
        latency_us={k: float(v) for k, v in data["latency_us"].items()},
        output=proc.stdout,
    )


# ------------------------------------------------------------------------- targets


@dataclass
class Target:
    """Something to send the load to, up and answering."""

    key: str
    label: str
    json_url: str
    sse_url: str | None
    measured: Callable[[], list[int]]  # processes whose CPU and RSS are reported
    measured_sse: Callable[[], list[int]] | None = None  # the same for SSE, if different
    after: Callable[[], dict[str, Any]] = lambda: {}  # extra facts, read after stopping
    # Several processes (workers): throughput runs spread everything over every CPU
    # instead of pinning the server to one.
    spread: bool = False


@dataclass
class RunResult:
    key: str
    label: str
    c50: WrkResult | None = None
    c1: WrkResult | None = None
    sse: WrkResult | None = None
    sse_c1: WrkResult | None = None  # streams one at a time: the latency a stream adds
    peak_rss_kib: int | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class Mocks:
    nginx: str
    workdir: Path
    mock_port: int
    sse_port: int
    placement: Placement
    servers: list[Server] = field(default_factory=list)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _redis_port: int = 0

    def pids(self) -> list[int]:
        return [pid for server in self.servers for pid in server.pids()]

    def place(self, subject: Sequence[int], connections: int, spread: bool) -> frozenset[int]:
        """Pin the mocks and ``subject`` (the server under test) for one wrk run of
        ``connections``, as every harness here measures; the CPUs wrk gets.  c1
        latency: every process on the server's CPU; several workers (``spread``):
        every process on every CPU; else throughput: the server alone on its CPU,
        the mocks (and wrk) on the others."""
        placement = self.placement
        if connections == 1:
            set_affinity([*self.pids(), *subject], placement.server)
            return placement.server
        if spread:
            set_affinity([*self.pids(), *subject], ALL_CPUS)
            return ALL_CPUS
        set_affinity(self.pids(), placement.client)
        set_affinity(subject, placement.server)
        return placement.client

    def redis_url(self) -> str:
        """A redis-server for the variants with ``[events] bus = redis``, started
        the first time one asks (loopback, no persistence, placed like the mocks)."""
        if not self._redis_port:
            binary = shutil.which("redis-server")
            if binary is None:
                raise RuntimeError("redis-server is not installed (scripts/system-deps)")
            port = free_port()
            argv = [
                binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir),
            ]  # fmt: skip
            server = self.stack.enter_context(spawn("redis", argv, self.workdir))
            self.servers.append(started(server, port_open(port)))
            self._redis_port = port
        return f"redis://127.0.0.1:{self._redis_port}/0"


def llmproxy_config(
    workdir: Path,
    mocks: Mocks,
    port: int,
    admin: int,
    extra: Sequence[str],
    workers: int = 1,
    tokens: bool = False,
) -> str:
    lines = [
        "[server]",
        f"workers = {workers}",
        f"listen = tcp:{port}:interface=127.0.0.1",
        f"admin_listen = tcp:{admin}:interface=127.0.0.1",
        f"state_dir = {workdir / 'state'}",
        "drain_timeout = 30",
        "",
        "[route:mock]",
        "prefix = /",
        f"upstream = http://127.0.0.1:{mocks.mock_port}",
        "provider = openai",
        "",
        "[route:sse]",
        f"prefix = {SSE_PREFIX}",
        f"upstream = http://127.0.0.1:{mocks.sse_port}",
        "provider = openai",
    ]
    if tokens:
        for route in ("[route:mock]", "[route:sse]"):
            at = lines.index(route) + 1
            lines[at:at] = ["auth = token", "api_key = sk-bench-upstream-key"]
    if any("{REDIS}" in line for line in extra):
        extra = [line.replace("{REDIS}", mocks.redis_url()) for line in extra]
    lines += [line.replace("{LOKI}", f"http://127.0.0.1:{mocks.mock_port}") for line in extra]
    return "\n".join(lines) + "\n"


def count_events(path: Path) -> dict[str, int]:
    """Events by type in a JSONL file and its rotated siblings (``path.1``, ``path.2``...)."""
    counts: dict[str, int] = {}
    rotated = [p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()]
    for file in [path, *rotated]:
        if not file.exists():
            continue
        with open(file, "rb") as f:  # streamed: the files can be large
            for line in f:
                try:
                    kind = str(json.loads(line).get("type"))
                except ValueError:
                    kind = "unparseable"
                counts[kind] = counts.get(kind, 0) + 1
    return counts


def tree_bytes(path: Path) -> int:
    """Bytes in the files under ``path`` (0 if it does not exist)."""
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def target_direct(mocks: Mocks, mock_server: Server, sse_server: Server) -> Iterator[Target]:
    yield Target(
        key="direct",
        label=LABELS["direct"],
        json_url=f"http://127.0.0.1:{mocks.mock_port}{CHAT_PATH}",
        sse_url=f"http://127.0.0.1:{mocks.sse_port}{CHAT_PATH}",
        measured=mock_server.pids,
        measured_sse=sse_server.pids,
    )


LABELS = {
    "direct": "direct to the mock (nginx)",
    "llmproxy-off": "llmproxy, no sinks",
    "llmproxy-file": "llmproxy, file sink on",
    "llmproxy-file-nofsync": "llmproxy, file sink, fsync = never",
    "llmproxy-file-nosessions": "llmproxy, file sink, sessions off",
    "llmproxy-file-loki": "llmproxy, file + Loki sinks on",
    "llmproxy-off-2w": "llmproxy, 2 workers, no sinks",
    "llmproxy-file-2w": "llmproxy, 2 workers, file sink on",
    "llmproxy-redis": "llmproxy, Redis bus (XADD), no local sink",
    "llmproxy-file-tokens": "llmproxy, file sink, token with quota and rpm",
    "llmproxy-file-tokens-redis": "llmproxy, file sink, token, [state] store = redis",
    "llmproxy-file-tokens-redis-2w": "llmproxy, 2 workers, file sink, token, store = redis",
    "llmproxy-file-tokens-2w": "llmproxy, 2 workers, file sink, token, store = local",
    "twisted": "Twisted ReverseProxyResource",
    "twisted-agent": "Twisted Agent proxy (pooled)",
    "nginx": "nginx proxy_pass (1 worker)",
}
FILE_SINK = ["", "[exporter:events]", "type = file", "path = events.jsonl"]
# [events] bus = redis on the harness's redis-server (Mocks.redis_url).
REDIS_BUS = ["", "[events]", "bus = redis", "", "[redis]", "url = {REDIS}"]
# [state] store = redis on the same redis-server.
SHARED_STATE = ["", "[state]", "store = redis", "", "[redis]", "url = {REDIS}"]
LLMPROXY_VARIANTS: dict[str, list[str]] = {
    # key: ini lines added to the common config (server and the two routes)
    "llmproxy-off": [],
    "llmproxy-file": FILE_SINK,
    "llmproxy-file-nofsync": [*FILE_SINK, "fsync = never"],
    "llmproxy-file-nosessions": [*FILE_SINK, "", "[sessions]", "enabled = false"],
    "llmproxy-file-loki": [*FILE_SINK, "", "[exporter:loki]", "type = loki", "url = {LOKI}"],
    "llmproxy-off-2w": [],
    "llmproxy-file-2w": FILE_SINK,
    "llmproxy-redis": REDIS_BUS,
    "llmproxy-file-tokens": FILE_SINK,
    "llmproxy-file-tokens-redis": [*FILE_SINK, *SHARED_STATE],
    "llmproxy-file-tokens-redis-2w": [*FILE_SINK, *SHARED_STATE],
    "llmproxy-file-tokens-2w": FILE_SINK,
}
WORKERS = {  # [server] workers; others: 1
    "llmproxy-off-2w": 2,
    "llmproxy-file-2w": 2,
    "llmproxy-file-tokens-redis-2w": 2,
    "llmproxy-file-tokens-2w": 2,
}
# Variants whose routes want a proxy token (auth = token): the state directory
# holds one for the key post.lua sends, with a quota and a rate limit so every
# request is counted and takes from a bucket (with store = redis: the admission
# script), both far above what a run sends.
TOKEN_VARIANTS = frozenset(
    {
        "llmproxy-file-tokens",
        "llmproxy-file-tokens-2w",
        "llmproxy-file-tokens-redis",
        "llmproxy-file-tokens-redis-2w",
    }
)
BENCH_TOKEN = "sk-bench-not-a-real-key"  # benchmarks/post.lua's Authorization
BENCH_TOKEN_LIMITS = {"max_requests": 10**12, "rpm": 10**9}


def write_bench_token(state_dir: Path) -> None:
    """``tokens.json`` with the token post.lua sends (as ``llmproxy token create``
    would store it: its digest only)."""
    digest = hashlib.sha256(BENCH_TOKEN.encode()).hexdigest()
    token = {"sha256": digest, "project": "bench", "created": time.time(), **BENCH_TOKEN_LIMITS}
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "tokens.json").write_text(json.dumps({"version": 1, "tokens": [token]}))


def llmproxy_daemon(
    mocks: Mocks, key: str, workdir: Path, twistd_options: Sequence[str] = ()
) -> tuple[list[str], int, int]:
    """Write variant ``key``'s config into ``workdir`` (made here); return the
    ``twistd`` command that runs it, its port and its admin port."""
    workdir.mkdir()
    port, admin = free_port(), free_port()
    config = workdir / "llmproxy.ini"
    extra = LLMPROXY_VARIANTS[key]
    tokens = key in TOKEN_VARIANTS
    config.write_text(
        llmproxy_config(workdir, mocks, port, admin, extra, WORKERS.get(key, 1), tokens)
    )
    if tokens:
        write_bench_token(workdir / "state")
    argv = [
        str(VENV_TWISTD), "-n", "--pidfile=", "-l", "/dev/null", *twistd_options,
        "llmproxy", "--config", str(config),
    ]  # fmt: skip
    return argv, port, admin


@contextlib.contextmanager
def target_llmproxy(mocks: Mocks, key: str) -> Iterator[Target]:
    label = LABELS[key]
    extra = LLMPROXY_VARIANTS[key]
    workdir = mocks.workdir / key
    workers = WORKERS.get(key, 1)
    argv, port, admin = llmproxy_daemon(mocks, key, workdir)
    facts: dict[str, Any] = {}
    with spawn(key, argv, mocks.workdir, cwd=ROOT) as server:
        started(server, answers_200(f"http://127.0.0.1:{admin}/ready"))

        def after() -> dict[str, Any]:
            return facts

        yield Target(
            key=key,
            label=label,
            json_url=f"http://127.0.0.1:{port}{CHAT_PATH}",
            sse_url=f"http://127.0.0.1:{port}{SSE_PREFIX}{CHAT_PATH}",
            measured=server.pids,
            after=after,
            spread=workers > 1,
        )
        facts["exit_code"] = server.stop()
    if extra:
        # One worker writes under state/; several under state/worker-I/ each.
        states = [workdir / "state"] if workers == 1 else sorted(
            (workdir / "state").glob("worker-*")
        )  # fmt: skip
        facts["events"] = {}
        facts["event_files"] = []
        facts["spool_bytes_left"] = 0
        facts["dead_letter_lines"] = {}
        for state in states:
            for kind, n in count_events(state / "events.jsonl").items():
                facts["events"][kind] = facts["events"].get(kind, 0) + n
            facts["event_files"] += sorted(
                str(p.relative_to(workdir / "state")) for p in state.glob("events.jsonl*")
            )
            facts["spool_bytes_left"] += tree_bytes(state / "spool")
            dead = state / "deadletter" / "events.jsonl"
            for kind, n in (count_events(dead) if dead.exists() else {}).items():
                facts["dead_letter_lines"][kind] = facts["dead_letter_lines"].get(kind, 0) + n


@contextlib.contextmanager
def target_twisted(mocks: Mocks, key: str = "twisted") -> Iterator[Target]:
    port = free_port()
    argv = [
        str(VENV_PYTHON), str(TWISTED_PROXY), "--port", str(port),
        "--upstream-port", str(mocks.mock_port), "--sse-upstream-port", str(mocks.sse_port),
    ]  # fmt: skip
    if key == "twisted-agent":
        argv.append("--agent")
    with spawn(key, argv, mocks.workdir) as server:
        started(server, port_open(port))
        yield Target(
            key=key,
            label=LABELS[key],
            json_url=f"http://127.0.0.1:{port}{CHAT_PATH}",
            sse_url=f"http://127.0.0.1:{port}{SSE_PREFIX}{CHAT_PATH}",
            measured=server.pids,
        )


@contextlib.contextmanager
def target_nginx(mocks: Mocks) -> Iterator[Target]:
    port = free_port()
    conf = nginx_proxy_conf(mocks.workdir / "nginx-proxy", port, mocks.mock_port, mocks.sse_port)
    with run_nginx("nginx-proxy", mocks.nginx, mocks.workdir, conf, port) as server:
        yield Target(
            key="nginx",
            label=LABELS["nginx"],
            json_url=f"http://127.0.0.1:{port}{CHAT_PATH}",
            sse_url=f"http://127.0.0.1:{port}{SSE_PREFIX}{CHAT_PATH}",
            measured=server.pids,
        )


# ------------------------------------------------------------------------ the runs

RUN_KEYS = (
    "direct",
    "llmproxy-off",
    "llmproxy-file",
    "llmproxy-file-loki",
    "llmproxy-off-2w",
    "llmproxy-file-2w",
    "twisted",
    "twisted-agent",
    "nginx",
)
# Not run by default: diagnoses of the file sink's cost (its fsync; the session
# tracker), and tokens counted per process or in Redis ([state] store).
EXTRA_RUN_KEYS = (
    "llmproxy-file-nofsync",
    "llmproxy-file-nosessions",
    "llmproxy-file-tokens",
    "llmproxy-file-tokens-redis",
    "llmproxy-file-tokens-redis-2w",
    "llmproxy-file-tokens-2w",
)
ALL_RUN_KEYS = (*RUN_KEYS[:3], *EXTRA_RUN_KEYS, *RUN_KEYS[3:])
ALL_CPUS = frozenset(os.sched_getaffinity(0))


@dataclass
class Load:
    seconds: int
    warmup_seconds: int
    threads: int
    connections: int
    retries: int  # extra attempts for a measurement disturbed by other processes


def check_plain(target: Target) -> str | None:
    """What is wrong with one plain request to the target, if anything."""
    status, body = http_call("POST", target.json_url, REQUEST_BODY)
    if status != 200 or b'"usage"' not in body:
        return f"POST {target.json_url}: HTTP {status}: {body[:200]!r}"
    return None


def check_stream(target: Target) -> str | None:
    """What is wrong with one streamed request to the target, if anything."""
    if target.sse_url is None:
        return "no SSE URL"
    status, body = http_call("POST", target.sse_url, STREAM_BODY)
    if status != 200 or not body.rstrip().endswith(b"data: [DONE]"):
        return f"POST {target.sse_url} (stream): HTTP {status}: {body[-200:]!r}"
    return None


def measure(target: Target, wrk: str, load: Load, mocks: Mocks) -> RunResult:
    result = RunResult(target.key, target.label)
    plain_problem = check_plain(target)
    if plain_problem is not None:
        result.problems.append(plain_problem)
        return result  # plain requests do not work: nothing to measure
    stream_problem = check_stream(target)
    if stream_problem is not None:
        result.problems.append(stream_problem)
    conns, threads = load.connections, min(load.threads, load.connections)
    placement = mocks.placement

    def attempt(url: str, threads: int, conns: int, seconds: int, stream: bool) -> WrkResult:
        subject = (target.measured_sse or target.measured)() if stream else target.measured()
        cpus = mocks.place(subject, conns, target.spread)
        subject_before, others_before = cpu_seconds(subject), other_processes_cpu()
        r = run_wrk(wrk, url, threads, conns, seconds, stream, cpus if placement.enabled else None)
        r.server_cpu_s = cpu_seconds(subject) - subject_before
        r.foreign_cpu_s = other_cpu_since(others_before)
        return r

    def wrk_run(
        what: str, url: str, threads: int, conns: int, seconds: int, stream: bool = False
    ) -> WrkResult | None:
        best: WrkResult | None = None
        for n in range(1, load.retries + 2):
            try:
                r = attempt(url, threads, conns, seconds, stream)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                result.problems.append(f"{what}: {e}")
                return best
            r.attempts = n
            if best is None:
                best = r
            else:  # keep the cleaner attempt; the other's exchanges were still made
                best, dropped = (r, best) if noise(r) < noise(best) else (best, r)
                unreported.append(dropped.requests)
            if noise(best) <= NOISE_LIMIT or what == "warm-up" or n > load.retries:
                break
            say(f"   {what}: other processes used {noise(r):.0%} of a CPU meanwhile; again")
        if best is None:
            return None
        if best.error_count:
            result.problems.append(f"{what}: wrk errors {best.errors}")
        if noise(best) > NOISE_LIMIT and what != "warm-up":
            result.problems.append(
                f"{what}: noisy, other processes used {noise(best):.0%} of a CPU meanwhile"
            )
        return best

    unreported: list[int] = []
    if load.warmup_seconds:
        warm = wrk_run("warm-up", target.json_url, threads, conns, load.warmup_seconds)
        unreported.append(warm.requests if warm else 0)
    result.c50 = wrk_run(f"c{conns}", target.json_url, threads, conns, load.seconds)
    c1_runs = [
        wrk_run(f"c1 #{n}", target.json_url, 1, 1, max(1, math.ceil(load.seconds / C1_RUNS)))
        for n in range(1, C1_RUNS + 1)
    ]
    done = sorted((r for r in c1_runs if r is not None), key=lambda r: r.latency_us["p99"])
    if done:  # the median run by p99: one disturbed run does not decide the figure
        result.c1 = done[(len(done) - 1) // 2]
        unreported.extend(r.requests for r in done if r is not result.c1)
        result.facts["c1_runs_p50_p99_us"] = [
            [r.latency_us["p50"], r.latency_us["p99"]] for r in c1_runs if r is not None
        ]
    if target.key.startswith("llmproxy"):  # still all on one CPU, as for c1
        try:
            sample = overhead_header_sample(target.json_url, OVERHEAD_SAMPLE)
        except (OSError, http.client.HTTPException, ValueError) as e:
            result.problems.append(f"{OVERHEAD_HEADER} sample: {e}")
            sample = []
        unreported.append(len(sample))
        if sample:
            result.facts["self_reported_overhead_ms"] = {
                "requests": len(sample),
                "p50": percentile(sample, 50),
                "p99": percentile(sample, 99),
            }
    if stream_problem is None and target.sse_url is not None:
        result.sse = wrk_run(f"SSE c{conns}", target.sse_url, threads, conns, load.seconds, True)
        c1_seconds = max(1, math.ceil(load.seconds / C1_RUNS))
        sse_runs = [
            wrk_run(f"SSE c1 #{n}", target.sse_url, 1, 1, c1_seconds, True)
            for n in range(1, C1_RUNS + 1)
        ]
        done = sorted((r for r in sse_runs if r is not None), key=lambda r: r.latency_us["p99"])
        if done:
            result.sse_c1 = done[(len(done) - 1) // 2]
            unreported.extend(r.requests for r in done if r is not result.sse_c1)
    result.peak_rss_kib = peak_rss_kib(target.measured())
    result.facts["unreported_requests"] = sum(unreported)  # warm-up, discarded attempts
    return result


C1_RUNS = 3  # the c1 time is split into this many runs; the median one (by p99) counts
OVERHEAD_SAMPLE = 1000  # sequential requests read for llmproxy's overhead header
NOISE_LIMIT = 0.10  # share of a CPU that others may use meanwhile before we measure again


def noise(r: WrkResult) -> float:
    """Share of a CPU used by other processes during ``r``."""
    if r.foreign_cpu_s is None or not r.duration_s:
        return 0.0
    return r.foreign_cpu_s / r.duration_s


def run_target(
    key: str,
    make: Callable[[], contextlib.AbstractContextManager[Target]],
    wrk: str,
    load: Load,
    mocks: Mocks,
) -> RunResult:
    say(f"== {key}")
    result: RunResult | None = None
    target: Target | None = None
    try:
        with make() as target:
            result = measure(target, wrk, load, mocks)
        if result is not None:
            result.facts.update(target.after())
    except (RuntimeError, OSError) as e:
        warn(f"{key}: {e}")
        result = result or RunResult(key, LABELS[key])
        for p in result.problems:
            warn(f"{key}: {p}")
        result.problems.append(str(e).splitlines()[0])
    else:
        for p in result.problems:
            warn(f"{key}: {p}")
    say(f"   {summary_line(result)}")
    return result


def summary_line(r: RunResult) -> str:
    parts = []
    if r.c50:
        parts.append(f"{r.c50.ok_rps:,.0f} req/s")
    if r.c1:
        parts.append(f"c1 p50 {ms(r.c1.latency_us['p50'])} p99 {ms(r.c1.latency_us['p99'])} ms")
    if r.sse:
        parts.append(f"SSE {r.sse.ok_rps:,.0f} streams/s")
    if r.peak_rss_kib:
        parts.append(f"RSS {r.peak_rss_kib / 1024:.0f} MiB")
    return ", ".join(parts) or "no figures"


# ------------------------------------------------------------------------ reporting


def ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.3f}"


def _cmd_output(argv: Sequence[str]) -> str:
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (p.stdout + p.stderr).strip()


def machine_facts(nginx: str, wrk: str) -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    twisted_version = _cmd_output(
        [str(VENV_PYTHON), "-c", "import twisted; print(twisted.__version__)"]
    )
    python_version = _cmd_output([str(VENV_PYTHON), "-c", "import sys; print(sys.version)"])
    git_rev = _cmd_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    # The report page itself does not count: an earlier run rewrote it.
    dirty = _cmd_output(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", ".",
         ":!docs/performance.md"]
    )  # fmt: skip
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": python_version.split()[0] if python_version else "unknown",
        "twisted": twisted_version,
        "nginx": _cmd_output([nginx, "-v"]).removeprefix("nginx version: nginx/"),
        "wrk": _cmd_output([wrk, "-v"]).splitlines()[0].split(" [")[0].removeprefix("wrk "),
        "llmproxy_git": git_rev + (" (with uncommitted changes)" if dirty.strip() else ""),
    }


def _added(r: RunResult, direct: RunResult | None, pct: str) -> str:
    if not (r.c1 and direct and direct.c1) or r.key == "direct":
        return "-"
    return f"{(r.c1.latency_us[pct] - direct.c1.latency_us[pct]) / 1000:+.3f}"


def results_table(results: Sequence[RunResult], load: Load) -> str:
    direct = next((r for r in results if r.key == "direct"), None)
    c = load.connections
    head = (
        f"| run | req/s c{c} | p50 / p99 c1 (ms) | added p50 / p99 (ms) "
        f"| SSE streams/s c{c} | server CPU µs/req (busy) | peak RSS (MiB) |"
    )
    rows = [head, "|" + "---|" * 7]
    for r in results:
        c50 = f"{r.c50.ok_rps:,.0f}" if r.c50 else "failed"
        c1 = f"{ms(r.c1.latency_us['p50'])} / {ms(r.c1.latency_us['p99'])}" if r.c1 else "failed"
        added = f"{_added(r, direct, 'p50')} / {_added(r, direct, 'p99')}"
        if r.key == "direct":
            added = "(baseline)"
        sse = f"{r.sse.ok_rps:,.0f}" if r.sse else "-"
        cpu = r.c50.cpu_us_per_request if r.c50 else None
        cpu_s = f"{cpu:.0f}" if cpu is not None else "-"
        if r.c50 and r.c50.server_cpu_s is not None and r.c50.duration_s:
            cpu_s += f" ({min(1.0, r.c50.server_cpu_s / r.c50.duration_s):.0%})"
        rss = f"{r.peak_rss_kib / 1024:.0f}" if r.peak_rss_kib else "-"
        flag = " ⚠" if r.problems else ""
        rows.append(f"| {r.label}{flag} | {c50} | {c1} | {added} | {sse} | {cpu_s} | {rss} |")
    return "\n".join(rows)


def _added_stream(r: RunResult, direct: RunResult | None, pct: str) -> str:
    if not (r.sse_c1 and direct and direct.sse_c1) or r.key == "direct":
        return "-"
    return f"{(r.sse_c1.latency_us[pct] - direct.sse_c1.latency_us[pct]) / 1000:+.3f}"


def stream_table(results: Sequence[RunResult], load: Load) -> str:
    """Streams: the recorded 100-chunk reply, at c50 and one at a time."""
    direct = next((r for r in results if r.key == "direct"), None)
    c = load.connections
    head = (
        f"| run | streams/s c{c} | p50 / p99 c1 (ms) | added p50 / p99 (ms) "
        "| server CPU µs/stream (busy) |"
    )
    rows = [head, "|" + "---|" * 5]
    for r in results:
        if r.sse is None and r.sse_c1 is None:
            continue
        rate = f"{r.sse.ok_rps:,.0f}" if r.sse else "failed"
        c1 = r.sse_c1
        lat = f"{ms(c1.latency_us['p50'])} / {ms(c1.latency_us['p99'])}" if c1 else "failed"
        added = f"{_added_stream(r, direct, 'p50')} / {_added_stream(r, direct, 'p99')}"
        if r.key == "direct":
            added = "(baseline)"
        cpu = r.sse.cpu_us_per_request if r.sse else None
        cpu_s = f"{cpu:.0f}" if cpu is not None else "-"
        if r.sse and r.sse.server_cpu_s is not None and r.sse.duration_s:
            cpu_s += f" ({min(1.0, r.sse.server_cpu_s / r.sse.duration_s):.0%})"
        flag = " ⚠" if r.problems else ""
        rows.append(f"| {r.label}{flag} | {rate} | {lat} | {added} | {cpu_s} |")
    return "\n".join(rows)


def compass_lines(results: Sequence[RunResult]) -> list[str]:
    """The SPEC section 10 targets, checked against this run."""
    by_key = {r.key: r for r in results}
    direct, off, on = by_key.get("direct"), by_key.get("llmproxy-off"), by_key.get("llmproxy-file")
    lines: list[str] = []
    if on and on.c50:
        lines.append(
            f"- throughput, one process, file sink on, c50: {on.c50.ok_rps:,.0f} req/s "
            "(LiteLLM proxy, one worker: ~100 req/s)"
        )
    if on and on.c1 and direct and direct.c1:
        p50 = on.c1.latency_us["p50"] - direct.c1.latency_us["p50"]
        p99 = on.c1.latency_us["p99"] - direct.c1.latency_us["p99"]
        lines.append(
            f"- added latency at c1 (file sink on): p50 {p50 / 1000:.3f} ms "
            f"(target < 0.5: {'met' if p50 < 500 else 'NOT met'}), p99 {p99 / 1000:.3f} ms "
            f"(target < 2: {'met' if p99 < 2000 else 'NOT met'})"
        )
    for sinks in (on, by_key.get("llmproxy-file-loki")):
        if sinks and sinks.c50 and off and off.c50 and off.c50.ok_rps:
            ratio = sinks.c50.ok_rps / off.c50.ok_rps
            lines.append(
                f"- exporter on vs off ({sinks.label}): {ratio:.1%} of the throughput "
                f"(target ≥ 95%: {'met' if ratio >= 0.95 else 'NOT met'})"
            )
    if on and on.sse and off and off.sse and off.sse.ok_rps:
        ratio = on.sse.ok_rps / off.sse.ok_rps
        lines.append(
            f"- streams, file sink on vs no sinks: {on.sse.ok_rps:,.0f} vs "
            f"{off.sse.ok_rps:,.0f} streams/s, {ratio:.1%} (target ≥ 4,000 and ≥ 50%)"
        )
    if on and on.sse_c1 and direct and direct.sse_c1:
        p50 = on.sse_c1.latency_us["p50"] - direct.sse_c1.latency_us["p50"]
        lines.append(
            f"- streams, added p50 at c1 (file sink on): {p50 / 1000:.3f} ms (target ≤ 0.4)"
        )
    agent = by_key.get("twisted-agent")
    if on and on.c50 and agent and agent.c50 and agent.c50.ok_rps:
        lines.append(
            f"- JSON, file sink on vs the Twisted Agent proxy: "
            f"{on.c50.ok_rps / agent.c50.ok_rps:.2f}x (target ≥ 1.5x)"
        )
    for one_key, two_key, what in (
        ("llmproxy-off", "llmproxy-off-2w", "no sinks"),
        ("llmproxy-file", "llmproxy-file-2w", "file sink on"),
    ):
        one, two = by_key.get(one_key), by_key.get(two_key)
        if one and one.c50 and two and two.c50 and one.c50.ok_rps:
            scale = two.c50.ok_rps / one.c50.ok_rps
            lines.append(
                f"- 2 workers vs 1 ({what}): {scale:.2f}x "
                f"({two.c50.ok_rps:,.0f} vs {one.c50.ok_rps:,.0f} req/s; target ≥ 1.7x: "
                f"{'met' if scale >= 1.7 else 'NOT met'}; wrk and the mocks share the 2 CPUs)"
            )
    for r in results:
        if "self_reported_overhead_ms" in r.facts:
            o = r.facts["self_reported_overhead_ms"]
            lines.append(
                f"- {r.label}: its own `{OVERHEAD_HEADER}` over {o['requests']} sequential "
                f"requests: p50 {o['p50']:.3f} ms, p99 {o['p99']:.3f} ms"
            )
    for r in results:
        if "events" in r.facts:
            lines.append(f"- {r.label}: {events_check(r)}")
    return lines


def events_check(r: RunResult) -> str:
    """Did the file sink get an event pair for every exchange the load completed?"""
    events: dict[str, int] = r.facts["events"]
    sent = 2 + (r.facts.get("unreported_requests") or 0)  # 2: the sanity checks
    sent += sum(w.requests for w in (r.c50, r.c1, r.sse, r.sse_c1) if w is not None)
    requests, responses = events.get("request", 0), events.get("response", 0)
    # wrk counts completed responses only; what was in flight when it stopped is still
    # recorded by the proxy, so a few more events than counted requests is expected.
    verdict = "every exchange recorded" if min(requests, responses) >= sent else "EVENTS MISSING"
    if len(r.facts.get("event_files", [])) > FILE_SINK_ROTATE_KEEP and verdict == "EVENTS MISSING":
        # The sink keeps rotate_keep old files and deletes older ones: not a loss.
        verdict = "not checkable, the file sink's rotation deleted the oldest file"
    dead = sum(r.facts.get("dead_letter_lines", {}).values())
    files = len(r.facts.get("event_files", []))
    return (
        f"{requests:,} request and {responses:,} response events in {files} file(s) for "
        f"{sent:,} completed exchanges, {dead} dead-lettered, "
        f"{r.facts.get('spool_bytes_left', 0):,} bytes left in the spool: {verdict}"
    )


def render_report(
    results: Sequence[RunResult], machine: dict[str, Any], load: Load, command: str, when: str
) -> str:
    problems = [f"- {r.key}: {p}" for r in results for p in r.problems]
    compass = compass_lines(results)
    mem = machine["memory_gib"]
    return f"""\
# Performance

What llmproxy costs on top of the upstream it forwards to, measured side by side
with nginx and a plain Twisted proxy under the same load on the same machine:
throughput, the latency it adds, its CPU per exchange and its memory, for small
JSON exchanges and for streamed replies.  Absolute figures depend on the
machine; compare the rows of one run.

The part of this page down to the marker below is written by
`benchmarks/run.py` (see `benchmarks/README.md`); everything after it (where
the CPU goes, how to size a deployment, the delivery engine, how to reproduce
each figure) is kept when it rewrites the page.

## Side by side

{when}, `{command}`

- machine: {machine["nproc"]} CPUs ({machine["cpu_model"]}), {mem} GiB memory, \
Linux {machine["kernel"]}
- versions: Python {machine["python"]}, Twisted {machine["twisted"]}, \
nginx {machine["nginx"]}, wrk {machine["wrk"]}; llmproxy {machine["llmproxy_git"]}
- load: wrk `-t{load.threads} -c{load.connections} -d{load.seconds}s` for throughput; \
for latency {C1_RUNS} runs of `-t1 -c1 -d{max(1, math.ceil(load.seconds / C1_RUNS))}s`, \
the median one by p99 reported; after a {load.warmup_seconds} s warm-up
- CPU placement: {machine["placement"]}

### JSON exchanges

POST `{REQUEST_BODY.decode()}`; the nginx mock answers a ~650-byte
`chat.completion` with `usage`.

{results_table(results, load)}

### Streams

POST the same with `"stream": true`; the nginx mock answers the recorded
100-chunk OpenAI reply (17.8 KB, with a usage chunk: `benchmarks/recorded.py`).

{stream_table(results, load)}

{chr(10).join(compass) if compass else "(no llmproxy figures in this run)"}
{chr(10) + "Problems in this run:" + chr(10) + chr(10).join(problems) + chr(10) if problems else ""}
### What the columns mean

- **req/s c{load.connections}**, **streams/s c{load.connections}**: completed 2xx
  answers per second at {load.connections} concurrent keep-alive connections.
- **p50 / p99 c1**: latency percentiles with one connection, one request at a time
  (wrk's histogram, µs resolution; for a stream, until its last byte); of
  {C1_RUNS} runs, the one with the median p99 (all are in the raw results).
- **added p50 / p99**: the same minus the direct run's: what the proxy adds.
- **SSE streams/s** (JSON table): the c{load.connections} stream rate again, for
  reading the two tables side by side.
- **server CPU µs/req (busy)**, **µs/stream**: user+system CPU of the process(es)
  under test during the c{load.connections} run divided by the answers served (for
  *direct*: the nginx mock), and in brackets how busy that kept them: a
  one-process proxy at 100% is CPU-bound.  The steadiest column, and the one
  to size a deployment with (1,000,000 / µs per exchange = exchanges per second
  per busy core).
- **peak RSS**: VmHWM of the process(es) under test at the end of their runs
  (nginx: master and worker).
- ⚠: something went wrong or the run was disturbed; see "Problems in this run".
  A measurement during which other processes (not ours, not kernel threads) used
  more than {NOISE_LIMIT:.0%} of a CPU is repeated (up to {load.retries} times) and the
  cleanest attempt kept.

### The runs

1. **direct**: wrk straight to the mock upstream (nginx, 1 worker, a fixed JSON
   body and a fixed stream, access log off, keep-alive).
2. **llmproxy, no sinks**: `twistd -n llmproxy` with routes to the mock and no
   `[exporter:*]` section: llmproxy then captures nothing; the bare forwarding path.
3. **llmproxy, file sink on**: the same plus `[exporter:events] type = file`: capture,
   session tracking (on by default), both events of every exchange built and
   written to a JSONL file; the difference to row 2 is the whole cost of capture.
4. **file + Loki sinks**: the file sink and a `loki` sink pushing gzip batches to
   the nginx mock (answers 204, stores nothing).
5. **2 workers**: rows 2 and 3 with `[server] workers = 2`; their throughput runs
   let every process (workers, wrk, mocks) use every CPU.
6. **Twisted ReverseProxyResource**: Twisted's stock reverse proxy on the same
   reactor (`benchmarks/twisted_proxy.py`): a new upstream connection per request,
   no capture.  The plainest Python reference.
7. **Twisted Agent proxy (pooled)**: `benchmarks/twisted_proxy.py --agent`:
   Twisted's `Agent` over a persistent connection pool, the answer relayed as it
   arrives, no capture.  The bare pooled Python reference.
8. **nginx proxy_pass**: nginx with one worker in front of the mock, upstream
   keep-alive, `proxy_buffering off` (as an LLM proxy must stream).  The native
   reference.

llmproxy and the Twisted references are one Python process each (one core); nginx
is given one worker to match.
"""


def write_outputs(
    results: Sequence[RunResult],
    machine: dict[str, Any],
    load: Load,
    command: str,
    docs: Path | None,
) -> Path:
    now = dt.datetime.now(dt.UTC)
    when = now.strftime("%Y-%m-%d %H:%M UTC")
    RESULTS_DIR.mkdir(exist_ok=True)
    raw_path = RESULTS_DIR / f"{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    raw = {
        "when": now.isoformat(),
        "command": command,
        "machine": machine,
        "load": asdict(load),
        "runs": [asdict(r) for r in results],
    }
    raw_path.write_text(json.dumps(raw, indent=2) + "\n")
    report = render_report(results, machine, load, command, when)
    if docs is not None:
        docs.write_text(report + "\n" + NOTES_MARKER + "\n" + kept_notes(docs))
    return raw_path


NOTES_MARKER = (
    "<!-- Everything below this line is hand-written and kept when benchmarks/run.py "
    "rewrites the page above it. -->"
)
DEFAULT_NOTES = """
## Notes

(Reading of the figures, known costs and what is being done about them.)
"""


def kept_notes(docs: Path) -> str:
    """The hand-written part of an existing report page, after the marker."""
    try:
        text = docs.read_text()
    except OSError:
        return DEFAULT_NOTES
    _, found, notes = text.partition(NOTES_MARKER)
    return "\n" + notes.lstrip("\n") if found else DEFAULT_NOTES


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Benchmark llmproxy against direct, Twisted and nginx.",
    )
    p.add_argument("--quick", action="store_true", help="3 s per measurement instead of 10")
    p.add_argument("--duration", type=float, default=None, help="seconds per measurement")
    p.add_argument("--connections", type=int, default=50, help="concurrency of the load runs")
    p.add_argument("--threads", type=int, default=2, help="wrk threads for the load runs")
    p.add_argument(
        "--only",
        default=",".join(RUN_KEYS),
        help=f"comma list of runs (default: all of {','.join(RUN_KEYS)}; "
        f"also: {','.join(EXTRA_RUN_KEYS)})",
    )
    p.add_argument(
        "--sse-mock",
        choices=("nginx", "twisted"),
        default="nginx",
        help="what sends the recorded 100-chunk stream: nginx (static, default) or "
        "sse_mock.py (Twisted)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="wait up to S seconds for other processes to quieten down first (0: don't)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure again, at most this often, when other processes disturbed a run",
    )
    p.add_argument("--no-install", action="store_true", help="fail instead of installing tools")
    p.add_argument(
        "--docs",
        type=Path,
        default=DOCS_PATH,
        help="where to write the report (default docs/performance.md)",
    )
    p.add_argument("--no-docs", action="store_true", help="do not write the report page")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(ALL_RUN_KEYS)
    if unknown:
        p.error(f"unknown runs: {', '.join(sorted(unknown))}")
    if args.connections < 1 or args.threads < 1:
        p.error("--connections and --threads must be at least 1")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    seconds = args.duration if args.duration is not None else (3.0 if args.quick else 10.0)
    load = Load(
        seconds=max(1, math.ceil(seconds)),
        warmup_seconds=1,
        retries=args.retries,
        threads=args.threads,
        connections=args.connections,
    )
    command = shlex.join([".venv/bin/python", "benchmarks/run.py", *argv])
    wanted = args.only.split(",")
    nginx, wrk = ensure_tools(allow_install=not args.no_install)
    if {"llmproxy-off", "llmproxy-file"} & set(wanted) and not VENV_TWISTD.exists():
        warn(f"{VENV_TWISTD} not found: the llmproxy runs will fail")
    machine = machine_facts(nginx, wrk)
    placement = Placement.choose(pin=not args.no_pin)
    machine["placement"] = placement.describe()
    say(f"machine: {machine['nproc']} CPUs, {machine['cpu_model']}, {machine['memory_gib']} GiB")

    if args.wait_quiet > 0:
        share = wait_for_quiet(args.wait_quiet)
        if share > NOISE_LIMIT:
            warn(f"the machine stays busy (others use {share:.0%} of a CPU); measuring anyway")
    tmp = Path(tempfile.mkdtemp(prefix="llmproxy-bench-"))
    tmp.chmod(0o755)  # nginx workers may run as another user
    results: list[RunResult] = []
    try:
        with contextlib.ExitStack() as stack:
            mock_port, sse_port = free_port(), free_port()
            mocks = Mocks(nginx, tmp, mock_port, sse_port, placement)
            stack.enter_context(mocks.stack)  # a redis-server, if a variant starts one
            nginx_sse = sse_port if args.sse_mock == "nginx" else None
            conf = nginx_mock_conf(tmp / "nginx-mock", mock_port, nginx_sse)
            mock = stack.enter_context(run_nginx("nginx-mock", nginx, tmp, conf, mock_port))
            mocks.servers.append(mock)
            sse = mock
            if nginx_sse is None:
                argv = [str(VENV_PYTHON), str(SSE_MOCK), "--port", str(sse_port), "--recorded"]
                sse = stack.enter_context(spawn("sse-mock", argv, tmp))
                started(sse, port_open(sse_port))
                mocks.servers.append(sse)
            makers: dict[str, Callable[[], contextlib.AbstractContextManager[Target]]] = {
                "direct": lambda: target_direct(mocks, mock, sse),
                "llmproxy-off": lambda: target_llmproxy(mocks, "llmproxy-off"),
                "llmproxy-file": lambda: target_llmproxy(mocks, "llmproxy-file"),
                "llmproxy-file-nofsync": lambda: target_llmproxy(mocks, "llmproxy-file-nofsync"),
                "llmproxy-file-nosessions": lambda: target_llmproxy(
                    mocks, "llmproxy-file-nosessions"
                ),
                "llmproxy-file-loki": lambda: target_llmproxy(mocks, "llmproxy-file-loki"),
                **{
                    key: (lambda key=key: target_llmproxy(mocks, key))
                    for key in sorted(TOKEN_VARIANTS)
                },
                "llmproxy-off-2w": lambda: target_llmproxy(mocks, "llmproxy-off-2w"),
                "llmproxy-file-2w": lambda: target_llmproxy(mocks, "llmproxy-file-2w"),
                "twisted": lambda: target_twisted(mocks),
                "twisted-agent": lambda: target_twisted(mocks, "twisted-agent"),
                "nginx": lambda: target_nginx(mocks),
            }
            for key in ALL_RUN_KEYS:
                if key in wanted:
                    results.append(run_target(key, makers[key], wrk, load, mocks))
    finally:
        if args.keep_tmp:
            say(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    docs = None if args.no_docs else args.docs
    failed = [r.key for r in results if r.c50 is None]
    if docs is not None and failed:
        warn(f"not writing {docs}: no figures for {', '.join(failed)} (raw results are kept)")
        docs = None
    raw_path = write_outputs(results, machine, load, command, docs)
    say("")
    say(results_table(results, load))
    say("")
    say(stream_table(results, load))
    say("")
    for line in compass_lines(results):
        say(line)
    say(f"\nraw results: {raw_path.relative_to(ROOT)}")
    if docs is not None:
        say(f"report: {docs}")
    return 0 if results and all(r.c50 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
