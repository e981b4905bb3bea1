"""The exit codes of llmproxy's processes, and the one line a process prints
before it exits for a reason restarting would not fix
(tests: tests/unit/systemd/test_units.py, tests/integration/test_daemon.py).

The codes are sysexits(3)'s, which systemd names in ``systemctl status``
(``status=64/USAGE``).  The units in systemd/ list ``EX_CONFIG`` and
``EX_CANNOT_LISTEN`` in ``RestartPreventExitStatus=``: a bad config file or an
address another program holds stays so until someone acts, and a restart loop
would only bury the reason in the journal.  docs/operations.md, "Exit codes",
is the operator's table of them.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from twisted.logger import Logger

__all__ = [
    "EX_CANNOT_LISTEN",
    "EX_CONFIG",
    "EX_SOFTWARE",
    "NOT_RESTARTED",
    "ListenError",
    "exit_cannot_listen",
]

# EX_USAGE: a bad config file or bad flags (the daemon, check-config, the
# dispatcher and a worker alike).
EX_CONFIG = 64
# EX_UNAVAILABLE: a listener could not be opened (the address is in use, a port
# below 1024 without the right, a socket-activation descriptor that is missing).
EX_CANNOT_LISTEN = 69
# EX_SOFTWARE: a bug (a worker that could not start for another reason).
EX_SOFTWARE = 70
# What systemd must not restart (RestartPreventExitStatus= of every unit).
NOT_RESTARTED = (EX_CONFIG, EX_CANNOT_LISTEN)

log = Logger()


class ListenError(Exception):
    """A listener could not be opened at start-up: which one, and why."""

    def __init__(self, description: str, reason: str, setting: str = "") -> None:
        super().__init__(f"cannot listen on {description}: {reason}")
        self.description = description
        self.reason = reason
        self.setting = setting

    def line(self) -> str:
        """The one line an operator reads."""
        where = f" ({self.setting})" if self.setting else ""
        return (
            f"llmproxy: cannot listen on {self.description}{where}: {self.reason}; "
            f"not starting (exit code {EX_CANNOT_LISTEN})"
        )


def exit_cannot_listen(error: ListenError) -> NoReturn:
    """Say why in one line and exit with ``EX_CANNOT_LISTEN`` (no traceback)."""
    # Through the logger: under twistd, stderr is the log too, and a line written
    # there directly would come out as a second, "stderr" line.
    log.critical("{line}", line=error.line())
    sys.stdout.flush()
    raise SystemExit(EX_CANNOT_LISTEN)
