"""``twistd llmproxy`` / ``twist llmproxy``: options and the service (tests: tests/integration/test_daemon.py).

The config is loaded and checked in ``postOptions``, so a bad file stops
twistd with a usage error (exit code 64) before anything listens.
"""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from llmproxy.config import ConfigError, load_settings


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = (
        "Run the llmproxy daemon. Without --config, the embedded default config is "
        "used (proxy on 127.0.0.1:8080, admin on 127.0.0.1:9090, events to "
        "state/events.jsonl). Environment variables LLMPROXY_<SECTION>_<KEY> override "
        "the file."
    )
    optParameters = [
        ["config", "c", None, "Path to the ini file (default: the embedded default config)."],
    ]

    def postOptions(self) -> None:
        try:
            self["settings"] = load_settings(self["config"])
        except ConfigError as e:
            # One line per problem, also on stderr: twistd shows only the message.
            for line in e.problems:
                print(f"llmproxy: {line}", file=sys.stderr)
            raise usage.UsageError(f"bad configuration ({len(e.problems)} problem(s))") from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from llmproxy.service import ProxyService

    return ProxyService(options["settings"], reactor)
