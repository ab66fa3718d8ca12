"""ASGI middleware: request ids, one log line per request, and the request body size limit."""

from __future__ import annotations

import json
import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.monitoring.metrics import HTTP_REQUEST_SECONDS

logger = logging.getLogger("app.api.access")

REQUEST_ID_HEADER = b"x-request-id"
# Load balancers and Kubernetes probe these every few seconds. A passing probe is logged at
# DEBUG so that it does not bury the requests of users; a failing one stays at INFO.
PROBE_PATHS = frozenset({"/health", "/ready"})


class RequestContextMiddleware:
    """Assign or propagate ``X-Request-ID``, log the request and time it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        headers = dict(scope["headers"])
        request_id = headers.get(REQUEST_ID_HEADER, b"").decode("latin-1")[:100] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status_code = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER, request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            path_template = getattr(route, "path", "unmatched")
            HTTP_REQUEST_SECONDS.labels(scope["method"], path_template, str(status_code)).observe(elapsed)
            passing_probe = scope["path"] in PROBE_PATHS and status_code == 200
            logger.log(
                logging.DEBUG if passing_probe else logging.INFO,
                "%s %s %s %.1fms",
                scope["method"],
                scope["path"],
                status_code,
                elapsed * 1000,
                extra={"action": "http.request", "request_id": request_id, "status": status_code},
            )


class BodySizeLimitMiddleware:
    """Reject request bodies over ``max_bytes`` with 413, before the handler reads them.

    A body sent without Content-Length (chunked) is read here up to the limit and replayed
    to the application, because an error raised while the framework reads the body would
    reach the client as a generic 400.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self._reject(send)
                return
            await self.app(scope, receive, send)
            return

        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._reject(send)
                return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps(
            {
                "detail": f"request body larger than {self.max_bytes} bytes; send less, or raise api.max_body_bytes"
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
