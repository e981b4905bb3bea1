"""One supervised connection to Redis (tests: tests/unit/redis/test_connection.py,
tests/integration/test_redis_bus.py).

The wire protocol (RESP framing and parsing, with hiredis's C parser) is
txredisapi's; what this module adds is what a bus needs and txredisapi's
connection pool does not give:

- the reactor is injected (reconnection runs on ``ClientService`` with our clock);
- a command fails *at once* with :class:`RedisUnavailable` while there is no
  usable connection, instead of waiting for one: the proxy must spool, not wait;
- every command has a deadline; a command that misses it aborts the connection
  (a reply that late means a hung connection, and replies must stay in order);
  the deadline is judged after the reactor has read its sockets once more, so a
  reply that came during a long reactor turn is not taken for a hung server;
- replies are raw: ``bytes`` stay ``bytes`` (no decoding, no number guessing).

Reconnection backs off from 0.1 s to 2 s.  An outage is logged once when it
starts and once when it ends, never with the URL's password.

txredisapi is imported lazily, when a connection starts: it imports the global
reactor, which must not happen before twistd has installed its own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from llmproxy.config.model import RedisSettings

__all__ = [
    "REDIS_SCHEMES",
    "TRANSIENT_ERROR_CODES",
    "RedisConnection",
    "RedisURL",
    "RedisUnavailable",
    "default_consumer_name",
    "is_refusal",
    "is_response_error",
    "parse_redis_url",
    "redis_problems",
]

log = Logger()

REDIS_SCHEMES = ("redis", "rediss", "unix")


class RedisUnavailable(Exception):
    """No usable connection to Redis right now (or it was lost mid-command)."""


@attrs.frozen
class RedisURL:
    """Where Redis is and how to log in; ``safe`` is the form fit for logs."""

    scheme: str  # redis | rediss | unix
    host: str = "127.0.0.1"
    port: int = 6379
    path: str = ""  # unix socket
    db: int = 0
    username: str = ""
    password: str = attrs.field(default="", repr=False)

    @property
    def safe(self) -> str:
        """The address without credentials, for log lines and stats."""
        if self.scheme == "unix":
            return f"unix://{self.path}?db={self.db}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/{self.db}"


def parse_redis_url(text: str) -> RedisURL:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS), or
    ``unix:///path/to/redis.sock[?db=N]``.  ``ValueError`` says what is wrong, never
    quoting a password."""
    parts = urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if scheme not in REDIS_SCHEMES:
        raise ValueError("must start with redis://, rediss:// or unix://")
    username = unquote(parts.username or "")
    password = unquote(parts.password or "")
    if scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs the socket's path (unix:///run/redis.sock)")
        db_values = parse_qs(parts.query).get("db", ["0"])
        db_text = db_values[0]
        path = parts.path
        host, port = "", 0
    else:
        if not parts.hostname:
            raise ValueError("has no host")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError("has a bad port") from None
        db_text = parts.path.strip("/") or "0"
        host, path = parts.hostname, ""
    if not db_text.isdigit():
        raise ValueError("the database must be a number (redis://host:6379/0)")
    return RedisURL(scheme, host, port, path, int(db_text), username, password)


def redis_problems(settings: RedisSettings) -> list[str]:
    """What is wrong in a ``[redis]`` section, as ``key: reason`` lines."""
    problems = []
    try:
        parse_redis_url(settings.url)
    except ValueError as e:
        problems.append(f"url: {e}")
    for key in ("stream", "group"):
        value = getattr(settings, key)
        if not value or any(c.isspace() for c in value):
            problems.append(f"{key}: must be a non-empty name without spaces")
    if any(c.isspace() for c in settings.consumer):
        problems.append("consumer: must not contain spaces")
    for key in ("maxlen", "publish_buffer", "batch_size", "spool_max_bytes"):
        if getattr(settings, key) <= 0:
            problems.append(f"{key}: must be greater than 0")
    for key in ("claim_idle", "block", "timeout", "flush_interval", "spool_interval"):
        if getattr(settings, key) <= 0:
            problems.append(f"{key}: must be greater than 0")
    return problems


def default_consumer_name() -> str:
    """``<hostname>-<pid>``: unique among running dispatchers."""
    return f"{os.uname().nodename}-{os.getpid()}"


@implementer(ILogObserver)
def _discard(event: Any) -> None:
    return None


class _QuietClientService(ClientService):
    # ClientService logs every reconnection attempt; the connection logs the
    # outage once instead.
    _log = Logger(observer=_discard)


