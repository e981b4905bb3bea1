"""Secrets never reach an event whole: headers, cookies, URLs, free text."""

from __future__ import annotations

import base64
import json
import re

from hypothesis import assume, given
from hypothesis import strategies as st

from llmproxy.capture.obfuscate import (
    HeaderObfuscator,
    is_secret_header,
    mask_body_keys,
    mask_cookie,
    mask_query,
    mask_secret,
    mask_set_cookie,
    mask_url,
    mask_userinfo,
    mask_values,
    obfuscate_headers,
    scrub_text,
)

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
KEY_100 = "sk-ant-api03-" + "Zx9" * 29  # 100 characters
# The test's own statement of what counts as public: a scheme word, a key prefix.
SCHEME_RE = re.compile(r"(?i)(?:bearer|basic|token)[ \t]+")


def longest_common_substring(a: str, b: str) -> int:
    best = 0
    previous = [0] * (len(b) + 1)
    for i in range(1, len(a) + 1):
        current = [0] * (len(b) + 1)
        for j in range(1, len(b) + 1):
            if a[i - 1] == b[j - 1]:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def revealed(secret: str, masked: str) -> int:
    """Longest run of the secret's characters in ``masked``, public prefixes aside."""
    scheme = SCHEME_RE.match(secret)
    if scheme is not None and masked.startswith(scheme.group(0)):
        secret, masked = secret[scheme.end() :], masked[scheme.end() :]
    for prefix in ("sk-ant-", "sk-proj-", "sk-"):
        if secret.startswith(prefix) and masked.startswith(prefix):
            secret, masked = secret[len(prefix) :], masked[len(prefix) :]
            break
    return longest_common_substring(secret, masked)


def test_bearer_key_keeps_scheme_key_prefix_and_last_four() -> None:
    key = "sk-proj-" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4"
    assert mask_secret(f"Bearer {key}") == f"Bearer sk-proj-****{key[-4:]}"


def test_anthropic_key_keeps_its_prefix() -> None:
    assert mask_secret(KEY_100) == "sk-ant-****" + KEY_100[-4:]


def test_a_100_character_key_shows_at_most_eight_of_its_characters() -> None:
    masked = mask_secret(KEY_100)
    assert revealed(KEY_100, masked) <= 8
    assert len(masked) <= len("sk-ant-") + 8


def test_a_jwt_shows_four_characters_at_most() -> None:
    masked = mask_secret(f"Bearer {JWT}")
    assert masked == "Bearer ****" + JWT[-4:]
    assert revealed(f"Bearer {JWT}", masked) <= 4
    # The Go llm-proxy's rule showed the whole header and payload segments.
    assert "eyJ" not in masked


def test_short_secret_shows_nothing_of_itself() -> None:
    assert mask_secret("sk-short1234") == "sk-****"
    assert mask_secret("Bearer abcdefghijklmno") == "Bearer ****"  # 15 chars
    assert mask_secret("hunter2") == "****"


def test_sixteen_characters_is_the_first_length_showing_a_tail() -> None:
    assert mask_secret("abcdefghijklmnop") == "****mnop"


def test_basic_credentials_keep_only_the_scheme_word_and_tail() -> None:
    value = "Basic " + base64.b64encode(b"alice:correct horse battery staple").decode()
    masked = mask_secret(value)
    assert masked.startswith("Basic ****")
    assert revealed(value, masked) <= 4


def test_scheme_word_case_is_kept() -> None:
    assert mask_secret("bearer " + "x" * 40).startswith("bearer ****")


def test_empty_value_stays_empty() -> None:
    assert mask_secret("   ") == ""


@given(st.text(min_size=16))
def test_any_secret_of_16_chars_or_more_never_shows_more_than_8(secret: str) -> None:
    masked = mask_secret(secret)
    if secret.strip():
        assert "****" in masked
    assert revealed(secret.strip(), masked) <= 8


@given(
    scheme=st.sampled_from(["", "Bearer ", "Basic ", "Token "]),
    prefix=st.sampled_from(["", "sk-", "sk-proj-", "sk-ant-"]),
    body=st.text(
        alphabet=st.characters(blacklist_categories=("Zs", "Cc", "Zl", "Zp")),
        min_size=16,
        max_size=300,
    ),
)
def test_structured_secrets_show_public_prefix_plus_last_four(
    scheme: str, prefix: str, body: str
) -> None:
    assume(not body.startswith("sk-"))
    masked = mask_secret(scheme + prefix + body)
    tail = masked[len(scheme) :]
    assert masked.startswith(scheme)
    # The key prefix is recognised, or (absent) nothing is taken for one.
    assert tail.endswith(body[-4:])
    assert len(masked) <= len(scheme) + len(prefix) + len("sk-proj-") + 8
    assert longest_common_substring(body, masked) <= 8


