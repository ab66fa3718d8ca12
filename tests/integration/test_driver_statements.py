"""The driver statements of a worker's batches (asyncpg on PostgreSQL, aiosqlite on SQLite)
store the same rows as the SQLAlchemy ones."""

import dataclasses
import json

from sqlalchemy import select

from app.agent.executor import Execution
from app.db.models import artifacts, events, llm_calls, messages, projects, task_attempts, tasks
from app.db.states import ProjectStatus
from app.worker import driver_statements, sqlite_statements
from tests.integration.helpers import start_runtime, submit

WORKER = "worker-a"


async def run_project(runtime, *, use_driver_statements: bool) -> str:
    """Run one project through claims and batches in a fixed order; return its id.

    The batches cover a stored plan, claims of the tasks that a batch's results released,
    the report among them, and a stale result that must be discarded.
    """
    runtime.queue.use_driver_statements = use_driver_statements
    executor = runtime.executor
    project_id = await submit(runtime)

    [plan] = await runtime.queue.claim(WORKER, 1)
    await executor.execute(planned := Execution(plan))
    async with runtime.database.transaction() as connection:
        stored, leases = await executor.store_and_claim(connection, [planned], WORKER, 1)
    assert stored == [True]
    assert leases == []  # the plan's tasks are inserted after the batch's claim

    [first] = await runtime.queue.claim(WORKER, 1)
    await executor.execute(first_execution := Execution(first))
    stale = Execution(dataclasses.replace(first, token=first.token + 1), output="late output")
    async with runtime.database.transaction() as connection:
        stored, work = await executor.store_and_claim(connection, [first_execution, stale], WORKER, 20)
    assert stored == [True, False]
    assert work

    # Each batch stores the results of the tasks the previous one claimed and claims the
    # tasks they released, the report last.
    claimed = work
    kinds = []
    while claimed:
        kinds += [lease.kind for lease in claimed]
        executions = [Execution(lease) for lease in claimed]
        for execution in executions:
            await executor.execute(execution)
        async with runtime.database.transaction() as connection:
            stored, claimed = await executor.store_and_claim(connection, executions, WORKER, 20)
        assert all(stored)
    assert kinds[-1] == "report"
    return project_id


async def stored_rows(runtime, project_id: str) -> dict[str, list]:
    """Read a project's rows with task ids replaced by task keys, and times and row ids left out.

    Rows are sorted by their content: within a batch, tasks go in the order of their random
    ids, so two projects store the rows of one batch in different orders.
    """
    async with runtime.database.read() as connection:
        task_rows = (
            await connection.execute(
                select(tasks).where(tasks.c.project_id == project_id).order_by(tasks.c.key)
            )
        ).all()
        keys = {row.id: row.key for row in task_rows}
        attempt_rows = (
            await connection.execute(
                select(task_attempts)
                .where(task_attempts.c.task_id.in_(list(keys)))
                .order_by(task_attempts.c.id)
            )
        ).all()
        event_rows = (
            await connection.execute(
                select(events).where(events.c.project_id == project_id).order_by(events.c.seq)
            )
        ).all()
        message_rows = (
            await connection.execute(
                select(messages).where(messages.c.project_id == project_id).order_by(messages.c.id)
            )
        ).all()
        call_rows = (
            await connection.execute(
                select(llm_calls).where(llm_calls.c.project_id == project_id).order_by(llm_calls.c.id)
            )
        ).all()
        artifact_rows = (
            await connection.execute(
                select(artifacts).where(artifacts.c.project_id == project_id).order_by(artifacts.c.id)
            )
        ).all()
        project = (await connection.execute(select(projects).where(projects.c.id == project_id))).one()

    def by_key(text):
        for task_id, key in keys.items():
            text = text.replace(task_id, key)
        return text.replace(project_id, "PROJECT")

    return {
        "project": [(project.status, project.event_seq, project.report is not None)],
        "tasks": [
            (
                row.key,
                row.status,
                row.output,
                row.error,
                row.attempts,
                row.lease_token,
                row.lease_owner,
                row.lease_expires_at,
                row.pending_dependencies,
                row.started_at is not None,
                row.finished_at is not None,
            )
            for row in task_rows
        ],
        "attempts": sorted(
            (keys[row.task_id], row.number, row.worker_id, row.lease_token, row.outcome, row.error or "")
            for row in attempt_rows
        ),
        "event_seqs": [row.seq for row in event_rows],
        "events": sorted(
            (row.type, keys.get(row.task_id) or "", by_key(json.dumps(row.data, sort_keys=True)))
            for row in event_rows
        ),
        "messages": sorted(
            (keys[row.task_id], row.agent_role, row.sender, row.content) for row in message_rows
        ),
        "llm_calls": sorted(
            (
                keys[row.task_id],
                row.attempt,
                row.agent_role,
                row.provider,
                row.model,
                row.prompt_tokens,
                row.completion_tokens,
                row.cost_usd,
                row.cache_hit,
                row.status,
                row.error or "",
            )
            for row in call_rows
        ),
        "artifacts": sorted(
            (keys[row.task_id], row.name, row.media_type, row.content) for row in artifact_rows
        ),
    }


async def test_driver_and_sqlalchemy_store_same_rows(database_url, tmp_path):
    # Each path runs in a runtime of its own, so neither reads the other's cached responses.
    driver_runtime = await start_runtime(database_url, tmp_path / "driver")
    try:
        driver_project = await run_project(driver_runtime, use_driver_statements=True)
        driver_rows = await stored_rows(driver_runtime, driver_project)
    finally:
        await driver_runtime.aclose()
    sqlalchemy_runtime = await start_runtime(database_url, tmp_path / "sqlalchemy")
    try:
        sqlalchemy_project = await run_project(sqlalchemy_runtime, use_driver_statements=False)
        sqlalchemy_rows = await stored_rows(sqlalchemy_runtime, sqlalchemy_project)
    finally:
        await sqlalchemy_runtime.aclose()

    assert driver_rows["project"] == [(ProjectStatus.COMPLETED, len(driver_rows["events"]), True)]
    assert driver_rows["event_seqs"] == list(range(1, len(driver_rows["events"]) + 1))
    for table in driver_rows:
        assert driver_rows[table] == sqlalchemy_rows[table], table


async def test_driver_statements_run_by_default(database_url, tmp_path):
    runtime = await start_runtime(database_url, tmp_path)
    try:
        assert runtime.queue.use_driver_statements
        expected = sqlite_statements if runtime.database.is_sqlite else driver_statements
        assert runtime.queue.statements is expected
    finally:
        await runtime.aclose()
