"""A hostile sink: does the daemon's memory stay flat while it retries against one?

    .venv/bin/python benchmarks/hostile_sink.py [--seconds 20] [--inflate-mib 1024]
    .venv/bin/python benchmarks/hostile_sink.py --pythonpath /tmp/old-tree   # older code

Issue 14: a receiver answering 500 with 1 MB of gzip that inflates to 1 GiB took
the daemon from 0.29 to 3.3 GB RSS within seconds of retries.  This starts such
a receiver (it is also the upstream, answering chat completions with 200), and
llmproxy with a Loki exporter pointed at it that retries fast (backoff 0.05 to
0.2 s, no spool), sends 20 exchanges through the proxy, and prints the daemon's
VmRSS and VmHWM (peak) every few seconds with the number of pushes the receiver
has answered.  ``--pythonpath`` runs the daemon on another tree of llmproxy (a
``git archive`` of an older commit) for comparison.  No tests: a measuring tool.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # the harness next to this file: free ports, child processes

RECEIVER = r"""
import struct, sys, zlib
from twisted.internet import reactor
from twisted.web import resource, server

def gzip_bomb(inflated):
    # One MiB of zeros compressed after a full flush is the same bytes every time.
    mib = b"\0" * (1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = deflate.compress(mib) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(inflated >> 20):
        crc = zlib.crc32(mib, crc)
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + block * (inflated >> 20)
            + deflate.flush() + struct.pack("<II", crc, inflated & 0xFFFFFFFF))

BOMB = gzip_bomb(int(sys.argv[2]) << 20)
COMPLETION = (b'{"id":"x","object":"chat.completion","model":"m","choices":[{"index":0,'
              b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
              b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}')
pushes = 0

class Receiver(resource.Resource):
    isLeaf = True
    def render_POST(self, request):
        global pushes
        request.content.read()
        if request.path.startswith(b"/loki/"):
            pushes += 1
            request.setResponseCode(500)
            request.setHeader(b"content-encoding", b"gzip")
            return BOMB
        request.setHeader(b"content-type", b"application/json")
        return COMPLETION
    def render_GET(self, request):
        return str(pushes).encode()

site = server.Site(Receiver())
site.log = lambda request: None
reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
reactor.run()
"""


def config(work: Path, port: int, admin: int, receiver: int) -> str:
    return f"""[server]
listen = tcp:{port}:interface=127.0.0.1
admin_listen = tcp:{admin}:interface=127.0.0.1
state_dir = {work / "state"}
drain_timeout = 2

[route:mock]
prefix = /
upstream = http://127.0.0.1:{receiver}
provider = openai

[exporter:loki]
type = loki
url = http://127.0.0.1:{receiver}
max_retries = 1000000
backoff_min = 0.05
backoff_max = 0.2
spool_max_bytes = 0
"""


def memory_mib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in MiB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0]) // 1024
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="how long to watch the retries")
    p.add_argument("--inflate-mib", type=int, default=1024, help="what each answer inflates to")
    p.add_argument("--pythonpath", help="run the daemon on this tree of llmproxy instead")
    args = p.parse_args()
    receiver_port, port, admin = run.free_port(), run.free_port(), run.free_port()
    with tempfile.TemporaryDirectory(prefix="bench-hostile-sink-") as tmp:
        work = Path(tmp)
        (work / "llmproxy.ini").write_text(config(work, port, admin, receiver_port))
        receiver_argv = [
            str(run.VENV_PYTHON), "-c", RECEIVER, str(receiver_port), str(args.inflate_mib),
        ]  # fmt: skip
        daemon_argv = [
            str(run.VENV_TWISTD), "-n", "--pidfile=", "-l", str(work / "daemon.log"),
            "llmproxy", "--config", str(work / "llmproxy.ini"),
        ]  # fmt: skip
        env = {"PYTHONPATH": args.pythonpath} if args.pythonpath else None
        with (
            run.spawn("receiver", receiver_argv, work) as receiver,
            run.spawn("llmproxy", daemon_argv, work, cwd=run.ROOT, extra_env=env) as daemon,
        ):
            run.started(receiver, run.port_open(receiver_port))
            run.started(daemon, run.answers_200(f"http://127.0.0.1:{admin}/ready"))
            pid = daemon.proc.pid
            print(f"started: {memory_mib(pid)} MiB")
            body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
            for _ in range(20):
                run.http_call("POST", f"http://127.0.0.1:{port}/v1/chat/completions", body)
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < args.seconds:
                time.sleep(min(args.seconds / 6, args.seconds - elapsed))
                _, answered = run.http_call("GET", f"http://127.0.0.1:{receiver_port}/")
                print(
                    f"t={time.monotonic() - started:5.1f}s  pushes answered: "
                    f"{answered.decode():>5s}  {memory_mib(pid)} MiB",
                    flush=True,
                )


if __name__ == "__main__":
    main()
