"""Chroma servers reached through the Chroma 1.x async HTTP client: connections, retries, health.

``ChromaInstances`` keeps one ``chromadb.AsyncHttpClient`` per configured server, created on
first use, and runs every call through ``call()``: a call that fails with a transient error
(connection refused or reset, a timeout, a 5xx or 429 response) is retried with exponential
backoff, and one that still fails raises ``VectorStoreUnavailableError`` naming the server's
host:port and how to start it. An instance that failed recently is marked unhealthy for
``vector_db.unhealthy_seconds``, so that queries ask its replicas first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import chromadb
import chromadb.errors
import httpx
from chromadb.api.models.AsyncCollection import AsyncCollection

from app.core.config import VectorDbSettings
from app.errors import VectorStoreUnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")

CollectionNotFound = chromadb.errors.NotFoundError


def is_transient(exc: BaseException) -> bool:
    """Tell whether the same request may succeed later: network errors, timeouts, 5xx and 429."""
    if isinstance(exc, httpx.TransportError | TimeoutError | ConnectionError):
        return True
    if isinstance(exc, chromadb.errors.InternalError | chromadb.errors.RateLimitError):
        return True
    # The client raises a bare Exception with the body of an error response it cannot parse,
    # such as a 502 from a proxy in front of the server.
    return type(exc) is Exception


def unavailable_message(address: str, exc: BaseException) -> str:
    reason = str(exc) or type(exc).__name__
    host, _, port = address.rpartition(":")
    return (
        f"Chroma server {address} is unreachable ({reason}); start it with "
        f"`chroma run --host {host} --port {port} --path DIR` or fix vector_db.instances"
    )


class ChromaInstances:
    """Clients of the configured Chroma servers, with retries and a health mark per server."""

    def __init__(self, settings: VectorDbSettings) -> None:
        self.settings = settings
        self._clients: dict[str, Any] = {}
        self._collections: dict[tuple[str, str], AsyncCollection] = {}
        self._max_batch: dict[str, int] = {}
        self._unhealthy_until: dict[str, float] = {}
        # One lock per server, so that connecting to an unreachable one delays no other.
        self._connect_locks: dict[str, asyncio.Lock] = {}

    def is_healthy(self, address: str) -> bool:
        return self._unhealthy_until.get(address, 0.0) <= time.monotonic()

    def mark_unhealthy(self, address: str) -> None:
        self._unhealthy_until[address] = time.monotonic() + self.settings.unhealthy_seconds

    async def call(
        self,
        address: str,
        operation: Callable[[], Awaitable[T]],
        *,
        timeout: float | None = None,
        retries: int | None = None,
        action: str = "request",
    ) -> T:
        """Run ``operation`` against ``address``, retrying transient errors with backoff."""
        retries = self.settings.max_retries if retries is None else retries
        timeout = self.settings.request_timeout_seconds if timeout is None else timeout
        attempt = 0
        while True:
            try:
                result = await asyncio.wait_for(operation(), timeout)
            except Exception as exc:  # noqa: BLE001 - classified just below
                if not is_transient(exc):
                    raise
                self.mark_unhealthy(address)
                if attempt >= retries:
                    raise VectorStoreUnavailableError(unavailable_message(address, exc)) from exc
                delay = self.settings.retry_backoff_seconds * 2**attempt
                attempt += 1
                logger.warning(
                    "Chroma %s on %s failed (%s); retry %d of %d in %.2f s",
                    action,
                    address,
                    exc or type(exc).__name__,
                    attempt,
                    retries,
                    delay,
                    extra={"action": "vector_db.retry", "instance": address, "attempt": attempt},
                )
                await asyncio.sleep(delay)
                continue
            self._unhealthy_until.pop(address, None)
            return result

    async def client(self, address: str, *, retries: int | None = None) -> Any:
        """Return the client of ``address``, connecting first if needed."""
        existing = self._clients.get(address)
        if existing is not None:
            return existing
        host, _, port = address.rpartition(":")

        async def connect() -> Any:
            return await chromadb.AsyncHttpClient(
                host=host, port=int(port), settings=chromadb.Settings(anonymized_telemetry=False)
            )

        async with self._connect_locks.setdefault(address, asyncio.Lock()):
            if address not in self._clients:
                self._clients[address] = await self.call(address, connect, retries=retries, action="connect")
        return self._clients[address]

    async def heartbeat(self, address: str, *, retries: int | None = None) -> None:
        """Raise VectorStoreUnavailableError unless ``address`` responds to its heartbeat."""
        client = await self.client(address, retries=retries)
        await self.call(address, client.heartbeat, retries=retries, action="heartbeat")

    async def max_batch_size(self, address: str) -> int:
        """Return the most records one write may carry, as the server reports it."""
        if address not in self._max_batch:
            client = await self.client(address)
            self._max_batch[address] = await self.call(
                address, client.get_max_batch_size, action="get_max_batch_size"
            )
        return self._max_batch[address]

    async def collection(
        self, address: str, name: str, *, create: bool, retries: int | None = None
    ) -> AsyncCollection:
        """Return collection ``name`` on ``address``; with ``create``, create it if it is missing.

        An existing collection keeps the HNSW configuration it was created with.
        """
        key = (address, name)
        cached = self._collections.get(key)
        if cached is not None:
            return cached
        client = await self.client(address, retries=retries)
        if create:
            configuration = {
                "hnsw": {
                    "space": self.settings.hnsw_space,
                    "ef_search": self.settings.hnsw_ef_search,
                    "ef_construction": self.settings.hnsw_ef_construction,
                    "max_neighbors": self.settings.hnsw_max_neighbors,
                }
            }

            async def open_collection() -> AsyncCollection:
                return await client.get_or_create_collection(
                    name, configuration=configuration, embedding_function=None
                )
        else:

            async def open_collection() -> AsyncCollection:
                return await client.get_collection(name, embedding_function=None)

        collection = await self.call(address, open_collection, retries=retries, action="open collection")
        self._collections[key] = collection
        return collection

    async def drop_collection(self, address: str, name: str) -> bool:
        """Delete collection ``name`` on ``address``; return False if it did not exist."""
        self._collections.pop((address, name), None)
        client = await self.client(address)
        try:
            await self.call(address, lambda: client.delete_collection(name), action="delete collection")
        except CollectionNotFound:
            return False
        return True

    def forget_collection(self, address: str, name: str) -> None:
        self._collections.pop((address, name), None)
