"""A Loki outage under steady load: is anything lost, and does the proxy notice?

    .venv/bin/python benchmarks/outage.py                   # 60 s healthy, 60 s outage
    .venv/bin/python benchmarks/outage.py --seconds 20 --delay-ms 10 --connections 5
    .venv/bin/python benchmarks/outage.py --seconds 20 --py-spy PATH --stacks /tmp/outage
    .venv/bin/python benchmarks/compare_stacks.py /tmp/outage/outage.txt /tmp/outage/healthy.txt

Starts the nginx mock upstream, a Loki stand-in that can be switched into an
outage (benchmarks/loki_switch.py), and llmproxy with one Loki exporter (all
defaults, ``spool_interval = 1s``).  wrk sends a steady load (every connection
pauses ``--delay-ms`` between requests: ~500 exchanges/s with the defaults) for
``--seconds`` while Loki answers 204, then for as long again while it answers
503, then Loki recovers and the script waits until every event arrived.  It
prints, per phase, the proxy's latency (wrk's p50/p99, c``--connections``), the
daemon's RSS (max of the samples) and the spool; then the events lost (expected
request + response events of every exchange wrk completed, less the distinct
ones Loki received) and how long the replay took.  Nothing here is a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # the harness next to this file
from profile_proxy import py_spy_record

HERE = Path(__file__).resolve().parent


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def get_json(url: str, data: bytes | None = None) -> Any:
    with urllib.request.urlopen(url, data=data, timeout=5) as resp:
        return json.loads(resp.read())


def wrk_steady(wrk: str, url: str, seconds: int, connections: int, delay_ms: int) -> dict[str, Any]:
    argv = [
        wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "--latency",
        "-s", str(run.POST_LUA), url,
    ]  # fmt: skip
    env = dict(os.environ, WRK_STREAM="0", WRK_DELAY_MS=str(delay_ms))
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 60)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("WRK_RESULT "))
    result: dict[str, Any] = json.loads(line.removeprefix("WRK_RESULT "))
    return result


class Sampler:
    """The daemon's RSS and its exporter's state every second, in a thread."""

    def __init__(self, pid: int, admin: int) -> None:
        self.pid, self.admin = pid, admin
        self.rss: list[int] = []
        self.stats: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.rss.append(rss_kib(self.pid))
            with contextlib.suppress(OSError):
                self.stats.append(get_json(f"http://127.0.0.1:{self.admin}/stats"))

    def phase(self) -> tuple[list[int], list[dict[str, Any]]]:
        rss, stats = self.rss, self.stats
        self.rss, self.stats = [], []
        return rss, stats

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=int, default=60, help="per phase")
    p.add_argument("--connections", type=int, default=5)
    p.add_argument("--delay-ms", type=int, default=10, help="pause per connection per request")
    p.add_argument("--drain", type=int, default=300, help="seconds to wait for the replay")
    p.add_argument(
        "--py-spy",
        default=None,
        metavar="PATH",
        help="sample the daemon with this py-spy binary during each phase; with --stacks",
    )
    p.add_argument(
        "--stacks",
        type=Path,
        default=None,
        metavar="DIR",
        help="with --py-spy: write DIR/healthy.txt and DIR/outage.txt (folded stacks, with "
        "the CPU per answer beside them) for compare_stacks.py",
    )
    args = p.parse_args(argv)
    if (args.py_spy is None) != (args.stacks is None):
        p.error("--py-spy and --stacks go together")

    nginx, wrk = run.ensure_tools(allow_install=True)
    with tempfile.TemporaryDirectory(prefix="llmproxy-outage-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        mock_port, loki_port = run.free_port(), run.free_port()
        mocks = run.Mocks(nginx, workdir, mock_port, mock_port, run.Placement.choose(pin=False))
        conf = run.nginx_mock_conf(workdir, mock_port)
        vdir = workdir / "llmproxy"
        vdir.mkdir()
        port, admin = run.free_port(), run.free_port()
        extra = [
            "", "[exporter:loki]", "type = loki", f"url = http://127.0.0.1:{loki_port}",
            "spool_interval = 1s",
        ]  # fmt: skip
        (vdir / "llmproxy.ini").write_text(run.llmproxy_config(vdir, mocks, port, admin, extra))
        twistd = [
            str(run.VENV_TWISTD), "-n", "--pidfile=", "-l", str(vdir / "twistd.log"),
            "llmproxy", "--config", str(vdir / "llmproxy.ini"),
        ]  # fmt: skip
        switch = [str(run.VENV_PYTHON), str(HERE / "loki_switch.py"), "--port", str(loki_port)]
        control = f"http://127.0.0.1:{loki_port}/control"
        with (
            run.run_nginx("mock", nginx, workdir, conf, mock_port),
            run.spawn("loki", switch, workdir) as loki,
            run.spawn("llmproxy", twistd, workdir, cwd=run.ROOT) as proxy,
        ):
            run.started(loki, run.port_open(loki_port))
            run.started(proxy, run.answers_200(f"http://127.0.0.1:{admin}/ready"))
            url = f"http://127.0.0.1:{port}{run.CHAT_PATH}"
            sampler = Sampler(proxy.proc.pid, admin)
            phases: dict[str, dict[str, Any]] = {}
            ok = 0
            for name, outage in (("healthy", "0"), ("outage", "1")):
                get_json(f"{control}?outage={outage}", data=b"")
                spy = None
                if args.py_spy is not None:
                    args.stacks.mkdir(parents=True, exist_ok=True)
                    out = args.stacks / f"{name}.txt"
                    spy = py_spy_record(args.py_spy, proxy.proc.pid, args.seconds, out)
                cpu_before = run.cpu_seconds(proxy.pids())
                result = wrk_steady(wrk, url, args.seconds, args.connections, args.delay_ms)
                cpu = run.cpu_seconds(proxy.pids()) - cpu_before
                if spy is not None:
                    spy.wait(timeout=60)
                    per_answer = cpu * 1e6 / max(1, int(result["ok"]))
                    meta = {"answers": result["ok"], "cpu_us_per_answer": per_answer}
                    (args.stacks / f"{name}.txt.json").write_text(json.dumps(meta))
                rss, stats = sampler.phase()
                ok += int(result["ok"])
                exporter = [s["exporters"]["loki"] for s in stats if "exporters" in s]
                phases[name] = {
                    "rps": result["rps"],
                    "ok": result["ok"],
                    "p50_ms": result["latency_us"]["p50"] / 1000,
                    "p99_ms": result["latency_us"]["p99"] / 1000,
                    "rss_max_mib": max(rss) / 1024 if rss else None,
                    "spooled_max": max((e["spooled"] for e in exporter), default=0),
                    "queued_max": max((e["queued"] for e in exporter), default=0),
                }
            get_json(f"{control}?outage=0", data=b"")
            started = time.monotonic()
            expected = 2 * ok
            counts: dict[str, Any] = {}
            while time.monotonic() - started < args.drain:
                counts = get_json(control)
                if counts["exchange_events"] >= expected:
                    break
                time.sleep(0.5)
            replay_s = time.monotonic() - started
            rss, stats = sampler.phase()
            sampler.stop()
            final = get_json(f"http://127.0.0.1:{admin}/stats")["exporters"]["loki"]
    heads = ("req/s", "p50 ms", "p99 ms", "RSS MiB", "spooled", "queued")
    print(f"{'phase':<9} " + " ".join(f"{h:>8}" for h in heads))
    for name, ph in phases.items():
        print(
            f"{name:<9} {ph['rps']:>8.0f} {ph['p50_ms']:>8.2f} {ph['p99_ms']:>8.2f} "
            f"{ph['rss_max_mib'] or 0:>8.0f} {ph['spooled_max']:>8} {ph['queued_max']:>8}"
        )
    # More than expected: exchanges still in flight when a wrk run ended (not counted).
    lost = max(0, expected - int(counts.get("exchange_events", 0)))
    print(
        f"exchanges {ok}; request+response events expected {expected}, received "
        f"{counts.get('exchange_events')} (all entries {counts.get('entries')}, distinct "
        f"{counts.get('unique')}, refused pushes {counts.get('refused')}); "
        f"lost {lost}; replay {replay_s:.1f}s; exporter dropped {final['dropped']}"
    )
    ratio = phases["outage"]["p99_ms"] / phases["healthy"]["p99_ms"]
    print(f"p99 during the outage / healthy: {ratio:.2f}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
