"""A stand-in instance that sends fixed bytes per path, for responses uvicorn cannot produce.

Each response is written as given and the connection is then closed, so a test can send
an interim 103 before the final response, or a body that ends only with the connection.
"""

from __future__ import annotations

import socketserver
import threading


class _CannedHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            data += chunk
        target = data.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
        path = target.partition("?")[0]
        responses: dict[str, bytes] = self.server.responses  # type: ignore[attr-defined]
        self.request.sendall(responses.get(path, b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"))


class CannedBackend:
    """Serve ``responses[path]`` verbatim; ``/health`` returns 200."""

    def __init__(self, port: int, responses: dict[str, bytes]) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", port), _CannedHandler)
        self._server.daemon_threads = True
        self._server.responses = {  # type: ignore[attr-defined]
            "/health": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
            **responses,
        }
        self._thread = threading.Thread(target=self._server.serve_forever, name="backend-canned", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
