"""The cache as the service uses it: versioned keys per kind, TTLs, metrics, degradation."""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import MaxConnectionsError

from app.cache.base import KEY_VERSIONS, CacheBackend, CacheKind
from app.cache.memory import MemoryBackend
from app.cache.outage import OutageTracker
from app.cache.redis import REDIS_FAILURES, RedisBackend, RedisClusterBackend
from app.core.config import Settings
from app.monitoring.metrics import CACHE_REQUESTS

logger = logging.getLogger(__name__)


class Cache:
    """Entries of each ``CacheKind`` under ``{prefix}:{kind}:v{version}:{identity}``.

    Every method returns normally when the backend fails: a lookup is then a miss, and a
    write or delete is skipped. A delete that was skipped leaves the entry until its TTL.
    """

    def __init__(
        self,
        backend: CacheBackend,
        ttls: dict[CacheKind, int],
        *,
        enabled: bool = True,
        key_prefix: str = "tat",
        timeout_seconds: float = 0.25,
        outages: OutageTracker | None = None,
    ) -> None:
        self.backend = backend
        self.ttls = ttls
        self.enabled = enabled
        self.timeout_seconds = timeout_seconds
        self.outages = outages or OutageTracker("cache", 2.0, 30.0)
        self._prefixes = {kind: f"{key_prefix}:{kind.value}:v{KEY_VERSIONS[kind]}:" for kind in CacheKind}
        self._local = isinstance(backend, MemoryBackend)
        self._counters = {
            (kind, result): CACHE_REQUESTS.labels(kind.value, result)
            for kind in CacheKind
            for result in ("hit", "miss", "error", "bypass")
        }

    async def start(self) -> None:
        """Connect the backend; an unreachable server is logged and tried again by later commands."""
        try:
            await self.backend.start(self.timeout_seconds * 8)
        except REDIS_FAILURES as exc:
            self.outages.failed("cluster", exc)

    def key(self, kind: CacheKind, identity: str) -> str:
        return self._prefixes[kind] + identity

    async def get(self, kind: CacheKind, identity: str) -> bytes | None:
        if not self.enabled:
            return None
        key = self._prefixes[kind] + identity
        if self._local:
            value = await self.backend.get(key)
        else:
            server = self.backend.server_of(key)
            if not self.outages.should_try(server):
                self._counters[kind, "bypass"].inc()
                return None
            try:
                async with asyncio.timeout(self.timeout_seconds):
                    value = await self.backend.get(key)
            except MaxConnectionsError:
                # Every pooled connection is busy: this process is loaded, the server is fine.
                self._counters[kind, "error"].inc()
                return None
            except REDIS_FAILURES as exc:
                self.outages.failed(server, exc)
                self._counters[kind, "error"].inc()
                return None
            self.outages.succeeded(server)
        self._counters[kind, "hit" if value is not None else "miss"].inc()
        return value

    async def set(self, kind: CacheKind, identity: str, value: bytes) -> None:
        if self.enabled:
            await self._write(kind, identity, value)

    async def delete(self, kind: CacheKind, identity: str) -> None:
        await self._write(kind, identity, None)

    async def _write(self, kind: CacheKind, identity: str, value: bytes | None) -> None:
        key = self._prefixes[kind] + identity
        if self._local:
            await self._apply(key, kind, value)
            return
        server = self.backend.server_of(key)
        if not self.outages.should_try(server):
            return
        try:
            async with asyncio.timeout(self.timeout_seconds):
                await self._apply(key, kind, value)
        except MaxConnectionsError:
            return
        except REDIS_FAILURES as exc:
            self.outages.failed(server, exc)
            return
        self.outages.succeeded(server)

    async def _apply(self, key: str, kind: CacheKind, value: bytes | None) -> None:
        if value is None:
            await self.backend.delete(key)
        else:
            await self.backend.set(key, value, self.ttls[kind])

    async def check(self) -> str:
        """Return ``ok``, or what failed, for the readiness report."""
        if self._local:
            return "ok"
        try:
            async with asyncio.timeout(self.timeout_seconds * 4):
                await self.backend.ping()
        except REDIS_FAILURES as exc:
            return f"{type(exc).__name__}: {exc}".rstrip(": ")
        return "ok"

    def describe(self) -> str:
        return self.backend.name

    async def aclose(self) -> None:
        await self.backend.aclose()


def build_cache(settings: Settings) -> Cache:
    """Build the cache that the settings select: a Redis Cluster, one Redis, or this process's memory."""
    caching = settings.caching
    cluster = settings.distributed_cache
    backend: CacheBackend
    llm_ttl = caching.ttl
    if cluster.enabled:
        backend = RedisClusterBackend.from_settings(
            cluster.nodes,
            caching,
            max_connections=cluster.max_connections,
            password=cluster.resolved_password(),
        )
        llm_ttl = cluster.default_ttl
    elif caching.provider == "redis":
        backend = RedisBackend.from_settings(caching)
    else:
        backend = MemoryBackend(caching.max_entries)

    ttls = {
        CacheKind.LLM_RESPONSE: llm_ttl,
        CacheKind.KNOWLEDGE_QUERY: caching.knowledge_ttl,
        CacheKind.QUERY_EMBEDDING: caching.embedding_ttl,
        CacheKind.PROJECT: caching.project_ttl,
    }
    logger.info(
        "cache: %s",
        backend.name,
        extra={"action": "cache.configured", "backend": backend.name, "enabled": caching.enabled},
    )
    return Cache(
        backend,
        ttls,
        enabled=caching.enabled,
        key_prefix=caching.key_prefix,
        timeout_seconds=caching.timeout_seconds,
        outages=OutageTracker("cache", caching.retry_seconds, caching.outage_log_interval_seconds),
    )
