"""A cancel that overlaps a worker storing a plan or a report, on SQLite and PostgreSQL.

The worker's transaction is held open while the cancel starts, so on PostgreSQL the
cancel waits on the worker's row locks and resumes after the commit.
"""

import asyncio

import pytest
from sqlalchemy import select

from app.agent.executor import Execution
from app.db import projects as store
from app.db.models import events, projects, tasks
from app.errors import ConflictError
from tests.integration.helpers import start_runtime, submit

HOLD_SECONDS = 0.3  # long enough for the cancel to reach its lock wait; correctness does not depend on it


@pytest.fixture
async def runtime(database_url, tmp_path):
    runtime = await start_runtime(database_url, tmp_path)
    yield runtime
    await runtime.aclose()


async def cancel(runtime, project_id):
    async with runtime.database.transaction() as connection:
        return await store.cancel_project(connection, project_id)


async def store_while_cancelling(runtime, execution, project_id):
    """Store ``execution`` in a transaction that commits only after a cancel has started."""
    connection = await runtime.database.write_engine.connect()
    transaction = await connection.begin()
    assert await runtime.executor.store(connection, execution)

    cancelling = asyncio.create_task(cancel(runtime, project_id))
    await asyncio.sleep(HOLD_SECONDS)
    await transaction.commit()
    await connection.close()
    return await asyncio.gather(cancelling, return_exceptions=True)


async def statuses(runtime, project_id):
    async with runtime.database.read() as connection:
        project = await connection.scalar(select(projects.c.status).where(projects.c.id == project_id))
        rows = await connection.execute(select(tasks.c.key, tasks.c.status).where(tasks.c.project_id == project_id))
        event_types = [row.type for row in await connection.execute(
            select(events.c.type).where(events.c.project_id == project_id).order_by(events.c.seq)
        )]
    return project, dict(rows.all()), event_types


async def run_until(runtime, kind):
    """Claim and execute tasks in order until one of ``kind`` is executed; return its execution."""
    while True:
        [lease] = await runtime.queue.claim("worker-a", 1)
        execution = Execution(lease)
        await runtime.executor.execute(execution)
        if lease.kind == kind:
            return execution
        async with runtime.database.transaction() as connection:
            assert await runtime.executor.store(connection, execution)


async def test_cancel_during_plan_store_cancels_new_tasks(runtime):
    project_id = await submit(runtime)
    execution = await run_until(runtime, "plan")

    [result] = await store_while_cancelling(runtime, execution, project_id)

    project, task_statuses, _ = await statuses(runtime, project_id)
    assert result == "cancelled"
    assert project == "cancelled"
    assert task_statuses.pop("PLAN") == "completed"
    assert set(task_statuses.values()) == {"cancelled"}


async def test_cancel_during_report_store_keeps_completion(runtime):
    project_id = await submit(runtime)
    execution = await run_until(runtime, "report")

    [result] = await store_while_cancelling(runtime, execution, project_id)

    project, task_statuses, event_types = await statuses(runtime, project_id)
    assert isinstance(result, ConflictError)
    assert "already completed" in str(result)
    assert project == "completed"
    assert set(task_statuses.values()) == {"completed"}
    assert "project.cancelled" not in event_types


async def test_task_of_finished_project_is_cancelled(runtime):
    project_id = await submit(runtime)
    [lease] = await runtime.queue.claim("worker-a", 1)
    async with runtime.database.transaction() as connection:
        await connection.execute(projects.update().where(projects.c.id == project_id).values(status="failed"))

    assert await runtime.queue.abandon(lease)

    _, task_statuses, _ = await statuses(runtime, project_id)
    assert task_statuses == {"PLAN": "cancelled"}
