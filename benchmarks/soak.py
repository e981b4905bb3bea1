"""A long run at a steady rate: does llmproxy's memory stay flat?

    .venv/bin/python benchmarks/soak.py                       # 30 minutes, ~500 req/s
    .venv/bin/python benchmarks/soak.py --minutes 5 --connections 20 --delay-ms 10

Starts the nginx mock and llmproxy with the file sink on (plus sessions, all
defaults), and runs wrk for ``--minutes`` with every connection pausing
``--delay-ms`` between requests (a steady rate well below saturation).  Every
``--sample`` seconds it reads the proxy's VmRSS; at the end it prints the RSS
after the first minute (warm), at the end and the maximum, the requests served,
and checks that the event file(s) hold a request and a response event for every
exchange.  ``--json`` writes all samples.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # the harness next to this file


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--delay-ms", type=int, default=20, help="pause per connection per request")
    p.add_argument("--sample", type=float, default=30.0, help="seconds between RSS samples")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    nginx, wrk = run.ensure_tools(allow_install=True)
    seconds = int(args.minutes * 60)
    with tempfile.TemporaryDirectory(prefix="llmproxy-soak-") as tmp:
        workdir = Path(tmp)
        mock_port = run.free_port()
        mocks = run.Mocks(nginx, workdir, mock_port, mock_port, run.Placement.choose(pin=False))
        conf = run.nginx_mock_conf(workdir, mock_port)
        key = "llmproxy-file"
        vdir = workdir / key
        vdir.mkdir()
        port, admin = run.free_port(), run.free_port()
        config = vdir / "llmproxy.ini"
        config.write_text(run.llmproxy_config(vdir, mocks, port, admin, run.FILE_SINK))
        twistd = [
            str(run.VENV_TWISTD), "-n", "--pidfile=", "-l", "/dev/null",
            "llmproxy", "--config", str(config),
        ]  # fmt: skip
        with (
            run.run_nginx("mock", nginx, workdir, conf, mock_port),
            run.spawn(key, twistd, workdir, cwd=run.ROOT) as server,
        ):
            run.started(server, run.answers_200(f"http://127.0.0.1:{admin}/ready"))
            pid = server.proc.pid
            url = f"http://127.0.0.1:{port}{run.CHAT_PATH}"
            env = dict(os.environ, WRK_STREAM="0", WRK_DELAY_MS=str(args.delay_ms))
            cmd = [
                wrk, "-t1", f"-c{args.connections}", f"-d{seconds}s", "--timeout", "5s",
                "-s", str(run.POST_LUA), url,
            ]  # fmt: skip
            load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            t0 = time.monotonic()
            samples: list[tuple[float, int]] = [(0.0, rss_kib(pid))]
            while load.poll() is None:
                time.sleep(min(args.sample, 5.0))
                now = time.monotonic() - t0
                if now - samples[-1][0] >= args.sample - 0.5:
                    samples.append((round(now, 1), rss_kib(pid)))
                    run.say(f"   {now / 60:5.1f} min  RSS {samples[-1][1] / 1024:6.1f} MiB")
            out, err = load.communicate()
            samples.append((round(time.monotonic() - t0, 1), rss_kib(pid)))
            line = next((ln for ln in out.decode().splitlines() if ln.startswith("WRK_RESULT")), "")
            if not line:
                raise SystemExit(f"wrk failed: {err.decode()[:500]}")
            wrk_result = json.loads(line.removeprefix("WRK_RESULT "))
            server.stop()
        events = run.count_events(vdir / "state" / "events.jsonl")
    warm = next((kib for t, kib in samples if t >= 60.0), samples[-1][1])
    result = {
        "minutes": args.minutes,
        "requests": wrk_result["requests"],
        "ok": wrk_result["ok"],
        "rps": round(wrk_result["rps"], 1),
        "rss_start_mib": round(samples[0][1] / 1024, 1),
        "rss_warm_mib": round(warm / 1024, 1),
        "rss_end_mib": round(samples[-1][1] / 1024, 1),
        "rss_max_mib": round(max(k for _, k in samples) / 1024, 1),
        "events_kept": events,
        "note": "the file sink rotates (100 MiB x 5 kept): older events are rotated away",
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    print(
        f"| soak {args.minutes:g} min at {result['rps']:,} req/s, file sink on | RSS "
        f"{result['rss_warm_mib']} MiB after 1 min, {result['rss_end_mib']} MiB at the end "
        f"(max {result['rss_max_mib']}) |"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
