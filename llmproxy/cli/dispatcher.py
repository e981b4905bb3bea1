"""``llmproxy dispatcher``: run one dispatcher of the Redis bus as a process (tests:
tests/unit/cli/test_dispatcher.py, tests/integration/test_dispatcher.py).

The dispatcher itself (reading the stream as one consumer of a group, delivering
to a sink, acknowledging, claiming, the drain) is llmproxy/redis/dispatcher.py.
This module is the command around it:

- ``dispatcher_plan`` resolves the sink and the Redis settings: flags, then the
  environment (``LLM_PROXY_ENDPOINT``, ``LLM_PROXY_API_KEY``), then the config file
  (``[redis]``, ``[server]``, an ``[exporter:NAME]`` picked with ``--exporter``),
  then defaults (a file sink, ``--buffer 1000``, ``--batch-size 100``).  Every
  problem is collected and printed one per line, exit code 64.  The sink's key
  comes from the environment or the config only: the old ``--api-key`` flag is
  refused with a message saying so (a command line is readable by every local
  user).
- ``run`` starts the dispatcher on the reactor as a ``DispatcherService``
  (``READY=1`` to systemd once started), logs its stats on SIGHUP (systemd's
  ``ExecReload``; nothing is re-read) and drains on SIGTERM/SIGINT within
  ``--drain-timeout`` (default ``[server] drain_timeout``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import attrs
import orjson
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

from llmproxy.cli.args import Subcommands, positive_duration, positive_int
from llmproxy.config.loader import ConfigError
from llmproxy.config.model import EXPORTER_TYPES, ExporterSettings, RedisSettings
from llmproxy.redis.connection import parse_redis_url, redis_problems
from llmproxy.redis.dispatcher import Dispatcher, build_dispatcher
from llmproxy.runtime.checks import load_checked
from llmproxy.runtime.exits import EX_CONFIG

__all__ = [
    "API_KEY_FLAG_GONE",
    "SERVICES",
    "DispatcherConfigError",
    "DispatcherPlan",
    "DispatcherService",
    "add_dispatcher_command",
    "dispatcher_plan",
    "run",
]

log = Logger()

SERVICES = EXPORTER_TYPES  # every sink type, as the ini has them
API_KEY_FLAG_GONE = (
    "--api-key: deprecated and no longer read: a key on the command line is readable by "
    "every local user (/proc/PID/cmdline, ps). Set LLM_PROXY_API_KEY in the environment "
    "(systemd: EnvironmentFile= or LoadCredential=), or api_key = env:NAME / file:PATH in "
    "the [exporter:NAME] section used with --exporter"
)


class DispatcherConfigError(Exception):
    """Bad flags or config for ``llmproxy dispatcher``: one problem per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@attrs.frozen
class DispatcherPlan:
    """Everything ``llmproxy dispatcher`` resolved from flags, config and environment."""

    redis: RedisSettings
    exporter: ExporterSettings
    state_dir: Path
    drain_timeout: float

    def describe(self) -> str:
        r = self.redis
        return (
            f"{parse_redis_url(r.url).safe} stream {r.stream} group {r.group} "
            f"-> {self.exporter.type} sink {self.exporter.name!r}"
        )


def dispatcher_plan(args: argparse.Namespace, env: Mapping[str, str]) -> DispatcherPlan:
    """Resolve flags > environment > config file > defaults; ``DispatcherConfigError``
    lists every problem."""
    try:
        settings = load_checked(args.config, env)
    except ConfigError as e:
        raise DispatcherConfigError(e.problems) from None
    overrides = {
        key: value
        for key, value in (
            ("url", args.redis_url),
            ("stream", args.stream),
            ("group", args.group),
            ("consumer", args.consumer),
            ("claim_idle", args.claim_idle),
        )
        if value is not None
    }
    redis = attrs.evolve(settings.redis, **overrides)
    problems = [f"redis.{p}" for p in redis_problems(redis)]
    endpoint = args.endpoint if args.endpoint is not None else env.get("LLM_PROXY_ENDPOINT")
    if args.api_key is not None:
        # Never used, never echoed: the key is in /proc/PID/cmdline already.
        problems.append(API_KEY_FLAG_GONE)
    api_key = env.get("LLM_PROXY_API_KEY")
    state_dir = settings.server.state_dir
    if args.exporter is not None:
        found = [e for e in settings.exporters if e.name == args.exporter]
        if not found:
            names = ", ".join(e.name for e in settings.exporters) or "none"
            problems.append(f"--exporter: no enabled [exporter:{args.exporter}] (have: {names})")
            raise DispatcherConfigError(problems)
        exporter = found[0]
        if args.service is not None and args.service != exporter.type:
            problems.append(f"--service {args.service} contradicts exporter type {exporter.type}")
    else:
        service = args.service or "file"
        # Without an [exporter:NAME] section: the command's own defaults,
        # --buffer 1000 and --batch-size 100.
        exporter = ExporterSettings(name=service, type=service, buffer=1000, batch_size=100)
    changes: dict[str, Any] = {}
    if args.batch_size is not None:
        changes["batch_size"] = args.batch_size
    if args.buffer is not None:
        changes["buffer"] = args.buffer
    if endpoint:
        if exporter.type in ("file", "sessions"):
            path = Path(endpoint).expanduser()
            key = "path" if exporter.type == "file" else "log_dir"
            changes[key] = path if path.is_absolute() else state_dir / path
        elif exporter.type == "loki":
            changes["url"] = endpoint
        else:
            changes["endpoint"] = endpoint
    if api_key:
        if exporter.type == "loki":
            changes["bearer_token"] = api_key
        elif exporter.type not in ("file", "sessions"):
            changes["api_key"] = api_key
    exporter = attrs.evolve(exporter, **changes)
    if exporter.type == "loki" and not exporter.url:
        problems.append("--endpoint: the Loki push URL is required for --service loki")
    if problems:
        raise DispatcherConfigError(problems)
    drain = args.drain_timeout if args.drain_timeout is not None else settings.server.drain_timeout
    return DispatcherPlan(redis, exporter, state_dir, drain)


