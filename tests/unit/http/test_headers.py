"""Hop-by-hop filtering and the Date header cache (llmproxy/http/headers.py)."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st
from twisted.web.http import datetimeToString

from llmproxy.http.headers import (
    _NOT_FORWARDED_DOWN,
    _NOT_FORWARDED_UP,
    HttpDate,
    filter_headers,
    upstream_request_headers,
)

Raw = list[tuple[bytes, Sequence[bytes]]]


def _reference_filter(raw: Raw, upstream: bool) -> Raw:
    """The straightforward form filter_headers must agree with."""
    drop = _NOT_FORWARDED_UP if upstream else _NOT_FORWARDED_DOWN
    named = {
        t.strip().lower()
        for name, values in raw
        if name.lower() == b"connection"
        for v in values
        for t in v.split(b",")
        if t.strip()
    }
    return [(n, v) for n, v in raw if n.lower() not in drop and n.lower() not in named]


_NAMES = st.sampled_from(
    [
        b"Connection",
        b"connection",
        b"Keep-Alive",
        b"TE",
        b"Transfer-Encoding",
        b"Host",
        b"Content-Length",
        b"X-Request-ID",
        b"Date",
        b"Server",
        b"Content-Type",
        b"X-Private",
        b"x-private",
        b"Authorization",
        b"Upgrade",
    ]
)
_VALUES = st.lists(
    st.sampled_from(
        [
            b"keep-alive",
            b"close",
            b"X-Private",
            b" x-private , Content-Type",
            b"authorization,,",
            b"",
            b"application/json",
            b"upgrade, te",
        ]
    ),
    min_size=1,
    max_size=3,
)
_RAW = st.lists(st.tuples(_NAMES, _VALUES), max_size=8)


@given(_RAW, st.booleans())
def test_filter_headers_drops_hop_by_hop_and_connection_named_fields(
    raw: Raw, upstream: bool
) -> None:
    assert filter_headers(raw, upstream) == _reference_filter(raw, upstream)


@given(_RAW, st.frozensets(st.sampled_from([b"authorization", b"content-type", b"x-other"])))
def test_upstream_request_headers_is_the_filter_less_drop_one_pair_per_value(
    raw: Raw, drop: frozenset[bytes]
) -> None:
    expected = [
        (n, v) for n, vs in _reference_filter(raw, True) if n.lower() not in drop for v in vs
    ]
    assert upstream_request_headers(raw, drop) == expected


def test_connection_naming_an_earlier_field_drops_it() -> None:
    raw: Raw = [(b"X-Private", [b"1"]), (b"X-Kept", [b"2"]), (b"Connection", [b"x-private"])]
    assert filter_headers(raw, upstream=True) == [(b"X-Kept", [b"2"])]
    assert filter_headers(raw, upstream=False) == [(b"X-Kept", [b"2"])]


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.now


def test_date_header_is_twisteds_text_for_the_current_second() -> None:
    clock = _Clock(1_795_000_000.25)
    date = HttpDate(clock)
    assert date() == datetimeToString(1_795_000_000)
    assert date() == b"Wed, 18 Nov 2026 11:06:40 GMT" == datetimeToString(1_795_000_000.99)


def test_date_header_changes_when_the_second_does() -> None:
    clock = _Clock(1_795_000_000.0)
    date = HttpDate(clock)
    first = date()
    clock.now = 1_795_000_000.999
    assert date() is first  # same second: the cached value
    clock.now = 1_795_000_001.0
    assert date() == datetimeToString(1_795_000_001) != first
    clock.now = 1_795_003_600.5  # an hour on
    assert date() == datetimeToString(1_795_003_600)
    assert clock.calls == 4  # the clock is read every time


def test_default_date_header_is_now() -> None:
    import time

    before = datetimeToString(int(time.time()))
    value = HttpDate()()
    after = datetimeToString(int(time.time()))
    assert value in (before, after)
