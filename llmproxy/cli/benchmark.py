"""``llmproxy benchmark``: load a deployment and say where the time goes (tests:
tests/unit/cli/test_benchmark.py, tests/integration/test_bench_cli.py).

It sends ``--requests`` POSTs with a JSON body, at most ``--concurrency`` in
flight over as many kept-alive connections, to ``--base-url`` + ``--endpoint``,
then prints the throughput, latency percentiles, a status table, the cache
outcomes and the split between the proxy's own overhead (the
``X-LLMProxy-Overhead-Ms`` response header) and the rest of each request's time
(upstream and network).  docs/benchmarking.md shows how to read it.

This module is the command: its flags become a ``Plan`` (``make_plan``), the run
shows its progress on stderr and ends with the report and the exit code
(``run_benchmark``).  The load generator is llmproxy/cli/loadgen.py, the figures
and their rendering llmproxy/cli/benchmark_report.py.

- Bodies: ``--json`` (inline or ``@file``, a JSON object) or a small OpenAI chat
  completion, the same for every request.  Without ``--cache`` each request says
  ``Cache-Control: no-store``, so no cache answers it; with ``--cache`` it opts in
  to caching (``Cache-Control: public, max-age=300``, llmproxy/cache/policy.py).
  Every request of a run has the same ``X-Session-ID``: one session per run.
- ``--requests`` or ``--duration`` (seconds of sending; ``--requests`` is then a
  cap) say when the run ends.
- ``--stream`` sets ``"stream": true`` and reads each event stream to its end;
  the time to the first body byte (the first event) is reported beside the total.
- Credentials (``--token``, credential headers given with ``-H``) are masked in
  everything printed.
"""

from __future__ import annotations

import argparse
import secrets as secrets_module
import sys
import time
from typing import IO, Any
from urllib.parse import urlsplit

import orjson
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from llmproxy.cli.args import Subcommands, positive_int, positive_seconds
from llmproxy.cli.benchmark_report import (
    CREDENTIAL_HEADERS,
    format_sample,
    format_summary,
    progress_line,
    summarize,
    summary_json,
)
from llmproxy.cli.loadgen import CONNECT_KINDS, Benchmark, Plan, Recorder

__all__ = [
    "CACHE_OPT_IN",
    "DEFAULT_BODY",
    "DEFAULT_ENDPOINT",
    "DEFAULT_REQUESTS",
    "UNLIMITED",
    "Progress",
    "add_benchmark_command",
    "base_url",
    "endpoint_path",
    "header_arg",
    "load_json_body",
    "make_plan",
    "run_benchmark",
    "token_arg",
]

CACHE_OPT_IN = b"public, max-age=300"
DEFAULT_REQUESTS = 100
# --duration without --requests: no cap but the clock (a run of 10**12 requests ends
# by its duration long before).
UNLIMITED = 10**12
DEFAULT_ENDPOINT = "/v1/chat/completions"
DEFAULT_BODY: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 16,
}


# -- the flags and the plan (pure) -------------------------------------------------------


def load_json_body(text: str) -> dict[str, Any]:
    """``--json``: an inline JSON object, or ``@path`` to a file holding one."""
    where = "--json"
    raw: bytes
    if text.startswith("@"):
        path = text[1:]
        where = path
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot read {path}: {e.strerror}") from None
    else:
        raw = text.encode()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise argparse.ArgumentTypeError(f"{where}: the body must be a JSON object")
    return body


