"""The API key: where it comes from, which keys are refused, and the middleware that checks it first.

The check is ASGI middleware rather than a route dependency, so that it runs before anything reads
or parses the body: an unauthenticated client learns nothing about the request format (no 400
detail, no 413) and cannot make the server read a large body.
"""

from __future__ import annotations

import secrets
from typing import Mapping

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from dynamoe.errors import DynamoeError
from dynamoe.serve.errors import error_response

KEY_VARIABLE = "DYNAMOE_API_KEY"
OPEN_PATHS = frozenset({"/health", "/"})  # answered without the key: liveness, and the static playground page
CLOSE = {"Connection": "close"}  # for answers sent before the body is read: the client may still be sending it


def api_key_from(flag: str | None, environ: Mapping[str, str]) -> str | None:
    """The key from --api-key, else from $DYNAMOE_API_KEY, else None; a blank one is an error, never 'no key'."""
    if flag is not None:
        check_api_key(flag, "--api-key")
        return flag
    key = environ.get(KEY_VARIABLE)
    if key is not None:
        check_api_key(key, f"${KEY_VARIABLE}")
    return key


def check_api_key(key: str, source: str) -> None:
    """Raise DynamoeError for a key that is empty or blank, or that a client could not send in a header as it is."""
    if not key.strip():
        raise DynamoeError(f"{source} is empty; pass a key, or leave {source} unset to serve without one")
    if not (key.isascii() and key.isprintable()) or any(character.isspace() for character in key):
        raise DynamoeError(f"{source} must be printable ASCII without spaces, as it travels in an HTTP header")


class APIKeyGuard:
    """ASGI middleware: 401 for any request but /health without `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self.authorized(scope):
            refusal = error_response(401, "a valid API key is needed: send the header `Authorization: Bearer <key>`",
                                     code="invalid_api_key", headers={"WWW-Authenticate": "Bearer", **CLOSE})
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def authorized(self, scope: Scope) -> bool:
        """Whether the request carries the key (compared in constant time)."""
        scheme, _, key = Headers(scope=scope).get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(key.strip().encode("latin-1"), self.api_key)
