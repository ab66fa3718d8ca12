"""Stand-ins for API instances whose behaviour a test controls, served on real sockets.

``ScriptedBackend`` is an ASGI app under uvicorn in a thread: ``/health`` follows its
``healthy`` flag, ``/echo`` returns the request it received, ``/hold`` waits until the test
releases it, ``/set-cookie`` sets a cookie, ``/not-modified`` responds 304, ``/events`` streams Server-Sent
Events one at a time as the test releases them, ``/large?bytes=N`` sends N bytes with a
Content-Length and ``/chunked`` sends three parts without one.

``DroppingBackend`` answers ``/health``, and ``/not-modified`` with a 304 that carries a
Content-Length, which RFC 9110 allows and uvicorn cannot send. It closes every other
connection, as an instance that crashes while handling a request does: without a response,
or, for a query string holding ``truncate=1``, after the headers and the first bytes of the
body.
"""

from __future__ import annotations

import asyncio
import json
import socket
import socketserver
import threading

import uvicorn
from starlette.types import Receive, Scope, Send

from tests.e2e.processes import wait_until


class ScriptedBackend:
    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.healthy = True
        self.requests: list[dict] = []
        self.release = threading.Event()
        self.events_sent = 0
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app, host="127.0.0.1", port=port, log_config=None, lifespan="off", interface="asgi3"
            )
        )
        self._thread = threading.Thread(target=self._server.run, name=f"backend-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        wait_until(lambda: self._server.started, 10, f"backend {self.name} to start")

    def stop(self) -> None:
        self.release.set()
        self._server.should_exit = True
        self._thread.join(timeout=10)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {name.decode(): value.decode() for name, value in scope["headers"]}
        self.requests.append({"method": scope["method"], "path": scope["path"], "headers": headers})

        if scope["path"] == "/health":
            status = 200 if self.healthy else 503
            await self._json(send, status, {"status": "ok" if self.healthy else "failing"})
        elif scope["path"] == "/echo":
            # A header the response's Connection header names, which no proxy may forward.
            hop_headers = [(b"connection", b"x-hop-only"), (b"x-hop-only", b"1")]
            await self._json(
                send,
                200,
                {
                    "backend": self.name,
                    "method": scope["method"],
                    "query": scope["query_string"].decode(),
                    "headers": headers,
                    "body_length": len(body),
                },
                hop_headers,
            )
        elif scope["path"] == "/hold":
            await asyncio.to_thread(self.release.wait, 30)
            await self._json(send, 200, {"backend": self.name, "released": self.release.is_set()})
        elif scope["path"] == "/set-cookie":
            await self._json(
                send, 200, {"backend": self.name}, [(b"set-cookie", b"session=first-client; Path=/")]
            )
        elif scope["path"] == "/not-modified":
            headers = [(b"etag", b'"v1"')]
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
        elif scope["path"] == "/events":
            await self._stream_events(send)
        elif scope["path"] == "/large":
            await self._send_large(send, int(scope["query_string"].decode().removeprefix("bytes=")))
        elif scope["path"] == "/chunked":
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
            )
            for part in (b"part-1;", b"part-2;", b"part-3"):
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            await self._json(send, 404, {"detail": "not found"})

    async def _stream_events(self, send: Send) -> None:
        # Sends event 1 at once and event 2 only after the test sets ``release``: a client that
        # reads event 1 before releasing proves that nothing between them buffers the stream.
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send({"type": "http.response.body", "body": b"id: 1\ndata: first\n\n", "more_body": True})
        self.events_sent = 1
        await asyncio.to_thread(self.release.wait, 30)
        await send({"type": "http.response.body", "body": b"id: 2\ndata: second\n\n", "more_body": True})
        self.events_sent = 2
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _send_large(send: Send, size: int) -> None:
        headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(size).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        # Byte i is i % 251, so a reordered or lost piece changes the content.
        pattern = bytes(range(251)) * (64 * 1024 // 251 + 2)
        sent = 0
        while sent < size:
            offset = sent % 251
            part = pattern[offset : offset + min(64 * 1024, size - sent)]
            sent += len(part)
            await send({"type": "http.response.body", "body": part, "more_body": sent < size})

    @staticmethod
    async def _json(
        send: Send, status: int, content: dict, extra_headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        body = json.dumps(content).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *(extra_headers or []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _DroppingHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            data += chunk
        request_line = data.split(b"\r\n", 1)[0].decode("latin-1")
        if request_line.split(" ")[1:2] == ["/health"]:
            body = b'{"status": "ok"}'
            self.request.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            return
        if request_line.split(" ")[1:2] == ["/not-modified"]:
            # The Content-Length of the body this 304 stands for, though the 304 has none.
            self.request.sendall(
                b'HTTP/1.1 304 Not Modified\r\netag: "v1"\r\ncontent-length: 100\r\nconnection: close\r\n\r\n'
            )
            return
        self.server.dropped.append(request_line)  # type: ignore[attr-defined]
        if "truncate=1" in request_line:
            self.request.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b'content-length: 2000\r\n\r\n{"backend": "dropping", '
            )
        # Closes with a reset, as the kernel does for a process killed mid-request.
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


class DroppingBackend:
    def __init__(self, port: int) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", port), _DroppingHandler)
        self._server.daemon_threads = True
        self._server.dropped = []  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="backend-dropping", daemon=True
        )

    @property
    def dropped(self) -> list[str]:
        return self._server.dropped  # type: ignore[attr-defined]

    def start(self) -> None:
        # The socket listens from the constructor on, so no wait is needed here.
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
