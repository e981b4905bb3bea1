"""Interleaved A/B of llmproxy configurations, for a noisy machine.

    .venv/bin/python benchmarks/ab.py off=llmproxy-off file=llmproxy-file
    .venv/bin/python benchmarks/ab.py --rounds 8 a=llmproxy-file b=llmproxy-file:PYTHONPATH=/tmp/x
    .venv/bin/python benchmarks/ab.py --stream off=llmproxy-off file=llmproxy-file

``run.py`` measures each configuration once, one after the other; on a shared
VM whose speed drifts by 20 % from minute to minute, two rows of one run can
differ by more than the change being judged.  This script starts every side at
once (same nginx mock, same CPU placement as ``run.py``) and measures them in
turns, ``--rounds`` times: per round and side one c1 latency run (everything on
the server's CPU, as ``run.py``) and one c50 throughput run (the server on its
CPU, wrk and the mock on the others), with the server's CPU time per request,
how busy the whole machine was during the c50 run (in CPUs: is it saturated?),
what everything else (wrk, the mocks, redis-server) spent per request, and how often
the server was preempted per request (a worker sharing its CPU with wrk and the
mocks is, and comes back to cold caches each time).  It prints, per
side, the median and the best (minimum) of each figure: a drift that slows one
round slows every side of it, and the best round of each side is the one the
machine disturbed least.

A side is ``NAME=VARIANT`` (a key of ``run.LLMPROXY_VARIANTS``), optionally
``:KEY=VALUE,KEY=VALUE`` for environment variables of that daemon only (an
experiment's hook, a different ``PYTHONPATH``), or one of run.py's reference
proxies: ``twisted``, ``twisted-agent`` (``benchmarks/twisted_proxy.py``) or
``nginx``, measured the same way.  Nothing is written anywhere.
For one-process variants: every process of a side is pinned to the server's CPU.
A side of several workers (``run.WORKERS``) is measured as ``run.py`` measures it:
its c50 runs spread every process (workers, wrk, mocks) over every CPU.
``--stream`` measures streams instead of JSON exchanges: the recorded 100-chunk
reply (17.8 KB) that ``run.py``'s nginx SSE mock sends.

A side of several workers (``X-2w``) measured with its one-worker variant
(``X``) gets one more line: how far it scales, round by round too, and the
ceiling this machine puts on that (``print_scaling``): N workers share the
CPUs with wrk, the mocks and redis-server, so at most min(CPUs / (p + o),
N / p) requests a second, p one worker's CPU per request, o everything else's.

    .venv/bin/python benchmarks/ab.py --rounds 8 local=llmproxy-file-tokens \
        redis=llmproxy-file-tokens-redis redis2w=llmproxy-file-tokens-redis-2w
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # the harness next to this file


def parse_side(text: str) -> tuple[str, str, dict[str, str]]:
    name, eq, rest = text.partition("=")
    variant, _, env_text = rest.partition(":")
    if not eq or not name or variant not in (*run.LLMPROXY_VARIANTS, *REFERENCES):
        known = ", ".join(sorted((*run.LLMPROXY_VARIANTS, *REFERENCES)))
        raise argparse.ArgumentTypeError(
            f"{text!r}: want NAME=VARIANT[:K=V,...]; variants: {known}"
        )
    env: dict[str, str] = {}
    for pair in filter(None, env_text.split(",")):
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"{text!r}: {pair!r} is not KEY=VALUE")
        env[key] = value
    return name, variant, env


# The reference proxies run.py measures, as sides too (no environment of their own).
REFERENCES = ("twisted", "twisted-agent", "nginx")


def involuntary_switches(pids: list[int]) -> int:
    """How often the threads of ``pids`` were preempted so far (``nonvoluntary_ctxt_switches``
    in /proc): a process sharing its CPU with busy others is preempted by them, and
    every time it comes back to cold caches."""
    total = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                status = (task / "status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("nonvoluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def machine_busy_seconds() -> float:
    """CPU-seconds every CPU of the machine has spent busy since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("sides", nargs="+", type=parse_side, metavar="NAME=VARIANT[:K=V,...]")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=int, default=3, help="per run")
    p.add_argument(
        "--stream",
        action="store_true",
        help="streams instead of JSON: the recorded 100-chunk reply from the nginx SSE mock",
    )
    args = p.parse_args(argv)
    if len({name for name, _, _ in args.sides}) != len(args.sides):
        p.error("side names must differ")

    nginx, wrk = run.ensure_tools(allow_install=True)
    placement = run.Placement.choose(pin=True)
    figures: dict[str, dict[str, list[float]]] = {
        name: {key: [] for key in ("p50", "p99", "cpu", "rps", "busy", "others", "preempted")}
        for name, _, _ in args.sides
    }
    with tempfile.TemporaryDirectory(prefix="llmproxy-ab-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers may run as another user (the stream file)
        mock_port, sse_port = run.free_port(), run.free_port()
        mocks = run.Mocks(nginx, workdir, mock_port, sse_port, placement)
        stack.enter_context(mocks.stack)  # a redis-server, if a variant starts one
        conf = run.nginx_mock_conf(workdir, mock_port, sse_port if args.stream else None)
        mocks.servers.append(
            stack.enter_context(run.run_nginx("mock", nginx, workdir, conf, mock_port))
        )
        servers: dict[str, tuple[Callable[[], list[int]], str]] = {}  # pids, URL
        spread = {name: run.WORKERS.get(variant, 1) > 1 for name, variant, _ in args.sides}
        for name, variant, env in args.sides:
            if variant in REFERENCES:
                target = stack.enter_context(
                    run.target_nginx(mocks)
                    if variant == "nginx"
                    else run.target_twisted(mocks, variant)
                )
                url = target.sse_url if args.stream else target.json_url
                assert url is not None
                servers[name] = (target.measured, url)
                continue
            twistd, port, admin = run.llmproxy_daemon(mocks, variant, workdir / name)
            server = stack.enter_context(
                run.spawn(name, twistd, workdir, cwd=run.ROOT, extra_env=env)
            )
            run.started(server, run.answers_200(f"http://127.0.0.1:{admin}/ready"))
            path = f"{run.SSE_PREFIX}{run.CHAT_PATH}" if args.stream else run.CHAT_PATH
            servers[name] = (server.pids, f"http://127.0.0.1:{port}{path}")
        for round_no in range(args.rounds):
            line = []
            for name, (pids, url) in servers.items():
                cpus = mocks.place(pids(), 1, spread[name])
                c1 = run.run_wrk(wrk, url, 1, 1, args.seconds, args.stream, cpus=cpus)
                wrk_cpus = mocks.place(pids(), 50, spread[name])
                before, busy_before = run.cpu_seconds(pids()), machine_busy_seconds()
                preempted_before = involuntary_switches(pids())
                started = time.monotonic()
                c50 = run.run_wrk(wrk, url, 2, 50, args.seconds, args.stream, cpus=wrk_cpus)
                server_s = run.cpu_seconds(pids()) - before
                busy_s = machine_busy_seconds() - busy_before
                preempted = involuntary_switches(pids()) - preempted_before
                wall_s = time.monotonic() - started
                cpu_us = server_s / max(c50.requests, 1) * 1e6
                f = figures[name]
                f["p50"].append(c1.latency_us["p50"])
                f["p99"].append(c1.latency_us["p99"])
                f["cpu"].append(cpu_us)
                f["rps"].append(c50.ok_rps)
                f["busy"].append(busy_s / wall_s)
                f["others"].append((busy_s - server_s) / max(c50.requests, 1) * 1e6)
                f["preempted"].append(preempted / max(c50.requests, 1))
                line.append(f"{name} {c50.ok_rps:,.0f} req/s {cpu_us:.0f} us/req")
            print(f"round {round_no + 1}: " + ", ".join(line), flush=True)
    print()
    print(
        "side: c50 req/s median (best) | c50 CPU us/req median (best) | c1 p50, p99 us median"
        " | c50 machine busy (CPUs), everything else's CPU us/req (wrk, mocks, redis) median"
        " | c50 times the server was preempted per request median"
    )
    for name, variant, env in args.sides:
        f = figures[name]
        extra = f" {env}" if env else ""
        print(
            f"{name} ({variant}{extra}): "
            f"{statistics.median(f['rps']):,.0f} ({max(f['rps']):,.0f}) | "
            f"{statistics.median(f['cpu']):.0f} ({min(f['cpu']):.0f}) | "
            f"{statistics.median(f['p50']):.0f}, {statistics.median(f['p99']):.0f} | "
            f"{statistics.median(f['busy']):.2f} of {os.cpu_count()}, "
            f"{statistics.median(f['others']):.0f} | "
            f"{statistics.median(f['preempted']):.2f}"
        )
    print_scaling(args.sides, figures)
    return 0


def print_scaling(
    sides: list[tuple[str, str, dict[str, str]]], figures: dict[str, dict[str, list[float]]]
) -> None:
    """For each side of several workers whose one-worker variant is a side too
    (``X-2w`` and ``X``): how far it scales, and how far this machine lets it.

    N workers share the machine's C CPUs with wrk, the mocks and redis-server, so
    they serve at most C / (p + o) requests a second, and at most N / p: p what
    a worker spends per request, o what everything else spends per request.
    With p that of one worker alone (workers that cost no more per request than
    one), that is the most N workers can reach here; its ratio to one worker's
    rate is the ceiling for the scaling figure on this machine.
    """
    one = {variant: name for name, variant, _ in sides if run.WORKERS.get(variant, 1) == 1}
    cpus = os.cpu_count() or 1
    for name, variant, _ in sides:
        workers = run.WORKERS.get(variant, 1)
        single = one.get(variant.removesuffix(f"-{workers}w"))
        if workers == 1 or single is None:
            continue
        many, alone = figures[name], figures[single]
        one_rps = statistics.median(alone["rps"])
        ratio = statistics.median(many["rps"]) / one_rps
        rounds = sorted(m / a for m, a in zip(many["rps"], alone["rps"], strict=True))
        p1, others = statistics.median(alone["cpu"]), statistics.median(many["others"])
        shared = cpus / ((p1 + others) / 1e6)  # everything on every CPU
        own = workers / (p1 / 1e6)  # each worker a CPU of its own, saturated
        most = min(shared, own)
        how = (
            f"{cpus} CPUs / ({p1:.0f} + {others:.0f} us)"
            if shared <= own
            else f"{workers} workers / {p1:.0f} us"
        )
        print(
            f"{name} against {single}: {ratio:.2f}x (round by round {rounds[0]:.2f}-"
            f"{rounds[-1]:.2f}x, median {statistics.median(rounds):.2f}x); this machine's "
            f"ceiling: {how} = {most:,.0f} req/s = {most / one_rps:.2f}x "
            f"(reached: {ratio / (most / one_rps):.0%})"
        )


if __name__ == "__main__":
    sys.exit(main())
