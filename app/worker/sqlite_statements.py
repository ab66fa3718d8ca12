"""The statements of a worker's store-and-claim transaction on SQLite, sent through aiosqlite.

``TaskQueue.complete_and_claim`` and ``TaskQueue.claim_in`` send these on SQLite, as
``app.worker.driver_statements`` does on PostgreSQL. The statements go to the aiosqlite
connection that the SQLAlchemy engine pooled for the transaction, which ``BEGIN IMMEDIATE``
has already begun. Through SQLAlchemy 2.1's aiosqlite adapter a statement takes 3 or 4 trips
to aiosqlite's thread (open a cursor, execute, fetch the rows, close) and SQLAlchemy
processes every parameter in Python. Here each statement, or each executemany, takes one trip.

Every write changes the same rows as the SQLAlchemy statements of ``app.worker.queue`` and
``app.db.records``: ``tests/integration/test_driver_statements.py`` compares the two. Lists
of ids go as one JSON array read by ``json_each``, so a statement's text is the same for any
number of tasks and the sqlite3 module reuses its prepared statement. This needs SQLite 3.35
or later for RETURNING and 3.33 for UPDATE ... FROM.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

import aiosqlite
from sqlalchemy import exc
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db.driver_errors import ErrorTranslations, sqlalchemy_errors
from app.db.models import tasks
from app.db.records import ARTIFACT_COLUMNS, CALL_COLUMNS, MESSAGE_COLUMNS, NewEvent, TaskRecords
from app.db.states import TaskStatus
from app.errors import NotFoundError

# SQLAlchemy's own conversion of a datetime for a SQLite DATETIME column, so that rows
# written here read back as those written through SQLAlchemy do.
_DIALECT = sqlite.dialect()
_datetime_text = tasks.c.finished_at.type.dialect_impl(_DIALECT).bind_processor(_DIALECT)

READ_RUNNING_TOKENS = f"""
SELECT id, lease_token FROM tasks
WHERE id IN (SELECT value FROM json_each(?)) AND status = '{TaskStatus.RUNNING}'
"""

COMPLETE_TASK = f"""
UPDATE tasks
SET status = '{TaskStatus.COMPLETED}', output = ?, error = NULL, finished_at = ?,
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = ? AND lease_token = ? AND status = '{TaskStatus.RUNNING}'
"""

FINISH_ATTEMPT = """
UPDATE task_attempts SET outcome = 'completed', error = NULL, finished_at = ?
WHERE task_id = ? AND lease_token = ?
"""

# Counts each finished task off its dependents. SQL evaluates every SET expression on the
# row as it was, so both CASE conditions read the count from before this statement.
RELEASE_DEPENDENTS = f"""
UPDATE tasks
SET pending_dependencies = tasks.pending_dependencies - counts.finished,
    status = CASE
        WHEN tasks.pending_dependencies = counts.finished AND tasks.status = '{TaskStatus.BLOCKED}'
        THEN '{TaskStatus.READY}' ELSE tasks.status END,
    available_at = CASE
        WHEN tasks.pending_dependencies = counts.finished AND tasks.status = '{TaskStatus.BLOCKED}'
        THEN ? ELSE tasks.available_at END
FROM (
    SELECT task_id, count(*) AS finished FROM task_dependencies
    WHERE depends_on_id IN (SELECT value FROM json_each(?))
    GROUP BY task_id
) AS counts
WHERE tasks.id = counts.task_id
RETURNING tasks.id, tasks.project_id, tasks.status
"""

CLAIM = f"""
WITH candidates AS (
    SELECT id FROM tasks
    WHERE status = '{TaskStatus.READY}' AND available_at <= ?
    ORDER BY available_at
    LIMIT ?
)
UPDATE tasks
SET status = '{TaskStatus.RUNNING}', lease_owner = ?, lease_token = tasks.lease_token + 1,
    lease_expires_at = ?, attempts = tasks.attempts + 1, started_at = coalesce(tasks.started_at, ?)
FROM candidates
WHERE tasks.id = candidates.id AND tasks.status = '{TaskStatus.READY}'
RETURNING tasks.id, tasks.project_id, tasks.kind, tasks.key, tasks.title, tasks.description,
    tasks.role, tasks.attempts, tasks.max_attempts, tasks.lease_token, tasks.depends_on
