"""Per-route access: proxy tokens in, the route's provider key out
(tests: tests/unit/access/test_policy.py, tests/integration/test_access.py).

A route with ``auth = passthrough`` (and the transparent form) forwards the
client's own credentials untouched.  A route with ``auth = token`` wants a proxy
token (``Authorization: Bearer llmp_...`` or ``x-api-key: llmp_...``); the
client's credential headers are dropped and the route's ``api_key`` is sent in
the provider's header instead, so provider keys never leave the server.

A route's ``allowed_paths`` / ``allowed_methods`` (whatever its ``auth``), and
a token's own (``token create --allow-path/--allow-method``), say which upstream
paths (after the route's prefix, percent-decoded) and methods a request may
use; anything else is answered 403 before the upstream is contacted.  On a
token route the client's ``OpenAI-Organization`` and ``OpenAI-Project`` are
dropped (the route may send its own, or forward the client's with
``forward_openai_scope``): the operator's key must not bill, or reach the files
and batches of, whichever organization a token holder names.

Answers, each in the OpenAI error shape and each written to the audit log:
401 for a missing, unknown, revoked or expired token; 403 outside the allowed
paths or methods, or when the token's request quota is spent; 429
``budget_exceeded`` when its USD or token budget for the period is spent
(llmproxy/access/budgets.py); 429 with ``Retry-After`` over its rate limit.

Tokens are found by the SHA-256 digest of what the client sent, so the lookup
never compares secrets byte by byte: timing can at most reveal something about
a digest, which says nothing about a token.  The digest found is still checked
with :func:`hmac.compare_digest`.

The token file is re-read when it changes: a ``stat`` at most once per
``reload_interval`` on the request path, and at once on :meth:`reload` (SIGHUP).

With ``[state] store = redis`` the token set, the quota counts and the rate
buckets are shared by every process through Redis (llmproxy/access/shared.py):
the answers are the same, a token with limits costs one round trip (shared by
the requests of one reactor turn) and :meth:`TokenAccess.check` answers with a
Deferred for it; while Redis does not answer, ``[state] on_unavailable`` says
503 (``fail_closed``) or pass (``fail_open``).
"""

from __future__ import annotations

import fnmatch
import functools
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from llmproxy.access.budgets import SpendBook, SpendFile
from llmproxy.access.decision import Allow, Deny
from llmproxy.access.limits import RateLimiter, retry_after_seconds
from llmproxy.access.shared import SharedTokens
from llmproxy.access.tokens import (
    MAX_TOKEN_LENGTH,
    Stamp,
    Token,
    TokenFile,
    TokenFileError,
    UsageFile,
    UsageLedger,
    digest_of,
    id_for,
)
from llmproxy.capture.record import ExchangeRecord
from llmproxy.config.model import RouteSettings, Settings
from llmproxy.events.machine import machine_id
from llmproxy.http.router import Target
from llmproxy.interfaces import Auditor
from llmproxy.state import SharedState
from llmproxy.state.counters import Admission

__all__ = [
    "CLIENT_CREDENTIAL_HEADERS",
    "TokenAccess",
    "build_access",
    "client_address",
    "presented_token",
    "upstream_auth_header",
]

log = Logger()

# What a client may authenticate with; none of it goes upstream on a token route.
CLIENT_CREDENTIAL_HEADERS = frozenset(
    {b"authorization", b"x-api-key", b"api-key", b"proxy-authorization"}
)
_ALLOW_AS_IS = Allow()
_WWW_AUTHENTICATE = ((b"www-authenticate", b'Bearer realm="llmproxy"'),)
_STATE_UNAVAILABLE = (
    "the proxy's shared state (Redis) does not answer: requests with proxy tokens are "
    "refused until it does"
)
_RETRY_SOON = ((b"retry-after", b"1"),)


def upstream_auth_header(provider: str, api_key: str) -> tuple[bytes, bytes]:
    """The header that carries the provider key: OpenAI bearer, Anthropic x-api-key."""
    key = api_key.encode("latin-1")
    if provider == "anthropic":
        return (b"x-api-key", key)
    return (b"authorization", b"Bearer " + key)


