"""The cache and signals when Redis is down, paused or restarted: bypass, one log line, recovery."""

from __future__ import annotations

import logging

import pytest
from redis.asyncio import Redis

from app.cache import CacheKind
from app.signals import Channel
from tests.integration.cache.helpers import backend_settings, eventually, make_bus, make_cache, metric
from tests.services.redis import PORT_BASE, RedisServers

# Nothing listens here: the test servers use the first four ports of the range.
CLOSED_PORT = PORT_BASE + 9
RECOVERY_TIMEOUT_SECONDS = 20
FAST_RETRY = {"TORONTO_AI_CACHING__RETRY_SECONDS": "0.2"}


def outage_records(caplog: pytest.LogCaptureFixture, action: str, role: str = "cache") -> list:
    return [
        record
        for record in caplog.records
        if getattr(record, "action", None) == action and getattr(record, "role", None) == role
    ]


async def test_unreachable_server_is_bypassed(caplog, key_prefix):
    caplog.set_level(logging.INFO)
    closed = RedisServers(directory=None, ports=[CLOSED_PORT])
    settings = backend_settings("redis", closed, key_prefix)
    server = f"127.0.0.1:{CLOSED_PORT}"
    cache = await make_cache(settings)
    bus = make_bus(settings)
    errors = metric("toronto_ai_cache_requests_total", kind="llm", result="error")
    bypassed = metric("toronto_ai_cache_requests_total", kind="llm", result="bypass")
    try:
        for _ in range(20):
            assert await cache.get(CacheKind.LLM_RESPONSE, "digest") is None
            await cache.set(CacheKind.LLM_RESPONSE, "digest", b"value")
        bus.on(Channel.TASK_READY, lambda payload: None)
        bus.publish_task_ready()
        assert await cache.check() != "ok"
        assert not bus.working
    finally:
        await cache.aclose()
        await bus.aclose()

    # The first failure marks the server down; the rest of the calls skip it without waiting.
    assert metric("toronto_ai_cache_requests_total", kind="llm", result="error") == errors + 1
    assert metric("toronto_ai_cache_requests_total", kind="llm", result="bypass") == bypassed + 19
    assert metric("toronto_ai_cache_server_up", role="cache", server=server) == 0
    assert len(outage_records(caplog, "redis.unavailable")) == 1
    assert outage_records(caplog, "redis.recovered") == []


async def test_cache_and_signals_recover_after_restart(redis_server, caplog, key_prefix):
    caplog.set_level(logging.INFO)
    settings = backend_settings("redis", redis_server, key_prefix, **FAST_RETRY)
    server = f"127.0.0.1:{redis_server.port}"
    cache = await make_cache(settings)
    bus = make_bus(settings)
    bus.on(Channel.TASK_READY, lambda payload: None)
    outages = metric("toronto_ai_cache_outages_total", role="cache", server=server)
    try:

        async def signals_working() -> bool:
            return bus.working

        async def signals_stopped() -> bool:
            return not bus.working

        await eventually(signals_working, RECOVERY_TIMEOUT_SECONDS, "signals to subscribe")
        await cache.set(CacheKind.PROJECT, "finished", b"{}")
        assert await cache.get(CacheKind.PROJECT, "finished") == b"{}"

        redis_server.stop_node(redis_server.port)
        try:
            assert await cache.get(CacheKind.PROJECT, "finished") is None
            assert metric("toronto_ai_cache_server_up", role="cache", server=server) == 0
            await eventually(signals_stopped, RECOVERY_TIMEOUT_SECONDS, "signals to notice the outage")
        finally:
            redis_server.start_node(redis_server.port)

        # The server restarted empty, so write again until the entry can be read back.
        async def cache_works() -> bool:
            await cache.set(CacheKind.PROJECT, "finished", b"{}")
            return await cache.get(CacheKind.PROJECT, "finished") == b"{}"

        await eventually(cache_works, RECOVERY_TIMEOUT_SECONDS, "the cache to use the restarted server")
        await eventually(signals_working, RECOVERY_TIMEOUT_SECONDS, "signals to subscribe again")
    finally:
        await cache.aclose()
        await bus.aclose()

    assert metric("toronto_ai_cache_server_up", role="cache", server=server) == 1
    assert metric("toronto_ai_cache_outages_total", role="cache", server=server) == outages + 1
    assert len(outage_records(caplog, "redis.unavailable")) == 1
    assert len(outage_records(caplog, "redis.recovered")) == 1
    assert len(outage_records(caplog, "redis.unavailable", role="signals")) >= 1
    assert len(outage_records(caplog, "redis.recovered", role="signals")) >= 1


async def test_paused_server_times_out(redis_server, caplog, key_prefix):
    caplog.set_level(logging.INFO)
    settings = backend_settings("redis", redis_server, key_prefix, **FAST_RETRY)
    cache = await make_cache(settings)
    admin = Redis(host=redis_server.host, port=redis_server.port)
    try:
        await cache.set(CacheKind.KNOWLEDGE_QUERY, "question", b"answer")
        # CLIENT PAUSE delays every client's commands, as a server stuck on a slow command would.
        await admin.execute_command("CLIENT", "PAUSE", "3000", "ALL")
        assert await cache.get(CacheKind.KNOWLEDGE_QUERY, "question") is None
        [unavailable] = outage_records(caplog, "redis.unavailable")
        assert "TimeoutError" in unavailable.getMessage()

        async def answered() -> bool:
            return await cache.get(CacheKind.KNOWLEDGE_QUERY, "question") == b"answer"

        await eventually(answered, RECOVERY_TIMEOUT_SECONDS, "the cache to answer after the pause")
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
        await cache.aclose()
    assert len(outage_records(caplog, "redis.recovered")) == 1
