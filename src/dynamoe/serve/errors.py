"""OpenAI-style errors: every failure is JSON `{"error": {"message", "type", "param", "code"}}`.

FastAPI answers validation errors with 422 and its own shape; the handlers here answer 400 in the
OpenAI shape instead, name the offending field in `param`, and turn any unexpected exception into a
500 of the same shape, so a client never sees a body it cannot parse.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dynamoe.serve.schemas import INVALID_UNICODE

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error", 504: "timeout_error"}


class APIError(Exception):
    """An error answered to the client with this status and OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error answer."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An error answer."""
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


# What a field accepts, for the fields that take one of several forms (pydantic reports each form's failure).
FIELD_FORMS = {"prompt": "a string, a list of strings, a list of token ids, or a list of token-id lists, none empty",
               "stop": "a non-empty string or a list of at most 4 non-empty strings",
               "content": "a string or a non-empty list of text parts"}
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list|dict)$|[-\[(]")


def validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    """A one-line message and the dotted field path of the first pydantic error."""
    location: list[str] = []
    for part in error.get("loc", ())[1:] if error.get("loc", ())[:1] == ("body",) else error.get("loc", ()):
        if isinstance(part, str) and _UNION_TAG.search(part):  # a union member's tag, not a field
            form = FIELD_FORMS.get(location[-1] if location else "")
            if form:
                return f"{'.'.join(location)} must be {form}", ".".join(location)
            break
        location.append(str(part))
    param = ".".join(location) or None
    message = str(error.get("msg", "invalid value"))
    if error.get("type") == "json_invalid":
        return f"the body is not valid JSON ({error.get('ctx', {}).get('error', message)})", None
    if error.get("type") == INVALID_UNICODE:
        return message, error["ctx"]["param"] or None
    if error.get("type") == "extra_forbidden":
        return f"unknown field {param!r}; see docs/serve.md for the fields this server accepts", param
    return (f"{param}: {message}" if param else f"the body: {message}"), param


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in the OpenAI shape: 400 for invalid bodies, the given status for APIError."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error.status, error.message, error.param, error.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        message, param = validation_message(errors[0] if errors else {})
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(error).__name__}); the server log has the details")
