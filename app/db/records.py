"""Append-only records of a project: events, agent messages, artifacts and LLM calls.

Each function runs inside the caller's transaction, so that a record is stored together
with the state change it describes, or not at all.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Insert, Table, bindparam, case, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db.models import artifacts, events, llm_calls, messages, projects, task_sources
from app.errors import NotFoundError


@dataclass(frozen=True, slots=True)
class NewEvent:
    type: str
    data: dict[str, Any] = field(default_factory=dict)
    task_id: str | None = None


@dataclass(frozen=True, slots=True)
class LLMCallRecord:
    agent_role: str
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    cost_usd: float
    cache_hit: bool
    status: str
    error: str | None = None


# The keys of the rows in TaskRecords, in the order in which the statements sent to the
# database driver directly (app.worker.driver_statements, sqlite_statements) list them.
MESSAGE_COLUMNS = ("project_id", "task_id", "agent_role", "sender", "content")
CALL_COLUMNS = (
    "project_id",
    "task_id",
    "attempt",
    "agent_role",
    "provider",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "cost_usd",
    "cache_hit",
    "status",
    "error",
)
ARTIFACT_COLUMNS = ("project_id", "task_id", "name", "media_type", "content")


@dataclass(frozen=True, slots=True)
class TaskRecords:
    """The rows of ``messages``, ``llm_calls`` and ``artifacts`` that a finished task adds."""

    messages: Sequence[dict[str, Any]] = ()
    llm_calls: Sequence[dict[str, Any]] = ()
    artifacts: Sequence[dict[str, Any]] = ()


def utc_now() -> datetime:
    return datetime.now(UTC)


async def append_events(connection: AsyncConnection, project_id: str, new_events: Sequence[NewEvent]) -> None:
    """Store events of one project with consecutive sequence numbers; see ``append_events_many``."""
    await append_events_many(connection, {project_id: new_events})


async def append_events_many(
    connection: AsyncConnection, events_by_project: Mapping[str, Sequence[NewEvent]]
) -> None:
    """Store events with consecutive per-project sequence numbers, in two statements for any number of projects.

    Incrementing ``projects.event_seq`` locks the project row until commit, so two
    transactions of one project number their events in commit order. A client that resumes
    after sequence N therefore never misses an event committed later with a smaller number.
    The project rows are updated by one statement in id order, the order every caller
    locks several projects in, so two such transactions never wait for each other crosswise.
    """
    counts = {project_id: len(items) for project_id, items in events_by_project.items() if items}
    if not counts:
        return
    project_ids = sorted(counts)
    increment: Any = counts[project_ids[0]]
    if len(project_ids) > 1:
        increment = case({project_id: counts[project_id] for project_id in project_ids}, value=projects.c.id)
    rows = await connection.execute(
        update(projects)
        .where(projects.c.id.in_(project_ids))
        .values(event_seq=projects.c.event_seq + increment)
        .returning(projects.c.id, projects.c.event_seq)
    )
    last_by_project = dict(rows.all())

    now = utc_now()
    event_rows = []
    for project_id in project_ids:
        if project_id not in last_by_project:
            raise NotFoundError(f"project {project_id!r} not found while storing its events")
        first = last_by_project[project_id] - counts[project_id] + 1
        event_rows += [
            {
                "project_id": project_id,
                "seq": first + offset,
                "task_id": event.task_id,
                "type": event.type,
                "data": event.data,
                "created_at": now,
            }
            for offset, event in enumerate(events_by_project[project_id])
        ]
    await insert_rows(connection, events, event_rows)


def message_rows(
    project_id: str, task_id: str, agent_role: str, items: Sequence[tuple[str, str]], now: datetime
) -> list[dict[str, Any]]:
    """Build rows of ``messages`` from a conversation of (sender, content) pairs, sender being
    system, user or assistant."""
    return [
        {
            "project_id": project_id,
            "task_id": task_id,
            "agent_role": agent_role,
            "sender": sender,
            "content": content,
            "created_at": now,
        }
        for sender, content in items
    ]


def artifact_row(
    project_id: str, task_id: str | None, name: str, content: str, now: datetime
) -> dict[str, Any]:
    return {
        "project_id": project_id,
        "task_id": task_id,
        "name": name,
        "media_type": "text/markdown",
        "content": content,
        "created_at": now,
    }


def llm_call_rows(
    project_id: str, task_id: str, attempt: int, calls: Sequence[LLMCallRecord], now: datetime
) -> list[dict[str, Any]]:
    return [
        {
            "project_id": project_id,
            "task_id": task_id,
            "attempt": attempt,
            "agent_role": call.agent_role,
            "provider": call.provider,
            "model": call.model,
            "prompt_tokens": call.prompt_tokens,
            "completion_tokens": call.completion_tokens,
            "latency_ms": call.latency_ms,
            "cost_usd": call.cost_usd,
            "cache_hit": call.cache_hit,
            "status": call.status,
            "error": call.error,
            "created_at": now,
        }
        for call in calls
    ]


async def insert_rows(connection: AsyncConnection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert ``rows`` into ``table`` in one statement; nothing happens when there are none.

    Every row must have the same keys. On PostgreSQL the rows go as one array per column
    (see ``_array_insert``); elsewhere as one multi-row INSERT.
    """
    if not rows:
        return
    if connection.dialect.name != "postgresql":
        await connection.execute(table.insert(), list(rows))
        return
    keys = tuple(rows[0])
    await connection.execute(_array_insert(table, keys), {key: [row[key] for row in rows] for key in keys})