def base_url(text: str) -> str:
    """``--base-url``: ``http(s)://host[:port][/prefix]``, without a trailing slash."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} has a bad port") from None
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError("--base-url takes no query; put it in --endpoint")
    return text.strip().rstrip("/")


def endpoint_path(text: str) -> str:
    """``--endpoint``: a path (a leading / is added), optionally with a query."""
    text = text.strip()
    if not text or "://" in text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a path like /v1/chat/completions")
    return text if text.startswith("/") else "/" + text


def header_arg(text: str) -> tuple[str, str]:
    """``-H 'Name: value'``."""
    name, sep, value = text.partition(":")
    name = name.strip()
    if not sep or not name or any(c.isspace() for c in name):
        raise argparse.ArgumentTypeError(f"{text!r} is not 'Name: value'")
    return name, value.strip()


def token_arg(text: str) -> str:
    """``--token``: the token, or ``@path`` to a file holding it (kept out of ``ps``)."""
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as f:
                text = f.readline()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {e.strerror}") from None
    text = text.strip()
    if not text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError("the token is empty or contains spaces")
    return text


def make_plan(args: argparse.Namespace) -> Plan:
    """The run the flags ask for; credentials given in flags become its ``secrets``."""
    url = args.base_url + args.endpoint
    run_id = secrets_module.token_hex(4)
    headers: list[tuple[str, str]] = [
        ("Content-Type", "application/json"),
        ("User-Agent", "llmproxy-benchmark"),
        # One session for the whole run in the proxy's session log (not one per request).
        ("X-Session-ID", f"llmproxy-bench-{run_id}"),
    ]
    secrets = [args.token] if args.token else []
    if args.token:
        headers.append(("Authorization", f"Bearer {args.token}"))
    headers.append(("Cache-Control", CACHE_OPT_IN.decode() if args.cache else "no-store"))
    for name, value in args.header or ():
        headers = [(n, v) for n, v in headers if n.lower() != name.lower()]
        headers.append((name, value))
        if name.lower() in CREDENTIAL_HEADERS:
            scheme, sep, credential = value.partition(" ")
            secrets.append(credential.strip() if sep and scheme.isalpha() else value)
    template = args.json if args.json is not None else dict(DEFAULT_BODY)
    requests = args.requests
    if requests is None:
        requests = UNLIMITED if args.duration is not None else DEFAULT_REQUESTS
    return Plan(
        url=url,
        requests=requests,
        concurrency=min(args.concurrency, requests),
        template=template,
        headers=tuple(headers),
        secrets=tuple(s for s in secrets if s),
        stream=args.stream,
        cache=args.cache,
        debug=args.debug,
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
        duration=args.duration,
        run_id=run_id,
    )


# -- the run: progress on stderr, then the report ------------------------------------------


class Progress:
    """A bar redrawn in place on a terminal, else one line every few seconds."""

    def __init__(self, bench: Benchmark, out: IO[str], tty: bool, clock: IReactorTime) -> None:
        self.bench = bench
        self.out = out
        self.tty = tty
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(0.1 if self.tty else 2.0, now=False)

    def tick(self) -> None:
        b = self.bench
        line = progress_line(
            b.rec.finished,
            b.plan.requests,
            b.rec.failed,
            time.perf_counter() - b.started,
            bar=self.tty,
            duration=b.plan.duration,
        )
        self.out.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.out.flush()

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self.tty:
            self.tick()
            self.out.write("\n")
            self.out.flush()


async def run_benchmark(
    reactor: Any,
    plan: Plan,
    out: IO[str],
    err: IO[str],
    *,
    output: str = "text",
    progress: bool = True,
) -> int:
    """Run ``plan`` and print the report; the exit code (0 ok, 1 nothing answered,
    130 interrupted)."""
    bench = Benchmark(reactor, plan)
    tty = progress and err.isatty()
    bar = Progress(bench, err, tty, reactor) if progress else None
    reported: defer.Deferred[None] = defer.Deferred()

    def on_shutdown() -> defer.Deferred[None]:
        # Ctrl-C: stop, and keep the reactor up until the partial report is out.
        bench.interrupt()
        return reported

    trigger = reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
    try:
        if bar is not None:
            bar.start()
        rec = await bench.run()
        if bar is not None:
            bar.stop()
        return _report(bench, rec, out, err, output)
    finally:
        if bench.interrupted:
            reported.callback(None)
        else:
            reactor.removeSystemEventTrigger(trigger)


def _report(bench: Benchmark, rec: Recorder, out: IO[str], err: IO[str], output: str) -> int:
    plan = bench.plan
    if rec.responses == 0 and (bench.aborted or set(rec.errors) <= CONNECT_KINDS):
        if bench.interrupted and not rec.errors:
            err.write("llmproxy benchmark: interrupted before any response\n")
            return 130
        err.write(f"llmproxy benchmark: cannot reach {plan.url}: {rec.first_error}\n")
        return 1
    summary = summarize(
        rec,
        url=plan.url,
        # A timed run planned as many as it sent.
        planned=plan.requests if plan.duration is None else bench.issued,
        duration=plan.duration,
        concurrency=plan.concurrency,
        elapsed=bench.ended - bench.started,
        stream=plan.stream,
        cache_mode=plan.cache,
        interrupted=bench.interrupted,
    )
    if output == "json":
        report = summary_json(summary)
        if plan.debug and bench.sample is not None:
            report["sample"] = format_sample(bench.sample, plan.secrets)
        out.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        if plan.debug:
            out.write("sample response (the last request):\n")
            if bench.sample is not None:
                out.write(format_sample(bench.sample, plan.secrets) + "\n\n")
            else:
                out.write("(none: the last request was not sent)\n\n")
        out.write(format_summary(summary) + "\n")
    out.flush()
    if bench.interrupted:
        return 130
    if rec.responses == 0:
        err.write("llmproxy benchmark: no request got a response\n")
        return 1
    return 0


# -- the command line ---------------------------------------------------------------------


def add_benchmark_command(sub: Subcommands) -> None:
    """Register ``llmproxy benchmark``."""
    p = sub.add_parser(
        "benchmark",
        help="load a deployment; report throughput, latency and the proxy's overhead",
        description="Send --requests POSTs (or send for --duration seconds), at most "
        "--concurrency at a time, to "
        "--base-url + --endpoint and report throughput, latency percentiles, the status "
        "codes, cache outcomes and the proxy's own overhead (X-LLMProxy-Overhead-Ms) "
        "against upstream time. See docs/benchmarking.md.",
    )
    p.add_argument(
        "--base-url", required=True, type=base_url, help="the proxy, e.g. http://127.0.0.1:8080"
    )
    p.add_argument(
        "--endpoint",
        type=endpoint_path,
        default=DEFAULT_ENDPOINT,
        help=f"path to POST to (default: {DEFAULT_ENDPOINT})",
    )
    p.add_argument(
        "--token",
        type=token_arg,
        default=None,
        help="sent as Authorization: Bearer; @FILE reads it",
    )
    p.add_argument(
        "-H",
        "--header",
        type=header_arg,
        action="append",
        metavar="'NAME: VALUE'",
        help="an extra request header (repeatable)",
    )
    p.add_argument(
        "--requests",
        "-n",
        type=positive_int,
        default=None,
        help=f"how many (default {DEFAULT_REQUESTS}; with --duration: at most this many)",
    )
    p.add_argument(
        "--duration",
        "-d",
        type=positive_seconds,
        default=None,
        metavar="SECONDS",
        help="send for this long instead of a number of requests (in-flight ones finish)",
    )
    p.add_argument(
        "--concurrency", "-c", type=positive_int, default=10, help="in flight at most (default 10)"
    )
    p.add_argument(
        "--json",
        type=load_json_body,
        default=None,
        metavar="BODY",
        help="request body: a JSON object, or @FILE (default: a small gpt-4o-mini chat)",
    )
    p.add_argument("--stream", action="store_true", help='"stream": true; read each SSE stream')
    p.add_argument(
        "--cache",
        action="store_true",
        help="identical, cacheable requests (exercise the proxy's cache)",
    )
    p.add_argument("--debug", action="store_true", help="print one sample exchange first")
    p.add_argument(
        "--output", choices=("text", "json"), default="text", help="report format (default text)"
    )
    p.add_argument(
        "--timeout", type=positive_seconds, default=60.0, help="per request, seconds (default 60)"
    )
    p.add_argument(
        "--connect-timeout", type=positive_seconds, default=10.0, help="seconds (default 10)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    p.set_defaults(func=_benchmark_command)


def _benchmark_command(args: argparse.Namespace) -> int:
    plan = make_plan(args)

    async def main(reactor: Any) -> None:
        code = await run_benchmark(
            reactor,
            plan,
            sys.stdout,
            sys.stderr,
            output=args.output,
            progress=not args.no_progress,
        )
        if code:
            raise SystemExit(code)

    task.react(main)
