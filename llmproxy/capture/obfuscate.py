"""Masking secrets in headers, URLs and free text (tests: tests/unit/capture/test_obfuscate.py).

The rule, everywhere: keep a short *public* prefix (an auth scheme word such as
``Bearer ``, then a key-format prefix such as ``sk-proj-``) and the last four
characters of the secret; everything else becomes ``****``.  A secret shorter than
16 characters (after the public prefix) shows none of itself.  So at most 4 (never
more than 8) characters of any secret reach an event, a log line or an error
message -- unlike the Go llm-proxy's rule, which leaks most of a JWT.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from urllib.parse import unquote_plus

import attrs

from llmproxy.capture.record import Headers

__all__ = [
    "ALWAYS_MASKED",
    "MASK",
    "HeaderObfuscator",
    "is_secret_header",
    "mask_cookie",
    "mask_query",
    "mask_secret",
    "mask_set_cookie",
    "mask_url",
    "obfuscate_headers",
    "scrub_text",
]

MASK = "****"
# Tail shown for long secrets; short ones (below _MIN_LEN_FOR_TAIL) show nothing.
_TAIL = 4
_MIN_LEN_FOR_TAIL = 16

ALWAYS_MASKED = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "cookie",
        "set-cookie",
    }
)
# Vendor headers that carry keys under other names (x-goog-api-key,
# x-auth-token, X-Auth, X-Custom-Credential, ...): masking a harmless header
# costs nothing, leaking a key does.  A name is split at "-" and "_"; any part
# in this set makes it secret ("tokens" is not: x-ratelimit-remaining-tokens).
_SECRET_NAME_SUFFIXES = ("api-key", "apikey", "-token", "-secret", "authorization")
_SECRET_NAME_PARTS = frozenset(
    {
        "auth",
        "authorization",
        "credential",
        "credentials",
        "secret",
        "password",
        "passwd",
        "pwd",
        "token",
        "apikey",
        "key",
        "signature",
        "sig",
        "cookie",
        "jwt",
    }
)
_NAME_PARTS_RE = re.compile(r"[-_.]")

_SCHEME_RE = re.compile(r"(?i)(?:bearer|basic|token)[ \t]+")
# Longest first: "sk-" is a prefix of the other two.
_KEY_PREFIXES = ("sk-ant-", "sk-proj-", "sk-")

_SECRET_QUERY_NAMES = frozenset({"key", "sig", "signature", "code", "pass", "pwd"})
_SECRET_QUERY_PARTS = ("key", "token", "secret", "password", "auth", "credential")

# Secret-looking tokens inside free text (upstream error messages, exceptions).
# Only words that rarely start ordinary prose: "token" and "key" alone would mask
# half of every "maximum context length is N tokens" message.
_TEXT_SECRET_RE = re.compile(
    r"(?i:\bbearer[ \t]+)[A-Za-z0-9._~+/=-]{4,}"
    r"|\bBasic[ \t]+[A-Za-z0-9+/=]{12,}"
    r"|\bsk-[A-Za-z0-9_*-]{4,}"
    r"|\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*)?"
    r"|\bAIza[A-Za-z0-9_-]{20,}"
)
_TEXT_ASSIGNMENT_RE = re.compile(
    r"(?i)\b((?:api[_-]?key|(?:access|refresh|auth)[_-]?token|(?:client[_-]?)?secret|password)"
    r"[\"']?\s*[=:]\s*[\"']?)"
    r"([^\s&\"',;}]{4,})"
)


def mask_secret(value: str) -> str:
    """Mask one secret value: public prefix + ``****`` + last 4 characters.

    Works on any string (a header value, a key found in an error message).
    Surrounding whitespace is dropped; an empty value stays empty.
    """
    value = value.strip()
    if not value:
        return ""
    prefix_len = 0
    scheme = _SCHEME_RE.match(value)
    if scheme is not None:
        prefix_len = scheme.end()
    for key_prefix in _KEY_PREFIXES:
        if value.startswith(key_prefix, prefix_len):
            prefix_len += len(key_prefix)
            break
    secret_len = len(value) - prefix_len
    if secret_len < _MIN_LEN_FOR_TAIL:
        return value[:prefix_len] + MASK
    return value[:prefix_len] + MASK + value[-_TAIL:]


def mask_cookie(value: str) -> str:
    """``Cookie``: keep every cookie name, mask every value."""
    out = []
    for part in value.split(";"):
        name, sep, cookie_value = part.partition("=")
        if sep:
            out.append(f"{name.strip()}={mask_secret(cookie_value)}")
        elif part.strip():
            # A nameless cookie is all value.
            out.append(mask_secret(part))
    return "; ".join(out)


def mask_set_cookie(value: str) -> str:
    """``Set-Cookie``: mask the cookie's value, keep its name and its attributes."""
    first, sep, attributes = value.partition(";")
    name, eq, cookie_value = first.partition("=")
    masked = f"{name.strip()}={mask_secret(cookie_value)}" if eq else mask_secret(first)
    return masked + sep + attributes


