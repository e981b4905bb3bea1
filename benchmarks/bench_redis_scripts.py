"""Microbenchmark: redis-server CPU per run of the shared state's Lua scripts (no
tests: benchmark tool).

    .venv/bin/python benchmarks/bench_redis_scripts.py [--runs 20000] [--rounds 3]
                                                      [--cpu N] [--no-pin]

With ``[state] store = redis`` every proxied request of the benchmark's token
(benchmarks/run.py ``llmproxy-file-tokens-redis``: a quota and a rate limit,
spend counted per day, month and total, a fresh session per request) costs
redis-server three script runs, shared by the requests of one reactor turn:

- ``admit`` (llmproxy/state/counters.py ``ADMIT``): the token's quota counter and
  rate bucket, from ``RedisCounters.admit`` with the checks
  llmproxy/access/shared.py makes for such a token;
- ``charge`` (``CHARGE``): the answer's budget counters and spend-table rows,
  from ``SpendBook.charge`` (llmproxy/access/budgets.py) over ``RedisCounters``;
- ``apply`` (llmproxy/state/sessions.py): a first turn's ``fresh`` record, from
  ``RedisSessionState.apply`` (a new session id each run, as each request of the
  benchmark starts a session).

The scripts' arguments are made by the project's own code (a recording
``RedisExecutor`` captures the ``EVALSHA`` each would send), so this measures what
the proxy sends.  A private ``redis-server`` (free port, no persistence) is
pinned to one CPU (the last one, or ``--cpu``) unless ``--no-pin``; each script
is warmed up (its keys made), then ``--runs`` runs are sent pipelined 100 at a
time and the server's CPU (``INFO cpu``, user + sys) before and after gives µs
per run.  Each figure is the minimum over ``--rounds`` (a shared machine only
adds).  Printed per script for 1 and for 3 requests per run (a c1 run sends
one per run; a c50 run batches more: ``redis_calls.py`` counts them), and the
sum per request.  ``PING`` is printed for
scale (the cost of a command and its reply alone).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hiredis
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from llmproxy.access.budgets import SpendBook, SpendFile
from llmproxy.access.shared import quota_key, rate_key
from llmproxy.state.counters import ADMIT, CHARGE, BucketTake, CounterCheck, RedisCounters
from llmproxy.state.sessions import _APPLY, RecordOp, RedisSessionState

Arg = bytes | str | int | float
PREFIX = "llmproxy:state:"
TOKEN_ID = "tok_cdef210389ca"
LIMITS = {"max_requests": 10**12, "rpm": 10**9}  # benchmarks/run.py BENCH_TOKEN_LIMITS
MODEL = "gpt-4o-mini-2024-07-18"
USAGE = {"input_tokens": 9, "output_tokens": 27}
COST = {"total": 1.755e-05}
FINGERPRINT = hashlib.sha256(b"the benchmark's one conversation").digest()
PIPELINE = 100


class Recorder:
    """A ``RedisExecutor`` that keeps the commands it is asked and never answers."""

    def __init__(self) -> None:
        self.commands: list[tuple[Arg, ...]] = []
        self.usable = True

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return Deferred()

    def execute(self, *args: Arg, timeout: float | None = None) -> Deferred[Any]:
        self.commands.append(args)
        return Deferred()

    def abort(self) -> None:
        pass

    def when_ready(self, callback: Callable[[], object]) -> None:
        pass


def encode(args: Sequence[Arg]) -> bytes:
    """One command in RESP, by hiredis (the parser the proxy's connection uses)."""
    return hiredis.pack_command(tuple(args))


# -- the scripts' commands, as the proxy makes them ------------------------------------


def admit_commands(runs: int, per_run: int, now: float) -> list[bytes]:
    recorder, clock = Recorder(), Clock()
    counters = RedisCounters(recorder, clock, PREFIX)
    checks = (CounterCheck(quota_key(TOKEN_ID), LIMITS["max_requests"]),)
    bucket = BucketTake(rate_key(TOKEN_ID), LIMITS["rpm"])
    for i in range(runs):
        for j in range(per_run):
            counters.admit(checks, bucket, now + (i * per_run + j) * 1e-4)
        clock.advance(0)
    return [encode(c) for c in recorder.commands]


def charge_commands(runs: int, per_run: int, now: float, directory: Path) -> list[bytes]:
    recorder, clock = Recorder(), Clock()
    book = SpendBook(
        SpendFile(directory / "token-spend.json"), RedisCounters(recorder, clock, PREFIX)
    )
    book.load()
    for _ in range(runs):
        for _ in range(per_run):
            book.charge(TOKEN_ID, "bench", MODEL, USAGE, COST, now)
        clock.advance(0)
    return [encode(c) for c in recorder.commands]


def apply_commands(runs: int, per_run: int) -> list[bytes]:
    recorder = Recorder()
    sessions = RedisSessionState(recorder, PREFIX, 7 * 86400)
    for _ in range(runs):
        ops = [RecordOp([FINGERPRINT], str(uuid.uuid4()), 1, fresh=True) for _ in range(per_run)]
        sessions.apply(ops)
    return [encode(c) for c in recorder.commands]


# -- the server --------------------------------------------------------------------------


class Server:
    def __init__(self, directory: Path, cpu: int | None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server is not installed (scripts/system-deps installs it)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(directory), "--loglevel", "warning"]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        if cpu is not None:
            for task in os.listdir(f"/proc/{self.process.pid}/task"):
                os.sched_setaffinity(int(task), {cpu})
            others = os.sched_getaffinity(0) - {cpu}
            if others:
                os.sched_setaffinity(0, others)  # this client out of its way
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.replies = hiredis.Reader()

    def read(self) -> Any:
        """The next reply; an error reply raises."""
        reply = self.replies.gets()
        while reply is False:
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("redis-server closed the connection")
            self.replies.feed(data)
            reply = self.replies.gets()
        if isinstance(reply, hiredis.ReplyError):
            raise RuntimeError(str(reply))
        return reply

    def command(self, *args: Arg) -> Any:
        self.sock.sendall(encode(args))
        return self.read()

    def cpu(self) -> float:
        info = self.command("INFO", "cpu").decode()
        user = re.search(r"used_cpu_user:([\d.]+)", info)
        system = re.search(r"used_cpu_sys:([\d.]+)", info)
        assert user is not None and system is not None
        return float(user.group(1)) + float(system.group(1))

    def send(self, payloads: Sequence[bytes]) -> None:
        """Every payload, pipelined; fails on the first error reply."""
        for start in range(0, len(payloads), PIPELINE):
            chunk = payloads[start : start + PIPELINE]
            self.sock.sendall(b"".join(chunk))
            for _ in chunk:
                self.read()

    def stop(self) -> None:
        self.sock.close()
        self.process.terminate()
        self.process.wait(10)


def per_run_us(server: Server, payloads: Sequence[bytes]) -> float:
    before = server.cpu()
    server.send(payloads)
    return (server.cpu() - before) * 1e6 / len(payloads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu", type=int, default=None)
    parser.add_argument("--no-pin", action="store_true")
    options = parser.parse_args()
    cpu = None if options.no_pin else (options.cpu or max(os.sched_getaffinity(0)))
    now = time.time()
    runs, warm = options.runs, 200
    with tempfile.TemporaryDirectory(prefix="bench-redis-scripts-") as tmp:
        directory = Path(tmp)
        server = Server(directory, cpu)
        try:
            for script in (ADMIT, CHARGE, _APPLY):
                server.command("SCRIPT", "LOAD", script.body)
            figures: dict[tuple[str, int], float] = {}
            for per_run in (1, 3):
                made = {
                    "admit": admit_commands(warm + runs, per_run, now),
                    "charge": charge_commands(warm + runs, per_run, now, directory),
                    "apply": apply_commands(warm + runs * options.rounds, per_run),
                }
                for name, payloads in made.items():
                    server.send(payloads[:warm])  # the keys made, the script cached
                    best = []
                    for r in range(options.rounds):
                        # Sessions are new each run; counters and buckets repeat.
                        chunk = payloads[warm + r * runs : warm + (r + 1) * runs]
                        best.append(per_run_us(server, chunk or payloads[warm:]))
                    figures[(name, per_run)] = min(best)
            ping = min(per_run_us(server, [encode(["PING"])] * runs) for _ in range(options.rounds))
        finally:
            server.stop()
    print(f"redis-server CPU per script run, µs (min of {options.rounds} x {runs} runs"
          f"{'' if cpu is None else f', pinned to CPU {cpu}'})")  # fmt: skip
    print(f"{'script':<8} {'1 req/run':>10} {'3 req/run':>10} {'per req @3':>11}")
    total = 0.0
    for name in ("admit", "charge", "apply"):
        one, three = figures[(name, 1)], figures[(name, 3)]
        total += three / 3
        print(f"{name:<8} {one:>10.1f} {three:>10.1f} {three / 3:>11.1f}")
    print(f"{'total':<8} {'':>10} {'':>10} {total:>11.1f}  (per request, 3 per run)")
    print(f"{'PING':<8} {ping:>10.1f}")


if __name__ == "__main__":
    main()
