"""The statements of a worker's store-and-claim transaction on PostgreSQL, sent through asyncpg.

``TaskQueue.complete_and_claim`` and ``TaskQueue.claim_in`` send these on PostgreSQL. The
statements go to the asyncpg connection that the SQLAlchemy engine pooled for the
transaction, so they run in that transaction and with its settings (PgBouncer mode,
statement timeout). A statement sent through SQLAlchemy cost 3 to 5 times the CPU of the
same statement sent through asyncpg alone: 124 against 23 µs and 172 against 51 µs in two
runs of ``bench/profile_worker.py``.
The data-modifying CTEs below also turn the 13 statements of a batch into 4, or 5 when a
claimed task has dependencies.

Every write changes the same rows as the SQLAlchemy statements of ``app.worker.queue`` and
``app.db.records``, which run when ``TaskQueue.use_driver_statements`` is False:
``tests/integration/test_driver_statements.py`` compares the two. SQLite has its own
driver statements in ``app.worker.sqlite_statements``. Rows of several tasks are sent as one array per column, so a statement's
text, and its plan, is the same for any number of tasks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import exc
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db.driver_errors import ErrorTranslations, sqlalchemy_errors
from app.db.records import ARTIFACT_COLUMNS, CALL_COLUMNS, MESSAGE_COLUMNS, NewEvent, TaskRecords
from app.db.states import TaskStatus
from app.errors import NotFoundError

# Counts each finished task off the dependents that wait for it, in one statement with
# the two writes of the finished tasks. The caller has locked every row written here, the
# finished tasks and their dependents, in id order, and passes only tasks whose lease it
# checked under that lock. The three writes touch different rows: a dependent is blocked
# while a task it depends on runs. The ``= ANY`` conditions duplicate the joins so that
# PostgreSQL finds the rows through an index: on tables without planner statistics it
# otherwise scanned every task and every attempt (0.7 ms for 3,600 tasks, by EXPLAIN ANALYZE).
COMPLETE_AND_RELEASE = f"""
WITH finished AS (
    SELECT * FROM unnest($1::varchar[], $2::integer[], $3::text[]) AS finished(id, token, output)
), completed AS (
    UPDATE tasks
    SET status = '{TaskStatus.COMPLETED}', output = finished.output, error = NULL,
        finished_at = $4, lease_owner = NULL, lease_expires_at = NULL
    FROM finished
    WHERE tasks.id = finished.id AND tasks.lease_token = finished.token
        AND tasks.status = '{TaskStatus.RUNNING}'
), attempts AS (
    UPDATE task_attempts
    SET outcome = 'completed', error = NULL, finished_at = $4
    FROM finished
    WHERE task_attempts.task_id = finished.id AND task_attempts.lease_token = finished.token
        AND task_attempts.task_id = ANY($1::varchar[])
), counts AS (
    SELECT task_id, count(*) AS finished
    FROM task_dependencies
    WHERE depends_on_id = ANY($1::varchar[])
    GROUP BY task_id
)
UPDATE tasks
SET pending_dependencies = tasks.pending_dependencies - counts.finished,
    status = CASE
        WHEN tasks.pending_dependencies = counts.finished AND tasks.status = '{TaskStatus.BLOCKED}'
        THEN '{TaskStatus.READY}' ELSE tasks.status END,
    available_at = CASE
        WHEN tasks.pending_dependencies = counts.finished AND tasks.status = '{TaskStatus.BLOCKED}'
        THEN $5 ELSE tasks.available_at END
FROM counts
WHERE tasks.id = counts.task_id AND tasks.id = ANY(ARRAY(SELECT task_id FROM counts))
RETURNING tasks.id, tasks.project_id, tasks.status
"""

# Leases up to $2 ready tasks, inserts their attempts and reads their projects in one
# statement. The materialized CTE runs the locking select once, for the reason given at
# ``_CANDIDATES`` in app/worker/queue.py.
CLAIM = f"""
WITH candidates AS MATERIALIZED (
    SELECT id FROM tasks
    WHERE status = '{TaskStatus.READY}' AND available_at <= $1
    ORDER BY available_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE tasks
    SET status = '{TaskStatus.RUNNING}', lease_owner = $3, lease_token = tasks.lease_token + 1,
        lease_expires_at = $4, attempts = tasks.attempts + 1,
        started_at = coalesce(tasks.started_at, $5)
    FROM candidates
    WHERE tasks.id = candidates.id AND tasks.status = '{TaskStatus.READY}'
    RETURNING tasks.id, tasks.project_id, tasks.kind, tasks.key, tasks.title, tasks.description,
        tasks.role, tasks.attempts, tasks.max_attempts, tasks.lease_token, tasks.depends_on
), attempts AS (
    INSERT INTO task_attempts (task_id, number, worker_id, lease_token, outcome, started_at)
    SELECT id, attempts, $3, lease_token, 'running', $5 FROM claimed
)
SELECT claimed.*, projects.status AS project_status, projects.brief, projects.team,
    projects.knowledge_base