def mask_query(query: str) -> str:
    """Mask the values of query parameters whose names say they are credentials
    (a name is percent-decoded first: ``k%65y`` is ``key``)."""
    if not query:
        return query
    out = []
    for pair in query.split("&"):
        name, sep, value = pair.partition("=")
        name_said = unquote_plus(name) if "%" in name or "+" in name else name
        if sep and value and _is_secret_query_name(name_said):
            out.append(f"{name}={mask_secret(value)}")
        else:
            out.append(pair)
    return "&".join(out)


def mask_url(url: str) -> str:
    """Mask credentials in a URL: a userinfo password and secret query values."""
    if "?" not in url and "@" not in url:
        return url  # no query, no userinfo: nothing to mask (the usual case)
    base, qmark, rest = url.partition("?")
    query, hash_, fragment = rest.partition("#")
    scheme_end = base.find("://")
    if scheme_end >= 0:
        authority_end = base.find("/", scheme_end + 3)
        authority = base[scheme_end + 3 : authority_end if authority_end >= 0 else None]
        if "@" in authority:
            userinfo, _, host = authority.rpartition("@")
            user, colon, _password = userinfo.partition(":")
            masked_authority = f"{user}{colon}{MASK if colon else ''}@{host}"
            base = base.replace(authority, masked_authority, 1)
    return base + qmark + mask_query(query) + hash_ + fragment


def scrub_text(text: str) -> str:
    """Mask anything in free text that looks like a credential.

    For error messages and upstream error bodies, which may quote the key that
    failed (OpenAI's "Incorrect API key provided: sk-proj-..."), and a URL's or
    path's userinfo (``user:SECRET@host``).
    """
    text = _TEXT_SECRET_RE.sub(lambda m: mask_secret(m.group(0)), text)
    text = _TEXT_ASSIGNMENT_RE.sub(lambda m: m.group(1) + mask_secret(m.group(2)), text)
    return mask_userinfo(text)


# A userinfo (RFC 3986: unreserved, pct-encoded, sub-delims but the quote, ':')
# right before '@' and a host: in a URL, in a passthrough path
# (/openai/user:SECRET@api.openai.com/...), in a message quoting either.
_USERINFO_RE = re.compile(r"[A-Za-z0-9._~!$&()*+,;=:%-]+@(?=[A-Za-z0-9\[])")


def mask_userinfo(text: str) -> str:
    """Every ``userinfo@`` in ``text`` (a path, a URL, a message) as ``****@``."""
    if "@" not in text:
        return text
    return _USERINFO_RE.sub(MASK + "@", text)


@functools.lru_cache(maxsize=16)
def _body_keys_re(keys: tuple[str, ...]) -> re.Pattern[str] | None:
    names = sorted({k for k in keys if k}, key=len, reverse=True)
    if not names:
        return None
    alternatives = "|".join(re.escape(k) for k in names)
    # "key": "value" in JSON (the value to its closing quote, escapes included,
    # or to the end of a body cut short), and \"key\": \"value\" in JSON inside a
    # JSON string (tool-call arguments; the value to its first backslash).
    return re.compile(
        r'"(?:' + alternatives + r')"\s*:\s*"(?P<plain>(?:[^"\\]|\\.)*)'
        r'|\\"(?:' + alternatives + r')\\"\s*:\s*\\"(?P<nested>[^"\\]*)'
    )


def _mask_value(match: re.Match[str]) -> str:
    group = "plain" if match.group("plain") is not None else "nested"
    start, end = match.span(group)
    whole, offset = match.group(0), match.start()
    return whole[: start - offset] + mask_secret(match.group(group)) + whole[end - offset :]


