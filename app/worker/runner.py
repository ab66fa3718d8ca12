"""The worker's run loop: claim, execute concurrently, heartbeat, sweep, shut down cleanly.

One worker process runs up to ``worker.concurrency`` tasks at once as asyncio tasks. Four
loops run beside them: claiming (woken when a slot frees up, or every poll interval),
storing finished tasks in batches (``CompletionBatcher``), heartbeating every held lease in
one statement, and sweeping expired leases of any worker. A task's slot frees up once its
batch has committed. The batch's transaction claims a new task for each slot it frees, so
the claim loop only fills slots that no batch refilled: at start-up, after an idle spell,
and after failed or retried tasks.

Shutdown (SIGTERM or ``stop()``) stops claiming at once, gives running tasks
``shutdown_grace_seconds`` to finish, stores every result already handed in, then cancels
the rest and releases their leases without counting the attempt, so another worker picks
them up straight away.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from contextlib import suppress

from app.agent.executor import Execution, ProjectClosedError, TaskExecutor
from app.core.config import Settings
from app.db.engine import Database
from app.db.projects import get_task
from app.db.states import TaskStatus
from app.errors import ConfigError, LLMError, LLMRateLimitError, PlanValidationError
from app.knowledge.ingestion import DocumentIngestor
from app.signals import Channel, SignalBus
from app.worker.cancelling import raise_if_cancelling
from app.worker.completions import CompletionBatcher, Refill
from app.worker.ingestion_loop import IngestionLoop
from app.worker.queue import Lease

logger = logging.getLogger(__name__)


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        database: Database,
        executor: TaskExecutor,
        settings: Settings,
        worker_id: str | None = None,
        ingestor: DocumentIngestor | None = None,
        signals: SignalBus | None = None,
    ) -> None:
        self.database = database
        self.executor = executor
        self.queue = executor.queue
        self.settings = settings.worker
        self.worker_id = worker_id or new_worker_id()
        self.ingestion = IngestionLoop(ingestor, settings, self.worker_id) if ingestor else None
        self._running: dict[str, tuple[Lease, asyncio.Task[None]]] = {}
        # Leases that a batch claimed after stop(): released by the drain, never started.
        self._unstarted: list[Lease] = []
        self.completions = CompletionBatcher(
            database,
            executor,
            self.settings,
            self.worker_id,
            running_tasks=lambda: len(self._running),
            refill=Refill(limit=self._refill_limit, start=self._start_claimed),
        )
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.completed = 0
        self.signals = signals

    def wake(self) -> None:
        """Claim now instead of at the next poll, for a caller that just queued work."""
        self._wake.set()
        if self.ingestion is not None:
            self.ingestion.wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self.wake()

    async def run(self) -> None:
        """Work until stop() is called, then drain; returns when every lease is finished or released."""
        logger.info(
            "worker started",
            extra={
                "action": "worker.started",
                "worker_id": self.worker_id,
                "concurrency": self.settings.concurrency,
            },
        )
        self.completions.start()
        loops = [
            asyncio.create_task(self._heartbeat_loop(), name=f"heartbeat-{self.worker_id}"),
            asyncio.create_task(self._sweep_loop(), name=f"sweeper-{self.worker_id}"),
        ]
        if self.ingestion is not None:
            loops.append(
                asyncio.create_task(self.ingestion.run(self._stopping), name=f"ingestion-{self.worker_id}")
            )
        self._listen_for_signals(True)
        try:
            await self._claim_loop()
            await self._drain()
        finally:
            self._listen_for_signals(False)
            await self.completions.close()
            for loop in loops:
                loop.cancel()
            for loop in loops:
                with suppress(asyncio.CancelledError):
                    await loop
            logger.info(
                "worker stopped",
                extra={"action": "worker.stopped", "worker_id": self.worker_id, "completed": self.completed},
            )

    async def _claim_loop(self) -> None:
        while not self._stopping.is_set():
            # The tasks of one stored batch finish together. Yielding once lets more of them
            # free their slots first, so that one claim fills more slots.
            await asyncio.sleep(0)
            # Cleared before the claim, so a wake-up that arrives while claiming is kept.
            self._wake.clear()
            free = self.settings.concurrency - len(self._running)
            # At most one batch's worth per transaction: the first tasks start while the
            # rest are claimed, and tasks claimed together finish together, so each group
            # of them later fits one completion batch.
            limit = min(free, self.settings.completion_batch_size)
            claimed: list[Lease] = []
            if free > 0:
                try:
                    claimed = await self.queue.claim(self.worker_id, limit)
                except Exception as exc:  # noqa: BLE001 - a database outage must not end the worker
                    logger.error(
                        "claiming tasks failed: %s",
                        exc,
                        extra={"action": "worker.claim_failed", "worker_id": self.worker_id},
                    )
                    await self._wait_for_work(self.settings.poll_interval_seconds)
                    continue
            for lease in claimed:
                self._start(lease)

            if claimed and len(claimed) == limit:
                continue  # the queue may hold more; claim again as soon as a slot frees up
            await self._wait_for_work(self.settings.poll_interval_seconds)

    def _listen_for_signals(self, listen: bool) -> None:
        """Wake the idle wait on a task-ready signal, and stop the tasks of a cancelled project."""
        if self.signals is None:
            return
        change = self.signals.on if listen else self.signals.off
        change(Channel.TASK_READY, self._on_task_ready)
        change(Channel.CANCEL, self._on_cancel)

    def _on_task_ready(self, _payload: bytes) -> None:
        self._wake.set()

    def _on_cancel(self, payload: bytes) -> None:
        project_id = payload.decode()
        for lease, task in list(self._running.values()):
            if lease.project_id != project_id:
                continue
            logger.info(
                "project cancelled, stopping the task",
                extra={
                    "action": "task.cancel_signalled",
                    "worker_id": self.worker_id,
                    "task_id": lease.task_id,
                    "project_id": project_id,
                },
            )
            task.cancel()

    def _refill_limit(self, freed: int) -> int:
        # Each result in a batch comes from a task in self._running that gives up its slot
        # only after the batch commits, so the claim loop never counts these slots as free.
        return 0 if self._stopping.is_set() else freed

    def _start_claimed(self, leases: list[Lease]) -> None:
        if self._stopping.is_set():
            self._unstarted.extend(leases)
            return
        for lease in leases:
            self._start(lease)

    async def _wait_for_work(self, seconds: float) -> None:
        """Wait until a slot frees up, ``wake()`` is called or ``seconds`` pass."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    def _start(self, lease: Lease) -> None:
        logger.info(
            "task claimed",
            extra={
                "action": "task.claimed",
                "worker_id": self.worker_id,
                "task_id": lease.task_id,
                "project_id": lease.project_id,
                "attempt": lease.attempt,
                "kind": lease.kind,
            },
        )
        task = asyncio.create_task(self._run_task(lease), name=f"task-{lease.task_id}")
        self._running[lease.task_id] = (lease, task)

    async def _run_task(self, lease: Lease) -> None:
        try:
            await self._execute(lease)
        except Exception as exc:  # noqa: BLE001 - the lease expires and the sweeper requeues the task
            logger.error(
                "storing the task's result failed: %s",
                exc,
                extra={
                    "action": "task.store_failed",
                    "worker_id": self.worker_id,
                    "task_id": lease.task_id,
                    "project_id": lease.project_id,
                },
            )
        finally:
            # A batch may already have claimed this task again (its result was discarded and
            # the sweeper requeued it), so only this lease's entry is removed.
            entry = self._running.get(lease.task_id)
            if entry is not None and entry[0] is lease:
                del self._running[lease.task_id]
            self._wake.set()  # a slot is free, and finishing may have made dependents ready

    async def _execute(self, lease: Lease) -> None:
        execution = Execution(lease)
        ids = {"worker_id": self.worker_id, "task_id": lease.task_id, "project_id": lease.project_id}
        try:
            await self.executor.execute(execution)
        except asyncio.CancelledError:
            raise
        except ProjectClosedError:
            await self.queue.abandon(lease)
            logger.info("task cancelled: its project is finished", extra={"action": "task.skipped", **ids})
            return
        except PlanValidationError as exc:
            await self._fail(execution, str(exc))
            return
        except ConfigError as exc:
            # A role naming a provider this worker does not configure: retrying cannot help.
            await self._fail(execution, f"ConfigError: {exc}")
            return
        except LLMError as exc:
            if exc.retryable and lease.attempt < lease.max_attempts:
                delay = None
                if isinstance(exc, LLMRateLimitError) and exc.retry_after:
                    # The server's wait, within the worker's own ceiling: a misbehaving
                    # server must not park a task for days.
                    delay = min(exc.retry_after, self.settings.backoff_max_seconds)
                await self._retry(execution, f"{type(exc).__name__}: {exc}", delay)
            else:
                await self._fail(execution, f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - an unexpected error fails the attempt, not the worker
            logger.exception("task raised an unexpected error", extra={"action": "task.error", **ids})
            if lease.attempt < lease.max_attempts:
                await self._retry(execution, f"{type(exc).__name__}: {exc}", None)
            else:
                await self._fail(execution, f"{type(exc).__name__}: {exc}")
            return

        stored = await self.completions.store(execution)
        if stored:
            self.completed += 1
            logger.info("task completed", extra={"action": "task.completed", **ids})
        else:
            await self._log_discarded(lease, ids)

    async def _log_discarded(self, lease: Lease, ids: dict[str, object]) -> None:
        """Log why a result was not stored: its task was cancelled, or its lease passed on."""
        try:
            async with self.database.read() as connection:
                status = (await get_task(connection, lease.project_id, lease.task_id)).status
        except Exception as exc:  # noqa: BLE001 - the status only refines a log line
            raise_if_cancelling(exc)
            status = "unknown"
        if status == TaskStatus.CANCELLED:
            # A cancel is routine, and the cancel itself was logged.
            logger.info(
                "result discarded: the task was cancelled while it ran",
                extra={"action": "task.result_discarded", "reason": "cancelled", **ids},
            )
            return
        logger.warning(
            "result discarded: the lease expired and passed to another attempt (task now %s)",
            status,
            extra={"action": "task.result_discarded", "reason": "lease_lost", "task_status": status, **ids},
        )

    async def _retry(self, execution: Execution, error: str, delay: float | None) -> None:
        lease = execution.lease
        async with self.database.transaction() as connection:
            await _store_calls(connection, execution)
            stored = await self.queue.retry_later(connection, lease, error, delay)
        if stored:
            logger.warning(
                "task will be retried: %s",
                error,
                extra={
                    "action": "task.retry",
                    "worker_id": self.worker_id,
                    "task_id": lease.task_id,
                    "project_id": lease.project_id,
                    "attempt": lease.attempt,
                },
            )

    async def _fail(self, execution: Execution, error: str) -> None:
        lease = execution.lease
        reason = f"task {lease.key} {lease.title!r} ({lease.role}) failed on attempt {lease.attempt}: {error}"
        async with self.database.transaction() as connection:
            await _store_calls(connection, execution)
            stored = await self.queue.fail(connection, lease.task_id, lease.project_id, lease.token, reason)
        if stored:
            logger.error(
                "task failed: %s",
                reason,
                extra={
                    "action": "task.failed",
                    "worker_id": self.worker_id,
                    "task_id": lease.task_id,
                    "project_id": lease.project_id,
                },
            )

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            held = {task_id: lease.token for task_id, (lease, _) in self._running.items()}
            try:
                lost = await self.queue.heartbeat(self.worker_id, held)
            except Exception as exc:  # noqa: BLE001 - retried at the next beat, well within the lease
                raise_if_cancelling(exc)
                logger.error(
                    "heartbeat failed: %s",
                    exc,
                    extra={"action": "worker.heartbeat_failed", "worker_id": self.worker_id},
                )
                continue
            for task_id in lost:
                entry = self._running.get(task_id)
                if entry is not None:
                    logger.info(
                        "lease lost, stopping the task",
                        extra={
                            "action": "task.lease_lost",
                            "worker_id": self.worker_id,
                            "task_id": task_id,
                            "project_id": entry[0].project_id,
                        },
                    )
                    entry[1].cancel()

    async def _sweep_loop(self) -> None:
        while True:
            try:
                expired = await self.queue.sweep_expired()
            except Exception as exc:  # noqa: BLE001 - the next sweep tries again
                raise_if_cancelling(exc)
                logger.error(
                    "sweeping expired leases failed: %s",
                    exc,
                    extra={"action": "worker.sweep_failed", "worker_id": self.worker_id},
                )
                expired = []
            for lease in expired:
                logger.warning(
                    "lease expired: task %s of worker %s %s",
                    lease.task_id,
                    lease.owner,
                    "failed for good" if lease.failed else "returned to the queue",
                    extra={
                        "action": "task.lease_expired",
                        "worker_id": self.worker_id,
                        "task_id": lease.task_id,
                        "project_id": lease.project_id,
                        "previous_owner": lease.owner,
                        "attempts": lease.attempts,
                    },
                )
            if expired:
                self._wake.set()
            await asyncio.sleep(self.settings.sweep_interval_seconds)

    async def _drain(self) -> None:
        # Results that arrive from now on are stored at once instead of waiting for a batch.
        self.completions.flush_now()
        unfinished: list[tuple[Lease, asyncio.Task[None]]] = []
        if self._running:
            pending = [task for _, task in self._running.values()]
            logger.info(
                "draining running tasks",
                extra={"action": "worker.draining", "worker_id": self.worker_id, "running": len(pending)},
            )
            await asyncio.wait(pending, timeout=self.settings.shutdown_grace_seconds)

            unfinished = list(self._running.values())
            for _, task in unfinished:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        # A cancelled task may have handed in its result already: store it before the
        # leases are released, so that a finished result is kept rather than redone.
        await self.completions.close()
        to_release = [lease for lease, _ in unfinished] + self._unstarted
        self._unstarted = []
        for lease in to_release:
            if await self.queue.release(lease):
                logger.info(
                    "lease released at shutdown",
                    extra={
                        "action": "task.released",
                        "worker_id": self.worker_id,
                        "task_id": lease.task_id,
                        "project_id": lease.project_id,
                    },
                )


async def _store_calls(connection, execution: Execution) -> None:
    from app.db.records import add_llm_calls

    lease = execution.lease
    await add_llm_calls(connection, lease.project_id, lease.task_id, lease.attempt, execution.calls)