def presented_token(request: Request) -> bytes | None:
    """The credential the client sent: ``Authorization: Bearer`` first, then ``x-api-key``."""
    headers = request.requestHeaders
    for value in headers.getRawHeaders(b"authorization", ()):
        scheme, _, rest = value.strip().partition(b" ")
        if scheme.lower() == b"bearer" and rest.strip():
            return rest.strip()
    for value in headers.getRawHeaders(b"x-api-key", ()):
        if value.strip():
            return value.strip()
    return None


# What a client must not choose on a route that bills the operator's key: the
# organization and project the request is billed to (and whose files, batches
# and fine-tunes it reaches).
OPENAI_SCOPE_HEADERS = frozenset({b"openai-organization", b"openai-project"})


def _route_allow(route: RouteSettings) -> Allow:
    """What a token route does to every request it lets through."""
    drop = CLIENT_CREDENTIAL_HEADERS
    if not route.forward_openai_scope:
        drop = drop | OPENAI_SCOPE_HEADERS
    return Allow(
        set_headers=(upstream_auth_header(route.provider, route.api_key), *_scope_headers(route)),
        drop_headers=drop,
        masked=(route.api_key,),
    )


def _scope_headers(route: RouteSettings) -> tuple[tuple[bytes, bytes], ...]:
    """The route's own OpenAI-Organization / OpenAI-Project, when it sets them."""
    out = []
    if route.openai_organization:
        out.append((b"openai-organization", route.openai_organization.encode("latin-1")))
    if route.openai_project:
        out.append((b"openai-project", route.openai_project.encode("latin-1")))
    return tuple(out)