def _make_protocol_class() -> Any:
    import txredisapi

    class _RedisProtocol(txredisapi.RedisProtocol):  # type: ignore[misc, name-defined]
        """txredisapi's protocol, reporting to its ``RedisConnection``."""

        owner: RedisConnection

        def connectionMade(self) -> None:
            # Commands go out as they are asked (one script run per reactor turn):
            # with Nagle's algorithm one sent while the one before is unacknowledged
            # waits for Redis' reply to the first (its ACK rides on it).
            with contextlib.suppress(AttributeError, OSError):
                self.transport.setTcpNoDelay(True)
            super().connectionMade()
            self.owner._made(self)

        def connectionLost(self, reason: Any = None) -> None:
            super().connectionLost(reason)
            self.owner._lost(self)

        # txredisapi encodes a command an argument at a time through a chain of
        # isinstance checks, and walks every reply to convert values we never
        # want converted (no charset, no number guessing): with one script call
        # per request batch, that was most of the CPU a Redis round trip cost
        # (about 4 us per argument).  The same RESP, built with bytes formatting.
        def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
            parts = [b"*%d\r\n" % len(args)]
            for arg in args:
                kind = arg.__class__
                if kind is bytes:
                    data = arg
                elif kind is str:
                    data = arg.encode()
                elif kind is int:
                    data = b"%d" % arg
                elif kind is float:
                    data = b"%f" % arg  # as txredisapi sends floats
                else:
                    data = self._encode_value(arg)
                parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
            return b"".join(parts)

        def tryConvertData(self, data: Any) -> Any:
            return data  # raw replies (charset=None, convertNumbers=False)

    return _RedisProtocol


