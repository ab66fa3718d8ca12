"""HTTP/1.1 connections from the load balancer to one API instance, kept alive in a pool.

Responses are parsed with httptools, the parser uvicorn uses, on plain asyncio protocols.
A general-purpose client does much more per request than a proxy needs (URL objects,
header multidicts, cookie and redirect handling): through aiohttp's client the balancer
spent about a third of its CPU there.

A response is either *buffered*, read whole before the balancer forwards anything, or
*streamed*, handed over chunk by chunk from its headers on. ``UpstreamConnection.send``
buffers a response whose declared length is at most ``buffer_limit`` and streams the rest,
so a buffered read can still be retried on another instance when this one dies mid-body.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

import httptools

# Streamed bytes the balancer holds for a slow client before it stops reading from the
# instance; reading resumes once the client has taken them.
STREAM_HIGH_WATER_BYTES = 256 * 1024
# A request body at least this large is written after its head instead of being copied
# into one buffer with it.
SEPARATE_BODY_WRITE_BYTES = 64 * 1024


class UpstreamError(Exception):
    """The instance failed after the request may have reached it."""


class UpstreamConnectError(UpstreamError):
    """No connection to the instance could be opened, so no request reached it."""


class UpstreamTimeout(UpstreamError):
    """The instance sent nothing for ``read_timeout_seconds``."""


class UpstreamResponse:
    """A response from an instance: status and headers first, then its body."""

    def __init__(self, connection: UpstreamConnection, head_only: bool, buffer_limit: int) -> None:
        self.connection = connection
        self.head_only = head_only
        self.buffer_limit = buffer_limit
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.buffered = False
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._pending_bytes = 0
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._chunk_waiter: asyncio.Future[None] | None = None

    @property
    def body(self) -> bytes:
        """The whole body of a buffered response."""
        return b"".join(self._chunks)

    async def read_chunk(self) -> bytes:
        """Return the next piece of a streamed body, or b"" at its end.

        Raises the error that ended the response early, such as a dropped connection.
        """
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            self._chunk_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._chunk_waiter
            finally:
                self._chunk_waiter = None
        chunk = self._chunks.popleft()
        self._pending_bytes -= len(chunk)
        if self._pending_bytes < STREAM_HIGH_WATER_BYTES:
            self.connection.resume_reading()
        return chunk

    # Called by the connection as the parser reports the response.

    def _headers_complete(self, status: int, keep_alive: bool) -> None:
        self.status = status
        self.keep_alive = keep_alive
        self.buffered = (
            not self.head_only
            and self.content_length is not None
            and self.content_length <= self.buffer_limit
        )
        if self.head_only:
            # A response to HEAD has no body whatever its Content-Length declares, and
            # httptools has no option to skip it: the response ends with its headers.
            self._finish()
        elif not self.buffered:
            self._set_ready()

    def _body(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        if self.buffered:
            return
        self._pending_bytes += len(chunk)
        if self._pending_bytes >= STREAM_HIGH_WATER_BYTES:
            self.connection.pause_reading()
        self._wake_reader()

    def _finish(self) -> None:
        self.complete = True
        self._set_ready()
        self._wake_reader()

    def _fail(self, error: Exception) -> None:
        if self.complete or self.error is not None:
            return
        self.error = error
        if not self._ready.done():
            self._ready.set_exception(error)
        self._wake_reader()

    def _set_ready(self) -> None:
        if not self._ready.done():
            self._ready.set_result(None)

    def _wake_reader(self) -> None:
        if self._chunk_waiter is not None and not self._chunk_waiter.done():
            self._chunk_waiter.set_result(None)


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to an instance, carrying one request at a time."""

    def __init__(self, read_timeout: float, on_lost: Callable[[UpstreamConnection], None]) -> None:
        self.read_timeout = read_timeout
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.counted = True  # in its pool's count of open connections
        self._loop = asyncio.get_running_loop()
        self._response: UpstreamResponse | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._last_read = 0.0
        self._read_timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._interim = False

    async def send(self, head: bytes, body: bytes, *, head_only: bool, buffer_limit: int) -> UpstreamResponse:
        """Send one request; return its response once buffered whole or, if streamed, at its headers."""
        assert self.transport is not None and self._response is None
        response = UpstreamResponse(self, head_only, buffer_limit)
        self._response = response
        self._parser = httptools.HttpResponseParser(self)
        self._last_read = self._loop.time()
        self._read_timer = self._loop.call_at(self._last_read + self.read_timeout, self._check_read_timeout)
        if len(body) < SEPARATE_BODY_WRITE_BYTES:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))
        await response._ready
        return response

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self._last_read = self._loop.time()
            self.transport.resume_reading()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        if self._parser is None:
            # Bytes that no request asked for: the instance is not speaking HTTP/1.1 as
            # expected, so the connection cannot be trusted with another request.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The 101 response was already failed in on_headers_complete.
            self.close()
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"invalid HTTP response: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        # A response without Content-Length or chunked framing ends when the connection does.
        response = self._response
        if response is not None and not response.complete and response.status and not response.buffered:
            if response.content_length is None and not _is_chunked(response.headers):
                self._message_complete_on_close()
                return None
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(UpstreamError(f"connection closed by the instance{f': {exc}' if exc else ''}"))
        self.on_lost(self)

    # httptools callbacks

    def on_status(self, reason: bytes) -> None:
        assert self._response is not None
        self._response.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._response is not None
        # httptools joins a name or value that arrived in pieces before calling this.
        self._response.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        response = self._response
        parser = self._parser
        assert response is not None and parser is not None
        status = parser.get_status_code()
        if status == 101:
            # The balancer drops Upgrade from every request, and the client connection
            # cannot carry another protocol, so a switch is a broken response.
            self._fail(UpstreamError("the instance switched protocols, which no forwarded request asks for"))
            return
        if 100 <= status < 200:
            # An interim response, such as 103 Early Hints: the final one follows.
            response.headers.clear()
            response.reason = b""
            self._interim = True
            return
        for name, value in response.headers:
            if name == b"content-length":
                response.content_length = int(value) if value.strip().isdigit() else None
        response._headers_complete(status, parser.should_keep_alive())
        if response.head_only:
            self._done()

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response._body(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        response = self._response
        if response is None or response.complete:
            return
        if response.buffered and self._parser is not None:
            response.keep_alive = self._parser.should_keep_alive()
        response._finish()
        self._done()

    # Internals

    def _message_complete_on_close(self) -> None:
        response = self._response
        assert response is not None
        response.keep_alive = False
        response._finish()
        self._done()

    def _done(self) -> None:
        """Forget the finished response, so this connection may carry the next request."""
        self._response = None
        self._parser = None
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _fail(self, error: Exception) -> None:
        response = self._response
        self._done()
        if response is not None:
            response._fail(error)

    def _check_read_timeout(self) -> None:
        self._read_timer = None
        if self._response is None:
            return
        if self._reading_paused:
            # The client is slow, not the instance: wait for the client.
            self._read_timer = self._loop.call_later(self.read_timeout, self._check_read_timeout)
            return
        deadline = self._last_read + self.read_timeout
        if self._loop.time() < deadline:
            self._read_timer = self._loop.call_at(deadline, self._check_read_timeout)
            return
        self._fail(UpstreamTimeout(f"no data from the instance for {self.read_timeout:g} s"))
        self.close()


class UpstreamPool:
    """Keep-alive connections to one instance, at most ``max_connections`` open at once.

    A request that finds every connection busy waits for one to be released rather than
    failing: a busy instance is not a failing one.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        keepalive_seconds: float,
    ) -> None:
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_seconds = keepalive_seconds
        self.open_connections = 0
        self._idle: list[UpstreamConnection] = []
        self._waiters: collections.deque[asyncio.Future[UpstreamConnection | None]] = collections.deque()

    async def acquire(self) -> UpstreamConnection:
        """Return an idle connection, a new one, or the next one released."""
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < self.keepalive_seconds:
                return connection
            self._discard(connection)

        loop = asyncio.get_running_loop()
        if self.open_connections >= self.max_connections:
            waiter: asyncio.Future[UpstreamConnection | None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                handed_over = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                    self.release(waiter.result(), reusable=True)
                elif waiter.done() and not waiter.cancelled():
                    self._wake_waiter()  # the free slot goes to the next waiter
                raise
            if handed_over is not None:
                return handed_over
            # A connection was closed, which freed a slot for this request to open one.

        self.open_connections += 1
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: UpstreamConnection(self.read_timeout, self._connection_lost), self.host, self.port
                ),
                self.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            self.open_connections -= 1
            self._wake_waiter()
            reason = f"timed out after {self.connect_timeout:g} s" if isinstance(exc, TimeoutError) else exc
            raise UpstreamConnectError(f"cannot connect to {self.host}:{self.port}: {reason}") from exc
        except BaseException:
            self.open_connections -= 1
            self._wake_waiter()
            raise
        return connection

    def release(self, connection: UpstreamConnection, *, reusable: bool) -> None:
        """Return a connection after its response ended; one that is not reusable is closed."""
        if not reusable or connection.closed:
            connection.close()
            self._discard(connection)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    def _connection_lost(self, connection: UpstreamConnection) -> None:
        # Only an idle connection is forgotten here; one carrying a request is released by
        # the request that holds it.
        if connection in self._idle:
            self._idle.remove(connection)
            self._discard(connection)

    def _discard(self, connection: UpstreamConnection) -> None:
        connection.close()
        if connection.counted:
            connection.counted = False
            self.open_connections -= 1
            self._wake_waiter()

    def _wake_waiter(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _is_chunked(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"transfer-encoding" and b"chunked" in value.lower() for name, value in headers)
