"""Group commit of finished tasks: the results of many tasks are stored in one transaction.

A task that finishes hands its execution to ``CompletionBatcher.store`` and waits. A flusher
collects the results that arrive within ``worker.completion_flush_seconds`` of the first,
up to ``worker.completion_batch_size``, and stores them with ``TaskExecutor.store_many``.
When every running task of the worker has handed in its result, no other result can
arrive, so the batch is stored at once. On a database server up to
``MAX_CONCURRENT_FLUSHES`` batches are stored at the same time, each in its own transaction.
A task counts as completed only once its batch has committed: ``store`` returns after the
commit, and never before.

With a ``Refill``, the transaction that stores a batch also claims up to one new task for
each result in it, because each result frees one slot of the worker. The freed slots are
filled in the same commit, so a worker with work waiting spends no separate transaction,
and no wait for one, on claiming.

Every result in a batch is checked against its lease token, so a stale result is dropped
without affecting the others. When the batch transaction fails, its results are stored
again one per transaction, so that one result the database rejects does not lose the rest.
A result that still fails raises from ``store``; its lease then expires and the sweeper
returns the task to the queue, as for a worker that died. Those retries claim nothing: the
worker's claim loop fills the slots once they are free.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field

from app.agent.executor import Execution, TaskExecutor
from app.core.config import WorkerSettings
from app.db.engine import Database
from app.worker.queue import Lease

logger = logging.getLogger(__name__)

# Batches stored at once on a database server: while one batch commits, the next is built
# and sent on another pooled connection.
MAX_CONCURRENT_FLUSHES = 3


@dataclass(frozen=True, slots=True)
class Refill:
    """The claim a batch makes for the slots its results free, in the transaction that stores it."""

    # Given the results in a batch, returns how many tasks to claim; 0 claims none.
    limit: Callable[[int], int]
    # Takes the claimed leases once the batch has committed and its results are settled.
    start: Callable[[list[Lease]], None]


@dataclass(slots=True)
class _Pending:
    execution: Execution
    stored: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def __post_init__(self) -> None:
        # A caller cancelled while it waited no longer reads the outcome; reading it here
        # keeps asyncio from reporting an exception that was never retrieved.
        self.stored.add_done_callback(lambda future: future.cancelled() or future.exception())


class CompletionBatcher:
    def __init__(
        self,
        database: Database,
        executor: TaskExecutor,
        settings: WorkerSettings,
        worker_id: str,
        running_tasks: Callable[[], int] | None = None,
        refill: Refill | None = None,
    ) -> None:
        """``running_tasks`` returns how many tasks of the worker may still hand in a result.

        Once all of them wait here, the batch is stored without waiting any longer.
        """
        self.database = database
        self.running_tasks = running_tasks
        self.refill = refill
        self.executor = executor
        self.batch_size = settings.completion_batch_size
        self.flush_seconds = settings.completion_flush_seconds
        self.worker_id = worker_id
        self._pending: list[_Pending] = []
        self._arrived = asyncio.Event()  # set when the first result of a batch arrives
        self._full = asyncio.Event()  # set when a batch is full, or when flushing must not wait
        self._closing = False
        self._flusher: asyncio.Task[None] | None = None
        self._flushing = 0  # results in batches being stored
        # On SQLite every write waits for the one write connection, so a second batch in
        # flight would only queue there and hold up the claims behind it.
        self._flush_slots = asyncio.Semaphore(1 if database.is_sqlite else MAX_CONCURRENT_FLUSHES)

    @property
    def pending(self) -> int:
        """Results waiting for the next flush."""
        return len(self._pending)

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_loop(), name=f"completions-{self.worker_id}")

    async def store(self, execution: Execution) -> bool:
        """Queue a successful attempt and wait until its batch commits.

        Returns False when the lease was lost before the commit, and raises the database's
        error when the result could not be stored. Cancelling the caller does not withdraw
        the result: it is still stored with its batch.
        """
        if self._flusher is None or self._flusher.done():
            raise RuntimeError("the completion batcher is not running; call start() first")
        pending = _Pending(execution)
        self._pending.append(pending)
        self._arrived.set()
        if self._closing or len(self._pending) >= self._flush_threshold():
            self._full.set()
        # A cancelled caller cancels only this future: the result stays in its batch.
        return await pending.stored

    def flush_now(self) -> None:
        """Stop waiting for more results: from now on every result is flushed as it arrives."""
        self._closing = True
        self._full.set()

    async def close(self) -> None:
        """Flush every pending result, then stop the flusher."""
        self.flush_now()
        self._arrived.set()
        if self._flusher is not None:
            await self._flusher

    async def _flush_loop(self) -> None:
        in_flight: set[asyncio.Task[None]] = set()
        while True:
            await self._arrived.wait()
            if self._closing and not self._pending:
                break
            if not self._closing:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), timeout=self.flush_seconds)
            await self._flush_slots.acquire()
            batch = self._take_batch()
            flush = asyncio.create_task(self._flush(batch), name=f"flush-{self.worker_id}")
            in_flight.add(flush)
            flush.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight)

    def _flush_threshold(self) -> int:
        if self.running_tasks is None:
            return self.batch_size
        # Results already being flushed cannot arrive again, so they do not count.
        can_still_arrive = self.running_tasks() - self._flushing
        return max(1, min(self.batch_size, can_still_arrive))

    def _take_batch(self) -> list[_Pending]:
        batch = self._pending[: self.batch_size]
        del self._pending[: self.batch_size]
        self._flushing += len(batch)
        if not self._pending and not self._closing:
            # Kept set while closing, so that the loop wakes up to see it has to stop.
            self._arrived.clear()
        if self._closing or len(self._pending) >= self._flush_threshold():
            self._full.set()
        else:
            self._full.clear()
        return batch

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            await self._store_batch(batch)
        finally:
            self._flushing -= len(batch)
            self._flush_slots.release()

    async def _store_batch(self, batch: list[_Pending]) -> None:
        claim_limit = self.refill.limit(len(batch)) if self.refill is not None else 0
        try:
            async with self.database.transaction() as connection:
                results, leases = await self.executor.store_and_claim(
                    connection, [item.execution for item in batch], self.worker_id, claim_limit
                )
        except Exception as exc:  # noqa: BLE001 - each result is retried alone below
            if len(batch) == 1:
                _settle(batch[0], exc)
                return
            logger.error(
                "storing a batch of %d results failed, storing them one by one: %s",
                len(batch),
                exc,
                extra={"action": "worker.batch_failed", "worker_id": self.worker_id, "tasks": len(batch)},
            )
            for item in batch:
                await self._store_alone(item)
            return
        for item, stored in zip(batch, results, strict=True):
            _settle(item, stored)
        if leases:
            # Called before the tasks of the batch resume and give up their slots, so the
            # worker never counts a slot as free that a lease of this batch already fills.
            self.refill.start(leases)

    async def _store_alone(self, item: _Pending) -> None:
        try:
            async with self.database.transaction() as connection:
                stored = await self.executor.store(connection, item.execution)
        except Exception as exc:  # noqa: BLE001 - raised to the task that waits for it
            _settle(item, exc)
            return
        _settle(item, stored)


def _settle(item: _Pending, outcome: bool | Exception) -> None:
    if item.stored.done():
        return
    if isinstance(outcome, Exception):
        item.stored.set_exception(outcome)
    else:
        item.stored.set_result(outcome)
