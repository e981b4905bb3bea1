"""The ``jq`` example of docs/operations.md ("Reading /stats and /metrics"), run by
the real ``jq`` on a real /stats document: it must work for one process and for
``workers > 1`` alike (tests/integration/test_admin.py, test_workers.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def documented_program() -> str:
    (program,) = re.findall(r"/stats \| jq '([^']+)'", OPERATIONS.read_text("utf-8"))
    return program


def run_documented_jq(stats: dict[str, Any]) -> Any:
    """What the documented command prints for ``stats``, parsed."""
    jq = shutil.which("jq")
    assert jq, "jq not found: install the Debian package jq (scripts/system-deps)"
    proc = subprocess.run(
        [jq, "-c", documented_program()],
        input=json.dumps(stats),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)
