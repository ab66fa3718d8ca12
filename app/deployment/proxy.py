"""The load balancer: forward each client request to one API instance.

Client connections are served by ``app.deployment.http_server`` and instances are reached
through the keep-alive pools of ``app.deployment.upstream``, both on httptools and plain
asyncio protocols. Served by uvicorn with aiohttp's client, the balancer reached 0.47 of
nginx's throughput over three instances on this project's 2-core test machine; most of its
CPU went to building ASGI messages and client objects that a proxy does not need.

A response that declares a length of at most ``BUFFERED_RESPONSE_BYTES`` is read whole
before anything is forwarded. Other responses are streamed back chunk by chunk as the
instance sends them, so Server-Sent Events pass through unbuffered. Request bodies are
read whole first (at most ``api.max_body_bytes``, the API's own limit), so that a retry
can send them again.

A failed attempt goes to another instance when that cannot run the request twice: always
when no connection could be opened (nothing was sent), and for the idempotent methods also
when the instance failed before its whole response was read, for a buffered response, or
before its headers arrived, for a streamed one. An instance killed while it sends a
project therefore costs the client nothing. Once response headers have been forwarded
nothing is retried; a stream that breaks is cut off, and the client sees the truncated
response.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.core.arguments import parse_address
from app.core.config import LoadBalancerSettings
from app.deployment.backends import Backend, BackendPool
from app.deployment.balancer_metrics import BalancerMetrics
from app.deployment.health import HealthChecker
from app.deployment.http_server import ClientConnection, HTTPServer, Request
from app.deployment.upstream import UpstreamConnectError, UpstreamError, UpstreamPool, UpstreamResponse

logger = logging.getLogger(__name__)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
HOP_BY_HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers the balancer sets itself; a client's own values are dropped. The body
# is sent with a Content-Length of its own, and the balancer itself responds to a client's
# Expect: 100-continue.
REPLACED_REQUEST_HEADERS = HOP_BY_HOP_HEADERS | {
    b"x-real-ip",
    b"x-forwarded-proto",
    b"content-length",
    b"expect",
}
METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
REQUEST_ID_HEADER = b"x-request-id"
# The API cuts a longer X-Request-ID to this length too, so both log the same id.
MAX_REQUEST_ID_LENGTH = 100
METRICS_PATH = b"/metrics"
BACKENDS_PATH = b"/lb/backends"
# Shorter than uvicorn's 5 s keep-alive, so an idle connection is dropped here before the
# instance closes it under a new request.
UPSTREAM_KEEPALIVE_SECONDS = 4.0
# A project's JSON is tens of kilobytes. Larger responses are streamed, so the balancer's
# memory per request stays bounded.
BUFFERED_RESPONSE_BYTES = 1024 * 1024
# Outcomes of a failed attempt: the instance cannot have seen the request, or it may have.
NOT_SENT = "not_sent"
FAILED = "failed"


class LoadBalancer:
    """Balance HTTP requests over the configured API instances."""

    def __init__(self, settings: LoadBalancerSettings, max_body_bytes: int) -> None:
        self.settings = settings
        self.max_body_bytes = max_body_bytes
        backends = [Backend(*parse_address(address)) for address in settings.backends]
        self.pool = BackendPool(
            backends,
            strategy=settings.strategy,
            max_failures=settings.max_failures,
            slow_start_seconds=settings.slow_start_seconds,
        )
        self.metrics = BalancerMetrics(self.pool)
        self.server = HTTPServer(
            self.handle,
            max_connections=settings.max_connections,
            max_body_bytes=max_body_bytes,
            header_timeout=settings.header_timeout_seconds,
            body_limit_detail=(
                f"request body larger than {max_body_bytes} bytes; send less, or raise api.max_body_bytes"
            ),
        )
        self.upstreams: dict[Backend, UpstreamPool] = {}
        self._health_client: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task[None] | None = None

    async def handle(self, request: Request, connection: ClientConnection) -> None:
        if request.path == METRICS_PATH:
            body = generate_latest(self.metrics.registry)
            headers = [
                (b"content-type", CONTENT_TYPE_LATEST.encode()),
                (b"content-length", b"%d" % len(body)),
            ]
            connection.respond(200, headers, body)
            return
        if request.path == BACKENDS_PATH:
            connection.respond_json(200, self.describe_backends())
            return
        await self.proxy(request, connection)

    def describe_backends(self) -> list[dict[str, object]]:
        return [
            {
                "address": backend.address,
                "admitted": not backend.ejected,
                "weight": round(self.pool.weight(backend), 3),
                "active_requests": backend.active_requests,
                "consecutive_failures": backend.consecutive_failures,
                "ejections": backend.ejections,
            }
            for backend in self.pool.backends
        ]

    # Start-up and shutdown

    async def start(self) -> None:
        settings = self.settings
        for backend in self.pool.backends:
            self.upstreams[backend] = UpstreamPool(
                backend.host,
                backend.port,
                max_connections=settings.backend_max_connections,
                # Only the TCP handshake is bounded: a request waiting for a pooled connection
                # to a busy but healthy instance is not a failure. The client connection
                # limit (max_connections) bounds how many can wait.
                connect_timeout=settings.connect_timeout_seconds,
                read_timeout=settings.read_timeout_seconds,
                keepalive_seconds=UPSTREAM_KEEPALIVE_SECONDS,
            )
        # Probes run every few seconds, so the client's per-request cost does not matter.
        self._health_client = httpx.AsyncClient(
            timeout=settings.health_check_timeout_seconds, trust_env=False
        )
        checker = HealthChecker(
            self.pool,
            self._health_client,
            settings.health_check_interval_seconds,
            settings.health_check_failures,
        )
        await checker.check_once(initial=True)
        self._health_task = asyncio.create_task(checker.run(), name="lb-health-checks")
        # With no instance admitted every request gets 503 until one passes a health check.
        logger.log(
            logging.INFO if self.pool.admitted() else logging.WARNING,
            "load balancer started with %d of %d backends admitted",
            len(self.pool.admitted()),
            len(self.pool.backends),
            extra={
                "action": "lb.started",
                "strategy": settings.strategy,
                "backends": [backend.address for backend in self.pool.backends],
                "admitted": [backend.address for backend in self.pool.admitted()],
            },
        )

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        for upstreams in self.upstreams.values():
            upstreams.close()
        if self._health_client is not None:
            await self._health_client.aclose()
        logger.info("load balancer stopped", extra={"action": "lb.stopped"})

    # Proxying

    async def proxy(self, request: Request, connection: ClientConnection) -> None:
        method = request.method
        head, request_id, has_host = self._upstream_head(request)
        tried: list[Backend] = []
        for attempt in range(self.settings.retries + 1):
            backend = self.pool.choose(exclude=tried)
            if backend is None:
                break
            if attempt:
                self.metrics.retries.inc()
            tried.append(backend)
            full_head = head if has_host else head + b"host: %s\r\n" % backend.address.encode()
            outcome = await self._attempt(backend, request, full_head + b"\r\n", request_id, connection)
            if outcome is None:
                return
            if not (outcome == NOT_SENT or method in IDEMPOTENT_METHODS):
                detail = (
                    f"the API instance failed while handling this {method} request, which may have "
                    "taken effect: check before sending it again"
                )
                self._send_error(connection, 502, detail, request_id)
                return

        if not tried:
            detail = "no API instance is available: every backend is failing its health checks"
            self._send_error(connection, 503, detail, request_id, retry_after=True)
        else:
            addresses = ", ".join(backend.address for backend in tried)
            self._send_error(connection, 502, f"no API instance answered; tried {addresses}", request_id)

    async def _attempt(
        self, backend: Backend, request: Request, head: bytes, request_id: bytes, connection: ClientConnection
    ) -> str | None:
        """Send one attempt; return None once a response was forwarded, else why it failed.

        ``NOT_SENT`` means the instance cannot have seen the request; ``FAILED`` means it may
        have.
        """
        upstreams = self.upstreams[backend]
        backend.active_requests += 1
        started = time.perf_counter()
        try:
            try:
                upstream = await upstreams.acquire()
            except UpstreamConnectError as exc:
                self._count_failure(backend, request.method, request_id, exc)
                return NOT_SENT
            try:
                response = await upstream.send(
                    head,
                    request.body,
                    head_only=request.method == "HEAD",
                    buffer_limit=BUFFERED_RESPONSE_BYTES,
                )
            except UpstreamError as exc:
                upstreams.release(upstream, reusable=False)
                self._count_failure(backend, request.method, request_id, exc)
                return FAILED
            except BaseException:
                upstreams.release(upstream, reusable=False)
                raise

            self.metrics.duration.observe(time.perf_counter() - started)
            self.metrics.requests.labels(backend.address, str(response.status)).inc()
            self.pool.record_success(backend)
            headers = _response_headers(response, request_id)
            if response.buffered or response.head_only or _has_no_body(response.status):
                upstreams.release(upstream, reusable=response.complete and response.keep_alive)
                body = response.body if response.buffered and not _has_no_body(response.status) else b""
                connection.respond(response.status, headers, body, response.reason)
                return None
            await self._stream(backend, upstreams, response, headers, request, request_id, connection)
            return None
        finally:
            backend.active_requests -= 1

    async def _stream(
        self,
        backend: Backend,
        upstreams: UpstreamPool,
        response: UpstreamResponse,
        headers: list[tuple[bytes, bytes]],
        request: Request,
        request_id: bytes,
        connection: ClientConnection,
    ) -> None:
        """Copy a response to the client as the instance sends it, until either side ends it."""
        connection.start_stream(
            response.status, headers, length_known=response.content_length is not None, reason=response.reason
        )
        # A response of unknown length, such as an event stream, may run for hours: stop
        # reading it from the instance as soon as the client goes away.
        connection.on_close = response.connection.close
        try:
            while not connection.closed:
                chunk = await response.read_chunk()
                if not chunk:
                    break
                await connection.write(chunk)
        except UpstreamError as exc:
            upstreams.release(response.connection, reusable=False)
            if not connection.closed:
                self._count_failure(backend, request.method, request_id, exc, streaming=True)
                connection.cut_off()
            return
        except BaseException:
            upstreams.release(response.connection, reusable=False)
            raise
        upstreams.release(
            response.connection, reusable=response.complete and response.keep_alive and not connection.closed
        )
        if not connection.closed:
            connection.end_stream()

    def _upstream_head(self, request: Request) -> tuple[bytes, bytes, bool]:
        """Return the request line and headers for the instance, its request id, and whether it has Host.

        The head ends without its blank line, so a Host header can still be added.
        """
        lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), request.target)]
        forwarded_for = b""
        request_id = b""
        has_host = False
        dropped = REPLACED_REQUEST_HEADERS | _connection_options(request.headers)
        for name, value in request.headers:
            if name in dropped:
                continue
            if name == b"x-forwarded-for":
                forwarded_for = value
                continue
            if name == REQUEST_ID_HEADER:
                # The first one counts, so the instance receives exactly the id the balancer logs.
                request_id = request_id or value[:MAX_REQUEST_ID_LENGTH]
                continue
            has_host = has_host or name == b"host"
            lines.append(b"%s: %s\r\n" % (name, value))
        if not request_id:
            # 32 random hex digits, like uuid4().hex, without building a UUID object.
            request_id = os.urandom(16).hex().encode()
        client = request.client_host.encode()
        lines.append(b"x-request-id: %s\r\n" % request_id)
        lines.append(
            b"x-forwarded-for: %s\r\n" % (forwarded_for + b", " + client if forwarded_for else client)
        )
        lines.append(b"x-real-ip: %s\r\nx-forwarded-proto: http\r\n" % client)
        if request.body or request.method in METHODS_WITH_BODY:
            lines.append(b"content-length: %d\r\n" % len(request.body))
        return b"".join(lines), request_id, has_host

    def _count_failure(
        self, backend: Backend, method: str, request_id: bytes, exc: Exception, *, streaming: bool = False
    ) -> None:
        error = type(exc).__name__
        self.metrics.upstream_failures.labels(backend.address, error).inc()
        self._log_attempt_failure(backend, method, request_id, error, str(exc) or error, streaming=streaming)
        self.pool.record_failure(backend, f"{error}: {exc}")

    def _log_attempt_failure(
        self,
        backend: Backend,
        method: str,
        request_id: bytes,
        error: str,
        detail: str,
        *,
        streaming: bool = False,
    ) -> None:
        stage = "while streaming the response" if streaming else "before responding"
        logger.warning(
            "backend %s failed %s: %s",
            backend.address,
            stage,
            detail,
            extra={
                "action": "lb.upstream_failed",
                "backend": backend.address,
                "error": error,
                "method": method,
                "streaming": streaming,
                "request_id": request_id.decode("latin-1"),
            },
        )

    def _send_error(
        self,
        connection: ClientConnection,
        status: int,
        detail: str,
        request_id: bytes,
        *,
        retry_after: bool = False,
    ) -> None:
        self.metrics.requests.labels("none", str(status)).inc()
        extra_headers = [(REQUEST_ID_HEADER, request_id)]
        if retry_after:
            extra_headers.append((b"retry-after", b"2"))
        connection.respond_json(status, {"detail": detail}, extra_headers)


def _response_headers(response: UpstreamResponse, request_id: bytes) -> list[tuple[bytes, bytes]]:
    """Return the instance's response headers as the client gets them."""
    dropped = HOP_BY_HOP_HEADERS | _connection_options(response.headers)
    if _has_no_body(response.status):
        # These statuses never have a body, so a Content-Length would only mislead.
        dropped = dropped | {b"content-length"}
    headers = []
    has_request_id = False
    for name, value in response.headers:
        if name in dropped:
            continue
        has_request_id = has_request_id or name == REQUEST_ID_HEADER
        headers.append((name, value))
    if not has_request_id:
        headers.append((REQUEST_ID_HEADER, request_id))
    return headers


def _connection_options(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Return the header names listed in ``Connection``: they apply to one hop only, so a
    proxy removes them before forwarding (RFC 9110, section 7.6.1)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return frozenset(names)


def _has_no_body(status: int) -> bool:
    """Tell whether a response with this status has no body, whatever its Content-Length.

    RFC 9110, section 6.4.1: 1xx, 204 and 304 responses carry no content.
    """
    return status < 200 or status in (204, 304)