FROM claimed JOIN projects ON projects.id = claimed.project_id
ORDER BY claimed.id
"""

READ_OUTPUTS = """
SELECT id, key, title, role, output FROM tasks WHERE id = ANY($1::varchar[]) ORDER BY position
"""

# Numbers the events of several projects and inserts them with the messages, LLM calls and
# artifacts of finished tasks. The projects are locked in id order first, the order every
# transaction that writes several project rows locks them in (see ``append_events_many``),
# so two batches never wait for each other crosswise. An UPDATE ... FROM locks rows in the
# order of its join, which need not be id order. PostgreSQL runs every data-modifying CTE
# once, whether or not the statement reads its output.
STORE_EVENTS_AND_RECORDS = """
WITH locked AS MATERIALIZED (
    SELECT id FROM projects WHERE id = ANY($1::varchar[]) ORDER BY id FOR UPDATE
), counts AS (
    SELECT * FROM unnest($1::varchar[], $2::integer[]) AS counts(project_id, added)
), numbered AS (
    UPDATE projects
    SET event_seq = projects.event_seq + counts.added
    FROM counts, locked
    WHERE projects.id = counts.project_id AND locked.id = projects.id
    RETURNING projects.id, projects.event_seq - counts.added AS before
), new_events AS (
    INSERT INTO events (project_id, seq, task_id, type, data, created_at)
    SELECT new.project_id, numbered.before + new.position, new.task_id, new.type, new.data, $8
    FROM unnest($3::varchar[], $4::integer[], $5::varchar[], $6::varchar[], $7::json[])
        AS new(project_id, position, task_id, type, data)
    JOIN numbered ON numbered.id = new.project_id
    RETURNING 1
), new_messages AS (
    INSERT INTO messages (project_id, task_id, agent_role, sender, content, created_at)
    SELECT project_id, task_id, agent_role, sender, content, $8
    FROM unnest($9::varchar[], $10::varchar[], $11::varchar[], $12::varchar[], $13::text[])
        AS m(project_id, task_id, agent_role, sender, content)
), new_calls AS (
    INSERT INTO llm_calls (project_id, task_id, attempt, agent_role, provider, model,
        prompt_tokens, completion_tokens, latency_ms, cost_usd, cache_hit, status, error, created_at)
    SELECT project_id, task_id, attempt, agent_role, provider, model, prompt_tokens,
        completion_tokens, latency_ms, cost_usd, cache_hit, status, error, $8
    FROM unnest($14::varchar[], $15::varchar[], $16::integer[], $17::varchar[], $18::varchar[],
        $19::varchar[], $20::integer[], $21::integer[], $22::float8[], $23::float8[],
        $24::boolean[], $25::varchar[], $26::text[])
        AS c(project_id, task_id, attempt, agent_role, provider, model, prompt_tokens,
            completion_tokens, latency_ms, cost_usd, cache_hit, status, error)
), new_artifacts AS (
    INSERT INTO artifacts (project_id, task_id, name, media_type, content, created_at)
    SELECT project_id, task_id, name, media_type, content, $8
    FROM unnest($27::varchar[], $28::varchar[], $29::varchar[], $30::varchar[], $31::text[])
        AS a(project_id, task_id, name, media_type, content)
)
SELECT count(*) FROM new_events
"""


# The SQLAlchemy exception that SQLAlchemy 2.1's asyncpg dialect raises for each asyncpg
# error, most specific first, so that callers catch the same exceptions on both paths.
_SQLALCHEMY_ERRORS: ErrorTranslations = (
    (asyncpg.IntegrityConstraintViolationError, exc.IntegrityError),
    (asyncpg.SyntaxOrAccessError, exc.ProgrammingError),
    (asyncpg.InternalServerError, exc.InternalError),
    (asyncpg.InterfaceError, exc.InterfaceError),
    (asyncpg.PostgresError, exc.DBAPIError),
)


def _sqlalchemy_errors(statement: str, arguments: Sequence[Any]) -> AbstractContextManager[None]:
    """Raise an asyncpg error of ``statement`` as the SQLAlchemy exception it would be through the engine."""
    return sqlalchemy_errors(statement, arguments, _SQLALCHEMY_ERRORS)


async def driver_connection(connection: AsyncConnection) -> asyncpg.Connection:
    """Return the asyncpg connection under ``connection``, which must be in a transaction.

    SQLAlchemy's asyncpg adapter sends BEGIN with the first statement of a transaction, so
    a caller runs at least one statement through ``connection`` first. A statement sent
    here before that would run outside the transaction and commit on its own.
    """
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    if not driver.is_in_transaction():
        raise RuntimeError(
            "the asyncpg connection is not in a transaction yet; run a statement through "
            "the SQLAlchemy connection before sending statements to the driver"
        )
    return driver


async def complete_and_release(
    driver: asyncpg.Connection,
    finished: Sequence[tuple[str, int, str]],
    finished_at: datetime,
    ready_at: float,
) -> list[tuple[str, str]]:
    """Store (task id, lease token, output) of held leases and count them off their dependents.

    Returns (id, project id) of the dependents that became ready.
    """
    ids, tokens, outputs = (list(column) for column in zip(*finished, strict=True))
    arguments = (ids, tokens, outputs, finished_at, ready_at)
    with _sqlalchemy_errors(COMPLETE_AND_RELEASE, arguments):
        rows = await driver.fetch(COMPLETE_AND_RELEASE, *arguments)
    return [(row["id"], row["project_id"]) for row in rows if row["status"] == TaskStatus.READY]


async def claim(
    connection: AsyncConnection,
    driver: asyncpg.Connection | None,
    *,
    worker_id: str,
    limit: int,
    now: float,
    expires_at: float,
    started_at: datetime,
) -> Sequence[Mapping[str, Any]]:
    """Lease up to ``limit`` ready tasks and insert their attempts.

    Returns the tasks in id order. Each row also carries its project's status (as
    ``project_status``), brief, team and knowledge base. Without ``driver`` the statement
    goes through SQLAlchemy, which begins the transaction: use that when the claim is the
    transaction's first statement.
    """
    arguments = (now, limit, worker_id, expires_at, started_at)
    if driver is None:
        return (await connection.exec_driver_sql(CLAIM, arguments)).mappings().all()
    with _sqlalchemy_errors(CLAIM, arguments):
        return await driver.fetch(CLAIM, *arguments)


async def read_outputs(driver: asyncpg.Connection, task_ids: Sequence[str]) -> list[asyncpg.Record]:
    """Read (id, key, title, role, output) of ``task_ids`` in plan order."""
    with _sqlalchemy_errors(READ_OUTPUTS, [task_ids]):
        return await driver.fetch(READ_OUTPUTS, list(task_ids))


async def store_events_and_records(
    driver: asyncpg.Connection,
    events_by_project: Mapping[str, Sequence[NewEvent]],
    records: Sequence[TaskRecords],
    created_at: datetime,
) -> None:
    """Store events with consecutive per-project sequence numbers, as ``append_events_many``
    does, and insert the rows of ``records``, all with ``created_at``."""
    project_ids = sorted(project_id for project_id, items in events_by_project.items() if items)
    if not project_ids and not records:
        return
    counts = [len(events_by_project[project_id]) for project_id in project_ids]
    event_columns: tuple[list[Any], ...] = ([], [], [], [], [])
    for project_id in project_ids:
        for position, event in enumerate(events_by_project[project_id], start=1):
            values = (project_id, position, event.task_id, event.type, json.dumps(event.data))
            for column, value in zip(event_columns, values, strict=True):
                column.append(value)
    messages = [row for item in records for row in item.messages]
    calls = [row for item in records for row in item.llm_calls]
    artifacts = [row for item in records for row in item.artifacts]
    arguments = (
        project_ids,
        counts,
        *event_columns,
        created_at,
        *([row[key] for row in messages] for key in MESSAGE_COLUMNS),
        *([row[key] for row in calls] for key in CALL_COLUMNS),
        *([row[key] for row in artifacts] for key in ARTIFACT_COLUMNS),
    )
    with _sqlalchemy_errors(STORE_EVENTS_AND_RECORDS, arguments):
        inserted = await driver.fetchval(STORE_EVENTS_AND_RECORDS, *arguments)
    if inserted != sum(counts):
        raise NotFoundError(
            f"a project of {project_ids!r} was not found while storing its events; "
            f"{inserted} of {sum(counts)} events were stored"
        )