def test_cookie_keeps_names_and_masks_each_value() -> None:
    value = "session=abcdefghijklmnopqrstuvwxyz; theme=dark; csrftoken=0123456789abcdef0123"
    assert mask_cookie(value) == "session=****wxyz; theme=****; csrftoken=****0123"


def test_set_cookie_keeps_attributes() -> None:
    attributes = "; Path=/; Expires=Wed, 21 Oct 2026 07:28:00 GMT; HttpOnly"
    value = "sid=abcdefghijklmnopqrstuvwxyz012345" + attributes
    assert mask_set_cookie(value) == "sid=****2345" + attributes


def test_always_masked_headers_and_configured_ones() -> None:
    for name in ("Authorization", "x-api-key", "API-KEY", "Cookie", "set-cookie"):
        assert is_secret_header(name)
    assert is_secret_header("Proxy-Authorization")
    assert is_secret_header("x-goog-api-key")
    assert not is_secret_header("content-type")
    assert not is_secret_header("x-ratelimit-remaining-tokens")
    assert is_secret_header("X-Tenant-Secret", frozenset({"x-tenant-secret"}))
    assert not is_secret_header("x-custom")


def test_obfuscated_headers_are_lowercased_masked_and_joined() -> None:
    headers = [
        (b"Content-Type", b"application/json"),
        (b"Authorization", b"Bearer sk-proj-0123456789abcdefghijklmnop"),
        (b"X-Api-Key", b"sk-ant-api03-0123456789abcdefghijkl"),
        (b"Accept", b"text/html"),
        (b"Accept", b"application/json"),
        (b"Set-Cookie", b"a=0123456789abcdefghij; Path=/"),
        (b"Set-Cookie", b"b=1; Secure"),
        (b"X-Org-Token-Value", b"plain"),
        (b"X-Org-Tokens-Used", b"plain"),
        (b"X-Internal", b"topsecretvalue-0123456789"),
    ]
    result = obfuscate_headers(headers, ("X-Internal",))
    assert result == {
        "content-type": "application/json",
        "authorization": "Bearer sk-proj-****mnop",
        "x-api-key": "sk-ant-****ijkl",
        "accept": "text/html, application/json",
        "set-cookie": ["a=****ghij; Path=/", "b=****; Secure"],
        "x-org-token-value": "****",  # a "token" part: a credential, until shown otherwise
        "x-org-tokens-used": "plain",  # "tokens" counts them
        "x-internal": "****6789",
    }


def test_single_set_cookie_is_still_a_list() -> None:
    assert obfuscate_headers([(b"set-cookie", b"a=b")]) == {"set-cookie": ["a=****"]}


def test_split_cookie_headers_are_rejoined_with_semicolons() -> None:
    result = obfuscate_headers([(b"cookie", b"a=1"), (b"cookie", b"b=2")])
    assert result == {"cookie": "a=****; b=****"}


def test_non_utf8_header_values_do_not_fail() -> None:
    result = obfuscate_headers([(b"x-name", b"caf\xe9")])
    assert result == {"x-name": "café"}


def test_obfuscator_is_shared_per_redact_list() -> None:
    assert HeaderObfuscator.for_names(("A",)) is HeaderObfuscator.for_names(("A",))


def test_query_secrets_are_masked_other_parameters_kept() -> None:
    query = "key=AIzaSyA-0123456789abcdefghijklmnopqrs&alt=sse&api_key=short"
    assert mask_query(query) == "key=****pqrs&alt=sse&api_key=****"


def test_url_credentials_are_masked() -> None:
    url = "https://user:p4ssw0rd@example.com/v1/x?access_token=0123456789abcdefghij&q=1#frag"
    assert mask_url(url) == "https://user:****@example.com/v1/x?access_token=****ghij&q=1#frag"
    assert mask_url("https://api.openai.com/v1/chat") == "https://api.openai.com/v1/chat"


def test_free_text_keys_are_masked() -> None:
    key = "sk-proj-" + "Qw3rTy" * 8
    message = f"Incorrect API key provided: {key}. You can find your API key at https://x."
    scrubbed = scrub_text(message)
    assert key not in scrubbed
    assert "sk-proj-****" + key[-4:] in scrubbed
    assert scrubbed.endswith("You can find your API key at https://x.")


