"""The task queue's lease semantics, on SQLite and PostgreSQL."""

import asyncio
import time

import pytest
from sqlalchemy import select, update

from app.db import projects as store
from app.db.locking import lock_tasks_in_id_order
from app.db.models import events, projects, task_attempts, tasks
from app.db.states import ProjectStatus, TaskStatus
from app.worker.queue import LOCK_RUNNING_TASKS
from tests.integration.helpers import start_runtime, submit


@pytest.fixture
async def runtime(database_url, tmp_path):
    runtime = await start_runtime(database_url, tmp_path, TORONTO_AI_WORKER__LEASE_SECONDS="30")
    yield runtime
    await runtime.aclose()


async def expire_leases(runtime) -> None:
    async with runtime.database.transaction() as connection:
        await connection.execute(
            update(tasks).where(tasks.c.status == TaskStatus.RUNNING).values(lease_expires_at=time.time() - 1)
        )


async def task_row(runtime, task_id):
    async with runtime.database.read() as connection:
        return (await connection.execute(select(tasks).where(tasks.c.id == task_id))).one()


async def test_claim_takes_a_lease(runtime):
    project_id = await submit(runtime)

    [lease] = await runtime.queue.claim("worker-a", 10)

    row = await task_row(runtime, lease.task_id)
    assert (row.status, row.lease_owner, row.lease_token, row.attempts) == ("running", "worker-a", 1, 1)
    async with runtime.database.read() as connection:
        project = await store.get_project(connection, project_id)
        attempts = (await connection.execute(select(task_attempts))).all()
    assert project.status == ProjectStatus.PLANNING
    assert [(attempt.worker_id, attempt.outcome) for attempt in attempts] == [("worker-a", "running")]


async def test_claimed_task_is_not_claimed_again(runtime):
    await submit(runtime)

    first = await runtime.queue.claim("worker-a", 10)
    second = await runtime.queue.claim("worker-b", 10)

    assert len(first) == 1
    assert second == []


async def test_concurrent_claims_never_share_a_task(runtime):
    for _ in range(20):
        await submit(runtime)

    batches = await asyncio.gather(*(runtime.queue.claim(f"worker-{index}", 3) for index in range(8)))

    claimed = [lease.task_id for batch in batches for lease in batch]
    assert len(claimed) == 20
    assert len(set(claimed)) == 20


async def test_late_result_is_discarded(runtime):
    project_id = await submit(runtime)
    [stale] = await runtime.queue.claim("worker-a", 1)
    await expire_leases(runtime)

    [expired] = await runtime.queue.sweep_expired()
    [fresh] = await runtime.queue.claim("worker-b", 1)
    async with runtime.database.transaction() as connection:
        stale_stored = await runtime.queue.complete(connection, stale, "late output")
    async with runtime.database.transaction() as connection:
        fresh_stored = await runtime.queue.complete(connection, fresh, "fresh output")

    assert expired.owner == "worker-a"
    assert not expired.failed
    assert fresh.token == stale.token + 1
    assert stale_stored is False
    assert fresh_stored is True
    row = await task_row(runtime, stale.task_id)
    assert row.output == "fresh output"
    assert row.attempts == 2
    async with runtime.database.read() as connection:
        outcomes = [attempt.outcome for attempt in await store.list_attempts(connection, stale.task_id)]
    assert outcomes == ["lease_expired", "completed"]
    assert project_id == stale.project_id


async def test_expired_lease_fails_after_last_attempt(runtime):
    project_id = await submit(runtime)
    for _ in range(runtime.settings.worker.max_attempts):
        assert await runtime.queue.claim("worker-a", 1)
        await expire_leases(runtime)
        await runtime.queue.sweep_expired()

    async with runtime.database.read() as connection:
        project = await store.get_project(connection, project_id)
    assert project.status == ProjectStatus.FAILED
    assert "failed after 3 attempts" in project.error
    assert "lease of worker worker-a expired" in project.error


async def test_retry_waits_for_backoff(runtime):
    await submit(runtime)
    [lease] = await runtime.queue.claim("worker-a", 1)

    async with runtime.database.transaction() as connection:
        assert await runtime.queue.retry_later(connection, lease, "LLMServerError: 503", delay=60)

    assert await runtime.queue.claim("worker-b", 1) == []
    row = await task_row(runtime, lease.task_id)
    assert row.status == TaskStatus.READY
    assert row.available_at > time.time() + 50
    assert row.error == "LLMServerError: 503"


def test_backoff_grows_and_is_capped(runtime):
    delays = [runtime.queue.backoff_seconds(attempt) for attempt in (1, 2, 3, 10)]

    assert (
        runtime.settings.worker.backoff_base_seconds / 2
        <= delays[0]
        <= runtime.settings.worker.backoff_base_seconds
    )
    assert delays[3] <= runtime.settings.worker.backoff_max_seconds


