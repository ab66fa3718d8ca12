"""Statements on projects and their task graphs, run inside the caller's transaction."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.agent.planning import PlannedTask
from app.db.locking import lock_tasks_in_id_order
from app.db.models import llm_calls, projects, task_attempts, task_dependencies, task_sources, tasks
from app.db.records import NewEvent, append_events, utc_now
from app.db.states import FINAL_PROJECT_STATUSES, OPEN_TASK_STATUSES, ProjectStatus, TaskKind, TaskStatus
from app.errors import ConflictError, NotFoundError

REPORT_KEY = "REPORT"
PLAN_KEY = "PLAN"


@dataclass(frozen=True, slots=True)
class NewProject:
    title: str
    brief: str
    team: str
    knowledge_base: str | None
    providers: list[str]
    max_attempts: int


def new_id() -> str:
    return str(uuid.uuid4())


def is_id(value: str) -> bool:
    """Tell whether ``value`` can be an id at all, before it reaches a query (NUL bytes and
    other junk would otherwise make PostgreSQL fail instead of finding nothing)."""
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


async def insert_project(connection: AsyncConnection, project: NewProject, manager_role: str) -> str:
    """Insert a project with its planning task, ready to be claimed."""
    project_id = new_id()
    now = utc_now()
    await connection.execute(
        projects.insert().values(
            id=project_id,
            title=project.title,
            brief=project.brief,
            team=project.team,
            knowledge_base=project.knowledge_base,
            status=ProjectStatus.QUEUED,
            providers=project.providers,
            event_seq=0,
            created_at=now,
            updated_at=now,
        )
    )
    await connection.execute(
        tasks.insert().values(
            id=new_id(),
            project_id=project_id,
            position=0,
            kind=TaskKind.PLAN,
            key=PLAN_KEY,
            title="Plan the project",
            description="Split the brief into tasks for the team.",
            role=manager_role,
            status=TaskStatus.READY,
            depends_on=[],
            pending_dependencies=0,
            max_attempts=project.max_attempts,
            available_at=time.time(),
            created_at=now,
        )
    )
    await append_events(
        connection, project_id, [NewEvent("project.created", {"title": project.title, "team": project.team})]
    )
    return project_id


async def insert_plan(
    connection: AsyncConnection,
    project_id: str,
    planned: Sequence[PlannedTask],
    manager_role: str,
    max_attempts: int,
) -> list[str]:
    """Insert the planned tasks and the final report task, which depends on all of them.

    ``planned`` must be in dependency order. Returns the ids of the tasks that are ready.
    """
    now = utc_now()
    ready_at = time.time()
    ids = {task.id: new_id() for task in planned}
    report_id = new_id()

    rows: list[dict[str, Any]] = []
    edges: list[dict[str, str]] = []
    for position, task in enumerate(planned, start=1):
        dependencies = [ids[key] for key in dict.fromkeys(task.depends_on)]
        rows.append(
            _task_row(
                ids[task.id],
                project_id,
                position,
                TaskKind.WORK,
                task.id,
                task.title,
                task.description,
                task.role,
                dependencies,
                max_attempts,
                ready_at,
                now,
            )
        )
        edges += [{"task_id": ids[task.id], "depends_on_id": dependency} for dependency in dependencies]

    report_dependencies = list(ids.values())
    rows.append(
        _task_row(
            report_id,
            project_id,
            len(planned) + 1,
            TaskKind.REPORT,
            REPORT_KEY,
            "Final report",
            "Review every output and write the final report.",
            manager_role,
            report_dependencies,
            max_attempts,
            ready_at,
            now,
        )
    )
    edges += [{"task_id": report_id, "depends_on_id": dependency} for dependency in report_dependencies]

    await connection.execute(tasks.insert(), rows)
    await connection.execute(task_dependencies.insert(), edges)
    await connection.execute(
        update(projects)
        .where(
            projects.c.id == project_id, projects.c.status.in_([ProjectStatus.QUEUED, ProjectStatus.PLANNING])
        )
        .values(status=ProjectStatus.RUNNING, updated_at=now)
    )

    ready = [row["id"] for row in rows if row["status"] == TaskStatus.READY]
    summary = [
        {"id": row["id"], "key": row["key"], "title": row["title"], "role": row["role"]} for row in rows
    ]
    await append_events(
        connection,
        project_id,
        [NewEvent("plan.accepted", {"tasks": summary}), NewEvent("project.running")]
        + [NewEvent("task.ready", {}, task_id) for task_id in ready],
    )
    return ready


def _task_row(
    task_id: str,
    project_id: str,
    position: int,
    kind: str,
    key: str,
    title: str,
    description: str,
    role: str,
    dependencies: list[str],
    max_attempts: int,
    ready_at: float,
    now: datetime,
) -> dict[str, Any]:
    return {
        "id": task_id,
        "project_id": project_id,
        "position": position,
        "kind": kind,
        "key": key,
        "title": title,
        "description": description,
        "role": role,
        "status": TaskStatus.BLOCKED if dependencies else TaskStatus.READY,
        "depends_on": dependencies,
        "pending_dependencies": len(dependencies),
        "attempts": 0,
        "max_attempts": max_attempts,
        "available_at": ready_at,
        "lease_token": 0,
        "created_at": now,
    }


async def complete_project(connection: AsyncConnection, project_id: str, report: str) -> None:
    now = utc_now()
    result = await connection.execute(
        update(projects)
        .where(projects.c.id == project_id, projects.c.status == ProjectStatus.RUNNING)
        .values(status=ProjectStatus.COMPLETED, report=report, updated_at=now, finished_at=now)
    )
    if result.rowcount:
        await append_events(connection, project_id, [NewEvent("project.completed")])


async def cancel_project(connection: AsyncConnection, project_id: str) -> str:
    """Cancel every open task of a project, then the project; return the resulting status.

    Task rows are locked before the project row, the order every other transaction uses,
    so that a cancel never deadlocks with a worker finishing a task of the same project.
    The open tasks are cancelled a second time once the project row is locked: a worker
    that stored a plan while this transaction waited has committed its new tasks by then,
    and on PostgreSQL only a new statement sees them.
    """
    status = None
    if is_id(project_id):
        status = await connection.scalar(select(projects.c.status).where(projects.c.id == project_id))
    if status is None:
        raise NotFoundError(f"project {project_id!r} not found")
    if status == ProjectStatus.CANCELLED:
        return status
    if status in FINAL_PROJECT_STATUSES:
        raise _cannot_cancel(project_id, status)

    cancelled_ids = await _cancel_open_tasks(connection, project_id)
    now = utc_now()
    changed = await connection.execute(
        update(projects)
        .where(projects.c.id == project_id, projects.c.status.not_in(list(FINAL_PROJECT_STATUSES)))
        .values(status=ProjectStatus.CANCELLED, updated_at=now, finished_at=now)
    )
    if not changed.rowcount:
        # The project finished while this transaction waited for its row; the rollback
        # that the error causes keeps the tasks as they were.
        status = await connection.scalar(select(projects.c.status).where(projects.c.id == project_id))
        raise _cannot_cancel(project_id, status)
    cancelled_ids += await _cancel_open_tasks(connection, project_id)

    await append_events(
        connection,
        project_id,
        [NewEvent("task.cancelled", {}, task_id) for task_id in cancelled_ids]
        + [NewEvent("project.cancelled")],
    )
    return ProjectStatus.CANCELLED


async def _cancel_open_tasks(connection: AsyncConnection, project_id: str) -> list[str]:
    now = utc_now()
    open_tasks = and_(tasks.c.project_id == project_id, tasks.c.status.in_(list(OPEN_TASK_STATUSES)))
    await lock_tasks_in_id_order(connection, open_tasks)
    cancelled = await connection.execute(
        update(tasks)
        .where(tasks.c.project_id == project_id, tasks.c.status.in_(list(OPEN_TASK_STATUSES)))
        .values(status=TaskStatus.CANCELLED, lease_owner=None, lease_expires_at=None, finished_at=now)
        .returning(tasks.c.id)
    )
    cancelled_ids = [task_id for (task_id,) in cancelled]
    if cancelled_ids:
        await connection.execute(
            update(task_attempts)
            .where(task_attempts.c.task_id.in_(cancelled_ids), task_attempts.c.outcome == "running")
            .values(outcome="cancelled", finished_at=now)
        )
    return cancelled_ids


def _cannot_cancel(project_id: str, status: str) -> ConflictError:
    return ConflictError(
        f"project {project_id} is already {status}; only queued, planning or running projects can be cancelled"
    )


async def get_project(connection: AsyncConnection, project_id: str) -> Row:
    row = None
    if is_id(project_id):
        row = (await connection.execute(select(projects).where(projects.c.id == project_id))).first()
    if row is None:
        raise NotFoundError(f"project {project_id!r} not found; list projects with GET /api/v1/projects")
    return row


async def list_tasks(connection: AsyncConnection, project_id: str) -> list[Row]:
    return list(
        await connection.execute(
            select(tasks).where(tasks.c.project_id == project_id).order_by(tasks.c.position)
        )
    )


async def get_task(connection: AsyncConnection, project_id: str, task_id: str) -> Row:
    row = None
    if is_id(project_id) and is_id(task_id):
        row = (
            await connection.execute(
                select(tasks).where(tasks.c.id == task_id, tasks.c.project_id == project_id)
            )
        ).first()
    if row is None:
        raise NotFoundError(f"task {task_id!r} not found in project {project_id!r}")
    return row


async def list_llm_calls(connection: AsyncConnection, task_id: str) -> list[Row]:
    return list(
        await connection.execute(
            select(llm_calls).where(llm_calls.c.task_id == task_id).order_by(llm_calls.c.id)
        )
    )


async def list_task_sources(connection: AsyncConnection, task_id: str) -> list[Row]:
    return list(
        await connection.execute(
            select(task_sources).where(task_sources.c.task_id == task_id).order_by(task_sources.c.rank)
        )
    )


async def list_attempts(connection: AsyncConnection, task_id: str) -> list[Row]:
    return list(
        await connection.execute(
            select(task_attempts).where(task_attempts.c.task_id == task_id).order_by(task_attempts.c.id)
        )
    )


async def list_projects(
    connection: AsyncConnection, limit: int, cursor: str | None, status: str | None
) -> tuple[list[Row], str | None]:
    """Return one page of projects, newest first, and the cursor of the next page."""
    query = select(projects).order_by(projects.c.created_at.desc(), projects.c.id.desc()).limit(limit + 1)
    if status:
        query = query.where(projects.c.status == status)
    if cursor:
        created_at, project_id = decode_cursor(cursor)
        query = query.where(
            or_(
                projects.c.created_at < created_at,
                and_(projects.c.created_at == created_at, projects.c.id < project_id),
            )
        )
    rows = list(await connection.execute(query))
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_cursor(last.created_at, last.id)


def encode_cursor(created_at: datetime, project_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{project_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, project_id = raw.split("|", 1)
        if not is_id(project_id):
            raise ValueError(project_id)
        return datetime.fromisoformat(created), project_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"invalid cursor {cursor!r}; pass the next_cursor of the previous page unchanged"
        ) from exc


async def read_outputs(connection: AsyncConnection, task_ids: Sequence[str]) -> list[Row]:
    if not task_ids:
        return []
    return list(
        await connection.execute(
            select(tasks.c.id, tasks.c.key, tasks.c.title, tasks.c.role, tasks.c.output)
            .where(tasks.c.id.in_(list(task_ids)))
            .order_by(tasks.c.position)
        )
    )


async def read_work_outputs(connection: AsyncConnection, project_id: str) -> list[Row]:
    return list(
        await connection.execute(
            select(tasks.c.id, tasks.c.key, tasks.c.title, tasks.c.role, tasks.c.output)
            .where(tasks.c.project_id == project_id, tasks.c.kind == TaskKind.WORK)
            .order_by(tasks.c.position)
        )
    )
