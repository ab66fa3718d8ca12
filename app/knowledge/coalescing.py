"""Request coalescing: concurrent calls with the same key share one batched request.

``Coalescer.submit(key, item)`` returns the result for ``item``. While fewer than
``max_in_flight`` requests for ``key`` are running, a submitted item goes out at once, together
with the items submitted for the same key in the same event-loop step. Otherwise it waits in
the key's queue, and the next request for the key to finish sends it, with up to
``max_batch - 1`` others, as soon as that request returns. A lone call therefore waits for
nothing (unless ``window_seconds`` is set), and under load each request carries the items that
arrived while the previous one was running.

The queues live in one process and one event loop, so only calls made by the same process
share requests.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
I = TypeVar("I")  # noqa: E741 - the item type, beside K and R
R = TypeVar("R")


class Coalescer(Generic[K, I, R]):
    """Batches concurrent items per key into calls of ``send(key, items)``.

    ``send`` returns one result per item, in the order of ``items``. An exception it raises
    reaches every caller whose item was in that batch.
    """

    def __init__(
        self,
        send: Callable[[K, list[I]], Awaitable[list[R]]],
        *,
        max_batch: int,
        max_in_flight: int = 1,
        window_seconds: float = 0.0,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1 or window_seconds < 0:
            raise ValueError(
                f"invalid coalescing limits: max_batch {max_batch} and max_in_flight {max_in_flight} "
                f"must be at least 1, window_seconds {window_seconds} at least 0"
            )
        self.send = send
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.window_seconds = window_seconds
        self._queues: dict[K, deque[tuple[I, asyncio.Future[R]]]] = {}
        self._in_flight: dict[K, int] = {}
        # The running senders, referenced here so that the event loop does not drop them.
        self._senders: set[asyncio.Task[None]] = set()

    async def submit(self, key: K, item: I) -> R:
        """Return the result of ``item``, sent in a batch with the other items of ``key``."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, deque()).append((item, future))
        running = self._in_flight.get(key, 0)
        if running < self.max_in_flight:
            self._in_flight[key] = running + 1
            sender = asyncio.create_task(self._drain(key))
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return await future

    def pending(self, key: K) -> int:
        """Return how many items of ``key`` wait for a request."""
        return len(self._queues.get(key, ()))

    async def _drain(self, key: K) -> None:
        """Send the key's queued items in batches until its queue is empty."""
        queue = self._queues[key]
        try:
            if self.window_seconds:
                await asyncio.sleep(self.window_seconds)
            while queue:
                batch = self._take(queue)
                if batch:
                    await self._send_batch(key, batch)
        finally:
            self._in_flight[key] -= 1
            if self._in_flight[key] == 0:
                del self._in_flight[key]
                # Items can remain only if this sender was cancelled, as at event loop shutdown,
                # and no other sender of the key is left to send them.
                while queue:
                    _, future = queue.popleft()
                    future.cancel()
                if self._queues.get(key) is queue:
                    del self._queues[key]

    def _take(self, queue: deque[tuple[I, asyncio.Future[R]]]) -> list[tuple[I, asyncio.Future[R]]]:
        batch = []
        while queue and len(batch) < self.max_batch:
            item, future = queue.popleft()
            if not future.done():  # a caller that was cancelled needs no result
                batch.append((item, future))
        return batch

    async def _send_batch(self, key: K, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        futures = [future for _, future in batch]
        try:
            results = await self.send(key, [item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"coalesced send for {key!r} returned {len(results)} results for {len(batch)} items"
                )
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, result in zip(futures, results, strict=True):
            if not future.done():
                future.set_result(result)