def test_free_text_bearer_jwt_and_assignments_are_masked() -> None:
    text = (
        f"sent Authorization: Bearer {JWT} and token {JWT} "
        'with {"api_key": "abcdefghijklmnopqrstuvwx"} password=hunter22'
    )
    scrubbed = scrub_text(text)
    assert JWT[:20] not in scrubbed
    assert "abcdefghijklmnop" not in scrubbed
    assert "hunter22" not in scrubbed
    plain = "maximum context length is 8192 tokens"
    assert scrub_text(plain) == plain


def test_a_query_name_is_decoded_before_it_is_judged() -> None:
    secret = "QkF9sT2vLw8xRz4nYp6m"
    assert mask_query(f"k%65y={secret}&x=1") == "k%65y=****Yp6m&x=1"
    assert mask_query(f"api%5Fkey={secret}") == "api%5Fkey=****Yp6m"
    assert mask_query(f"access+token={secret}") == "access+token=****Yp6m"
    assert mask_query("m%6Fdel=gpt-4o") == "m%6Fdel=gpt-4o"


def test_header_names_with_a_credential_part_are_secret() -> None:
    for name in ("X-Auth", "X-Custom-Credential", "x_session_token", "X-Signature", "X-Jwt"):
        assert is_secret_header(name), name
    for name in ("x-ratelimit-remaining-tokens", "anthropic-ratelimit-input-tokens-limit"):
        assert not is_secret_header(name), name
    assert obfuscate_headers([(b"X-Auth", b"QkF9sT2vLw8xRz4nYp6m")]) == {"x-auth": "****Yp6m"}


KEYS = ("api_key", "apiKey", "key", "secret", "password", "token", "access_token")


def test_body_keys_are_masked_at_any_depth_and_inside_encoded_json() -> None:
    arguments = json.dumps({"password": "hunter2-hunter2-hunter2", "city": "Oslo"})
    body = json.dumps(
        {
            "model": "gpt-4o",
            "api_key": "sk-live-QkF9sT2vLw8xRz4nYp6m",
            "metadata": {"apiKey": "short", "keyboard": "qwerty", "tokens": 12},
            "tool": {"arguments": arguments},
            "n": {"token": 12345},
        }
    )
    masked = mask_body_keys(body, KEYS)
    assert "QkF9sT2vLw8xRz4n" not in masked and "hunter2-hunter2-hun" not in masked
    assert '"short"' not in masked
    doc = json.loads(masked)
    assert doc["api_key"] == "sk-****Yp6m" and doc["metadata"]["apiKey"] == "****"
    assert doc["metadata"]["keyboard"] == "qwerty" and doc["metadata"]["tokens"] == 12
    assert json.loads(doc["tool"]["arguments"]) == {"password": "****ter2", "city": "Oslo"}
    assert doc["n"] == {"token": 12345}  # only string values are masked
    assert doc["model"] == "gpt-4o"


def test_a_body_cut_inside_a_secret_masks_what_is_there() -> None:
    cut = '{"model": "x", "secret": "QkF9sT2vLw8xRz4nYp6m-and-more'
    assert "QkF9sT2v" not in mask_body_keys(cut, KEYS)
    assert mask_body_keys('{"key": "a\\"b-QkF9sT2vLw8xRz4nYp6m"}', KEYS) == '{"key": "****Yp6m"}'


def test_no_body_keys_mask_nothing() -> None:
    body = '{"api_key": "QkF9sT2vLw8xRz4nYp6m"}'
    assert mask_body_keys(body, ()) == body


def test_userinfo_is_masked_in_paths_urls_and_messages() -> None:
    assert mask_userinfo("/openai/user:S3cr3tPa55@api.openai.com/v1") == (
        "/openai/****@api.openai.com/v1"
    )
    assert mask_userinfo("/openai/T0kenOnly@api.openai.com/") == "/openai/****@api.openai.com/"
    assert mask_userinfo("/v1/chat/completions") == "/v1/chat/completions"
    text = "upstream host 'u:S3cr3tPa55@api.openai.com' is not allowed"
    assert scrub_text(text) == "upstream host '****@api.openai.com' is not allowed"


def test_injected_values_are_masked_wherever_they_appear() -> None:
    key = "sk-proj-Q7vT9xKp2LmZ4rWb8NcY6hJd3FgS5aEu"
    text = f'{{"authorization": "Bearer {key}", "again": "{key}"}}'
    masked = mask_values(text, (key,))
    assert key[:20] not in masked and masked.count("sk-proj-****aEu") == 0
    assert masked.count("sk-proj-****5aEu") == 2
    assert mask_values("nothing here", (key,)) == "nothing here"
