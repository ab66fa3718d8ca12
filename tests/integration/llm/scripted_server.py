"""A scripted HTTP server on 127.0.0.1 that the provider tests call over real sockets.

Each test scripts the replies in order. The last reply repeats once the script runs out,
so one 429 reply scripts a server that is rate limited forever.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

SERVER_START_TIMEOUT_SECONDS = 10.0


@dataclass
class Reply:
    """One scripted response: a JSON body, a raw body or a stream of SSE frames."""

    status: int = 200
    body: Any = None
    raw: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    events: list[str] | None = None
    drop_connection: bool = False
    delay_seconds: float = 0.0


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: Any


class DroppedConnection(Exception):
    """Raised inside a streamed body so that uvicorn closes the socket mid-response."""


def sse(data: Any, event: str | None = None) -> str:
    """Format one server-sent event frame. Strings are sent as they are, others as JSON."""
    payload = data if isinstance(data, str) else json.dumps(data)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n"


class ScriptedServer:
    """The replies to send and the requests received, shared with the server thread."""

    def __init__(self) -> None:
        self.url = ""
        self._lock = threading.Lock()
        self._replies: list[Reply] = []
        self._requests: list[RecordedRequest] = []

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._replies = list(replies)
            self._requests = []

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    async def handle(self, request: Request) -> Response:
        raw_body = await request.body()
        with self._lock:
            self._requests.append(
                RecordedRequest(
                    path=request.url.path, headers=dict(request.headers), body=json.loads(raw_body or b"null")
                )
            )
            reply = self._replies.pop(0) if len(self._replies) > 1 else self._replies[0]

        if reply.delay_seconds and await _client_left_during(request, reply.delay_seconds):
            return Response(status_code=499)
        if reply.events is not None:
            return StreamingResponse(
                _frames(reply),
                status_code=reply.status,
                headers=reply.headers,
                media_type="text/event-stream",
            )
        content = reply.raw if reply.raw is not None else json.dumps(reply.body)
        return Response(
            content, status_code=reply.status, headers=reply.headers, media_type="application/json"
        )


async def _client_left_during(request: Request, seconds: float) -> bool:
    # Polling for the disconnect ends the handler soon after the client times out, so the
    # server can stop without waiting for the whole delay.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await request.is_disconnected():
            return True
        await asyncio.sleep(0.02)
    return False


async def _frames(reply: Reply) -> AsyncIterator[str]:
    for frame in reply.events or []:
        yield frame
        # A short pause sends each frame in its own chunk, as a real server would.
        await asyncio.sleep(0.005)
    if reply.drop_connection:
        raise DroppedConnection("scripted drop after the last frame")