def mask_body_keys(text: str, keys: tuple[str, ...]) -> str:
    """``text`` (JSON, or JSON cut short) with the string values of ``keys`` masked,
    at any depth and inside JSON-encoded strings."""
    pattern = _body_keys_re(keys)
    if pattern is None or '"' not in text:
        return text
    return pattern.sub(_mask_value, text)


def mask_values(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each of ``secrets`` masked (the provider
    key the proxy injected, echoed by an upstream)."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, mask_secret(secret))
    return text


def _is_secret_query_name(name: str) -> bool:
    low = name.lower()
    return low in _SECRET_QUERY_NAMES or any(part in low for part in _SECRET_QUERY_PARTS)


def is_secret_header(name: str, extra: frozenset[str] = frozenset()) -> bool:
    """Whether header ``name`` (any case) carries a secret."""
    low = name.lower()
    return (
        low in ALWAYS_MASKED
        or low in extra
        or low.endswith(_SECRET_NAME_SUFFIXES)
        or not _SECRET_NAME_PARTS.isdisjoint(_NAME_PARTS_RE.split(low))
    )


# What ``HeaderObfuscator`` does with a header, decided once per raw name.
_PLAIN = 0
_SECRET = 1
_COOKIE = 2
_SET_COOKIE = 3
# Distinct raw header names remembered per obfuscator: the usual ones (a few
# dozen spellings) are all remembered; a client inventing names is not a leak.
_MAX_REMEMBERED_NAMES = 1024


@attrs.frozen
class HeaderObfuscator:
    """Turns raw header pairs into the event form: lower-cased name -> masked value.

    Repeated headers are joined with ``", "`` (RFC 9110 5.3), except
    ``set-cookie``, which cannot be joined and is always a list.
    """

    _extra: frozenset[str] = frozenset()
    # raw name -> (event name, what to do): the decision costs a decode, a
    # lower() and several suffix checks; the lookup one dict access.
    _decisions: dict[bytes, tuple[str, int]] = attrs.field(
        factory=dict, init=False, eq=False, hash=False, repr=False
    )

    @classmethod
    def for_names(cls, redact_headers: Iterable[str]) -> HeaderObfuscator:
        return _obfuscator_for(tuple(redact_headers))

    def _decide(self, raw_name: bytes) -> tuple[str, int]:
        name = raw_name.decode("latin-1").lower()
        if name == "set-cookie":
            kind = _SET_COOKIE
        elif not is_secret_header(name, self._extra):
            kind = _PLAIN
        else:
            kind = _COOKIE if name == "cookie" else _SECRET
        decision = (name, kind)
        if len(self._decisions) < _MAX_REMEMBERED_NAMES:
            self._decisions[raw_name] = decision
        return decision

    def obfuscate(self, headers: Headers) -> dict[str, str | list[str]]:
        result: dict[str, str | list[str]] = {}
        decisions = self._decisions
        for raw_name, raw_value in headers:
            decision = decisions.get(raw_name)
            name, kind = self._decide(raw_name) if decision is None else decision
            try:
                value = raw_value.decode()  # UTF-8; no codec name to look up
            except UnicodeDecodeError:
                # HTTP field values are historically ISO-8859-1; latin-1 never fails.
                value = raw_value.decode("latin-1")
            if kind:
                if kind == _SET_COOKIE:
                    cookies = result.setdefault(name, [])
                    assert isinstance(cookies, list)
                    cookies.append(mask_set_cookie(value))
                    continue
                value = mask_cookie(value) if kind == _COOKIE else mask_secret(value)
            if name not in result:
                result[name] = value
            else:
                previous = result[name]
                # Split Cookie fields are rejoined with "; " (RFC 9113 8.2.3).
                result[name] = f"{previous}{'; ' if kind == _COOKIE else ', '}{value}"
        return result


@functools.lru_cache(maxsize=16)
def _obfuscator_for(names: tuple[str, ...]) -> HeaderObfuscator:
    return HeaderObfuscator(frozenset(n.strip().lower() for n in names if n.strip()))


def obfuscate_headers(
    headers: Headers, redact_headers: Iterable[str] = ()
) -> dict[str, str | list[str]]:
    """Shorthand for ``HeaderObfuscator.for_names(redact_headers).obfuscate(headers)``."""
    return HeaderObfuscator.for_names(redact_headers).obfuscate(headers)