@functools.cache
def _array_insert(table: Table, keys: tuple[str, ...]) -> Insert:
    """Build ``INSERT INTO table (keys) SELECT unnest(:key1), unnest(:key2), ...`` for PostgreSQL.

    The statement text is the same for any number of rows, so PostgreSQL plans it once per
    connection, and the driver encodes each column as one array instead of one parameter
    per value. A multi-row INSERT has a new text, and a new plan, for each row count.
    Set-returning functions in one select list advance together, so the arrays, all of
    one length, yield one row per element.
    """
    values = [func.unnest(bindparam(key, type_=ARRAY(table.c[key].type))) for key in keys]
    return table.insert().from_select(list(keys), select(*values))


async def add_messages(
    connection: AsyncConnection,
    project_id: str,
    task_id: str,
    agent_role: str,
    items: Sequence[tuple[str, str]],
) -> None:
    """Store a conversation as (sender, content) pairs, sender being system, user or assistant."""
    await insert_rows(connection, messages, message_rows(project_id, task_id, agent_role, items, utc_now()))


async def add_artifact(
    connection: AsyncConnection, project_id: str, task_id: str | None, name: str, content: str
) -> None:
    await insert_rows(connection, artifacts, [artifact_row(project_id, task_id, name, content, utc_now())])


async def add_llm_calls(
    connection: AsyncConnection, project_id: str, task_id: str, attempt: int, calls: Sequence[LLMCallRecord]
) -> None:
    await insert_rows(connection, llm_calls, llm_call_rows(project_id, task_id, attempt, calls, utc_now()))


async def add_task_sources(connection: AsyncConnection, task_id: str, sources: Sequence[Any]) -> None:
    """Record which knowledge-base chunks a task's prompt carried, in rank order.

    A retried task replaces the sources of its earlier attempt.
    """
    await connection.execute(task_sources.delete().where(task_sources.c.task_id == task_id))
    if not sources:
        return
    await connection.execute(
        task_sources.insert(),
        [
            {
                "task_id": task_id,
                "rank": rank,
                "chunk_id": hit.chunk_id,
                "source": hit.source,
                "heading": hit.heading,
                "score": hit.score,
            }
            for rank, hit in enumerate(sources, start=1)
        ],
    )
