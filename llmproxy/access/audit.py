"""The audit log: security decisions, one fsynced JSON line each
(tests: tests/unit/access/test_audit.py).

Separate from the instrumentation events: it is for the operator's security
review, so it is written synchronously and durably, and never carries secrets:
every text field goes through :func:`llmproxy.capture.obfuscate.scrub_text`
(userinfo, keys quoted in messages).

The log follows its path: before each line one ``os.stat`` checks that the path
still names the open file (a line costs an ``fsync`` anyway).  Moved aside or
deleted (logrotate, ``state_dir`` removed), it is reopened at the configured
path, its directory made again, so it needs no SIGHUP.  Each reopen is logged at
info level with its reason and counted in ``reopens``.  A failed write closes
the file: the next line opens the path afresh.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import orjson
from twisted.logger import Logger

from llmproxy.capture.obfuscate import scrub_text
from llmproxy.capture.record import ExchangeRecord
from llmproxy.export.appendfile import displaced, open_append

__all__ = ["AuditLog"]

log = Logger()


class AuditLog:
    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._fd: int | None = None
        self._identity = (0, 0)  # (st_dev, st_ino) of the open file
        self.lines = 0
        self.errors = 0
        self.reopens: dict[str, int] = {}

    def write(self, action: str, **fields: Any) -> None:
        if self._path is None:
            return
        entry = {"ts": time.time(), "action": action}
        for key, value in fields.items():
            # A path, host or reason may quote what a client sent: a userinfo
            # (/openai/user:SECRET@host/...), a key in a message.
            entry[key] = scrub_text(value) if isinstance(value, str) else value
        line = orjson.dumps(entry) + b"\n"
        try:
            fd = self._open(self._path)
            os.write(fd, line)
            os.fsync(fd)
            self.lines += 1
        except OSError as e:
            self.errors += 1
            self.close()  # the next line starts afresh: path, directory, descriptor
            log.warn("audit log {path} not writable: {err}", path=str(self._path), err=str(e))

    def _open(self, path: Path) -> int:
        if self._fd is not None:
            reason = displaced(path, self._fd, self._identity)
            if reason is None:
                return self._fd
            self._reopening(reason)
            self.close()
        opened = open_append(path, 0o600)
        self._fd = opened.fd
        self._identity = opened.identity
        return opened.fd

    def _reopening(self, reason: str) -> None:
        self.reopens[reason] = self.reopens.get(reason, 0) + 1
        log.info("audit log {path}: reopening ({reason})", path=str(self._path), reason=reason)

    def refused_host(self, record: ExchangeRecord, reason: str) -> None:
        self.write(
            "upstream_refused",
            request_id=record.request_id,
            client=record.client_addr,
            provider=record.provider,
            host=record.upstream_host[:255],
            path=record.path[:500],
            outcome="denied",
            reason=reason,
        )

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