@attrs.define(eq=False)
class RedisConnection:
    """A connection to Redis kept open across outages; see the module docstring."""

    _reactor: Any  # IReactorTime + IReactorTCP (+ IReactorUNIX for unix://)
    _url: RedisURL
    _timeout: float
    _client_name: str = "llmproxy"

    _service: ClientService | None = attrs.field(init=False, default=None)
    _protocol: Any = attrs.field(init=False, default=None)  # the usable connection
    _on_ready: list[Callable[[], object]] = attrs.field(init=False, factory=list)
    _down_since: float | None = attrs.field(init=False, default=None)
    _ever_connected: bool = attrs.field(init=False, default=False)
    _last_warning: str = attrs.field(init=False, default="")
    _stopped: bool = attrs.field(init=False, default=False)
    last_error: str | None = attrs.field(init=False, default=None)
    connects: int = attrs.field(init=False, default=0)

    @property
    def usable(self) -> bool:
        return self._protocol is not None

    @property
    def address(self) -> str:
        return self._url.safe

    def when_ready(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` each time a connection becomes usable."""
        self._on_ready.append(callback)

    def start(self) -> None:
        if self._service is not None or self._stopped:
            return
        protocol_class = _make_protocol_class()
        connection = self

        class _Factory(Factory):
            noisy = False

            def buildProtocol(self, addr: Any) -> Protocol:
                protocol: Protocol = protocol_class(charset=None, convertNumbers=False)
                protocol.owner = connection  # type: ignore[attr-defined]
                protocol.factory = self
                return protocol

        self._down_since = self._now()
        self._service = _QuietClientService(
            self._endpoint(),
            _Factory(),
            retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=2.0, factor=2.0),
            clock=self._reactor,
        )
        self._service.startService()
        self._service.whenConnected(failAfterFailures=1).addErrback(self._first_attempt_failed)

    def _first_attempt_failed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            self._warn_down(f"cannot connect ({failure.getErrorMessage()}); retrying")

    def stop(self) -> Deferred[None]:
        """Close the connection and stop reconnecting; commands fail from now on."""
        self._stopped = True
        self._protocol = None
        service, self._service = self._service, None
        if service is None:
            return succeed(None)
        d: Deferred[None] = service.stopService()  # type: ignore[assignment]
        return d

    def abort(self) -> None:
        """Drop the current connection at once (it is re-established)."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()

    def execute(
        self, *args: bytes | str | int | float, timeout: float | None = None
    ) -> Deferred[Any]:
        """Send one command; fires with its raw reply, fails with ``RedisUnavailable``
        (no connection, lost, or no reply within ``timeout``), or txredisapi's
        ``ResponseError`` (Redis refused the command)."""
        protocol = self._protocol
        if protocol is None:
            return fail(RedisUnavailable(f"not connected to {self._url.safe}"))
        try:
            d: Deferred[Any] = protocol.execute_command(*args, apply_timeout=False)
        except Exception as e:  # txredisapi raises ConnectionError when not connected
            return fail(RedisUnavailable(f"{type(e).__name__} on {self._url.safe}"))
        limit = self._timeout if timeout is None else timeout
        timer = self._reactor.callLater(limit, self._timed_out, protocol, d)

        def done(result: object) -> object:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure) and not result.check(_response_error_type()):
                return Failure(RedisUnavailable(f"{result.getErrorMessage()} ({self._url.safe})"))
            return result

        return d.addBoth(done)

    def _timed_out(self, protocol: Any, d: Deferred[Any], looked_again: bool = False) -> None:
        if d.called:
            return
        if not looked_again:
            # Timers run before the reactor reads its sockets: after a long turn
            # (a busy process) the reply may be waiting unread.  Look once more
            # after the next read before calling the connection hung.
            self._reactor.callLater(0, self._timed_out, protocol, d, True)
            return
        self.last_error = "no reply in time"
        if protocol is self._protocol:
            self.abort()  # fails every pending command of this connection
        if not d.called:
            d.errback(RedisUnavailable(f"no reply within the timeout ({self._url.safe})"))

    # -- connection events ---------------------------------------------------------

    def _made(self, protocol: Any) -> None:
        if self._stopped:
            protocol.transport.loseConnection()
            return
        url = self._url
        setup: list[Deferred[Any]] = []
        if url.password:
            creds = (url.username, url.password) if url.username else (url.password,)
            setup.append(protocol.execute_command("AUTH", *creds, apply_timeout=False))
        if url.db:
            setup.append(protocol.execute_command("SELECT", url.db, apply_timeout=False))
        setup.append(
            protocol.execute_command("CLIENT", "SETNAME", self._client_name, apply_timeout=False)
        )
        waiting = [len(setup)]
        failed: list[str] = []

        def no_answer() -> None:
            # Connected, but the server does not answer: try again later.
            failed.append("no reply to the connection setup")
            self._warn_down(failed[0])
            protocol.transport.abortConnection()

        timer = self._reactor.callLater(self._timeout, no_answer)

        def one_done(result: object) -> None:
            if isinstance(result, Failure):
                failed.append(result.getErrorMessage())
            waiting[0] -= 1
            if waiting[0]:
                return
            if timer.active():
                timer.cancel()
            elif failed:
                return  # timed out: already handled
            if self._stopped:
                return
            if failed:
                # AUTH or SELECT refused: a config problem, retried with backoff.
                self._warn_down(f"refused the connection setup: {failed[0]}")
                protocol.transport.loseConnection()
                return
            self._ready(protocol)

        for d in setup:
            d.addBoth(one_done)

    def _ready(self, protocol: Any) -> None:
        if self._stopped or not protocol.connected:
            return
        self._protocol = protocol
        self.connects += 1
        if self._ever_connected and self._down_since is not None:
            log.info(
                "redis {address} ({client}): connected again after {down:.1f}s",
                address=self._url.safe,
                client=self._client_name,
                down=self._now() - self._down_since,
            )
        elif not self._ever_connected:
            log.info(
                "redis {address} ({client}): connected",
                address=self._url.safe,
                client=self._client_name,
            )
        self._last_warning = ""
        self._ever_connected = True
        self._down_since = None
        for callback in list(self._on_ready):
            try:
                callback()
            except Exception:
                log.failure(
                    "redis {address} ({client}): a ready callback failed",
                    address=self._url.safe,
                    client=self._client_name,
                )

    def _lost(self, protocol: Any) -> None:
        if protocol is self._protocol:
            self._protocol = None
        if not self._stopped and self._down_since is None:
            self._warn_down("connection lost; reconnecting")

    def _warn_down(self, why: str) -> None:
        self.last_error = why
        if self._down_since is None:
            self._down_since = self._now()
        if why != self._last_warning:  # once per outage and reason, not per retry
            self._last_warning = why
            log.warn(
                "redis {address} ({client}): {why}",
                address=self._url.safe,
                client=self._client_name,
                why=why,
            )

    def _endpoint(self) -> Any:
        url = self._url
        if url.scheme == "unix":
            return endpoints.UNIXClientEndpoint(self._reactor, url.path, timeout=self._timeout)
        endpoint: Any = endpoints.HostnameEndpoint(
            self._reactor, url.host, url.port, timeout=self._timeout
        )
        if url.scheme == "rediss":
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = endpoints.wrapClientTLS(optionsForClientTLS(url.host), endpoint)
        return endpoint

    def _now(self) -> float:
        now: float = self._reactor.seconds()
        return now


def _response_error_type() -> type[Exception]:
    import txredisapi

    error: type[Exception] = txredisapi.ResponseError
    return error


def is_response_error(failure: Failure, text: str = "") -> bool:
    """Whether Redis refused a command (optionally: with ``text`` in its message)."""
    if not failure.check(_response_error_type()):
        return False
    return text in str(failure.value)


# Error codes that mean "not now" rather than "no": Redis loading its data after a
# restart, busy with a script, in a failover (or a replica for now), refusing writes
# after a failed save, a cluster reconfiguring.  The same command may succeed later.
TRANSIENT_ERROR_CODES = frozenset(
    {
        "LOADING",
        "BUSY",
        "TRYAGAIN",
        "MASTERDOWN",
        "READONLY",
        "MISCONF",
        "CLUSTERDOWN",
        "NOREPLICAS",
    }
)


def is_refusal(failure: Failure) -> bool:
    """Whether Redis answered a command with an error that sending it again will
    not change (``NOGROUP``, ``WRONGTYPE``, a syntax error).  A lost connection, a
    timeout or an error in ``TRANSIENT_ERROR_CODES`` is no refusal."""
    if not failure.check(_response_error_type()):
        return False
    code = str(failure.value).split(" ", 1)[0]
    return code not in TRANSIENT_ERROR_CODES
