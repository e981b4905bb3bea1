"""A real ``redis-server`` for tests: a free port on 127.0.0.1, a temporary
directory, no persistence (unless asked), started and stopped by the test, plus
a tiny blocking RESP client for assertions.

``scripts/system-deps`` installs redis-server when it is missing.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import hiredis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@attrs.define
class RedisServer:
    directory: Path
    port: int = 0
    persistent: bool = False  # appendonly: the stream and groups survive a restart
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/system-deps installs it)")
        if not self.port:
            self.port = free_port()
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--appendfsync", "always",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                # Commands get LOADING until the AOF is loaded; INFO answers.
                if self.command("PING") == b"PONG" and b"loading:0" in self.command(
                    "INFO", "persistence"
                ):
                    return
            except OSError:
                pass
            except RedisReplyError as e:
                if not str(e).startswith("LOADING"):
                    raise
            if self.process.poll() is not None or time.monotonic() > deadline:
                text = (self.directory / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server did not start:\n{text}")
            time.sleep(0.02)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def command(self, *args: Any) -> Any:
        """Send one command, return its reply (bytes, int, list, None; errors raise)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(hiredis.pack_command(args))
            replies = hiredis.Reader()
            reply = replies.gets()
            while reply is False:
                data = s.recv(65536)
                if not data:
                    raise OSError("connection closed")
                replies.feed(data)
                reply = replies.gets()
            if isinstance(reply, hiredis.ReplyError):
                raise RedisReplyError(str(reply))
            return reply


class RedisReplyError(Exception):
    pass


@contextlib.contextmanager
def running_redis(directory: Path, persistent: bool = False) -> Iterator[RedisServer]:
    server = RedisServer(directory, persistent=persistent)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def stream_events(server: RedisServer, stream: str) -> list[dict[str, Any]]:
    """Every event in the stream, oldest first."""
    import orjson

    out = []
    for _entry_id, fields in server.command("XRANGE", stream, "-", "+"):
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        out.append(orjson.loads(values[b"event"]))
    return out


def info_pairs(reply: Any) -> dict[str, Any]:
    return {k.decode(): v for k, v in zip(reply[::2], reply[1::2], strict=True)}
