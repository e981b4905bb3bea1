"""Profile llmproxy's request path under load and print where the CPU goes.

    .venv/bin/python benchmarks/profile_proxy.py                 # no sinks, 8 s of wrk -c50
    .venv/bin/python benchmarks/profile_proxy.py --variant llmproxy-file --seconds 10
    .venv/bin/python benchmarks/profile_proxy.py --sort cumulative --top 60
    .venv/bin/python benchmarks/profile_proxy.py --variant llmproxy-file --stream --py-spy PATH

It starts the same nginx mock as ``run.py``, runs ``twistd --profile`` with
cProfile on one llmproxy config variant, loads it with wrk (POST, small JSON
chat exchanges; with ``--stream``, the recorded 100-chunk reply), stops it
with SIGTERM and prints the top functions.  The stats file is kept (``--out``)
for ``python -m pstats`` or snakeviz.  Profiling slows the proxy down by about
2x: compare shares, not absolute times.

With ``--py-spy`` the daemon is sampled from outside (no slow-down) and the
daemon's CPU time during the load (``/proc``) over the completed answers is
printed too: µs of CPU per answer, which the shares divide.  ``--stacks PATH``
keeps the folded stacks, with that figure beside them (``PATH.json``), for
``compare_stacks.py``: two variants side by side, function by function, in µs
per answer.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # the harness next to this file


def _frame_name(frame: str) -> str:
    """``func (/path/to/file.py:123)`` -> ``func file.py`` (with ``llmproxy/`` kept)."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0]
    short = path.rpartition("/")[2]
    if "/llmproxy/" in path:
        short = "llmproxy/" + path.rpartition("/llmproxy/")[2]
    return f"{name} {short}"


SAMPLE_RATE = 500  # asked of py-spy; it gets fewer when the client CPU is busy


def py_spy_record(
    binary: str, pid: int, seconds: int, out: Path, children: bool = False
) -> subprocess.Popen[bytes]:
    """py-spy sampling ``pid`` (without stopping it) for ``seconds``, its folded
    stacks with full file names written to ``out``; with ``children``, its
    worker processes too (each stack then starts with its process)."""
    argv = [
        binary, "record", "-p", str(pid), "-r", str(SAMPLE_RATE), "-d", str(seconds),
        "-f", "raw", "-o", str(out), "--nonblocking", "--full-filenames",
    ]  # fmt: skip
    if children:
        argv.append("--subprocesses")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wrk_answers(output: str) -> int:
    """The completed 2xx answers of a wrk run with ``post.lua`` (its WRK_RESULT line)."""
    for line in output.splitlines():
        if line.startswith("WRK_RESULT "):
            return int(json.loads(line.removeprefix("WRK_RESULT "))["ok"])
    return 0


