"""Errors the proxy itself answers, in the OpenAI error shape
(tests: tests/unit/http/test_router.py).

``{"error": {"message": ..., "type": ..., "code": ...}}`` so that OpenAI and
Anthropic SDKs show the message instead of a parse error.
"""

from __future__ import annotations

import orjson

__all__ = ["error_body"]

_TYPES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_proxy_token"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limited"),
    431: ("invalid_request_error", "request_header_fields_too_large"),
    502: ("upstream_error", "bad_gateway"),
    503: ("service_unavailable", "unavailable"),
    504: ("timeout_error", "gateway_timeout"),
}


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    etype, default_code = _TYPES.get(status, ("api_error", "error"))
    return orjson.dumps(
        {"error": {"message": message, "type": etype, "code": code or default_code}}
    )
