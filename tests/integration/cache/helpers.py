"""Building caches and signal buses on the test servers, and reading metric values."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from prometheus_client import REGISTRY

from app.cache import Cache, build_cache
from app.core.config import Settings, load_settings
from app.signals import SignalBus, build_signal_bus
from tests.services.redis import RedisServers

T = TypeVar("T")


def backend_settings(backend: str, servers: RedisServers | None, key_prefix: str, **extra: str) -> Settings:
    environ = {"TORONTO_AI_ENV": "test", "TORONTO_AI_CACHING__KEY_PREFIX": key_prefix, **extra}
    if backend == "redis":
        environ.update(servers.standalone_settings(key_prefix))
    elif backend == "redis_cluster":
        environ.update(servers.cluster_settings(key_prefix))
    return load_settings(config_dir=Path("/nonexistent-config"), environ=environ)


async def make_cache(settings: Settings) -> Cache:
    cache = build_cache(settings)
    await cache.start()
    return cache


def make_bus(settings: Settings) -> SignalBus:
    return build_signal_bus(settings)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def eventually(condition: Callable[[], Awaitable[T]], timeout: float, description: str) -> T:
    """Await ``condition()`` until it returns a truthy value; fail naming ``description`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = await condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {description}")
        await asyncio.sleep(0.05)