def print_samples(folded: str, top: int, cpu_us_per_answer: float) -> None:
    """Self and inclusive shares per function from py-spy's folded stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    callers: dict[str, dict[str, int]] = {}
    total = 0
    for line in folded.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [_frame_name(f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        path = " < ".join(reversed(frames[-4:-1]))
        callers.setdefault(frames[-1], {})
        callers[frames[-1]][path] = callers[frames[-1]].get(path, 0) + count
        for frame in set(frames):
            incl[frame] = incl.get(frame, 0) + count
    print(f"{total} samples; the daemon's CPU: {cpu_us_per_answer:.0f} us per answer")
    print("self %, inclusive %, function")
    for name, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{100 * n / total:6.1f} {100 * incl[name] / total:6.1f}  {name}")
    print("\nwhere the top five spend their own time (callers, innermost first):")
    for name, _ in sorted(own.items(), key=lambda kv: -kv[1])[:5]:
        path, n = max(callers[name].items(), key=lambda kv: kv[1])
        print(f"{100 * n / total:6.1f}  {name} < {path}")
    print("\ninclusive, llmproxy functions:")
    ours = [(k, v) for k, v in incl.items() if "llmproxy/" in k]
    for name, n in sorted(ours, key=lambda kv: -kv[1])[:top]:
        print(f"{100 * n / total:6.1f}  {name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variant", default="llmproxy-off", choices=sorted(run.LLMPROXY_VARIANTS))
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--sort", default="tottime", choices=["tottime", "cumulative", "ncalls"])
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", type=Path, default=Path("/tmp/llmproxy.pstats"))
    p.add_argument("--stream", action="store_true", help="profile SSE streams instead of JSON")
    p.add_argument(
        "--py-spy",
        default=None,
        metavar="PATH",
        help="sample with this py-spy binary instead of cProfile (no slow-down): prints the "
        "share of samples per function, self and inclusive",
    )
    p.add_argument(
        "--stacks",
        type=Path,
        default=None,
        metavar="PATH",
        help="with --py-spy: keep the folded stacks at PATH and the answer count at PATH.json "
        "(for compare_stacks.py)",
    )
    args = p.parse_args(argv)

    nginx, wrk = run.ensure_tools(allow_install=True)
    with tempfile.TemporaryDirectory(prefix="llmproxy-profile-") as tmp:
        workdir = Path(tmp)
        mock_port, sse_port = run.free_port(), run.free_port()
        placement = run.Placement.choose(pin=True)
        mocks = run.Mocks(nginx, workdir, mock_port, sse_port, placement)
        workdir.chmod(0o755)  # nginx workers may run as another user (the stream file)
        # The JSON answer, and for --stream the recorded 100-chunk reply, as run.py.
        conf = run.nginx_mock_conf(workdir, mock_port, sse_port)
        with mocks.stack, run.run_nginx("mock", nginx, workdir, conf, mock_port) as mock:
            mocks.servers.append(mock)
            key = args.variant
            profiling = [] if args.py_spy else [
                "--profile", str(args.out), "--profiler", "cprofile", "--savestats",
            ]  # fmt: skip
            twistd, port, admin = run.llmproxy_daemon(mocks, key, workdir / key, profiling)
            # Several workers are measured as run.py and ab.py measure them: every
            # process (workers, wrk, mocks) on every CPU.
            spread = run.WORKERS.get(key, 1) > 1
            with run.spawn(key, twistd, workdir, cwd=run.ROOT) as server:
                run.started(server, run.answers_200(f"http://127.0.0.1:{admin}/ready"))
                mocks.place(server.pids(), args.connections, spread)
                url = f"http://127.0.0.1:{port}"
                url += (run.SSE_PREFIX if args.stream else "") + run.CHAT_PATH
                cmd = [
                    wrk, "-t2", f"-c{args.connections}", f"-d{args.seconds}s",
                    "-s", str(run.POST_LUA), url,
                ]  # fmt: skip
                env = dict(os.environ, WRK_STREAM="1" if args.stream else "0")
                sampler = None
                folded = args.stacks or workdir / "stacks.txt"
                if args.py_spy:
                    sampler = py_spy_record(
                        args.py_spy, server.proc.pid, args.seconds, folded, children=spread
                    )
                cpu_before = run.cpu_seconds(server.pids())
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                cpu = run.cpu_seconds(server.pids()) - cpu_before
                print(out.stdout)
                if sampler is not None:
                    sampler.wait(timeout=60)
                    answers = wrk_answers(out.stdout)
                    per_answer = cpu * 1e6 / answers if answers else 0.0
                    if args.stacks is not None:
                        meta = {"answers": answers, "cpu_us_per_answer": per_answer, "variant": key}
                        folded.with_name(folded.name + ".json").write_text(json.dumps(meta))
                    print_samples(folded.read_text(), args.top, per_answer)
                server.stop()
    if args.py_spy:
        return 0
    stats = pstats.Stats(str(args.out))
    stats.sort_stats(args.sort).print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
