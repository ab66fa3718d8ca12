"""A stand-in API instance that sends fixed bytes, for responses no HTTP server library sends.

``CannedBackend`` reads each request's head and declared body and writes the bytes its
``responses`` map to the request's path, as they are: a test can send a malformed
response, an unrequested 101, or a response followed by a closed connection. ``/health``
returns 200 unless mapped, so the balancer admits the backend. A path missing from the
map gets 404. A response listed in ``closing`` is followed by closing the connection.
"""

from __future__ import annotations

import socketserver
import threading

HEALTHY = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{"status":"ok"}'
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


class _CannedHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        backend: CannedBackend = self.server.backend  # type: ignore[attr-defined]
        self.connection.settimeout(30)
        while True:
            request_line = self.rfile.readline()
            if not request_line:
                return
            content_length = 0
            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    content_length = int(value)
            self.rfile.read(content_length)

            path = request_line.split(b" ")[1].split(b"?")[0].decode("latin-1")
            backend.paths.append(path)
            self.wfile.write(backend.responses.get(path, HEALTHY if path == "/health" else NOT_FOUND))
            self.wfile.flush()
            if path in backend.closing:
                return


class CannedBackend:
    def __init__(self, port: int, responses: dict[str, bytes], closing: frozenset[str] = frozenset()) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.responses = responses
        self.closing = closing
        self.paths: list[str] = []  # request paths in the order they arrived
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", port), _CannedHandler)
        self._server.daemon_threads = True
        self._server.backend = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="backend-canned", daemon=True)

    def start(self) -> None:
        # The socket listens from the constructor on, so no wait is needed here.
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
