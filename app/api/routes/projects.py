"""Projects: create, list, read, cancel, read a task, and follow events."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from sqlalchemy import case, func, select
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from app.agent.team import PROJECT_MANAGER, load_team
from app.api.consistency import ReadAfterDep
from app.api.deps import RuntimeDep
from app.api.schemas import (
    OFFLINE_NOTICE,
    AttemptPublic,
    EventPage,
    EventPublic,
    LLMCallPublic,
    MessagePublic,
    ProjectAccepted,
    ProjectCreate,
    ProjectPage,
    ProjectPublic,
    ProjectSummary,
    SourcePublic,
    TaskDetail,
    TaskPublic,
    UsagePublic,
    as_utc,
)
from app.cache import CacheKind
from app.db import projects as store
from app.db.models import events, llm_calls, messages, projects
from app.db.states import FINAL_PROJECT_STATUSES, OPEN_TASK_STATUSES, ProjectStatus
from app.errors import NotFoundError
from app.knowledge import repository as knowledge_repository
from app.monitoring.metrics import PROJECTS_CREATED
from app.runtime import Runtime
from app.signals import EventFollower

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/projects", tags=["projects"])

EVENTS_PER_READ = 500
FINAL_EVENT_TYPES = frozenset({"project.completed", "project.failed", "project.cancelled"})
SIGNAL_CHECK_SECONDS = 1.0
MAX_SEQ = 2**31 - 1  # events.seq is a 32-bit integer column


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=ProjectAccepted)
async def create_project(body: ProjectCreate, runtime: RuntimeDep) -> ProjectAccepted:
    """Queue a project; the project manager plans it as soon as a worker is free."""
    limit = runtime.settings.api.max_brief_chars
    if len(body.brief) > limit:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"brief: {len(body.brief)} characters, over the limit of {limit}; shorten it or raise api.max_brief_chars",
        )
    async with runtime.database.transaction() as connection:
        if body.knowledge_base is not None:
            try:
                await knowledge_repository.get_knowledge_base(connection, body.knowledge_base)
            except NotFoundError as exc:
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"knowledge_base: {exc}") from exc
        team = await load_team(connection, body.team)
        if not team:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"team: no team named {body.team!r}; the configured team is 'default'",
            )
        providers = sorted({role.provider for role in team.values() if role.enabled})
        project = store.NewProject(
            title=body.title or _title_from(body.brief),
            brief=body.brief,
            team=body.team,
            knowledge_base=body.knowledge_base,
            providers=providers,
            max_attempts=runtime.settings.worker.max_attempts,
        )
        project_id = await store.insert_project(connection, project, PROJECT_MANAGER)

    PROJECTS_CREATED.inc()
    logger.info("project created", extra={"action": "project.created", "project_id": project_id})
    if runtime.notify_work is not None:
        runtime.notify_work()
    return ProjectAccepted(id=project_id, status=ProjectStatus.QUEUED)


@router.get("", response_model=ProjectPage)
async def list_projects(
    runtime: RuntimeDep,
    read_after: ReadAfterDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
    status_filter: Annotated[ProjectStatus | None, Query(alias="status")] = None,
) -> ProjectPage:
    """List projects, newest first. Served by a read replica when one is in rotation."""

    async def read_page(connection):
        return await store.list_projects(connection, limit, cursor, status_filter)

    try:
        rows, next_cursor = await runtime.database.read_stale(read_page, after=read_after)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"cursor: {exc}") from exc
    items = [
        ProjectSummary(
            id=row.id,
            title=row.title,
            status=row.status,
            team=row.team,
            created_at=as_utc(row.created_at),
            finished_at=as_utc(row.finished_at),
        )
        for row in rows
    ]
    return ProjectPage(items=items, next_cursor=next_cursor)


@router.get("/{project_id}", response_model=ProjectPublic)
async def read_project(project_id: str, runtime: RuntimeDep, read_after: ReadAfterDep) -> Response:
    """Read a project. A finished project no longer changes, so its response is cached and
    may come from a read replica. One still changing comes from the primary, so clients
    following it see each step at once.

    ``app.api.cached_reads`` serves cached responses before routing, so a request reaching
    this route missed the cache, or carries something the route must reject.
    """
    project = await runtime.database.read_stale(
        lambda connection: _load_project(connection, project_id),
        after=read_after,
        accept=lambda project: project.status in FINAL_PROJECT_STATUSES,
    )
    body = project.model_dump_json().encode()
    if project.status in FINAL_PROJECT_STATUSES:
        await runtime.shared_cache.set(CacheKind.PROJECT, project_id, body)
    return Response(body, media_type="application/json")


async def _load_project(connection, project_id: str) -> ProjectPublic:
    project = await store.get_project(connection, project_id)
    task_rows = await store.list_tasks(connection, project_id)
    usage = (
        await connection.execute(
            select(
                func.count(),
                func.coalesce(func.sum(llm_calls.c.prompt_tokens), 0),
                func.coalesce(func.sum(llm_calls.c.completion_tokens), 0),
                func.coalesce(func.sum(llm_calls.c.cost_usd), 0.0),
                func.coalesce(func.sum(case((llm_calls.c.cache_hit, 1), else_=0)), 0),
            ).where(llm_calls.c.project_id == project_id)
        )
    ).one()

    return ProjectPublic(
        id=project.id,
        title=project.title,
        status=project.status,
        team=project.team,
        knowledge_base=project.knowledge_base,
        providers=project.providers,
        notice=OFFLINE_NOTICE if "offline" in project.providers else None,
        created_at=as_utc(project.created_at),
        updated_at=as_utc(project.updated_at),
        finished_at=as_utc(project.finished_at),
        tasks=[_task_public(row) for row in task_rows],
        usage=UsagePublic(
            llm_calls=usage[0],
            prompt_tokens=usage[1],
            completion_tokens=usage[2],
            cost_usd=round(float(usage[3]), 6),
            cache_hits=usage[4],
        ),
        report=project.report,
        error=project.error,
    )


@router.post("/{project_id}/cancel", response_model=ProjectAccepted)
async def cancel_project(project_id: str, runtime: RuntimeDep) -> ProjectAccepted:
    """Cancel queued and running work. A worker holding a task stops it at its next heartbeat."""
    async with runtime.database.transaction() as connection:
        result = await store.cancel_project(connection, project_id)
    logger.info("project cancelled", extra={"action": "project.cancelled", "project_id": project_id})
    return ProjectAccepted(id=project_id, status=result)


@router.get("/{project_id}/tasks/{task_id}", response_model=TaskDetail)
async def read_task(
    project_id: str, task_id: str, runtime: RuntimeDep, read_after: ReadAfterDep
) -> TaskDetail:
    """Read a task. A finished one may come from a read replica, one still open from the primary."""
    return await runtime.database.read_stale(
        lambda connection: _load_task(connection, project_id, task_id),
        after=read_after,
        accept=lambda task: task.status not in OPEN_TASK_STATUSES,
    )


async def _load_task(connection, project_id: str, task_id: str) -> TaskDetail:
    task = await store.get_task(connection, project_id, task_id)
    calls = await store.list_llm_calls(connection, task_id)
    attempts = await store.list_attempts(connection, task_id)
    sources = await store.list_task_sources(connection, task_id)
    prompt = list(
        await connection.execute(
            select(messages.c.sender, messages.c.content)
            .where(messages.c.task_id == task_id, messages.c.sender != "assistant")
            .order_by(messages.c.id)
        )
    )

    return TaskDetail(
        **_task_public(task).model_dump(),
        project_id=task.project_id,
        description=task.description,
        max_attempts=task.max_attempts,
        input=[MessagePublic(sender=row.sender, content=row.content) for row in prompt],
        output=task.output,
        attempt_history=[
            AttemptPublic(
                number=row.number,
                worker_id=row.worker_id,
                outcome=row.outcome,
                error=row.error,
                started_at=as_utc(row.started_at),
                finished_at=as_utc(row.finished_at),
            )
            for row in attempts
        ],
        llm_calls=[
            LLMCallPublic(
                attempt=row.attempt,
                provider=row.provider,
                model=row.model,
                prompt_tokens=row.prompt_tokens,
                completion_tokens=row.completion_tokens,
                latency_ms=row.latency_ms,
                cost_usd=row.cost_usd,
                cache_hit=row.cache_hit,
                status=row.status,
                error=row.error,
                created_at=as_utc(row.created_at),
            )
            for row in calls
        ],
        sources=[
            SourcePublic(
                rank=row.rank, source=row.source, heading=row.heading, score=row.score, chunk_id=row.chunk_id
            )
            for row in sources
        ],
        created_at=as_utc(task.created_at),
        started_at=as_utc(task.started_at),
        finished_at=as_utc(task.finished_at),
    )


@router.get(
    "/{project_id}/events",
    response_model=EventPage,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "JSON page, or a stream with Accept: text/event-stream",
        }
    },
)
async def read_events(
    project_id: str,
    request: Request,
    runtime: RuntimeDep,
    after: Annotated[
        int, Query(ge=0, le=MAX_SEQ, description="Return events with a sequence number above this")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    last_event_id: Annotated[str | None, Header()] = None,
    read_after: ReadAfterDep = None,
):
    """Page through a project's events, or stream them with ``Accept: text/event-stream``.

    A stream resumes after ``Last-Event-ID`` (or ``after``) and ends once the project is
    finished and every event has been sent.
    """
    async with runtime.database.read() as connection:
        await store.get_project(connection, project_id)

    if "text/event-stream" not in request.headers.get("accept", ""):
        # Events are only ever appended, so a replica's page is correct, if possibly shorter.
        rows = await runtime.database.read_stale(
            lambda connection: _events_after(connection, project_id, after, limit), after=read_after
        )
        return EventPage(items=[_event_public(row) for row in rows], last_seq=rows[-1].seq if rows else after)

    start = after
    if last_event_id is not None:
        if not re.fullmatch(r"[0-9]{1,10}", last_event_id.strip()) or int(last_event_id) > MAX_SEQ:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"Last-Event-ID: {last_event_id!r} is not an event sequence number; send the id of the last event received",
            )
        start = int(last_event_id)
    return EventSourceResponse(
        _stream_events(request, runtime, project_id, start),
        ping=int(runtime.settings.api.sse_keepalive_seconds),
        headers={"X-Accel-Buffering": "no"},
    )


async def _stream_events(
    request: Request, runtime: Runtime, project_id: str, after: int
) -> AsyncIterator[ServerSentEvent]:
    """Send the project's events after ``after``, from the database and then as signals bring them.

    The stream follows the project's signals before its first read, so an event committed
    after that read arrives by signal. Signalled events are sent only when they continue
    the sequence; after a gap, or with no signal for a while, the stream reads the database.
    """
    follower = runtime.signals.follow(project_id)
    try:
        read_database = True
        while not await request.is_disconnected():
            if read_database:
                async with runtime.database.read() as connection:
                    # Read the status first: events committed before a final status are then
                    # guaranteed to be in the read that follows.
                    project_status = await connection.scalar(
                        select(projects.c.status).where(projects.c.id == project_id)
                    )
                    rows = await _events_after(connection, project_id, after, EVENTS_PER_READ)
                for row in rows:
                    after = row.seq
                    yield _server_sent(_event_public(row))
                if rows:
                    continue
                if project_status in FINAL_PROJECT_STATUSES:
                    return

            signalled = await _next_signalled(runtime, follower)
            read_database = signalled is None
            for item in signalled or ():
                if item.seq <= after:
                    continue  # also read from the database already
                if item.seq != after + 1:
                    read_database = True
                    break
                after = item.seq
                yield _server_sent(item)
                if item.type in FINAL_EVENT_TYPES:
                    return
    finally:
        runtime.signals.unfollow(project_id, follower)


async def _next_signalled(runtime: Runtime, follower: EventFollower) -> list[EventPublic] | None:
    """Wait for events by signal; return None when the stream should read the database instead.

    While signals from other instances arrive, the database is read only every
    ``caching.signal_poll_seconds``, in case a signal was lost; otherwise every
    ``api.sse_poll_interval_seconds``.
    """
    signals = runtime.signals
    poll_seconds = runtime.settings.api.sse_poll_interval_seconds
    if signals.working:
        poll_seconds = max(poll_seconds, runtime.settings.caching.signal_poll_seconds)
    deadline = time.monotonic() + poll_seconds
    batch = None
    while batch is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or follower.overflowed:
            break
        # Short slices notice at once when signals stop working and polling must take over.
        slice_seconds = min(remaining, SIGNAL_CHECK_SECONDS) if signals.working else remaining
        with suppress(TimeoutError):
            async with asyncio.timeout(slice_seconds):
                batch = await follower.queue.get()
        if batch is None and not signals.working:
            break

    if follower.overflowed:
        follower.overflowed = False
        while not follower.queue.empty():
            follower.queue.get_nowait()
        return None
    if batch is None:
        return None
    items = list(batch)
    while not follower.queue.empty():
        items += follower.queue.get_nowait()
    return [EventPublic.model_validate(item) for item in items]


def _server_sent(event: EventPublic) -> ServerSentEvent:
    return ServerSentEvent(
        data=json.dumps(event.model_dump(mode="json")), event=event.type, id=str(event.seq)
    )


async def _events_after(connection, project_id: str, after: int, limit: int):
    return list(
        await connection.execute(
            select(events)
            .where(events.c.project_id == project_id, events.c.seq > after)
            .order_by(events.c.seq)
            .limit(limit)
        )
    )


def _event_public(row) -> EventPublic:
    return EventPublic(
        seq=row.seq, type=row.type, task_id=row.task_id, data=row.data, created_at=as_utc(row.created_at)
    )


def _task_public(row) -> TaskPublic:
    return TaskPublic(
        id=row.id,
        key=row.key,
        kind=row.kind,
        title=row.title,
        role=row.role,
        status=row.status,
        depends_on=row.depends_on,
        attempts=row.attempts,
        error=row.error,
    )


def _title_from(brief: str) -> str:
    for line in brief.splitlines():
        text = line.strip().lstrip("#").strip()
        if text:
            return text[:200]
    return "Untitled project"
