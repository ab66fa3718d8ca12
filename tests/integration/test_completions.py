"""Storing finished tasks in batches: stale leases, failed batches and shutdown, on SQLite and PostgreSQL."""

import asyncio
import time

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from app.agent.executor import Execution
from app.db.models import artifacts, events, llm_calls, messages, task_attempts, tasks
from app.db.records import LLMCallRecord
from app.db.states import TaskStatus
from app.llm.base import Completion, CompletionRequest
from app.llm.offline import OfflineProvider
from app.llm.registry import ProviderRegistry
from app.worker.completions import CompletionBatcher, Refill
from app.worker.runner import Worker
from tests.integration.helpers import start_runtime, submit

# A flush interval far longer than any test, so that a batch is flushed only when it is
# full or when the worker shuts down.
HOLD_BATCHES = {"TORONTO_AI_WORKER__COMPLETION_FLUSH_SECONDS": "60"}


@pytest.fixture
async def runtime(database_url, tmp_path):
    runtime = await start_runtime(
        database_url,
        tmp_path,
        TORONTO_AI_WORKER__LEASE_SECONDS="30",
        TORONTO_AI_WORKER__SHUTDOWN_GRACE_SECONDS="0.2",
        **HOLD_BATCHES,
    )
    yield runtime
    await runtime.aclose()


async def executed(runtime, lease) -> Execution:
    execution = Execution(lease)
    await runtime.executor.execute(execution)
    return execution


async def expire_lease(runtime, task_id: str) -> None:
    async with runtime.database.transaction() as connection:
        await connection.execute(
            update(tasks).where(tasks.c.id == task_id).values(lease_expires_at=time.time() - 1)
        )


async def stored_rows(runtime, task_id: str) -> dict[str, int]:
    """Count the rows each store writes for ``task_id``."""
    async with runtime.database.read() as connection:
        counts = {
            table.name: await connection.scalar(
                select(func.count()).select_from(table).where(table.c.task_id == task_id)
            )
            for table in (messages, artifacts, llm_calls)
        }
        counts["task.completed"] = await connection.scalar(
            select(func.count()).where(events.c.task_id == task_id, events.c.type == "task.completed")
        )
    return counts


async def task_row(runtime, task_id: str):
    async with runtime.database.read() as connection:
        return (await connection.execute(select(tasks).where(tasks.c.id == task_id))).one()


def batcher_for(runtime, running: int) -> CompletionBatcher:
    return CompletionBatcher(
        runtime.database, runtime.executor, runtime.settings.worker, "worker-a", running_tasks=lambda: running
    )


async def test_batch_discards_only_the_stale_lease(runtime):
    await submit(runtime)
    await submit(runtime)
    stale, kept = await runtime.queue.claim("worker-a", 2)
    stale_execution = await executed(runtime, stale)
    kept_execution = await executed(runtime, kept)
    await expire_lease(runtime, stale.task_id)
    [expired] = await runtime.queue.sweep_expired()
    [takeover] = await runtime.queue.claim("worker-b", 1)

    batcher = batcher_for(runtime, running=2)
    batcher.start()
    results = await asyncio.gather(batcher.store(stale_execution), batcher.store(kept_execution))
    await batcher.close()

    assert expired.task_id == stale.task_id
    assert takeover.task_id == stale.task_id
    assert results == [False, True]
    stale_row = await task_row(runtime, stale.task_id)
    assert (stale_row.status, stale_row.lease_owner, stale_row.output) == ("running", "worker-b", None)
    assert await stored_rows(runtime, stale.task_id) == {
        "messages": 0,
        "artifacts": 0,
        "llm_calls": 0,
        "task.completed": 0,
    }
    assert (await task_row(runtime, kept.task_id)).status == TaskStatus.COMPLETED
    assert (await stored_rows(runtime, kept.task_id))["artifacts"] == 1

    takeover_execution = await executed(runtime, takeover)
    async with runtime.database.transaction() as connection:
        assert await runtime.executor.store(connection, takeover_execution)
    assert (await stored_rows(runtime, stale.task_id))["artifacts"] == 1


async def attempt_row(runtime, task_id: str, token: int):
    async with runtime.database.read() as connection:
        return (
            await connection.execute(
                select(task_attempts).where(
                    task_attempts.c.task_id == task_id, task_attempts.c.lease_token == token
                )
            )
        ).one()


