"""The interface of cache backends, and the kinds of entries the service caches."""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol


class CacheKind(StrEnum):
    LLM_RESPONSE = "llm"
    KNOWLEDGE_QUERY = "knowledge"
    QUERY_EMBEDDING = "embedding"
    PROJECT = "project"


# Part of every key. Raise a kind's version whenever the layout of its values changes, so
# that instances of a new deploy never decode entries written by the old one.
KEY_VERSIONS: dict[CacheKind, int] = {
    CacheKind.LLM_RESPONSE: 2,
    CacheKind.KNOWLEDGE_QUERY: 1,
    CacheKind.QUERY_EMBEDDING: 1,
    CacheKind.PROJECT: 1,
}


class CacheBackend(Protocol):
    """A store of bytes with a time to live. Methods raise redis-py errors, OSError or TimeoutError."""

    name: str

    async def start(self, timeout_seconds: float) -> None:
        """Connect ahead of the first command where the backend needs to; raise like a command."""
        ...

    def server_of(self, key: str) -> str:
        """Return the server (``host:port``) that stores ``key``, for outage tracking."""
        ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_seconds: int) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def ping(self) -> None:
        """Raise unless every server of the backend replies."""
        ...

    async def aclose(self) -> None: ...
