"""``llmproxy cache purge``: ask the running proxy to purge cached responses
(tests: tests/integration/test_cache.py, tests/unit/cache/test_policy.py).

It calls the admin endpoint (``POST /cache/purge``) rather than touching a store
itself: the memory store lives inside the proxy process and only the proxy can
reach it, the same command works for both stores, and the purge is audited by
the proxy like any other admin action.  The address and bearer token come from
``[server] admin_listen`` / ``admin_token`` of the config (``--admin-url``
overrides the address, e.g. for a systemd-activated admin socket).
"""

from __future__ import annotations

import argparse
import http.client
import socket
import sys
from typing import Any
from urllib.parse import urlencode, urlsplit

import orjson

from llmproxy.cli.args import Subcommands, config_option, on_local_settings, positive_seconds
from llmproxy.config.model import Settings

__all__ = ["add_cache_command", "admin_url_for", "post_purge", "split_endpoint"]


def split_endpoint(description: str) -> list[str]:
    """A Twisted endpoint description's fields (``\\:`` escapes a colon)."""
    fields, current, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(ch)
    fields.append("".join(current))
    return fields


def admin_url_for(admin_listen: str) -> str:
    """``http://HOST:PORT`` or ``unix:PATH`` for a listening endpoint; ValueError if unknown."""
    fields = split_endpoint(admin_listen.strip())
    kind = fields[0].lower()
    positional = [f for f in fields[1:] if "=" not in f]
    named = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
    if kind in ("tcp", "tcp6"):
        port = named.get("port") or (positional[0] if positional else "")
        if not port.isdigit() or int(port) == 0:
            raise ValueError(f"cannot tell the admin port from {admin_listen!r}: use --admin-url")
        host = named.get("interface", "")
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    if kind == "unix":
        path = named.get("address") or (positional[0] if positional else "")
        if path:
            return "unix:" + path
    raise ValueError(f"cannot reach the admin listener {admin_listen!r} from here: use --admin-url")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def post_purge(
    base: str, token: str, query: dict[str, str], timeout: float = 30.0
) -> tuple[int, dict[str, Any]]:
    """POST /cache/purge; the status and the JSON answer."""
    target = "/cache/purge?" + urlencode(query)
    conn: http.client.HTTPConnection
    if base.startswith("unix:"):
        conn = _UnixConnection(base[len("unix:") :], timeout)
    else:
        u = urlsplit(base)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"--admin-url must be http://HOST:PORT or unix:PATH, not {base!r}")
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
        target = u.path.rstrip("/") + target
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        conn.request("POST", target, body=b"", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    try:
        answer = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        answer = {"error": {"message": body[:200].decode("utf-8", "replace")}}
    return resp.status, answer if isinstance(answer, dict) else {}


@on_local_settings
def _purge(args: argparse.Namespace, settings: Settings) -> int:
    server = settings.server
    try:
        base = args.admin_url or admin_url_for(server.admin_listen)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 1
    if args.key is not None:
        query = {"key": args.key}
    elif args.prefix is not None:
        query = {"prefix": args.prefix}
    else:
        query = {"all": "1"}
    try:
        status, answer = post_purge(base, server.admin_token, query, args.timeout)
    except (OSError, http.client.HTTPException, ValueError) as e:
        print(f"cannot reach the proxy's admin listener at {base}: {e}", file=sys.stderr)
        return 1
    if status != 200:
        message = (answer.get("error") or {}).get("message", "")
        print(f"purge refused: HTTP {status} {message}".rstrip(), file=sys.stderr)
        return 1
    print(f"purged {answer.get('purged', 0)} cached responses")
    return 0


def add_cache_command(sub: Subcommands) -> None:
    """Register ``llmproxy cache`` (purge)."""
    cache = sub.add_parser("cache", help="manage the response cache of a running proxy")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    p = cache_sub.add_parser(
        "purge", help="delete cached responses by key, by key prefix, or all of them"
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", help="one key, as X-PROXY-CACHE-KEY shows it")
    which.add_argument(
        "--prefix", help="every key starting with this, e.g. ROUTE/ or ROUTE/NAMESPACE/"
    )
    which.add_argument("--all", action="store_true", help="every cached response")
    config_option(p, "admin_listen, admin_token")
    p.add_argument("--admin-url", default=None, help="http://HOST:PORT or unix:PATH of the admin")
    p.add_argument(
        "--timeout", type=positive_seconds, default=30.0, help="seconds to wait for the proxy"
    )
    p.set_defaults(func=_purge)
