"""A cap on the size of request bodies, enforced before any route parses one.

Without it a client could send a body of any size and the server would hold and parse it whole
(JSON parsing of a data URL holds the interpreter too). The declared Content-Length is checked
first; a body sent without one (chunked) is counted as it arrives. Either way an oversized body
gets a 413 naming the flag, before the route sees a byte of it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glmv.server.errors import error_response


class BodyLimit:
    """ASGI middleware: bodies over `max_bytes` are answered 413 (`--max-request-bytes`)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, f"{declared:,} bytes")
            return
        if declared is not None:
            # The server (h11/httptools) never delivers more than the declared length.
            await self.app(scope, receive, send)
            return
        # No length given: read the body here, counting, and replay it to the app.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                messages.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, f"more than {self.max_bytes:,} bytes")
                return
            messages.append(message)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        response = error_response(
            413, f"the request body is {size}, more than the limit of {self.max_bytes:,} bytes "
                 "(--max-request-bytes)")
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