async def test_batch_claims_a_task_per_result(runtime):
    # Four planning tasks: the batch stores two and claims the other two. The work tasks
    # of the stored plans are inserted after the claim, so the batch does not see them.
    for _ in range(4):
        await submit(runtime)
    first, second = await runtime.queue.claim("worker-a", 2)
    executions = [await executed(runtime, first), await executed(runtime, second)]
    limits: list[int] = []
    started: list = []

    def limit(freed: int) -> int:
        limits.append(freed)
        return freed

    batcher = CompletionBatcher(
        runtime.database,
        runtime.executor,
        runtime.settings.worker,
        "worker-a",
        running_tasks=lambda: 2,
        refill=Refill(limit=limit, start=started.extend),
    )
    batcher.start()
    results = await asyncio.gather(*(batcher.store(execution) for execution in executions))
    await batcher.close()

    assert results == [True, True]
    assert limits == [2]
    assert len(started) == 2
    finished_at = (await attempt_row(runtime, first.task_id, first.token)).finished_at
    for lease in started:
        row = await task_row(runtime, lease.task_id)
        assert (row.status, row.lease_owner, row.lease_token) == ("running", "worker-a", lease.token)
        assert lease.context is not None
        # Claimed in the transaction that finished the batch, so no slot runs two attempts at once.
        assert (await attempt_row(runtime, lease.task_id, lease.token)).started_at >= finished_at


async def test_worker_releases_leases_claimed_after_stop(runtime):
    await submit(runtime)
    [lease] = await runtime.queue.claim("worker-a", 1)
    worker = Worker(runtime.database, runtime.executor, runtime.settings, worker_id="worker-a")

    worker.stop()
    # A batch that was in flight when the worker stopped hands over what it claimed.
    worker._start_claimed([lease])
    await worker._drain()

    row = await task_row(runtime, lease.task_id)
    assert not worker._running
    assert (row.status, row.attempts, row.lease_owner) == ("ready", 0, None)
    assert (await attempt_row(runtime, lease.task_id, lease.token)).outcome == "released"


async def test_failed_batch_keeps_the_valid_results(runtime):
    await submit(runtime)
    await submit(runtime)
    rejected, kept = await runtime.queue.claim("worker-a", 2)
    rejected_execution = await executed(runtime, rejected)
    kept_execution = await executed(runtime, kept)
    # A call record without a model breaks the NOT NULL constraint of llm_calls.model, so
    # the database rejects the whole batch transaction.
    rejected_execution.calls.append(
        LLMCallRecord("developer", "offline", None, 1, 1, 1.0, 0.0, False, "ok")  # type: ignore[arg-type]
    )

    batcher = batcher_for(runtime, running=2)
    batcher.start()
    results = await asyncio.gather(
        batcher.store(rejected_execution), batcher.store(kept_execution), return_exceptions=True
    )
    await batcher.close()

    assert isinstance(results[0], IntegrityError)
    assert results[1] is True
    assert (await task_row(runtime, kept.task_id)).status == TaskStatus.COMPLETED
    assert (await stored_rows(runtime, kept.task_id))["artifacts"] == 1
    rejected_row = await task_row(runtime, rejected.task_id)
    assert (rejected_row.status, rejected_row.lease_token) == ("running", rejected.token)
    assert await stored_rows(runtime, rejected.task_id) == {
        "messages": 0,
        "artifacts": 0,
        "llm_calls": 0,
        "task.completed": 0,
    }

    # The task whose result was rejected goes back to the queue when its lease expires.
    await expire_lease(runtime, rejected.task_id)
    [expired] = await runtime.queue.sweep_expired()
    assert expired.task_id == rejected.task_id
    assert (await task_row(runtime, rejected.task_id)).status == TaskStatus.READY


class GatedProvider(OfflineProvider):
    """The offline provider, except that a brief containing ``HOLD`` waits for ``gate``.

    It plays a model that is still generating when the worker is stopped.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.held = asyncio.Event()

    async def complete(self, request: CompletionRequest) -> Completion:
        if any("HOLD" in message.content for message in request.messages):
            self.held.set()
            await self.gate.wait()
        return await super().complete(request)


async def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


async def test_shutdown_stores_pending_batch(runtime):
    provider = GatedProvider()
    runtime.executor.providers = ProviderRegistry({"offline": provider}, {})
    quick_project = await submit(runtime, "# Quick\n\nBuild a small thing that works.")
    held_project = await submit(runtime, "# HOLD\n\nBuild a thing that takes a while.")
    worker = Worker(runtime.database, runtime.executor, runtime.settings, worker_id="worker-a")
    running = asyncio.create_task(worker.run())

    # The quick plan's result waits in the batch: the held task may still hand in its
    # result, and the flush interval is far away.
    await wait_until(lambda: provider.held.is_set() and worker.completions.pending == 1)
    worker.stop()
    await running

    async with runtime.database.read() as connection:
        rows = {
            row.project_id: row
            for row in await connection.execute(
                select(tasks).where(
                    tasks.c.project_id.in_([quick_project, held_project]), tasks.c.kind == "plan"
                )
            )
        }
    quick, held = rows[quick_project], rows[held_project]
    assert worker.completed == 1
    assert quick.status == TaskStatus.COMPLETED
    assert (await stored_rows(runtime, quick.id))["artifacts"] == 1
    assert (held.status, held.attempts, held.lease_owner) == ("ready", 0, None)
    assert await stored_rows(runtime, held.id) == {
        "messages": 0,
        "artifacts": 0,
        "llm_calls": 0,
        "task.completed": 0,
    }
