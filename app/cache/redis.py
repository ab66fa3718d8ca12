"""The Redis backends: one standalone server, or a Redis Cluster.

Both clients use short socket timeouts and no client-side retries: a cache that does not
reply at once is bypassed (see ``app.cache.outage``), which is cheaper than waiting.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from app.core.config import CacheNode, CachingSettings

# The errors a failing server raises through redis-py: its own errors, socket errors, and the
# TimeoutError of ``asyncio.timeout`` around each command.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


def redis_client(
    host: str, port: int, settings: CachingSettings, *, db: int = 0, password: str | None = None
) -> Redis:
    return Redis(
        host=host,
        port=port,
        db=db,
        password=password,
        socket_timeout=settings.timeout_seconds,
        socket_connect_timeout=settings.connect_timeout_seconds,
        retry=Retry(NoBackoff(), 0),
        client_name="toronto-ai",
    )


class _RedisCommands:
    """The cache commands, which a standalone server and a cluster client take alike."""

    client: Redis | RedisCluster

    async def get(self, key: str) -> bytes | None:
        return await self.client.get(key)

    async def set(self, key: str, value: bytes, ttl_seconds: int) -> None:
        await self.client.set(key, value, ex=ttl_seconds)

    async def delete(self, key: str) -> None:
        await self.client.delete(key)

    async def aclose(self) -> None:
        await self.client.aclose()


class RedisBackend(_RedisCommands):
    name = "redis"

    def __init__(self, client: Redis, server: str) -> None:
        self.client = client
        self.server = server

    @classmethod
    def from_settings(cls, settings: CachingSettings) -> RedisBackend:
        client = redis_client(
            settings.redis_host,
            settings.redis_port,
            settings,
            db=settings.redis_db,
            password=settings.resolved_redis_password(),
        )
        return cls(client, f"{settings.redis_host}:{settings.redis_port}")

    async def start(self, timeout_seconds: float) -> None:
        return None

    def server_of(self, key: str) -> str:
        return self.server

    async def ping(self) -> None:
        await self.client.ping()


class RedisClusterBackend(_RedisCommands):
    """Keys carry no hash tags, so they spread over every master's slots."""

    name = "redis_cluster"

    def __init__(self, client: RedisCluster) -> None:
        self.client = client

    @classmethod
    def from_settings(
        cls,
        nodes: list[CacheNode],
        settings: CachingSettings,
        *,
        max_connections: int,
        password: str | None = None,
    ) -> RedisClusterBackend:
        client = RedisCluster(
            startup_nodes=[ClusterNode(node.host, node.port) for node in nodes],
            # Serve the slots of the masters that are up while another is down, instead of
            # refusing every command until the cluster is whole again.
            require_full_coverage=False,
            max_connections=max_connections,
            password=password,
            socket_timeout=settings.timeout_seconds,
            socket_connect_timeout=settings.connect_timeout_seconds,
            retry=Retry(NoBackoff(), 1),
            client_name="toronto-ai",
        )
        return cls(client)

    async def start(self, timeout_seconds: float) -> None:
        """Read the cluster's slot map now, so that the first commands need not wait for it."""
        async with asyncio.timeout(timeout_seconds):
            await self.client.initialize()

    def server_of(self, key: str) -> str:
        """Return the master that owns the key's slot, or ``cluster`` before the slot map is known."""
        try:
            return self.client.get_node_from_key(key).name
        except (RedisError, RedisClusterException, IndexError, KeyError):
            return "cluster"

    async def ping(self) -> None:
        await self.client.ping(target_nodes=RedisCluster.PRIMARIES)
