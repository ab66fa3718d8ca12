"""Publishing and receiving signals, in this process or through Redis pub/sub.

Without Redis a signal reaches only the handlers of the process that sent it (an API
instance with an embedded worker). With Redis every process subscribes once: a standalone
server, or one node of a Redis Cluster at a time, since the cluster forwards a PUBLISH on
any node to the subscribers of every node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import suppress
from enum import StrEnum
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from app.cache.outage import OutageTracker
from app.cache.redis import REDIS_FAILURES, redis_client
from app.core.config import CachingSettings, Settings
from app.monitoring.metrics import SIGNALS_UP

logger = logging.getLogger(__name__)

Handler = Callable[[bytes], None]
# Events queued for one stream before it stops taking them from signals and reads the database.
FOLLOWER_QUEUE_SIZE = 1000


class Channel(StrEnum):
    TASK_READY = "task-ready"  # payload: empty
    CANCEL = "cancel"  # payload: the project id
    EVENTS = "events"  # payload: the project id, "|", a JSON list of events


class EventFollower:
    """The events of one project that arrive by signal, for one event stream."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue(FOLLOWER_QUEUE_SIZE)
        # Set when events were dropped because the queue was full; the stream then reads
        # the database to fill the gap.
        self.overflowed = False

    def put(self, batch: list[dict[str, Any]]) -> None:
        try:
            self.queue.put_nowait(batch)
        except asyncio.QueueFull:
            self.overflowed = True


class SignalBus:
    """Handlers per channel, followers per project, and the transport that carries signals."""

    def __init__(self, transport: LocalTransport | RedisTransport) -> None:
        self.transport = transport
        self._handlers: dict[Channel, list[Handler]] = {}
        self._followers: dict[str, set[EventFollower]] = {}
        transport.deliver = self._deliver

    @property
    def working(self) -> bool:
        """Tell whether signals from other processes arrive now; callers poll faster when not."""
        return self.transport.working

    @property
    def degraded(self) -> bool:
        """Tell whether signals should come through Redis but do not, so callers fall back to polling."""
        return isinstance(self.transport, RedisTransport) and not self.transport.working

    def on(self, channel: Channel, handler: Handler) -> None:
        self._handlers.setdefault(channel, []).append(handler)
        self.transport.subscribe(channel)

    def off(self, channel: Channel, handler: Handler) -> None:
        handlers = self._handlers.get(channel, [])
        if handler in handlers:
            handlers.remove(handler)

    def receive_events(self) -> None:
        """Subscribe to project events now, so that the first event stream finds the subscription active."""
        if self._dispatch_events not in self._handlers.get(Channel.EVENTS, ()):
            self.on(Channel.EVENTS, self._dispatch_events)

    def follow(self, project_id: str) -> EventFollower:
        self.receive_events()
        follower = EventFollower()
        self._followers.setdefault(project_id, set()).add(follower)
        return follower

    def unfollow(self, project_id: str, follower: EventFollower) -> None:
        followers = self._followers.get(project_id)
        if followers is not None:
            followers.discard(follower)
            if not followers:
                del self._followers[project_id]

    def publish_task_ready(self) -> None:
        self.transport.publish(Channel.TASK_READY, b"")

    def publish_cancel(self, project_id: str) -> None:
        self.transport.publish(Channel.CANCEL, project_id.encode())

    def publish_events(self, project_id: str, new_events: list[dict[str, Any]]) -> None:
        self.transport.publish(Channel.EVENTS, project_id.encode() + b"|" + orjson.dumps(new_events))

    async def aclose(self) -> None:
        await self.transport.aclose()

    def _deliver(self, channel: Channel, payload: bytes) -> None:
        for handler in self._handlers.get(channel, ()):
            try:
                handler(payload)
            except Exception:  # noqa: BLE001 - one broken handler must not stop the others
                logger.exception("signal handler failed", extra={"action": "signals.handler_failed"})

    def _dispatch_events(self, payload: bytes) -> None:
        project_id, _, body = payload.partition(b"|")
        followers = self._followers.get(project_id.decode())
        if not followers:
            return
        batch = orjson.loads(body)
        for follower in followers:
            follower.put(batch)


class LocalTransport:
    """Delivers signals to the handlers of this process only."""

    # Signals of other processes never arrive, so callers keep polling at their usual pace.
    working = False

    def __init__(self) -> None:
        self.deliver: Callable[[Channel, bytes], None] = lambda channel, payload: None

    def subscribe(self, channel: Channel) -> None:
        return None

    def publish(self, channel: Channel, payload: bytes) -> None:
        # Delivered from the event loop, never inside the publisher's own call (which may be
        # a database driver's commit hook).
        asyncio.get_running_loop().call_soon(self.deliver, channel, payload)

    async def aclose(self) -> None:
        return None


