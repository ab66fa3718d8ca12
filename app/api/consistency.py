"""Read-your-writes across stateless API instances and read replicas.

On a deployment with read replicas, the response to a successful write request (POST, PUT,
PATCH or DELETE with a 2xx status) carries the primary's WAL position, which covers the
write. It is in the ``X-Toronto-AI-LSN`` header and in the ``toronto_ai_lsn`` cookie, which
lives ``database.read_your_writes_seconds``. A later read that sends either back, to any
instance, goes only to a server that has replayed that position. That is a replica whose
last check found it past the position, or else the primary. Clients that keep cookies
(browsers, ``httpx.Client``) get this without doing anything. Others copy the header.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db.replicas import REPLICA_ERRORS, WalPosition, describe_error

logger = logging.getLogger(__name__)

POSITION_HEADER = "X-Toronto-AI-LSN"
POSITION_COOKIE = "toronto_ai_lsn"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


async def read_after(request: Request) -> WalPosition | None:
    """Return the WAL position a read must see, from the request's header or else its cookie.

    A coroutine although it never awaits, because FastAPI runs a plain function dependency
    in its thread pool, a hop that costs more than a cached project read.
    """
    header = request.headers.get(POSITION_HEADER)
    if header is not None:
        try:
            return WalPosition.parse(header)
        except ValueError as exc:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"{POSITION_HEADER}: {exc}; send the value of the header of your last write's response",
            ) from exc
    cookie = request.cookies.get(POSITION_COOKIE)
    if cookie is None:
        return None
    try:
        return WalPosition.parse(cookie)
    except ValueError as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"cookie {POSITION_COOKIE}: {exc}; delete the cookie, the next write sets it again",
        ) from exc


ReadAfterDep = Annotated[WalPosition | None, Depends(read_after)]


class ReadYourWritesMiddleware:
    """Add the primary's WAL position to the response of every successful write request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in WRITE_METHODS:
            await self.app(scope, receive, send)
            return

        async def send_with_position(message: Message) -> None:
            if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
                headers = await self._position_headers(scope)
                message["headers"] = [*message.get("headers", []), *headers]
            await send(message)

        await self.app(scope, receive, send_with_position)

    async def _position_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        runtime = scope["app"].state.runtime
        try:
            position = await runtime.database.write_position()
        except REPLICA_ERRORS as exc:
            # The write has committed, so the response still succeeds. Without the position,
            # this client's next reads may go to a replica that has not replayed the write.
            logger.warning(
                "cannot read the primary's WAL position after a write: %s",
                describe_error(exc),
                extra={"action": "db.write_position_failed"},
            )
            return []
        if position is None:
            return []
        max_age = int(runtime.settings.database.read_your_writes_seconds)
        cookie = f"{POSITION_COOKIE}={position}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Lax"
        return [
            (POSITION_HEADER.lower().encode("latin-1"), str(position).encode("latin-1")),
            (b"set-cookie", cookie.encode("latin-1")),
        ]
