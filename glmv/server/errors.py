"""Errors as OpenAI returns them: {"error": {"message", "type", "param", "code"}} + a status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi.responses import JSONResponse

from glmv.errors import GlmvError

logger = logging.getLogger(__name__)

#: OpenAI's error type per HTTP status.
_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
    422: "invalid_request_error", 429: "rate_limit_error", 500: "internal_server_error",
    503: "service_unavailable",
}


class HTTPError(GlmvError):
    """An error the server itself raises with an explicit status (unknown model, bad key)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.http_status = status
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def from_exception(exc: BaseException) -> tuple[int, str, str | None]:
    """(status, message, param) of any exception reaching a request."""
    if isinstance(exc, GlmvError):
        return exc.http_status, str(exc), getattr(exc, "param", None)
    logger.exception("unexpected error while serving a request", exc_info=exc)
    return 500, f"internal error: {type(exc).__name__}", None