class RedisTransport:
    """Publishes with PUBLISH and receives on one subscribed connection per process.

    ``servers`` are tried in turn: the one server of a standalone Redis, or the nodes of a
    cluster. A failed server is left for the next one, and the outage is tracked like the
    cache's.
    """

    def __init__(
        self, servers: list[tuple[str, int]], settings: CachingSettings, password: str | None
    ) -> None:
        self.servers = servers
        self.settings = settings
        self.password = password
        self.prefix = f"{settings.key_prefix}:signals:v1:"
        self.outages = OutageTracker("signals", settings.retry_seconds, settings.outage_log_interval_seconds)
        self.deliver: Callable[[Channel, bytes], None] = lambda channel, payload: None
        self.working = False
        self._channels: set[Channel] = set()
        self._subscribed: set[Channel] = set()
        self._publisher_index = 0
        self._publisher: Redis | None = None
        self._listener: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._closed = False
        SIGNALS_UP.set(0)

    def subscribe(self, channel: Channel) -> None:
        self._channels.add(channel)
        if self._listener is None and not self._closed:
            self._listener = asyncio.get_running_loop().create_task(self._listen(), name="signals-listener")

    def publish(self, channel: Channel, payload: bytes) -> None:
        server = self._server_name(self._publisher_index)
        if self._closed or not self.outages.should_try(server):
            return
        task = asyncio.get_running_loop().create_task(self._publish(channel, payload, server))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish(self, channel: Channel, payload: bytes, server: str) -> None:
        if self._publisher is None:
            host, port = self.servers[self._publisher_index]
            self._publisher = redis_client(host, port, self.settings, password=self.password)
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                await self._publisher.publish(self.prefix + channel.value, payload)
        except REDIS_FAILURES as exc:
            self.outages.failed(server, exc)
            await self._next_publisher(server)
            return
        self.outages.succeeded(server)

    async def _next_publisher(self, failed_server: str) -> None:
        if self._server_name(self._publisher_index) != failed_server:
            return  # another failed publish moved on already
        publisher, self._publisher = self._publisher, None
        self._publisher_index = (self._publisher_index + 1) % len(self.servers)
        if publisher is not None:
            with suppress(*REDIS_FAILURES):
                await publisher.aclose()

    async def _listen(self) -> None:
        index = 0
        while True:
            server = self._server_name(index)
            host, port = self.servers[index]
            client = redis_client(host, port, self.settings, password=self.password)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await self._receive(pubsub, server)
            except REDIS_FAILURES as exc:
                self._set_working(False)
                self.outages.failed(server, exc)
            finally:
                self._subscribed.clear()
                with suppress(*REDIS_FAILURES):
                    await pubsub.aclose()
                with suppress(*REDIS_FAILURES):
                    await client.aclose()
            index = (index + 1) % len(self.servers)
            await asyncio.sleep(self.settings.retry_seconds / len(self.servers))

    async def _receive(self, pubsub: PubSub, server: str) -> None:
        # A paused or unreachable server raises nothing on a quiet connection, so the
        # listener sends PING every interval and gives up when no reply came in time.
        ping_interval = max(1.0, self.settings.retry_seconds)
        reply_deadline = ping_interval + self.settings.timeout_seconds * 4
        last_reply = last_ping = time.monotonic()
        while True:
            missing = self._channels - self._subscribed
            if missing:
                async with asyncio.timeout(self.settings.timeout_seconds):
                    await pubsub.subscribe(*(self.prefix + channel.value for channel in missing))
                self._subscribed |= missing
                last_reply = time.monotonic()
                self.outages.succeeded(server)
                self._set_working(True)
                logger.info(
                    "signals subscribed on %s: %s",
                    server,
                    ", ".join(sorted(channel.value for channel in self._subscribed)),
                    extra={"action": "signals.subscribed", "server": server},
                )

            message = await pubsub.get_message(timeout=min(1.0, ping_interval))
            now = time.monotonic()
            if message is not None:
                last_reply = now
                if message["type"] == "message":
                    channel = Channel(message["channel"].decode().removeprefix(self.prefix))
                    self.deliver(channel, message["data"])
            if now - last_ping >= ping_interval:
                last_ping = now
                async with asyncio.timeout(self.settings.timeout_seconds):
                    await pubsub.ping()
            if now - last_reply > reply_deadline:
                raise TimeoutError(f"no reply from {server} for {now - last_reply:.1f} s")

    def _set_working(self, working: bool) -> None:
        if working != self.working:
            self.working = working
            SIGNALS_UP.set(1 if working else 0)

    def _server_name(self, index: int) -> str:
        host, port = self.servers[index]
        return f"{host}:{port}"

    async def aclose(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with suppress(asyncio.CancelledError):
                await self._listener
        for task in list(self._pending):
            task.cancel()
        if self._publisher is not None:
            with suppress(*REDIS_FAILURES):
                await self._publisher.aclose()
        self._set_working(False)


def build_signal_bus(settings: Settings) -> SignalBus:
    """Signals go through the cluster's nodes, the Redis server, or stay in this process."""
    caching = settings.caching
    if settings.distributed_cache.enabled:
        servers = [(node.host, node.port) for node in settings.distributed_cache.nodes]
        password = settings.distributed_cache.resolved_password()
    elif caching.provider == "redis":
        servers = [(caching.redis_host, caching.redis_port)]
        password = caching.resolved_redis_password()
    else:
        return SignalBus(LocalTransport())
    return SignalBus(RedisTransport(servers, caching, password))
