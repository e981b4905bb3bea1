"""Helpers shared by the HTTP sinks, and :class:`BearerSink`, the base of those
that send an API key as a bearer token (tests: tests/unit/export/sinks/test_lunary.py,
tests/unit/export/sinks/test_helicone.py, tests/unit/export/sinks/test_otlp.py)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, Generic, Protocol, Self, TypeVar, overload

import attrs
import orjson
from twisted.internet.interfaces import IReactorTime

from llmproxy.config.model import ExporterSettings
from llmproxy.export.sink import HTTPSink
from llmproxy.interfaces import HTTPClient

__all__ = [
    "BearerSink",
    "P",
    "PlannedBatch",
    "bearer_headers",
    "exchange_ns",
    "json_default",
    "message_of",
    "nonempty_str",
    "parse_ns",
    "request_json",
    "secrets_to_mask",
    "user_of",
]


class _HasSource(Protocol):
    @property
    def source(self) -> Sequence[dict[str, Any]]: ...


P = TypeVar("P", bound=_HasSource)


class PlannedBatch(Sequence[dict[str, Any]], Generic[P]):
    """The batch handed to ``HTTPSink.deliver``, carrying its encoding along, so
    the bodies are built once (``encode`` finds the plan instead of redoing it)."""

    def __init__(self, plan: P) -> None:
        self.plan = plan

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | Sequence[dict[str, Any]]:
        return self.plan.source[index]

    def __len__(self) -> int:
        return len(self.plan.source)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.plan.source)


def request_json(event: dict[str, Any]) -> dict[str, Any] | None:
    """The captured request body as a JSON object, else None."""
    body = event.get("request_body")
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text.lstrip().startswith("{"):
        return None
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None  # cut at the capture cap
    return obj if isinstance(obj, dict) else None


def user_of(request: dict[str, Any] | None) -> str | None:
    """Who the client said the request is for: OpenAI's ``user``, or Anthropic's
    ``metadata.user_id``."""
    if request is None:
        return None
    user = request.get("user")
    if isinstance(user, str) and user:
        return user
    metadata = request.get("metadata")
    if isinstance(metadata, dict):
        user = metadata.get("user_id")
        if isinstance(user, str) and user:
            return user
    return None


def message_of(text: str, keys: tuple[str, ...] = ("message", "error")) -> str:
    """The human part of an error body: OpenAI's/Anthropic's ``error.message``,
    else the first string among ``keys``, else the text itself."""
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    if isinstance(doc, dict):
        error = doc.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        for key in keys:
            if isinstance(doc.get(key), str):
                return str(doc[key])
    return text


def nonempty_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def json_default(value: Any) -> Any:
    """Last resort for a value that is not JSON-ready (a contract breach upstream):
    send its text rather than fail the whole batch."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


# -- time ------------------------------------------------------------------------------

_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9})\d*)?([Zz]|[+-]\d{2}:\d{2})\Z"
)


def parse_ns(text: Any) -> int | None:
    """An RFC 3339 timestamp in epoch ns, else None."""
    if not isinstance(text, str):
        return None
    match = _RFC3339.match(text)
    if match is None:
        return None
    day, clock, fraction, zone = match.groups()
    try:
        whole = datetime.fromisoformat(f"{day}T{clock}{'+00:00' if zone in 'Zz' else zone}")
    except ValueError:
        return None
    return int(whole.timestamp()) * 1_000_000_000 + int((fraction or "").ljust(9, "0"))


def exchange_ns(event: dict[str, Any]) -> tuple[int, int]:
    """The exchange's start and end in epoch ns (end never before start: Helicone
    refuses a log whose start is after its end)."""
    ts = event.get("ts_ns")
    fallback = ts if isinstance(ts, int) and not isinstance(ts, bool) else None
    start = parse_ns(event.get("start"))
    end = parse_ns(event.get("end"))
    if end is None:
        end = fallback if fallback is not None else start
    if start is None:
        start = end
    if start is None or end is None:
        raise ValueError("no timestamps")
    return start, max(start, end)


def bearer_headers(api_key: str, extra: Sequence[tuple[str, str]]) -> dict[str, str]:
    """JSON content type, the configured extra headers, then the bearer key (which wins)."""
    headers = {"Content-Type": "application/json"}
    headers.update(extra)
    headers["Authorization"] = f"Bearer {api_key}"
    return headers


def secrets_to_mask(
    credentials: Iterable[str], extra: Sequence[tuple[str, str]]
) -> tuple[str, ...]:
    """What a sink masks in its verdict reasons, longest first.

    Header values may be credentials too (a gateway token); short ones are not
    worth masking and would garble reasons."""
    found = {*credentials, *(v for _, v in extra if len(v) >= 8)}
    return tuple(sorted((s for s in found if len(s) >= 4), key=len, reverse=True))


@attrs.define(kw_only=True)
class BearerSink(HTTPSink):
    """An HTTP sink that sends its ``api_key`` as a bearer token, with the
    section's extra ``headers``, and masks both in its verdict reasons."""

    _api_key: str = attrs.field(repr=False)
    _extra_headers: tuple[tuple[str, str], ...] = attrs.field(default=(), repr=False)
    _headers: dict[str, str] = attrs.field(factory=dict, init=False, repr=False)
    _secrets: tuple[str, ...] = attrs.field(default=(), init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._headers = bearer_headers(self._api_key, self._extra_headers)
        self._secrets = secrets_to_mask((self._api_key,), self._extra_headers)

    @classmethod
    def keyed(
        cls, settings: ExporterSettings, url: str, client: HTTPClient, clock: IReactorTime
    ) -> Self:
        """The sink of ``[exporter:NAME]`` posting to ``url`` (checked) with the
        section's ``api_key`` (checked) and ``headers``."""
        return cls.configured(
            settings,
            url,
            client,
            clock,
            api_key=settings.api_key,
            extra_headers=tuple(settings.headers),
        )