class PathRule:
    """``allowed_paths``: prefixes on whole segments, or globs (``*``, ``?``,
    ``[...]``; ``*`` crosses ``/``), matched against the percent-decoded path."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.prefixes: tuple[str, ...] = ()
        globs = []
        for pattern in patterns:
            if any(c in pattern for c in "*?["):
                globs.append(fnmatch.translate(pattern))
            else:
                self.prefixes += (pattern.rstrip("/") or "/",)
        self._glob = re.compile("|".join(globs)) if globs else None

    def allows(self, path: str) -> bool:
        for prefix in self.prefixes:
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                return True
        return self._glob is not None and self._glob.match(path) is not None


@functools.lru_cache(maxsize=1024)
def _decoded(rest: bytes) -> str:
    # The path as the upstream will read it: %2F and dot segments were refused
    # by the router, so decoding cannot change which segments there are.
    return unquote_to_bytes(rest or b"/").decode("utf-8", "replace")


def _methods(names: Iterable[str]) -> frozenset[bytes]:
    return frozenset(m.strip().upper().encode("ascii", "replace") for m in names if m.strip())


@attrs.frozen
class RouteRules:
    """A route's ``allowed_paths`` / ``allowed_methods``, and what it lets
    through when it does not inject a key (its own OpenAI scope headers)."""

    paths: PathRule | None
    methods: frozenset[bytes]
    passthrough: Allow

    @classmethod
    def of(cls, route: RouteSettings) -> RouteRules | None:
        scope = _scope_headers(route)
        if not (route.allowed_paths or route.allowed_methods or scope):
            return None
        return cls(
            paths=PathRule(route.allowed_paths) if route.allowed_paths else None,
            methods=_methods(route.allowed_methods),
            passthrough=Allow(set_headers=scope) if scope else _ALLOW_AS_IS,
        )

    def refusal(self, method: bytes, rest: bytes) -> tuple[str, str] | None:
        """None when allowed, else what was refused: ``("method", "DELETE")`` or
        ``("path", "/v1/files")``."""
        if self.methods and method not in self.methods:
            return "method", method.decode("latin-1")[:20]
        if self.paths is not None:
            path = _decoded(rest)
            if not self.paths.allows(path):
                return "path", path[:200]
        return None


@functools.lru_cache(maxsize=256)
def _token_rules(paths: tuple[str, ...], methods: tuple[str, ...]) -> RouteRules:
    return RouteRules(PathRule(paths) if paths else None, _methods(methods), _ALLOW_AS_IS)


def _token_refusal(token: Token, method: bytes, rest: bytes) -> tuple[str, str] | None:
    return _token_rules(token.allowed_paths, token.allowed_methods).refusal(method, rest)


def client_address(request: Request) -> str:
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    return f"{host}:{getattr(peer, 'port', '')}" if host else "-"


@attrs.define(eq=False, kw_only=True)
class TokenAccess:
    """The access policy of :class:`llmproxy.proxy.forward.ProxyResource`."""

    _routes: Iterable[RouteSettings]
    _tokens: TokenFile
    _usage: UsageLedger
    _audit: Auditor
    _clock: IReactorTime
    _reload_interval: float = 1.0
    _flush_interval: float = 5.0
    spend: SpendBook | None = None
    # With ``shared`` (``[state] store = redis``) the token set and the counts
    # live there (:class:`SharedTokens`), ``usage_file`` only imported.
    _shared_state: SharedState | None = attrs.field(default=None, alias="shared")
    _usage_file: UsageFile | None = None
    _fail_open: bool = False
    _machine: str = ""
    _limiter: RateLimiter = attrs.field(init=False, factory=RateLimiter)
    _by_digest: dict[str, Token] = attrs.field(init=False, factory=dict)
    _stamp: Stamp | None = attrs.field(init=False, default=None)
    _loaded: bool = attrs.field(init=False, default=False)
    _next_stat: float = attrs.field(init=False, default=0.0)
    _flusher: LoopingCall | None = attrs.field(init=False, default=None)
    _started: bool = attrs.field(init=False, default=False)
    _rules: dict[str, RouteRules] = attrs.field(init=False)
    _inject: dict[str, Allow] = attrs.field(init=False)
    denied: int = attrs.field(init=False, default=0)
    reloads: int = attrs.field(init=False, default=0)
    unavailable: int = attrs.field(init=False, default=0)
    _by_project: dict[tuple[str, str], Allow] = attrs.field(init=False, factory=dict)
    _shared: SharedTokens | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._routes = routes = tuple(self._routes)
        self._rules = self._route_rules(routes)
        self._inject = self._injections(routes)
        if self._shared_state is not None:
            usage_file = self._usage_file or UsageFile.in_state_dir(self._tokens.path.parent)
            self._shared = SharedTokens(
                state=self._shared_state,
                clock=self._clock,
                token_file=self._tokens,
                usage_file=usage_file,
                on_tokens=self._take_tokens,
                fail_open=self._fail_open,
                machine=self._machine,
            )

    @staticmethod
    def _injections(routes: Iterable[RouteSettings]) -> dict[str, Allow]:
        # Route name -> the headers that carry its provider key (and its own
        # OpenAI organization and project) upstream.
        return {r.name: _route_allow(r) for r in routes if r.auth == "token"}

    @staticmethod
    def _route_rules(routes: Iterable[RouteSettings]) -> dict[str, RouteRules]:
        return {r.name: rules for r in routes if (rules := RouteRules.of(r)) is not None}

    def set_routes(self, routes: Iterable[RouteSettings]) -> None:
        """A config reload changed the routes: new keys and token routes apply now."""
        self._routes = routes = tuple(routes)
        was_active = bool(self._inject)
        self._rules = self._route_rules(routes)
        self._inject = self._injections(routes)
        if self._inject and not was_active and not self._started:
            self.start()
        elif self._inject:
            self.reload("config_reload")

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Load tokens and counts; flush counts every ``flush_interval`` while running."""
        if not self._inject:
            return
        self._started = True
        if self._shared is not None:
            self._shared.start()
            if self.spend is not None:
                # The per-model record of this process's spend (reports) is kept
                # on disk as with local state; the budgets' counts are in Redis.
                self.spend.load()
                self._start_flusher(self.spend.flush)
            return
        self._load("start")
        self._start_flusher(self._flush)

    def _start_flusher(self, flush: Callable[[], None]) -> None:
        flusher = self._flusher = LoopingCall(flush)
        flusher.clock = self._clock
        flusher.start(self._flush_interval, now=False).addErrback(self._flush_failed)

    def stop(self, timeout: float) -> Deferred[None]:
        """Stop flushing and write the exact counts (call it after the last exchange)."""
        self._started = False
        if self._flusher is not None:
            if self._flusher.running:
                self._flusher.stop()
            self._flusher = None
        if self._shared is not None:
            if self.spend is not None:
                self.spend.close()
            return self._shared.stop(timeout)
        if self._loaded:
            self._usage.close()
            if self.spend is not None:
                self.spend.close()
        return succeed(None)

    def write_spend(self, timeout: float) -> Deferred[None]:
        """Write the spend record again: the answers the capture pump priced after
        :meth:`stop` (the last exchanges of the drain) are charged by then."""
        if self.spend is not None and self.spend.loaded:
            self.spend.close()
        return succeed(None)

    def _flush(self) -> None:
        self._usage.flush()
        if self.spend is not None:
            self.spend.flush()

    def reload(self, trigger: str = "sighup") -> Deferred[None]:
        """Re-read the token file (or ask the shared state) now (SIGHUP); fires
        once the tokens are read."""
        if not self._inject:
            return succeed(None)
        if self._shared is not None:
            return self._shared.poll()
        self._load(trigger)
        return succeed(None)

    def stats(self) -> dict[str, Any]:
        """For ``/stats``: tokens known, denials and reloads since start (and,
        with shared state, requests refused or let through while Redis did not
        answer, and counts not yet added to Redis), and the spend of each token
        and project in the current period of its budget."""
        stats: dict[str, Any] = {
            "tokens": len(self._by_digest),
            "denied": self.denied,
            "reloads": self.reloads,
            "usage_write_errors": self._usage.write_errors,
        }
        if self._shared is not None:
            stats["unavailable"] = self.unavailable
            stats.update(self._shared.stats())
        if self.spend is not None:
            stats["spend"] = self.spend_stats(self._clock.seconds())
        return stats

    def spend_stats(self, now: float) -> dict[str, Any]:
        """Spend per token (in the current window of its period) and per project
        (this month, UTC)."""
        assert self.spend is not None
        by_token: dict[str, Any] = {}
        by_project: dict[str, dict[str, Any]] = {}
        for token in self._by_digest.values():
            usd, tokens = self.spend.spent(token.id, token.period, now)
            by_token[token.id] = {
                "project": token.project,
                "period": token.period,
                "usd": round(usd, 9),
                "tokens": tokens,
                "max_usd": token.max_usd,
                "max_tokens": token.max_tokens,
            }
            month_usd, month_tokens = self.spend.spent(token.id, "month", now)
            p = by_project.setdefault(token.project, {"usd": 0.0, "tokens": 0})
            p["usd"] = round(p["usd"] + month_usd, 9)
            p["tokens"] += month_tokens
        return {
            "tokens": by_token,
            "projects_this_month": by_project,
            "charged": self.spend.charged,
            "write_errors": self.spend.write_errors,
        }

    def _flush_failed(self, failure: Failure) -> None:
        log.failure("token usage flushing stopped", failure)

    # -- the request path -------------------------------------------------------

    def check(
        self, request: Request, target: Target, record: ExchangeRecord, refreshed: bool = False
    ) -> Allow | Deny | Deferred[Allow | Deny]:
        """``refreshed``: the shared token set was read again for this request."""
        route = target.settings
        if route is None:
            return _ALLOW_AS_IS
        rules = self._rules.get(route.name)
        if rules is not None:
            refused = rules.refusal(request.method, target.rest)
            if refused is not None:
                return self._deny(
                    request,
                    record,
                    403,
                    f"route {route.name} does not serve the {refused[0]} {refused[1]} "
                    f"(allowed_{refused[0]}s)",
                    action="access_denied",
                    reason="route_" + refused[0],
                )
        inject = self._inject.get(route.name)
        if inject is None:
            return rules.passthrough if rules is not None else _ALLOW_AS_IS
        now = self._clock.seconds()
        shared = self._shared
        if shared is None and (now >= self._next_stat or not self._loaded):
            self._next_stat = now + self._reload_interval
            if self._tokens.stamp() != self._stamp or not self._loaded:
                self._load("file_change")
        secret = presented_token(request)
        if secret is None:
            return self._deny(
                request,
                record,
                401,
                "a proxy token is required: send Authorization: Bearer <token> "
                "(or x-api-key: <token>)",
                action="auth_failed",
                reason="missing",
                headers=_WWW_AUTHENTICATE,
            )
        offline = shared is not None and not shared.current()
        if shared is not None and offline:
            if not shared.loaded and shared.starting():
                # The first read of the shared token set is under way: wait for it.
                return shared.first_load().addCallback(
                    lambda _: self.check(request, target, record)
                )
            if not shared.fail_open or (not shared.loaded and not self._file_fallback()):
                return self._unavailable(shared, "no current token set")
        digest = digest_of(secret) if len(secret) <= MAX_TOKEN_LENGTH else ""
        token = self._by_digest.get(digest)
        if token is None or not hmac.compare_digest(token.sha256, digest):
            if shared is not None and digest and not refreshed:
                # Perhaps created a moment ago: read the shared set (one short
                # round trip, shared by every request waiting for it) and look again.
                return shared.poll().addCallback(
                    lambda _: self.check(request, target, record, refreshed=True)
                )
            return self._deny(
                request,
                record,
                401,
                "invalid proxy token",
                action="auth_failed",
                reason="unknown",
                # The digest's public form, as token ids are: lets an operator
                # match repeated attempts, reveals nothing of what was sent.
                token_id=id_for(digest) if digest else "-",
                headers=_WWW_AUTHENTICATE,
            )
        # Attribution: the events and metrics say whose request this was, let through or not.
        record.token_id = token.id
        record.project = token.project
        state = token.state(now)
        if state != "active":
            return self._deny(
                request,
                record,
                401,
                f"proxy token {state}",
                action="auth_failed",
                reason=state,
                token=token,
                headers=_WWW_AUTHENTICATE,
            )
        if token.allowed_paths or token.allowed_methods:
            refused = _token_refusal(token, request.method, target.rest)
            if refused is not None:
                return self._deny(
                    request,
                    record,
                    403,
                    f"this proxy token may not use the {refused[0]} {refused[1]}",
                    action="access_denied",
                    reason="token_" + refused[0],
                    token=token,
                )
        if shared is not None:
            if offline:  # fail_open: pass on the token set last read, count later
                shared.state.health.failed("access", "admitted", "no current token set")
                shared.count_later(token.id)
                return self._allowed(route.name, inject, token)
            spend = self.spend
            if (
                spend is not None
                and spend.shared is not None
                and (token.max_usd is not None or token.max_tokens is not None)
            ):
                # Budgets first, against the counters every process adds to.
                return ensureDeferred(
                    self._shared_budget(
                        shared, spend, request, record, token, route.name, inject, now
                    )
                )
            return self._shared_admit(shared, request, record, token, route.name, inject, now)
        if self._usage.exhausted(token):
            return self._quota_spent(request, record, token)
        if self.spend is not None:
            refusal = self.spend.refusal(token, now)
            if refusal is not None:
                return self._budget_spent(
                    request, record, token, refusal.message(), refusal.retry_after(now)
                )
        if token.rpm is not None:
            wait = self._limiter.take(token.id, token.rpm, now)
            if wait > 0:
                return self._rate_limited(request, record, token, wait)
        self._usage.consume(token)
        return self._allowed(route.name, inject, token)

    def _allowed(self, route: str, inject: Allow, token: Token) -> Allow:
        # The project is the response cache's namespace: one Allow per route and project.
        key = (route, token.project)
        allow = self._by_project.get(key)
        if allow is None or allow.set_headers != inject.set_headers:
            allow = self._by_project[key] = attrs.evolve(inject, namespace=token.project)
        return allow

    def _quota_spent(self, request: Request, record: ExchangeRecord, token: Token) -> Deny:
        return self._deny(
            request,
            record,
            403,
            f"the request quota of this proxy token is spent ({token.max_requests} requests)",
            action="quota_exceeded",
            reason="quota",
            token=token,
        )

    def _rate_limited(
        self, request: Request, record: ExchangeRecord, token: Token, wait: float
    ) -> Deny:
        after = retry_after_seconds(wait)
        return self._deny(
            request,
            record,
            429,
            f"rate limit of this proxy token exceeded ({token.rpm} requests per "
            f"minute); retry after {after}s",
            action="rate_limited",
            reason="rpm",
            token=token,
            headers=((b"retry-after", b"%d" % after),),
        )

    async def _shared_budget(
        self,
        shared: SharedTokens,
        spend: SpendBook,
        request: Request,
        record: ExchangeRecord,
        token: Token,
        route: str,
        inject: Allow,
        now: float,
    ) -> Allow | Deny:
        """The token's budgets read from the shared counters (one round trip), then
        the shared admission.  While Redis does not answer, ``on_unavailable``
        decides as for quotas."""
        try:
            refusal = await spend.shared_refusal(token, now)
        except Exception as e:
            why = str(e) or type(e).__name__
            if not shared.fail_open:
                return self._unavailable(shared, why)
            shared.state.health.failed("access", "admitted", why)
            refusal = None
        if refusal is not None:
            shared.state.health.succeeded("access")
            return self._budget_spent(
                request, record, token, refusal.message(), refusal.retry_after(now)
            )
        decision = self._shared_admit(shared, request, record, token, route, inject, now)
        if isinstance(decision, Deferred):
            return await decision
        return decision

    def _shared_admit(
        self,
        shared: SharedTokens,
        request: Request,
        record: ExchangeRecord,
        token: Token,
        route: str,
        inject: Allow,
        now: float,
    ) -> Allow | Deny | Deferred[Allow | Deny]:
        """The shared quota and rate bucket decide (one round trip, or none for a
        token without limits)."""
        asked = shared.admit(token, now)
        if asked is None:
            return self._allowed(route, inject, token)

        def answered(admission: Admission) -> Allow | Deny:
            shared.state.health.succeeded("access")
            if admission.admitted:
                return self._allowed(route, inject, token)
            if admission.refused_by is not None:
                return self._quota_spent(request, record, token)
            return self._rate_limited(request, record, token, admission.retry_after)

        def unanswered(failure: Failure) -> Allow | Deny:
            why = failure.getErrorMessage()
            if shared.fail_open:
                shared.state.health.failed("access", "admitted", why)
                shared.count_later(token.id)
                return self._allowed(route, inject, token)
            return self._unavailable(shared, why)

        return asked.addCallbacks(answered, unanswered)

    def _unavailable(self, shared: SharedTokens, why: str) -> Deny:
        # Not audited: a line per request of an outage would flood the audit log;
        # the outage is logged once and counted.
        self.unavailable += 1
        shared.state.health.failed("access", "refused", why)
        return Deny(503, _STATE_UNAVAILABLE, _RETRY_SOON)

    def _file_fallback(self) -> bool:
        """``fail_open`` before Redis ever answered: the token file's set."""
        if not self._loaded:
            self._load("file_fallback")
        return bool(self._by_digest)

    def finished(self, record: ExchangeRecord) -> None:
        # Counting happens when a request is let through, whatever the upstream did.
        pass

    def charge(self, record: ExchangeRecord, event: Mapping[str, Any]) -> None:
        """The capture pump priced an answer (``event``, the response event): count
        it against its token's budgets."""
        if self.spend is None or record.token_id is None:
            return
        self.spend.charge(
            record.token_id,
            record.project or "-",
            event.get("model"),
            event.get("usage"),
            event.get("cost"),
            record.started_at + (record.ended_at or 0.0),
        )

    def _budget_spent(
        self,
        request: Request,
        record: ExchangeRecord,
        token: Token,
        message: str,
        retry_after: int | None,
    ) -> Deny:
        headers = () if retry_after is None else ((b"retry-after", b"%d" % retry_after),)
        deny = self._deny(
            request,
            record,
            429,
            message,
            action="budget_exceeded",
            reason="budget",
            token=token,
            headers=headers,
        )
        return attrs.evolve(deny, code="budget_exceeded")

    # -- helpers ----------------------------------------------------------------

    def _deny(
        self,
        request: Request,
        record: ExchangeRecord,
        status: int,
        message: str,
        *,
        action: str,
        reason: str,
        token: Token | None = None,
        token_id: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> Deny:
        self.denied += 1
        self._audit.write(
            action,
            request_id=record.request_id,
            client=client_address(request),
            route=record.route,
            method=record.method,
            path=record.path[:500],
            token_id=token.id if token is not None else token_id,
            project=token.project if token is not None else None,
            status=status,
            outcome="denied",
            reason=reason,
        )
        return Deny(status, message, headers)

    def _load(self, trigger: str) -> None:
        self._next_stat = self._clock.seconds() + self._reload_interval
        if not self._loaded:
            # Counts first, whoever loads first (start() or a request): a quota
            # must never start again from 0.
            self._usage.load()
            if self.spend is not None:
                self.spend.load()
        stamp = self._tokens.stamp()
        try:
            tokens = self._tokens.read()
        except TokenFileError as e:
            # Keep what we had: a bad edit must not open or close every door.
            log.warn("proxy tokens not reloaded, keeping the previous set: {err}", err=str(e))
            self._stamp = stamp
            self._loaded = True
            return
        first = not self._loaded
        self._by_digest = {t.sha256: t for t in tokens}
        self._limiter.forget_all_but({t.id for t in tokens})
        self._stamp = stamp
        self._loaded = True
        self.reloads += 1
        now = self._clock.seconds()
        active = sum(1 for t in tokens if t.state(now) == "active")
        if not first or trigger == "sighup":
            self._audit.write("tokens_reloaded", trigger=trigger, tokens=len(tokens), active=active)
        log.info(
            "proxy tokens loaded ({trigger}): {active} active of {n}",
            trigger=trigger,
            active=active,
            n=len(tokens),
        )

    def _take_tokens(self, tokens: tuple[Token, ...], trigger: str) -> None:
        """The shared token set changed (or was read for the first time)."""
        self._by_digest = {t.sha256: t for t in tokens}
        self._loaded = True
        self.reloads += 1
        now = self._clock.seconds()
        active = sum(1 for t in tokens if t.state(now) == "active")
        if trigger != "start":
            self._audit.write("tokens_reloaded", trigger=trigger, tokens=len(tokens), active=active)
        log.info(
            "proxy tokens loaded ({trigger}): {active} active of {n}",
            trigger=trigger,
            active=active,
            n=len(tokens),
        )


def build_access(
    settings: Settings,
    audit: Auditor,
    clock: IReactorTime,
    *,
    reload_interval: float = 1.0,
    flush_interval: float = 5.0,
    tokens_dir: Path | None = None,
    shared: SharedState | None = None,
) -> TokenAccess:
    """The access policy for ``settings``: call ``start()`` when the service
    starts and ``stop(timeout)`` after the last exchange of the drain.  The tokens
    are read from ``tokens_dir`` (default ``state_dir``: a worker reads the
    master's), the usage counts kept under ``state_dir``; with ``shared`` (``[state]
    store = redis``) both live in Redis, the files are only imported."""
    state_dir: Path = settings.server.state_dir
    usage_file = UsageFile.in_state_dir(state_dir)
    return TokenAccess(
        routes=settings.routes,
        tokens=TokenFile.in_state_dir(tokens_dir or state_dir),
        usage=UsageLedger(usage_file),
        spend=SpendBook(
            SpendFile.in_state_dir(state_dir),
            shared=shared.counters if shared is not None else None,
            max_rows=settings.state.spend_rows,
        ),
        audit=audit,
        clock=clock,
        reload_interval=reload_interval,
        flush_interval=flush_interval,
        shared=shared,
        usage_file=usage_file,
        fail_open=settings.state.on_unavailable == "fail_open",
        machine=machine_id(),
    )
