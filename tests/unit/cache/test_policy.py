"""The response cache's rules: what is looked up, what is stored, for how long,
under which key; conditional requests; the entry's byte form; the purge command's
address."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from llmproxy.cache.entry import CachedResponse
from llmproxy.cache.policy import (
    Namespace,
    cache_key,
    judge_response,
    namespace_for,
    not_modified,
    parse_cache_control,
    plan_request,
    sorted_query,
)
from llmproxy.cli.cache import admin_url_for, split_endpoint


def _h(**values: str) -> Headers:
    return Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in values.items()})


def _plan(method: bytes = b"GET", route_on: bool = False, size: int = 0, **headers: str) -> str:
    p = plan_request(method, _h(**headers), route_on=route_on, body_size=size, max_object_bytes=100)
    return f"{p.action}:{p.fwd}:{p.detail}"


# -- Cache-Control --------------------------------------------------------------------------


def test_cache_control_directives_are_lower_cased_with_unquoted_arguments() -> None:
    cc = parse_cache_control([b'Public, MAX-AGE="60"', b"no-cache,s-maxage=5"])
    assert cc == {"public": "", "max-age": "60", "no-cache": "", "s-maxage": "5"}


# -- requests --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_get_and_head_are_looked_up(method: bytes) -> None:
    assert _plan(method) == "lookup::"


def test_post_is_a_bypass_without_an_opt_in() -> None:
    assert _plan(b"POST") == "bypass:method:method"
    assert _plan(b"POST", cache_control="public") == "bypass:method:method"
    assert _plan(b"POST", cache_control="max-age=60") == "bypass:method:method"


def test_post_is_looked_up_on_the_clients_opt_in_with_its_ttl() -> None:
    p = plan_request(
        b"POST",
        _h(cache_control="public, s-maxage=30, max-age=60"),
        route_on=False,
        body_size=10,
        max_object_bytes=100,
    )
    assert (p.action, p.ttl_hint) == ("lookup", 30.0)


def test_post_is_looked_up_on_a_route_with_cache_on() -> None:
    assert _plan(b"POST", route_on=True) == "lookup::"
    assert _plan(b"PUT", route_on=True) == "bypass:method:method"
    assert _plan(b"DELETE") == "bypass:method:method"


@pytest.mark.parametrize(
    ("headers", "size", "expected"),
    [
        ({"cache_control": "no-store"}, 0, "bypass:bypass:no-store"),
        ({"range": "bytes=0-10"}, 0, "bypass:bypass:range"),
        ({}, 101, "bypass:bypass:body-too-large"),
        ({"cache_control": "no-cache"}, 0, "revalidate:request:no-cache"),
        ({"pragma": "no-cache"}, 0, "revalidate:request:no-cache"),
        ({"cache_control": "max-age=0"}, 0, "revalidate:request:no-cache"),
        ({"cache_control": "max-age=10", "pragma": "no-cache"}, 0, "lookup::"),
    ],
)
def test_client_directives_and_limits(headers: dict[str, str], size: int, expected: str) -> None:
    assert _plan(size=size, **headers) == expected


def test_a_client_max_age_limits_the_age_it_accepts() -> None:
    p = plan_request(
        b"GET", _h(cache_control="max-age=10"), route_on=False, body_size=0, max_object_bytes=1
    )
    assert (p.action, p.max_age) == ("lookup", 10.0)


# -- responses --------------------------------------------------------------------------------


def _judge(status: int = 200, length: int | None = None, **headers: str) -> tuple[float, str]:
    raw = [(k.replace("_", "-").title().encode(), [v.encode()]) for k, v in headers.items()]
    j = judge_response(status, raw, length=length, max_object_bytes=1000, fallback_ttl=300)
    return j.ttl, j.detail


def test_ttl_is_s_maxage_then_max_age_then_the_fallback() -> None:
    assert _judge(cache_control="max-age=60, s-maxage=30") == (30, "")
    assert _judge(cache_control="max-age=60") == (60, "")
    assert _judge() == (300, "")
    assert _judge(cache_control="max-age=oops") == (300, "")


def test_the_upstreams_age_is_taken_off_the_ttl() -> None:
    assert _judge(cache_control="max-age=60", age="45") == (15, "")
    assert _judge(cache_control="max-age=60", age="60") == (0, "stale")


@pytest.mark.parametrize(
    ("status", "headers", "detail"),
    [
        (500, {}, "status"),
        (404, {}, "status"),
        (304, {}, "status"),
        (206, {}, "status"),
        (200, {"cache_control": "no-store"}, "no-store"),
        (200, {"cache_control": "private"}, "private"),
        (200, {"cache_control": 'private="set-cookie", max-age=60'}, "private"),
        (200, {"vary": "Accept, *"}, "vary"),
        (200, {"cache_control": "max-age=0"}, "stale"),
    ],
)
def test_responses_never_stored(status: int, headers: dict[str, str], detail: str) -> None:
    assert _judge(status, **headers) == (0, detail)


def test_a_response_over_max_object_bytes_is_refused_from_its_length() -> None:
    assert _judge(length=1001) == (0, "too-large")
    assert _judge(length=1000) == (300, "")


def test_no_cache_on_a_response_does_not_stop_storing() -> None:
    assert _judge(cache_control="no-cache") == (300, "")


def test_vary_names_are_collected_lower_case_once() -> None:
    raw = [(b"Vary", [b"X-A, Accept"]), (b"vary", [b"x-a"])]
    j = judge_response(200, raw, length=None, max_object_bytes=10, fallback_ttl=1)
    assert j.vary == (b"x-a", b"accept")


# -- keys ------------------------------------------------------------------------------------


def _key(
    headers: Headers | None = None,
    project: str = "",
    *,
    route: str = "r",
    method: bytes = b"GET",
    query: bytes = b"",
    body: bytes = b"",
    upstream: bytes = b"https://api.openai.com/v1/models",
) -> str:
    headers = headers or Headers()
    return cache_key(
        route=route,
        upstream=upstream,
        method=method,
        query=query,
        body=body,
        headers=headers,
        namespace=namespace_for(project, headers),
    )


def test_the_key_reads_route_namespace_method_digest() -> None:
    route, ns, method, digest = _key(project="billing").split("/")
    assert (route, ns, method) == ("r", "p-billing", "GET")
    assert len(digest) == 64 and int(digest, 16) >= 0


def test_project_names_are_escaped_in_the_key() -> None:
    assert _key(project="team/a b").split("/")[1] == "p-team%2Fa%20b"


def test_every_input_changes_the_key() -> None:
    base = _key()
    others = [
        _key(route="s"),
        _key(method=b"HEAD"),
        _key(query=b"a=1"),
        _key(body=b"{}"),
        _key(upstream=b"https://api.openai.com/v1/files"),
        _key(_h(accept="text/plain")),
        _key(_h(accept_encoding="gzip")),
        _key(_h(accept_language="de")),
        _key(_h(anthropic_version="2023-06-01")),
        _key(_h(openai_organization="org-1")),
        _key(_h(authorization="Bearer x")),
        _key(project="p"),
    ]
    assert len({base, *others}) == len(others) + 1


def test_query_order_does_not_change_the_key() -> None:
    assert sorted_query(b"b=2&a=1&&c") == b"a=1&b=2&c"
    assert _key(query=b"b=2&a=1") == _key(query=b"a=1&b=2")


def test_the_same_secret_in_another_header_is_another_namespace() -> None:
    a = namespace_for("", _h(authorization="Bearer sk-1"))
    b = namespace_for("", _h(x_api_key="Bearer sk-1"))
    assert a != b


def test_a_cookie_counts_only_without_a_key() -> None:
    with_key = namespace_for("", _h(authorization="Bearer sk-1", cookie="lb=1"))
    assert with_key == namespace_for("", _h(authorization="Bearer sk-1", cookie="lb=2"))
    assert namespace_for("", _h(cookie="s=1")) != namespace_for("", _h(cookie="s=2"))
    assert namespace_for("", Headers()) == Namespace("anon", b"anon")


def test_a_project_wins_over_the_clients_credentials() -> None:
    assert namespace_for("p", _h(authorization="Bearer a")) == namespace_for(
        "p", _h(authorization="Bearer b")
    )


_secret = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=8, max_size=60)


@given(_secret, _secret)
def test_two_credentials_never_share_a_key_and_neither_appears_in_it(a: str, b: str) -> None:
    ka = _key(_h(authorization=f"Bearer {a}"))
    kb = _key(_h(authorization=f"Bearer {b}"))
    assert (ka == kb) == (a == b)
    assert a not in ka and b not in kb


# -- conditional requests ----------------------------------------------------------------------


LM = 784887151.0  # Tue, 15 Nov 1994 08:12:31 GMT


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"if_none_match": '"v1"'}, True),
        ({"if_none_match": 'W/"v1"'}, True),
        ({"if_none_match": '"v0", W/"v1"'}, True),
        ({"if_none_match": "*"}, True),
        ({"if_none_match": '"v2"'}, False),
        ({"if_modified_since": "Tue, 15 Nov 1994 08:12:31 GMT"}, True),
        ({"if_modified_since": "Wed, 16 Nov 1994 00:00:00 GMT"}, True),
        ({"if_modified_since": "Mon, 14 Nov 1994 00:00:00 GMT"}, False),
        ({"if_modified_since": "yesterday"}, False),
        # If-None-Match wins over If-Modified-Since.
        ({"if_none_match": '"v2"', "if_modified_since": "Wed, 16 Nov 1994 00:00:00 GMT"}, False),
        ({}, False),
    ],
)
def test_not_modified(headers: dict[str, str], expected: bool) -> None:
    assert not_modified(_h(**headers), b'"v1"', LM, stored_at=LM + 1e6) is expected


def test_without_last_modified_the_storage_time_counts() -> None:
    since = _h(if_modified_since="Wed, 16 Nov 1994 00:00:00 GMT")
    assert not_modified(since, None, None, stored_at=LM)
    assert not not_modified(since, None, None, stored_at=LM + 1e6)


def test_no_etag_never_matches_a_tag() -> None:
    assert not not_modified(_h(if_none_match='"v1"'), None, None, stored_at=0)


# -- the entry's byte form ------------------------------------------------------------------


_pairs = st.lists(
    st.tuples(st.binary(min_size=1, max_size=20), st.binary(max_size=40)), max_size=6
).map(tuple)


@given(
    status=st.integers(100, 599),
    headers=_pairs,
    chunks=st.lists(st.binary(max_size=300), max_size=8).map(tuple),
    stored=st.floats(0, 2e9),
    ttl=st.floats(0, 1e6),
    age=st.floats(0, 1e4),
    vary=_pairs,
)
def test_an_entry_survives_its_byte_form(
    status: int,
    headers: tuple[tuple[bytes, bytes], ...],
    chunks: tuple[bytes, ...],
    stored: float,
    ttl: float,
    age: float,
    vary: tuple[tuple[bytes, bytes], ...],
) -> None:
    entry = CachedResponse(status, headers, chunks, stored, stored + ttl, age, vary)
    assert CachedResponse.decode(entry.encode()) == entry


_magic = st.tuples(st.integers(0, 300), st.binary(max_size=200)).map(
    lambda t: b"LPC1" + t[0].to_bytes(4, "big") + t[1]
)
_json_head = st.binary(max_size=50).map(lambda b: b'LPC1\x00\x00\x00\x0b{"s": 200}' + b)


@given(st.one_of(st.binary(max_size=200), _magic, _json_head))
def test_garbage_is_refused_with_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        CachedResponse.decode(data)


def test_a_cut_entry_is_refused() -> None:
    data = CachedResponse(200, (), (b"hello",), 0, 1).encode()
    with pytest.raises(ValueError, match="length"):
        CachedResponse.decode(data[:-1])


# -- llmproxy cache purge: where the admin listens ----------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("tcp:9090:interface=127.0.0.1", "http://127.0.0.1:9090"),
        ("tcp:port=9091", "http://127.0.0.1:9091"),
        ("tcp:9090:interface=0.0.0.0", "http://127.0.0.1:9090"),
        (r"tcp6:9090:interface=\:\:1", "http://[::1]:9090"),
        (r"tcp6:9090:interface=\:\:", "http://[::1]:9090"),
        ("unix:/run/llmproxy/admin.sock", "unix:/run/llmproxy/admin.sock"),
        ("unix:address=/tmp/a.sock:mode=600", "unix:/tmp/a.sock"),
    ],
)
def test_the_admin_url_comes_from_admin_listen(endpoint: str, url: str) -> None:
    assert admin_url_for(endpoint) == url


@pytest.mark.parametrize("endpoint", ["tcp:0", "systemd:domain=INET:index=1", "ssl:443"])
def test_an_admin_listen_that_cannot_be_reached_asks_for_admin_url(endpoint: str) -> None:
    with pytest.raises(ValueError, match="--admin-url"):
        admin_url_for(endpoint)


def test_escaped_colons_stay_in_their_field() -> None:
    assert split_endpoint(r"tcp6:80:interface=\:\:1") == ["tcp6", "80", "interface=::1"]