class DispatcherService(Service):
    """The dispatcher as a twisted service: READY=1 once started, a drain on stop."""

    name = "llmproxy-dispatcher"

    def __init__(self, dispatcher: Dispatcher, drain_timeout: float) -> None:
        self.dispatcher = dispatcher
        self.drain_timeout = drain_timeout

    def startService(self) -> None:
        # Imported here: the runtime package costs ~0.17 s of start-up that every
        # other ``llmproxy`` command (and ``--help``) would pay.
        from llmproxy.runtime.system import sd_notify

        super().startService()
        self.dispatcher.start()
        sd_notify("READY=1")

    def stopService(self) -> Deferred[None]:
        from llmproxy.runtime.system import sd_notify

        super().stopService()
        sd_notify("STOPPING=1")
        return self.dispatcher.stop(self.drain_timeout)


def run(dispatcher: Dispatcher, drain_timeout: float, reactor: Any, describe: str) -> int:
    """Run ``dispatcher`` on ``reactor`` until SIGTERM/SIGINT, then drain; 0 when clean."""
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    service = DispatcherService(dispatcher, drain_timeout)

    def on_hup(signum: int, frame: FrameType | None) -> None:
        # systemd's ExecReload: nothing to re-read (restart to change settings);
        # report instead of dying from the default SIGHUP action.
        reactor.callFromThread(
            lambda: log.info("dispatcher stats: {stats}", stats=_stats_line(dispatcher))
        )

    signal.signal(signal.SIGHUP, on_hup)

    def begin() -> None:
        service.startService()
        log.info("dispatcher ready: {describe}", describe=describe)

    reactor.callWhenRunning(begin)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


def _stats_line(dispatcher: Dispatcher) -> str:
    return orjson.dumps(dispatcher.stats()).decode()


def _dispatcher_command(args: argparse.Namespace) -> int:
    try:
        plan = dispatcher_plan(args, dict(os.environ))
    except DispatcherConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return EX_CONFIG
    from twisted.internet import reactor

    try:
        dispatcher = build_dispatcher(
            plan.redis, plan.exporter, reactor=reactor, state_dir=plan.state_dir
        )
    except ValueError as e:
        print(e, file=sys.stderr)
        return EX_CONFIG
    return run(dispatcher, plan.drain_timeout, reactor, plan.describe())


def add_dispatcher_command(sub: Subcommands) -> None:
    """Register ``llmproxy dispatcher``."""
    p = sub.add_parser(
        "dispatcher",
        help="deliver events from the Redis bus to a sink, at least once",
        description="Consume the proxy's Redis stream as one consumer of a group and "
        "deliver every entry to a sink; entries are acknowledged once delivered or "
        "dead-lettered. SIGTERM drains.",
    )
    p.add_argument("--service", choices=SERVICES, default=None, help="the sink (default: file)")
    p.add_argument(
        "--exporter", metavar="NAME", default=None, help="use [exporter:NAME] of --config as sink"
    )
    p.add_argument(
        "--endpoint",
        default=None,
        help="sink URL, or the file path for file (default: $LLM_PROXY_ENDPOINT)",
    )
    # Deprecated: refused with a message saying where the key goes instead.
    p.add_argument("--api-key", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=positive_int, default=None, help="events per batch")
    p.add_argument("--buffer", type=positive_int, default=None, help="entries held unsettled")
    p.add_argument("--config", "-c", default=None, help="ini file: [redis], [server], exporters")
    p.add_argument("--redis-url", default=None, help="overrides [redis] url")
    p.add_argument("--stream", default=None, help="overrides [redis] stream")
    p.add_argument("--group", default=None, help="overrides [redis] group")
    p.add_argument("--consumer", default=None, help="overrides [redis] consumer")
    p.add_argument("--claim-idle", type=positive_duration, default=None, help="seconds")
    p.add_argument("--drain-timeout", type=positive_duration, default=None, help="seconds")
    p.set_defaults(func=_dispatcher_command)
