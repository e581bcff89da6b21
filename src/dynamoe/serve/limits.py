"""Limits on how a request arrives: its body's size, and how long its headers and body may take.

A client that declares a body and sends it slowly (or never) would otherwise hold its connection,
and a coroutine, for as long as it likes; so would one that drips its headers a byte at a time.
The body's limits are ASGI middleware (413, 408); the headers never reach the app, so their
deadline lives in uvicorn's connection protocol.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dynamoe.serve.errors import error_response
from dynamoe.serve.security import CLOSE


class BodyLimits:
    """ASGI middleware: 413 for a body over the size limit, 408 for one not complete within the read timeout."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, read_timeout_s: float) -> None:
        self.app, self.max_body_bytes, self.read_timeout_s = app, max_body_bytes, read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"the request body exceeds the server's limit of {self.max_body_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await error_response(413, too_large, headers=CLOSE)(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_s
        received, complete = 0, False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: only a disconnect can come, whenever it does
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(deadline - loop.time(), 0.0))
            except TimeoutError:  # raised inside the route, so that the error handlers answer it
                raise StarletteHTTPException(408, f"the request body did not arrive within {self.read_timeout_s} s "
                                                  "(--read-timeout)", headers=CLOSE) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise StarletteHTTPException(413, too_large, headers=CLOSE)
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


def with_header_deadline(protocol: type[Any], timeout_s: float) -> type[Any]:
    """uvicorn's HTTP protocol class, closing a connection whose next request's headers take over timeout_s to arrive.

    The clock starts when the connection opens and again when a response ends; it stops when a request's
    headers are complete (uvicorn then starts its request cycle). Works with uvicorn's h11 and httptools
    protocols, which both keep the current cycle in `cycle`.
    """

    class HeaderDeadline(protocol):  # type: ignore[misc, valid-type]
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.follow_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.follow_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.follow_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self.stop_header_timer()
            super().connection_lost(exc)

        def awaiting_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def follow_headers(self) -> None:
            """Start the clock when the connection waits for a request's headers, stop it when they are in."""
            if not self.awaiting_headers():
                self.stop_header_timer()
            elif self.header_timer is None:
                self.header_timer = self.loop.call_later(timeout_s, self.headers_too_slow)

        def stop_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def headers_too_slow(self) -> None:
            self.header_timer = None
            if self.awaiting_headers() and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline
