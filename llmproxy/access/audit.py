"""The audit log: security decisions, one fsynced JSON line each
(tests: tests/unit/test_audit.py).

Separate from the instrumentation events: it is for the operator's security
review, so it is written synchronously and durably, and never carries secrets.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson
from twisted.logger import Logger

from llmproxy.capture.record import ExchangeRecord

log = Logger()


class AuditLog:
    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._fd: int | None = None
        self.lines = 0
        self.errors = 0

    def write(self, action: str, **fields: Any) -> None:
        if self._path is None:
            return
        entry = {"ts": time.time(), "action": action, **fields}
        line = orjson.dumps(entry) + b"\n"
        try:
            if self._fd is None:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.write(self._fd, line)
            os.fsync(self._fd)
            self.lines += 1
        except OSError as e:
            self.errors += 1
            log.warn("audit log {path} not writable: {err}", path=str(self._path), err=str(e))

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
            os.close(self._fd)
            self._fd = None
