"""The cache on each backend: in-process, a real Redis and a real three-master Redis Cluster."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from app.cache import CacheKind
from tests.integration.cache.helpers import backend_settings, eventually, make_cache, metric

REMOTE_BACKENDS = ["redis", "redis_cluster"]


@pytest.fixture
def servers(request: pytest.FixtureRequest):
    backend = request.param
    if backend == "redis":
        return backend, request.getfixturevalue("redis_server")
    if backend == "redis_cluster":
        return backend, request.getfixturevalue("redis_cluster")
    return backend, None


@pytest.mark.parametrize("servers", ["memory", *REMOTE_BACKENDS], indirect=True)
async def test_entry_roundtrip_and_counts(servers, key_prefix):
    backend, redis_servers = servers
    cache = await make_cache(backend_settings(backend, redis_servers, key_prefix))
    hits = metric("toronto_ai_cache_requests_total", kind="knowledge", result="hit")
    misses = metric("toronto_ai_cache_requests_total", kind="knowledge", result="miss")
    try:
        assert cache.describe() == backend
        assert await cache.get(CacheKind.KNOWLEDGE_QUERY, "question") is None
        await cache.set(CacheKind.KNOWLEDGE_QUERY, "question", b"answer")
        assert await cache.get(CacheKind.KNOWLEDGE_QUERY, "question") == b"answer"
        # Kinds never share entries, even under the same identity.
        assert await cache.get(CacheKind.PROJECT, "question") is None
        await cache.delete(CacheKind.KNOWLEDGE_QUERY, "question")
        assert await cache.get(CacheKind.KNOWLEDGE_QUERY, "question") is None
        assert await cache.check() == "ok"
    finally:
        await cache.aclose()

    assert metric("toronto_ai_cache_requests_total", kind="knowledge", result="hit") == hits + 1
    assert metric("toronto_ai_cache_requests_total", kind="knowledge", result="miss") == misses + 2


@pytest.mark.parametrize("servers", REMOTE_BACKENDS, indirect=True)
async def test_entry_shared_between_instances(servers, key_prefix):
    backend, redis_servers = servers
    writer = await make_cache(backend_settings(backend, redis_servers, key_prefix))
    reader = await make_cache(backend_settings(backend, redis_servers, key_prefix))
    other_deploy = await make_cache(backend_settings(backend, redis_servers, key_prefix + "x"))
    try:
        await writer.set(CacheKind.LLM_RESPONSE, "prompt-digest", b"completion")
        assert await reader.get(CacheKind.LLM_RESPONSE, "prompt-digest") == b"completion"
        assert await other_deploy.get(CacheKind.LLM_RESPONSE, "prompt-digest") is None
    finally:
        for cache in (writer, reader, other_deploy):
            await cache.aclose()


@pytest.mark.parametrize("servers", ["memory", *REMOTE_BACKENDS], indirect=True)
async def test_entry_expires_after_ttl(servers, key_prefix):
    backend, redis_servers = servers
    settings = backend_settings(backend, redis_servers, key_prefix, TORONTO_AI_CACHING__PROJECT_TTL="1")
    cache = await make_cache(settings)
    try:
        await cache.set(CacheKind.PROJECT, "finished", b"{}")
        await cache.set(CacheKind.KNOWLEDGE_QUERY, "lasting", b"[]")
        assert await cache.get(CacheKind.PROJECT, "finished") == b"{}"

        async def expired() -> bool:
            return await cache.get(CacheKind.PROJECT, "finished") is None

        await eventually(expired, timeout=10, description="the project entry to expire after its 1 s TTL")
        assert await cache.get(CacheKind.KNOWLEDGE_QUERY, "lasting") == b"[]"
    finally:
        await cache.aclose()


@pytest.mark.parametrize("servers", ["redis_cluster"], indirect=True)
async def test_cluster_spreads_keys_over_masters(servers, key_prefix):
    backend, cluster = servers
    cache = await make_cache(backend_settings(backend, cluster, key_prefix))
    try:
        for number in range(300):
            await cache.set(CacheKind.LLM_RESPONSE, f"entry-{number}", b"x")
    finally:
        await cache.aclose()

    per_master = {}
    for port in cluster.ports:
        client = Redis(host=cluster.host, port=port)
        try:
            keys = [key async for key in client.scan_iter(match=f"{key_prefix}:llm:*", count=1000)]
        finally:
            await client.aclose()
        per_master[port] = len(keys)
    assert sum(per_master.values()) == 300
    for port, count in per_master.items():
        assert count > 0, f"master {port} holds none of the keys: {per_master}"
