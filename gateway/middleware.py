"""Plain ASGI middleware on the hot path (no BaseHTTPMiddleware): body-size limits."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import PayloadTooLarge
from gateway.models import Problem
from gateway.responses import ProblemResponse


class BodyLimit:
    """Refuse bodies over the limit with 413, before the app reads them whole.

    Key imports (paths ending in /keys) get the larger import limit. A Content-Length over the
    limit is refused at once; a chunked body is counted as it streams.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_import_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_import_bytes = max_import_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_import_bytes if scope["path"].endswith("/keys") else self.max_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(scope, receive, send, limit)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"body over {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        err = PayloadTooLarge(f"body over {limit} bytes")
        body = Problem(type=f"https://flashgate.dev/problems/{err.code}", title=err.title,
                       status=err.status, code=err.code, detail=err.detail,
                       instance=scope["path"])
        response = ProblemResponse(body, status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)
