"""Signals between two processes' buses through a real Redis and a real Redis Cluster."""

from __future__ import annotations

import asyncio

import pytest

from app.signals import Channel
from tests.integration.cache.helpers import backend_settings, eventually, make_bus

SIGNAL_TIMEOUT_SECONDS = 10


@pytest.fixture
def servers(request: pytest.FixtureRequest):
    fixture = "redis_server" if request.param == "redis" else "redis_cluster"
    return request.param, request.getfixturevalue(fixture)


@pytest.mark.parametrize("servers", ["redis", "redis_cluster"], indirect=True)
async def test_signals_reach_other_bus(servers, key_prefix):
    backend, redis_servers = servers
    settings = backend_settings(backend, redis_servers, key_prefix)
    sender, receiver = make_bus(settings), make_bus(settings)
    ready = asyncio.Event()
    cancelled: list[bytes] = []
    receiver.on(Channel.TASK_READY, lambda payload: ready.set())
    receiver.on(Channel.CANCEL, cancelled.append)
    follower = receiver.follow("project-1")
    other_follower = receiver.follow("project-2")
    try:

        async def subscribed() -> bool:
            return receiver.working

        await eventually(subscribed, SIGNAL_TIMEOUT_SECONDS, "the receiving bus to subscribe")
        event = {"seq": 7, "type": "task.completed", "task_id": "t", "data": {"key": "T1"}, "created_at": "x"}
        sender.publish_events("project-1", [event])
        sender.publish_cancel("project-1")
        sender.publish_task_ready()

        # Each publish may take its own connection, so the three can arrive in any order.
        async with asyncio.timeout(SIGNAL_TIMEOUT_SECONDS):
            await ready.wait()
            batch = await follower.queue.get()

        async def cancel_arrived() -> bool:
            return bool(cancelled)

        await eventually(cancel_arrived, SIGNAL_TIMEOUT_SECONDS, "the cancel signal")
        assert batch == [event]
        assert cancelled == [b"project-1"]
        assert other_follower.queue.empty()
    finally:
        await sender.aclose()
        await receiver.aclose()
