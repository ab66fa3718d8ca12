"""The load balancer's side facing clients: HTTP/1.1 connections parsed with httptools.

Served through uvicorn, every request went through ASGI: message dicts for the request
and each response part, a request-cycle object and header lists converted twice. For a
proxy that forwards bytes, that was a large share of its CPU. This server parses requests
with the same httptools parser uvicorn uses and hands each complete request, body
included, to one coroutine, which writes a whole response or a stream.

What it enforces before a request reaches the balancer:

- at most ``max_connections`` open connections: a request on any further connection
  gets 503 and the connection is closed;
- a request body of at most ``max_body_bytes``, declared or sent chunked: 413;
- request headers complete within ``header_timeout`` of the connection opening or of the
  first byte of a later request. Slow clients therefore cannot hold connections open
  ("slowloris"). An idle keep-alive connection is closed after ``KEEPALIVE_SECONDS``;
- a request body that stops arriving for ``header_timeout`` gets 408;
- at most ``MAX_HEADER_BYTES`` of request line and headers, and as many of trailers: 431;
- malformed requests and invalid absolute targets get 400, as does a request to switch
  protocols that has a body; ``CONNECT`` gets 405.

Trailer fields after a chunked body are read and dropped, because the body goes to the
instance with a Content-Length and without them.

Requests pipelined on one connection get their responses in order.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus

import httptools

logger = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 5.0
# After rejecting a request whose body it will not read, the server keeps reading (and
# dropping) what the client still sends for this long before closing. Closing at once
# with unread bytes makes the kernel reset the connection, and the client may then never
# see the response.
LINGER_SECONDS = 2.0
# httptools has no limit of its own: it keeps a header that is still arriving in memory,
# so without this bound one connection could send gigabytes within the header timeout.
MAX_HEADER_BYTES = 64 * 1024


@dataclass(slots=True)
class Request:
    """One complete request as the client sent it."""

    method: str
    target: bytes  # origin form: the path and query, still percent-encoded
    path: bytes
    http_version: str
    headers: list[tuple[bytes, bytes]]  # names in lower case
    body: bytes
    client_host: str
    keep_alive: bool
    rejection: tuple[int, str] | None = None  # status and detail of the error the server returns itself


Handler = Callable[[Request, "ClientConnection"], Awaitable[None]]


class HTTPServer:
    """Connection limits, timeouts and shutdown shared by every client connection."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_connections: int,
        max_body_bytes: int,
        header_timeout: float,
        body_limit_detail: str,
    ) -> None:
        self.handler = handler
        self.max_connections = max_connections
        self.max_body_bytes = max_body_bytes
        self.header_timeout = header_timeout
        self.body_limit_detail = body_limit_detail
        self.connections: set[ClientConnection] = set()
        self.closing = False

    def protocol_factory(self) -> ClientConnection:
        return ClientConnection(self)

    async def shutdown(self, grace_seconds: float) -> None:
        """Close idle connections now, and the others once their response ends or the grace expires.

        Close the listening socket first, so no new connection arrives meanwhile.
        """
        self.closing = True
        for connection in list(self.connections):
            connection.close_when_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        remaining = list(self.connections)
        if remaining:
            logger.warning(
                "closing %d connections still busy after %g s",
                len(remaining),
                grace_seconds,
                extra={"action": "http.shutdown_forced", "connections": len(remaining)},
            )
        await asyncio.gather(*(connection.abort() for connection in remaining))


