"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

from __future__ import annotations

import re

import msgspec

from armature.frontend.openai import ErrorBody, ErrorResponse, json_encoder

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error answered to the client as-is; raising it never takes the server down."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code if code is not None else status

    @property
    def type(self) -> str:
        return _TYPE_BY_STATUS.get(self.status, "invalid_request_error")

    def body(self) -> bytes:
        return json_encoder.encode(ErrorResponse(ErrorBody(self.message, self.type, self.param, self.code)))


_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


def from_decode_error(exc: msgspec.DecodeError) -> ApiError:
    """Turn msgspec's message into an error that names the offending field."""
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        m = _PATH.search(text)
        param = m.group(1) if m and m.group(1) else None
        message = _PATH.sub("", text)
        if param:
            message = f"{message} at '{param}'"
        return ApiError(400, f"Invalid request: {message}", param=param, code="invalid_value")
    return ApiError(400, f"Malformed JSON body: {text}", code="invalid_json")
