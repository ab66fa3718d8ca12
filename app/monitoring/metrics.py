"""Prometheus metrics of one process. Queue gauges are read from the database at scrape time,
so every API instance reports the same, current queue."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import func, select

from app.db.engine import Database
from app.db.models import projects, tasks

HTTP_REQUEST_SECONDS = Histogram(
    "toronto_ai_http_request_seconds", "HTTP request duration in seconds", ["method", "path", "status"]
)
PROJECTS_CREATED = Counter("toronto_ai_projects_created_total", "Projects accepted by this instance")
TASKS_BY_STATUS = Gauge("toronto_ai_tasks", "Tasks in the database by status", ["status"])
PROJECTS_BY_STATUS = Gauge("toronto_ai_projects", "Projects in the database by status", ["status"])


async def refresh_database_gauges(database: Database) -> None:
    async with database.read() as connection:
        task_counts = dict(
            (await connection.execute(select(tasks.c.status, func.count()).group_by(tasks.c.status))).all()
        )
        project_counts = dict(
            (
                await connection.execute(select(projects.c.status, func.count()).group_by(projects.c.status))
            ).all()
        )
    from app.db.states import ProjectStatus, TaskStatus

    for status in TaskStatus:
        TASKS_BY_STATUS.labels(status.value).set(task_counts.get(status.value, 0))
    for status in ProjectStatus:
        PROJECTS_BY_STATUS.labels(status.value).set(project_counts.get(status.value, 0))


CACHE_REQUESTS = Counter(
    "toronto_ai_cache_requests_total",
    "Cache lookups by kind and result: hit, miss, error (the server failed) or bypass (server down)",
    ["kind", "result"],
)
CACHE_SERVER_UP = Gauge(
    "toronto_ai_cache_server_up",
    "1 while a Redis server or cluster node answers this process, 0 during an outage",
    ["role", "server"],
)
CACHE_OUTAGES = Counter(
    "toronto_ai_cache_outages_total",
    "Outages of a Redis server or cluster node seen by this process",
    ["role", "server"],
)
SIGNALS_UP = Gauge(
    "toronto_ai_signals_up", "1 while wake-up, cancel and event signals arrive through Redis, 0 while polling"
)
