"""The machine id every event carries (tests: tests/unit/capture/test_events.py).

``user@host`` of the proxy process, as the Go llm-proxy records it.  Worked out once
and cached; it never fails -- an unknown part is ``unknown``, because a missing
passwd entry in a container must not stop the proxy from recording.
"""

from __future__ import annotations

import functools
import getpass
import os
import socket

__all__ = ["machine_id"]


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry (containers)
        try:
            return f"uid{os.getuid()}"
        except Exception:
            return "unknown"


def _host() -> str:
    try:
        return socket.gethostname()
    except Exception:
        return ""


def _clean(part: str) -> str:
    # No whitespace or '@' inside a part, so "user@host" splits back unambiguously.
    cleaned = "".join("_" if c.isspace() or c == "@" else c for c in part.strip())
    return cleaned or "unknown"


@functools.cache
def machine_id() -> str:
    """``"user@host"`` of this process."""
    return f"{_clean(_user())}@{_clean(_host())}"
