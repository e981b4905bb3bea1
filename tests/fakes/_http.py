"""Pieces shared by the fake HTTP receivers (tests/fakes/loki.py, helicone.py,
lunary.py, otlp.py): what a request carried, scripted answers (``Respond``,
``Hang``, ``Reset``, ``Endless``), the resource base that plays them, and serving
a fake on a real port."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site


@attrs.frozen
class ReceivedRequest:
    """What one request to the fake carried, and what it answered."""

    method: str
    path: str
    headers: Mapping[str, str]  # lower-case names, values joined with ", "
    body_size: int  # bytes on the wire (compressed when gzipped)
    status: int | None  # None: hung, reset or endless, no complete answer
    reply: str  # the answer's body text

    @property
    def tenant(self) -> str | None:
        return self.headers.get("x-scope-orgid")

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    @property
    def content_encoding(self) -> str | None:
        return self.headers.get("content-encoding")

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")


# -- scripted failures --------------------------------------------------------------


@attrs.frozen
class Respond:
    """Answer with this status (and headers, body) instead of ingesting; with
    ``store=True`` the request is stored first (the service stored it but the
    answer was lost or failed: the client will send it again)."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = attrs.field(factory=dict)
    store: bool = False


@attrs.frozen
class Hang:
    """Never answer (until :meth:`ScriptedResource.release_hung`)."""


@attrs.frozen
class Reset:
    """Abort the connection without an answer."""


@attrs.frozen
class Endless:
    """Answer with this status and headers and start a body that never ends:
    ``chunk`` is sent (chunked), then nothing more, the connection left open
    (until :meth:`ScriptedResource.release_hung`)."""

    status: int
    chunk: bytes = b"{"
    headers: Mapping[str, str] = attrs.field(factory=dict)


Scripted = Respond | Hang | Reset | Endless


def read_request(request: Request) -> tuple[dict[str, str], bytes, str, str]:
    """The request's headers (lower-case names, values joined), body, method, path."""
    headers = {
        k.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in vs)
        for k, vs in request.requestHeaders.getAllRawHeaders()
    }
    body = request.content.read() if request.content is not None else b""
    method = (request.method or b"").decode("latin-1")
    path = (request.path or b"").decode("latin-1")
    return headers, body, method, path


class ScriptedResource(Resource):
    """A fake endpoint's test helpers: its clock, the scripted answers it plays
    first, the requests it saw, and the requests it leaves hanging."""

    isLeaf = True

    def __init__(self, clock: IReactorTime | None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._clock = clock
        self._script: list[Scripted] = []
        self._outage: Respond | None = None
        self._hung: list[Request] = []
        self.requests: list[ReceivedRequest] = []

    def now(self) -> float:
        if self._clock is None:
            return time.time()
        return float(self._clock.seconds())  # type: ignore[misc]  # zope, no mypy-zope

    def fail_next(self, *actions: Scripted | int) -> None:
        """Queue scripted answers for the next requests, in order (an int is a
        bare status, e.g. ``fail_next(503, 500)``)."""
        self._script.extend(Respond(a) if isinstance(a, int) else a for a in actions)

    def outage(self, status: int | None) -> None:
        """Answer every request with ``status`` (after the script) until
        ``outage(None)``: a service that is down for as long as the test says."""
        self._outage = None if status is None else Respond(status)

    def next_scripted(self) -> Scripted | None:
        """The scripted answer for the request now arriving, if any."""
        if self._script:
            return self._script.pop(0)
        return self._outage

    @property
    def request_count(self) -> int:
        return len(self.requests)

    @property
    def hung(self) -> int:
        return len(self._hung)

    def release_hung(self, status: int = 503) -> None:
        """Answer every hung request (if its client is still there)."""
        hung, self._hung = self._hung, []
        for request in hung:
            if not request.finished and not request._disconnected:
                request.setResponseCode(status)
                request.finish()  # type: ignore[no-untyped-call]

    def _stall(self, request: Request, action: Hang | Reset | Endless) -> int:
        """Play a ``Hang``, ``Reset`` or ``Endless``: no complete answer."""
        if isinstance(action, Reset):
            request.channel.transport.abortConnection()  # type: ignore[union-attr]
            request.notifyFinish().addErrback(lambda _: None)
            return NOT_DONE_YET
        if isinstance(action, Endless):
            request.setResponseCode(action.status)
            for name, value in action.headers.items():
                request.setHeader(name, value)  # type: ignore[no-untyped-call]
            request.write(action.chunk)
        self._hang(request)
        return NOT_DONE_YET

    def _hang(self, request: Request) -> None:
        self._hung.append(request)

        def gone(_: Failure | None) -> None:
            if request in self._hung:
                self._hung.remove(request)

        request.notifyFinish().addBoth(gone)


# -- on a real port -------------------------------------------------------------------

F = TypeVar("F", bound=ScriptedResource)


@attrs.define
class RunningFake(Generic[F]):
    """A fake listening on 127.0.0.1; ``stop()`` when done."""

    fake: F
    port: Any  # IListeningPort
    _connections: set[Protocol]

    @property
    def url(self) -> str:
        """The base URL, as the sink's ``endpoint`` takes it."""
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def stop(self) -> defer.Deferred[None]:
        """Stop listening and drop every open connection (hung ones too), so no
        timer or socket outlives the test."""
        self.fake.release_hung()
        waits: list[defer.Deferred[Any]] = []
        for proto in list(self._connections):
            lost: defer.Deferred[None] = defer.Deferred()
            proto.connectionLost = _chain(proto.connectionLost, lost)  # type: ignore[method-assign]
            waits.append(lost)
            # Site's protocol wraps the real channel, which holds the transport.
            transport = getattr(getattr(proto, "_channel", proto), "transport", None)
            if transport is not None:
                transport.abortConnection()
            else:
                lost.callback(None)
        waits.append(defer.maybeDeferred(self.port.stopListening))
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)


R = TypeVar("R", bound=RunningFake[Any])


def listen(running: type[R], fake: Any, reactor: Any = None) -> R:
    """Serve ``fake`` on an OS-chosen port of 127.0.0.1 (for end-to-end tests)."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    connections: set[Protocol] = set()
    port = reactor.listenTCP(0, _TrackingSite(fake, connections), interface="127.0.0.1")
    return running(fake, port, connections)


def _chain(original: Callable[[Failure], None], lost: defer.Deferred[None]) -> Callable[..., None]:
    def connection_lost(reason: Failure) -> None:
        try:
            original(reason)
        finally:
            if not lost.called:
                lost.callback(None)

    return connection_lost


class _TrackingSite(Site):
    noisy = False

    def __init__(self, resource: Resource, connections: set[Protocol]) -> None:
        # No idle timeout: its timer would outlive a test that forgot to stop().
        super().__init__(resource, timeout=None)  # type: ignore[no-untyped-call]
        self._connections = connections

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        if proto is not None:
            self._connections.add(proto)
            original = proto.connectionLost

            def lost(reason: Failure) -> None:
                self._connections.discard(proto)
                original(reason)

            proto.connectionLost = lost
        return proto

    def log(self, request: Any) -> None:
        pass  # no access log lines in test output
