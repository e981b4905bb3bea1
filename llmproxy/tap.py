"""``twistd llmproxy`` / ``twist llmproxy``: options and the service
(tests: tests/integration/test_daemon.py).

The config is loaded and checked in ``postOptions``, so a bad file stops
twistd (and twist) before anything listens: one line per problem on stderr and
exit code 64 (``EX_CONFIG``); a listener that cannot be opened stops it with one
line and exit code 69 (``EX_CANNOT_LISTEN``, llmproxy/runtime/exits.py).  The
systemd units list both as not to be restarted, and since systemd decides that
from the main process's exit status alone, this check is what they rely on (no
``ExecStartPre=``).
"""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from llmproxy.config.loader import ConfigError
from llmproxy.runtime.checks import load_checked
from llmproxy.runtime.exits import EX_CONFIG

__all__ = ["Options", "makeService"]


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
            self["settings"] = load_checked(self["config"])
        except ConfigError as e:
            for line in e.problems:
                print(f"llmproxy: {line}", file=sys.stderr)
            print("llmproxy: bad configuration, not starting", file=sys.stderr)
            raise SystemExit(EX_CONFIG) from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from llmproxy.runtime.service import ProxyService

    settings = options["settings"]
    if settings.server.workers > 1:
        from llmproxy.runtime.supervisor import (
            Supervisor,  # N processes on one port: docs/workers.md
        )

        return Supervisor(settings, reactor, config_path=options["config"])
    return ProxyService(settings, reactor, config_path=options["config"])
