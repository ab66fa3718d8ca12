"""Prometheus metrics of one process. Queue gauges are read from the database at scrape time,
so every API instance reports the same, current queue."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import func, select

from app.db.models import projects, tasks

if TYPE_CHECKING:
    # Imported for annotations only: app.db imports the replica metrics below.
    from app.db.engine import Database

HTTP_REQUEST_SECONDS = Histogram(
    "toronto_ai_http_request_seconds", "HTTP request duration in seconds", ["method", "path", "status"]
)
PROJECTS_CREATED = Counter("toronto_ai_projects_created_total", "Projects accepted by this instance")
TASKS_BY_STATUS = Gauge("toronto_ai_tasks", "Tasks in the database by status", ["status"])
PROJECTS_BY_STATUS = Gauge("toronto_ai_projects", "Projects in the database by status", ["status"])

# Read replicas, labelled "host:port/database". The lag is NaN while a replica cannot be checked.
REPLICA_LAG_SECONDS = Gauge(
    "toronto_ai_database_replica_lag_seconds", "Seconds a read replica is behind the primary", ["replica"]
)
REPLICA_IN_ROTATION = Gauge(
    "toronto_ai_database_replica_in_rotation", "1 while a read replica receives reads, else 0", ["replica"]
)
DATABASE_READS = Counter(
    "toronto_ai_database_reads_total",
    "Reads that tolerate staleness, by the server that answered: primary or a replica",
    ["server"],
)


VECTOR_PARTITION_QUERY_SECONDS = Histogram(
    "toronto_ai_vector_partition_query_seconds",
    "One partition's part of a vector query on one Chroma instance, in seconds",
    ["partition", "instance", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
VECTOR_PARTITION_QUERY_BATCH = Histogram(
    "toronto_ai_vector_partition_query_batch_size",
    "Queries that one request to one partition carried, coalesced from concurrent searches",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
VECTOR_PARTITIONS_MISSING = Counter(
    "toronto_ai_vector_partitions_missing_total",
    "Partitions left out of a query result because none of their replicas answered",
)
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
