"""Append-only records of a project: events, agent messages, artifacts and LLM calls.

Each function runs inside the caller's transaction, so that a record is stored together
with the state change it describes, or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db.models import artifacts, events, llm_calls, messages, projects, task_sources


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


def utc_now() -> datetime:
    return datetime.now(UTC)


async def append_events(connection: AsyncConnection, project_id: str, new_events: Sequence[NewEvent]) -> None:
    """Store events with consecutive per-project sequence numbers.

    Incrementing ``projects.event_seq`` locks the project row until commit, so two
    transactions of one project number their events in commit order. A client that resumes
    after sequence N therefore never misses an event committed later with a smaller number.
    """
    if not new_events:
        return
    last = await connection.scalar(
        update(projects)
        .where(projects.c.id == project_id)
        .values(event_seq=projects.c.event_seq + len(new_events))
        .returning(projects.c.event_seq)
    )
    first = last - len(new_events) + 1
    now = utc_now()
    await connection.execute(
        events.insert(),
        [
            {
                "project_id": project_id,
                "seq": first + offset,
                "task_id": event.task_id,
                "type": event.type,
                "data": event.data,
                "created_at": now,
            }
            for offset, event in enumerate(new_events)
        ],
    )


async def add_messages(
    connection: AsyncConnection,
    project_id: str,
    task_id: str,
    agent_role: str,
    items: Sequence[tuple[str, str]],
) -> None:
    """Store a conversation as (sender, content) pairs, sender being system, user or assistant."""
    if not items:
        return
    now = utc_now()
    await connection.execute(
        messages.insert(),
        [
            {
                "project_id": project_id,
                "task_id": task_id,
                "agent_role": agent_role,
                "sender": sender,
                "content": content,
                "created_at": now,
            }
            for sender, content in items
        ],
    )


async def add_artifact(
    connection: AsyncConnection, project_id: str, task_id: str | None, name: str, content: str
) -> None:
    await connection.execute(
        artifacts.insert().values(
            project_id=project_id,
            task_id=task_id,
            name=name,
            media_type="text/markdown",
            content=content,
            created_at=utc_now(),
        )
    )


async def add_llm_calls(
    connection: AsyncConnection, project_id: str, task_id: str, attempt: int, calls: Sequence[LLMCallRecord]
) -> None:
    if not calls:
        return
    now = utc_now()
    await connection.execute(
        llm_calls.insert(),
        [
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
        ],
    )


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