class ClientConnection(asyncio.Protocol):
    """One client connection: parse its requests and write their responses in order."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.client_host = ""
        self.closed = False
        self.on_close: Callable[[], None] | None = None  # stops a stream when the client leaves
        self._parser = httptools.HttpRequestParser(self)
        self._over_limit = False
        self._ignore_input = False
        self._unread_body = False  # a rejected request may still be sending its body
        self._lingering = False
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_for_headers = False
        self._in_message = False
        self._message_began = False  # during the current read
        self._body_arrived = False  # during the current read
        self._field_bytes = 0  # read since the last body bytes, while no body arrives

        # The request being parsed.
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0

        # The request being handled, and those pipelined behind it.
        self._busy = False
        self._task: asyncio.Task[None] | None = None
        self._pipeline: collections.deque[Request] = collections.deque()
        self._keep_alive = True
        self._http_11 = True
        self._head_request = False
        self._response_started = False
        self._chunked = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # Writing responses, for the handler

    def respond(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, reason: bytes = b""
    ) -> None:
        """Write a whole response. ``headers`` frame the body: Content-Length, or a status without one.

        The body is left out in a response to HEAD, whose headers still describe it.
        """
        head = self._head(status, reason, headers)
        if self.transport is not None and not self.closed:
            # One write for head and body: each write is a system call on the event loop.
            self.transport.write(head + body if body and not self._head_request else head)
        self._response_done()

    def respond_json(
        self, status: int, payload: object, extra_headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        self.respond(status, headers + (extra_headers or []), body)

    def start_stream(
        self, status: int, headers: list[tuple[bytes, bytes]], *, length_known: bool, reason: bytes = b""
    ) -> None:
        """Write the head of a response whose body follows through ``write`` and ``end_stream``.

        Without a Content-Length the body goes out chunked to HTTP/1.1 clients and ends with
        the connection for HTTP/1.0 clients.
        """
        if not length_known:
            if self._http_11:
                self._chunked = True
                headers = [*headers, (b"transfer-encoding", b"chunked")]
            else:
                self._keep_alive = False
        head = self._head(status, reason, headers)
        if self.transport is not None and not self.closed:
            self.transport.write(head)

    async def write(self, data: bytes) -> None:
        """Write part of a streamed body, waiting while the client is slow to read it."""
        if self.closed or self.transport is None:
            return
        if self._chunked:
            self.transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.transport.write(data)
        if self._write_paused:
            self._drain_waiter = self.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def end_stream(self) -> None:
        if self._chunked and self.transport is not None and not self.closed:
            self.transport.write(b"0\r\n\r\n")
        self._response_done()

    def cut_off(self) -> None:
        """End a streamed response early: the client sees it truncated."""
        self._close()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client_host = peer[0] if isinstance(peer, tuple) else ""
        self.server.connections.add(self)
        self._over_limit = len(self.server.connections) > self.server.max_connections
        self._expect_headers()

    def data_received(self, data: bytes) -> None:
        if self._ignore_input:
            return
        self._message_began = False
        self._body_arrived = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request asking to switch protocols was parsed and queued. This server
            # speaks only HTTP/1.1, so it responds to that request and closes.
            self._keep_alive = False
            self._ignore_input = True
        except httptools.HttpParserError as exc:
            self._reject_malformed(exc)
        if not self._ignore_input:
            self._count_field_bytes(len(data))
        if self._in_message and not self._waiting_for_headers and not self._ignore_input:
            # The body or its trailers are still to come: each read restarts their deadline.
            # NOTE: a client that sends a byte now and then still keeps its connection
            # until the body reaches max_body_bytes.
            self._arm_timer(self.server.header_timeout, self._body_timed_out)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._cancel_timer()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if self.on_close is not None:
            self.on_close()
        if self._task is not None and not self._task.done():
            # The client is gone, so stop waiting for a pooled connection or for the
            # instance. The request then frees its connection slot at once instead of
            # keeping it until the instance responds.
            self._task.cancel()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._in_message = True
        self._message_began = True
        self._target = b""
        self._headers = []
        self._body = []
        self._body_size = 0
        if not self._waiting_for_headers:
            # A request begins on an idle keep-alive connection: its headers get a deadline.
            self._expect_headers()

    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._waiting_for_headers:
            # A trailer field. Merged into the headers, it would reach the instance as a
            # header that no proxy in front of this one inspected.
            return
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._cancel_timer()
        self._waiting_for_headers = False
        if self._ignore_input:
            return
        if self._over_limit:
            detail = (
                f"the load balancer has {self.server.max_connections} connections open; "
                "retry later, or raise load_balancer.max_connections"
            )
            self._reject(503, detail)
            return
        if self._parser.get_method() == b"CONNECT":
            self._reject(405, "CONNECT is not supported: this is a reverse proxy for the API")
            return
        declared = _find_header(self._headers, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.server.max_body_bytes:
            self._reject(413, self.server.body_limit_detail)
            return
        has_body = (declared is not None and declared.strip(b"0") != b"") or (
            _find_header(self._headers, b"transfer-encoding") is not None
        )
        if self._parser.should_upgrade() and has_body:
            # httptools treats everything after the head of a request asking to upgrade as
            # the new protocol, so its body would be lost.
            detail = "a request asking to upgrade cannot have a body here; send it without the Upgrade header"
            self._reject(400, detail)
            return
        expect = _find_header(self._headers, b"expect")
        if expect is not None and expect.lower() == b"100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_arrived = True
        if self._ignore_input:
            return
        self._body_size += len(body)
        if self._body_size > self.server.max_body_bytes:
            self._reject(413, self.server.body_limit_detail)
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._cancel_timer()
        if self._ignore_input:
            return
        parser = self._parser
        target = self._target
        path = target.partition(b"?")[0]
        if not target.startswith(b"/") and target != b"*":
            # Absolute form (http://host/path): forward only the path and query.
            try:
                url = httptools.parse_url(target)
            except httptools.HttpParserInvalidURLError:
                quoted_target = target[:100].decode("latin-1")
                self._reject(
                    400, f"invalid request target {quoted_target!r}; send a path such as /api/v1/projects"
                )
                return
            path = url.path or b"/"
            target = path + (b"?" + url.query if url.query else b"")
        request = Request(
            method=parser.get_method().decode("ascii"),
            target=target,
            path=path,
            http_version=parser.get_http_version(),
            headers=self._headers,
            body=b"".join(self._body),
            client_host=self.client_host,
            keep_alive=parser.should_keep_alive(),
        )
        if not request.keep_alive:
            self._ignore_input = True
        self._enqueue(request)

    # Request cycle

    def _enqueue(self, request: Request) -> None:
        if self._busy:
            self._pipeline.append(request)
            if self.transport is not None:
                # Leave further pipelined requests in the kernel until these have responses.
                self.transport.pause_reading()
            return
        self._busy = True
        self._keep_alive = request.keep_alive and not self.server.closing
        self._http_11 = request.http_version == "1.1"
        self._head_request = request.method == "HEAD"
        self._response_started = False
        self._chunked = False
        self._task = self.loop.create_task(self._handle(request))

    async def _handle(self, request: Request) -> None:
        try:
            if request.rejection is not None:
                status, detail = request.rejection
                self._keep_alive = False
                self.respond_json(status, {"detail": detail})
                return
            await self.server.handler(request, self)
        except Exception:
            logger.exception(
                "load balancer failed on %s %s",
                request.method,
                request.path.decode("latin-1"),
                extra={"action": "lb.internal_error", "method": request.method},
            )
            if not self._response_started:
                self._keep_alive = False
                self.respond_json(500, {"detail": "the load balancer failed; its log has the traceback"})
        finally:
            if self._busy and self._task is asyncio.current_task():
                # The handler returned or failed without finishing its response.
                self._close()

    def _head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
        """Return the status line and headers of a response, ending with the blank line."""
        self._response_started = True
        if not reason:
            reason = _reason_phrase(status)
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        for name, value in headers:
            lines.append(b"%s: %s\r\n" % (name, value))
        if not self._keep_alive:
            lines.append(b"connection: close\r\n")
        elif not self._http_11:
            lines.append(b"connection: keep-alive\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def _response_done(self) -> None:
        self._busy = False
        self._task = None
        self.on_close = None
        if self.closed:
            return
        if not self._keep_alive or self.server.closing:
            self._close()
            return
        if self._pipeline:
            self._enqueue(self._pipeline.popleft())
            if not self._pipeline and self.transport is not None:
                self.transport.resume_reading()
            return
        self._arm_timer(KEEPALIVE_SECONDS, self._close)

    # Rejections, timeouts and closing

    def _reject(self, status: int, detail: str) -> None:
        """Queue an error response for the request being parsed, then stop reading it."""
        self._ignore_input = True
        self._unread_body = True
        request = Request(
            method=self._parser.get_method().decode("ascii", "replace"),
            target=self._target,
            path=self._target.partition(b"?")[0],
            http_version=self._parser.get_http_version(),
            headers=self._headers,
            body=b"",
            client_host=self.client_host,
            keep_alive=False,
            rejection=(status, detail),
        )
        self._enqueue(request)

    def _count_field_bytes(self, size: int) -> None:
        """Reject a request whose head or trailers grow past ``MAX_HEADER_BYTES``.

        A read that starts a request or carries body bytes restarts the count, so the read
        in which a request begins is not counted: that is at most one read buffer more.
        """
        if not self._in_message or self._message_began or self._body_arrived:
            self._field_bytes = 0
            return
        self._field_bytes += size
        if self._field_bytes > MAX_HEADER_BYTES:
            self._cancel_timer()
            detail = (
                f"request headers or trailers larger than {MAX_HEADER_BYTES} bytes; "
                "send fewer or shorter header fields"
            )
            self._reject(431, detail)

    def _reject_malformed(self, exc: Exception) -> None:
        """Queue a 400 behind any requests already parsed, which still get their responses."""
        self._ignore_input = True
        self._unread_body = True
        self._cancel_timer()
        request = Request(
            method="GET",
            target=b"",
            path=b"",
            http_version="1.1",
            headers=[],
            body=b"",
            client_host=self.client_host,
            keep_alive=False,
            rejection=(400, f"malformed HTTP request: {exc}; send HTTP/1.1"),
        )
        self._enqueue(request)

    def _expect_headers(self) -> None:
        self._waiting_for_headers = True
        self._arm_timer(self.server.header_timeout, self._headers_timed_out)

    def _headers_timed_out(self) -> None:
        self._timer = None
        if self.closed:
            return
        if self._pipeline:
            # Reading is paused until the requests before this one have responses.
            self._arm_timer(self.server.header_timeout, self._headers_timed_out)
            return
        logger.info(
            "closed a connection whose request headers did not arrive within %g s",
            self.server.header_timeout,
            extra={"action": "http.header_timeout", "client": self.client_host},
        )
        self._close()

    def _body_timed_out(self) -> None:
        self._timer = None
        if self.closed or self._ignore_input:
            return
        if self._pipeline:
            # Reading is paused until the requests before this one have responses.
            self._arm_timer(self.server.header_timeout, self._body_timed_out)
            return
        logger.info(
            "rejected a request whose body stopped arriving for %g s",
            self.server.header_timeout,
            extra={"action": "http.body_timeout", "client": self.client_host},
        )
        detail = (
            f"no request body bytes arrived for {self.server.header_timeout:g} s; "
            "send the whole body without pausing"
        )
        self._reject(408, detail)

    def _arm_timer(self, delay: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close_when_idle(self) -> None:
        """Close now if no request is being handled; otherwise after its response."""
        if not self._busy:
            self._close()

    async def abort(self) -> None:
        """Drop the connection now, with the request it is handling."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        self._cancel_timer()
        if self.transport is None or self.transport.is_closing() or self._lingering:
            return
        if self._unread_body:
            self._linger()
            return
        self.transport.close()

    def _linger(self) -> None:
        assert self.transport is not None
        self._lingering = True
        try:
            self.transport.write_eof()
        except (NotImplementedError, RuntimeError, OSError):
            self.transport.close()
            return
        self.transport.resume_reading()
        self._timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)


def _find_header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"