async def test_release_does_not_count_the_attempt(runtime):
    await submit(runtime)
    [lease] = await runtime.queue.claim("worker-a", 1)

    assert await runtime.queue.release(lease)

    row = await task_row(runtime, lease.task_id)
    assert (row.status, row.attempts, row.lease_owner) == ("ready", 0, None)


async def test_heartbeat_reports_cancelled_tasks(runtime):
    project_id = await submit(runtime)
    [lease] = await runtime.queue.claim("worker-a", 1)
    assert await runtime.queue.heartbeat("worker-a", {lease.task_id: lease.token}) == set()

    async with runtime.database.transaction() as connection:
        await store.cancel_project(connection, project_id)

    assert await runtime.queue.heartbeat("worker-a", {lease.task_id: lease.token}) == {lease.task_id}


async def start_shared_dependent_plan(runtime):
    """Accept a plan where C depends on A and B; return the project id and the leases of A and B."""
    from app.agent.planning import PlannedTask

    project_id = await submit(runtime)
    [plan_lease] = await runtime.queue.claim("worker-a", 1)
    planned = [
        PlannedTask(id="A", title="A", role="developer"),
        PlannedTask(id="B", title="B", role="developer"),
        PlannedTask(id="C", title="C", role="qa_engineer", depends_on=["A", "B"]),
    ]
    async with runtime.database.transaction() as connection:
        assert await runtime.queue.complete(connection, plan_lease, "{}")
        await store.insert_plan(connection, project_id, planned, "project_manager", 3)
    first, second = sorted(await runtime.queue.claim("worker-a", 10), key=lambda lease: lease.key)
    return project_id, first, second


async def test_dependents_wait_for_every_dependency(runtime):
    project_id, first, second = await start_shared_dependent_plan(runtime)

    async with runtime.database.transaction() as connection:
        await runtime.queue.complete(connection, first, "a")
    assert await runtime.queue.claim("worker-a", 10) == []
    async with runtime.database.transaction() as connection:
        await runtime.queue.complete(connection, second, "b")
    [third] = await runtime.queue.claim("worker-a", 10)

    assert (first.key, second.key, third.key) == ("A", "B", "C")
    async with runtime.database.read() as connection:
        status = await connection.scalar(select(projects.c.status).where(projects.c.id == project_id))
    assert status == ProjectStatus.RUNNING


async def test_claim_never_exceeds_limit(runtime):
    for _ in range(12):
        await submit(runtime)

    sizes = [len(await runtime.queue.claim("worker-a", limit)) for limit in (1, 3, 5)]

    assert sizes == [1, 3, 5]


async def test_batch_releases_shared_dependent_once(runtime):
    from app.worker.queue import FinishedTask

    project_id, first, second = await start_shared_dependent_plan(runtime)

    async with runtime.database.transaction() as connection:
        stored = await runtime.queue.complete_many(
            connection, [FinishedTask(first, "a"), FinishedTask(second, "b")]
        )
    [third] = await runtime.queue.claim("worker-a", 10)

    assert stored == [True, True]
    assert third.key == "C"
    assert [output.output for output in third.context.dependencies] == ["a", "b"]
    async with runtime.database.read() as connection:
        ready_events = (
            await connection.execute(
                select(events.c.task_id).where(
                    events.c.project_id == project_id, events.c.type == "task.ready"
                )
            )
        ).all()
        sequence = [
            row.seq
            for row in await connection.execute(
                select(events.c.seq).where(events.c.project_id == project_id).order_by(events.c.seq)
            )
        ]
    assert [row.task_id for row in ready_events].count(third.task_id) == 1
    assert sequence == list(range(1, len(sequence) + 1))


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_heartbeat_and_batch_lock_never_deadlock(runtime):
    """A heartbeat and a completion batch over the same leases wait for each other, never crosswise.

    Without one lock order, PostgreSQL detected a deadlock here in a few of every hundred
    rounds, because a multi-row UPDATE locks rows in the order it finds them.
    """
    for _ in range(20):
        await submit(runtime)
    leases = []
    while claimed := await runtime.queue.claim("worker-a", 20):
        leases += claimed
    held = {lease.task_id: lease.token for lease in reversed(leases)}

    async def lock_as_a_batch() -> None:
        async with runtime.database.transaction() as connection:
            await lock_tasks_in_id_order(connection, tasks.c.id.in_(list(held)))
            await connection.execute(LOCK_RUNNING_TASKS, {"task_ids": sorted(held)})
            await asyncio.sleep(0.01)

    for _ in range(40):
        lost = await asyncio.gather(lock_as_a_batch(), runtime.queue.heartbeat("worker-a", held))
        assert lost[1] == set()