"""
_CLAIM_COLUMNS = (
    "id",
    "project_id",
    "kind",
    "key",
    "title",
    "description",
    "role",
    "attempts",
    "max_attempts",
    "lease_token",
    "depends_on",
)

INSERT_ATTEMPT = """
INSERT INTO task_attempts (task_id, number, worker_id, lease_token, outcome, started_at)
VALUES (?, ?, ?, ?, 'running', ?)
"""

READ_PROJECTS = """
SELECT id, status, brief, team, knowledge_base FROM projects
WHERE id IN (SELECT value FROM json_each(?))
"""

READ_OUTPUTS = """
SELECT id, key, title, role, output FROM tasks
WHERE id IN (SELECT value FROM json_each(?)) ORDER BY position
"""

# Adds each project's event count to its sequence. The parameter is a JSON array of
# [project id, count] pairs. SQLite's write transaction is exclusive, so no other writer
# numbers events meanwhile.
NUMBER_EVENTS = """
UPDATE projects
SET event_seq = projects.event_seq + counts.added
FROM (
    SELECT json_extract(value, '$[0]') AS project_id, json_extract(value, '$[1]') AS added
    FROM json_each(?)
) AS counts
WHERE projects.id = counts.project_id
RETURNING projects.id, projects.event_seq
"""

INSERT_EVENT = """
INSERT INTO events (project_id, seq, task_id, type, data, created_at) VALUES (?, ?, ?, ?, ?, ?)
"""
INSERT_MESSAGE = """
INSERT INTO messages (project_id, task_id, agent_role, sender, content, created_at)
VALUES (?, ?, ?, ?, ?, ?)
"""
INSERT_CALL = """
INSERT INTO llm_calls (project_id, task_id, attempt, agent_role, provider, model, prompt_tokens,
    completion_tokens, latency_ms, cost_usd, cache_hit, status, error, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
INSERT_ARTIFACT = """
INSERT INTO artifacts (project_id, task_id, name, media_type, content, created_at)
VALUES (?, ?, ?, ?, ?, ?)
"""


# The SQLAlchemy exception that SQLAlchemy 2.1's aiosqlite dialect raises for each sqlite3
# error, most specific first, so that callers catch the same exceptions on both paths.
_SQLALCHEMY_ERRORS: ErrorTranslations = (
    (sqlite3.IntegrityError, exc.IntegrityError),
    (sqlite3.OperationalError, exc.OperationalError),
    (sqlite3.ProgrammingError, exc.ProgrammingError),
    (sqlite3.InternalError, exc.InternalError),
    (sqlite3.InterfaceError, exc.InterfaceError),
    (sqlite3.DatabaseError, exc.DatabaseError),
    (sqlite3.Error, exc.DBAPIError),
)


def _sqlalchemy_errors(statement: str, arguments: Any) -> AbstractContextManager[None]:
    """Raise a sqlite3 error of ``statement`` as the SQLAlchemy exception it would be through the engine."""
    return sqlalchemy_errors(statement, arguments, _SQLALCHEMY_ERRORS)


async def _fetch(driver: aiosqlite.Connection, statement: str, arguments: Sequence[Any]) -> list[Any]:
    with _sqlalchemy_errors(statement, arguments):
        return list(await driver.execute_fetchall(statement, arguments))


async def _execute_many(driver: aiosqlite.Connection, statement: str, rows: Sequence[Sequence[Any]]) -> None:
    if not rows:
        return
    with _sqlalchemy_errors(statement, rows):
        await driver.executemany(statement, rows)


async def driver_connection(connection: AsyncConnection) -> aiosqlite.Connection:
    """Return the aiosqlite connection under ``connection``, which must be in a transaction.

    ``Database.transaction`` sends ``BEGIN IMMEDIATE`` when it starts, so the statements
    sent here run in its transaction.
    """
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    if not driver.in_transaction:
        raise RuntimeError(
            "the aiosqlite connection is not in a transaction; open it with "
            "Database.transaction, which sends BEGIN IMMEDIATE, before sending statements to the driver"
        )
    return driver


async def read_running_tokens(driver: aiosqlite.Connection, task_ids: Sequence[str]) -> dict[str, int]:
    """Return the lease token of each running task among ``task_ids``."""
    return dict(await _fetch(driver, READ_RUNNING_TOKENS, (json.dumps(list(task_ids)),)))


async def complete_and_release(
    driver: aiosqlite.Connection,
    finished: Sequence[tuple[str, int, str]],
    finished_at: datetime,
    ready_at: float,
) -> list[tuple[str, str]]:
    """Store (task id, lease token, output) of held leases and count them off their dependents.

    Returns (id, project id) of the dependents that became ready.
    """
    finished_text = _datetime_text(finished_at)
    await _execute_many(
        driver,
        COMPLETE_TASK,
        [(output, finished_text, task_id, token) for task_id, token, output in finished],
    )
    await _execute_many(
        driver, FINISH_ATTEMPT, [(finished_text, task_id, token) for task_id, token, _ in finished]
    )
    task_ids = json.dumps([task_id for task_id, _, _ in finished])
    rows = await _fetch(driver, RELEASE_DEPENDENTS, (ready_at, task_ids))
    return [(task_id, project_id) for task_id, project_id, status in rows if status == TaskStatus.READY]


async def claim(
    connection: AsyncConnection,
    driver: aiosqlite.Connection | None,
    *,
    worker_id: str,
    limit: int,
    now: float,
    expires_at: float,
    started_at: datetime,
) -> list[dict[str, Any]]:
    """Lease up to ``limit`` ready tasks and insert their attempts.

    Returns the tasks in id order, as ``driver_statements.claim`` does: each row also
    carries its project's status (as ``project_status``), brief, team and knowledge base.
    """
    driver = driver or await driver_connection(connection)
    started_text = _datetime_text(started_at)
    claimed = await _fetch(driver, CLAIM, (now, limit, worker_id, expires_at, started_text))
    if not claimed:
        return []
    rows = sorted((dict(zip(_CLAIM_COLUMNS, row, strict=True)) for row in claimed), key=lambda row: row["id"])
    await _execute_many(
        driver,
        INSERT_ATTEMPT,
        [(row["id"], row["attempts"], worker_id, row["lease_token"], started_text) for row in rows],
    )
    project_ids = json.dumps(sorted({row["project_id"] for row in rows}))
    projects_by_id = {row[0]: row for row in await _fetch(driver, READ_PROJECTS, (project_ids,))}
    for row in rows:
        _, status, brief, team, knowledge_base = projects_by_id[row["project_id"]]
        depends_on = row["depends_on"]
        row["depends_on"] = json.loads(depends_on) if depends_on is not None else None
        row.update(project_status=status, brief=brief, team=team, knowledge_base=knowledge_base)
    return rows


async def read_outputs(driver: aiosqlite.Connection, task_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Read (id, key, title, role, output) of ``task_ids`` in plan order."""
    rows = await _fetch(driver, READ_OUTPUTS, (json.dumps(list(task_ids)),))
    return [
        {"id": task_id, "key": key, "title": title, "role": role, "output": output}
        for task_id, key, title, role, output in rows
    ]


async def store_events_and_records(
    driver: aiosqlite.Connection,
    events_by_project: Mapping[str, Sequence[NewEvent]],
    records: Sequence[TaskRecords],
    created_at: datetime,
) -> None:
    """Store events with consecutive per-project sequence numbers, as ``append_events_many``
    does, and insert the rows of ``records``.

    The events get ``created_at``; each record row keeps its own ``created_at``, as
    ``insert_rows`` stores it.
    """
    counts = {project_id: len(items) for project_id, items in events_by_project.items() if items}
    if counts:
        numbered = await _fetch(driver, NUMBER_EVENTS, (json.dumps(sorted(counts.items())),))
        last_by_project = dict(numbered)
        missing = sorted(set(counts) - set(last_by_project))
        if missing:
            raise NotFoundError(f"projects {missing!r} not found while storing their events")
        created_text = _datetime_text(created_at)
        event_rows = []
        for project_id in sorted(counts):
            first = last_by_project[project_id] - counts[project_id] + 1
            for offset, event in enumerate(events_by_project[project_id]):
                event_rows.append(
                    (
                        project_id,
                        first + offset,
                        event.task_id,
                        event.type,
                        json.dumps(event.data),
                        created_text,
                    )
                )
        await _execute_many(driver, INSERT_EVENT, event_rows)

    for statement, columns, rows in (
        (INSERT_MESSAGE, MESSAGE_COLUMNS, [row for item in records for row in item.messages]),
        (INSERT_CALL, CALL_COLUMNS, [row for item in records for row in item.llm_calls]),
        (INSERT_ARTIFACT, ARTIFACT_COLUMNS, [row for item in records for row in item.artifacts]),
    ):
        await _execute_many(
            driver,
            statement,
            [(*(row[key] for key in columns), _datetime_text(row["created_at"])) for row in rows],
        )
