"""Reference queues on the same PostgreSQL server: procrastinate, pgqueuer and a bare claim loop.

Each run queues ``job_count`` jobs whose handler does nothing, then times one worker from
the start of processing until the queue is empty, and checks afterwards that every job
was processed exactly as the library records it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Any

import asyncpg

ENQUEUE_CHUNK = 1_000


@dataclass(frozen=True, slots=True)
class BaselineResult:
    """One measured run of a reference queue."""

    name: str
    package_version: str
    jobs: int
    seconds: float
    # The options that shape throughput, as passed to the library.
    options: dict[str, Any]

    @property
    def jobs_per_second(self) -> float:
        return self.jobs / self.seconds

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "jobs_per_second": self.jobs_per_second}


async def run_procrastinate(dsn: str, job_count: int, concurrency: int) -> BaselineResult:
    """Defer ``job_count`` no-op jobs, then run one worker with ``wait=False`` until none is left."""
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        for first in range(0, job_count, ENQUEUE_CHUNK):
            await noop.batch_defer_async(*({} for _ in range(min(ENQUEUE_CHUNK, job_count - first))))

        started = time.perf_counter()
        # wait=False: the worker returns once it has caught up with the queue.
        await app.run_worker_async(wait=False, concurrency=concurrency, install_signal_handlers=False)
        seconds = time.perf_counter() - started

        async with app.connector.pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT status, count(*) FROM procrastinate_jobs GROUP BY status"
            )
            statuses = dict(await cursor.fetchall())
    if statuses != {"succeeded": job_count}:
        raise RuntimeError(
            f"procrastinate left jobs in these states: {statuses}; expected {job_count} succeeded"
        )
    return BaselineResult(
        "procrastinate", version("procrastinate"), job_count, seconds, {"concurrency": concurrency}
    )


async def run_pgqueuer(dsn: str, job_count: int, batch_size: int) -> BaselineResult:
    """Enqueue ``job_count`` no-op jobs, then run one QueueManager in drain mode until none is left."""
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.domain.types import QueueExecutionMode
    from pgqueuer.models import Job
    from pgqueuer.queries import Queries

    setup = await asyncpg.connect(dsn)
    worker_connection = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(setup))
        await queries.install()
        for first in range(0, job_count, ENQUEUE_CHUNK):
            size = min(ENQUEUE_CHUNK, job_count - first)
            await queries.enqueue(["noop"] * size, [None] * size, [0] * size)

        queuer = PgQueuer(AsyncpgDriver(worker_connection))

        @queuer.entrypoint("noop")
        async def noop(job: Job) -> None:
            return None

        started = time.perf_counter()
        await queuer.qm.run(batch_size=batch_size, mode=QueueExecutionMode.drain)
        seconds = time.perf_counter() - started

        left = await setup.fetchval("SELECT count(*) FROM pgqueuer")
        succeeded = await setup.fetchval("SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'")
    finally:
        await setup.close()
        if not worker_connection.is_closed():
            await worker_connection.close()
    if left or succeeded != job_count:
        raise RuntimeError(
            f"pgqueuer left {left} jobs queued and logged {succeeded} successful; expected 0 and {job_count}"
        )
    return BaselineResult("pgqueuer", version("pgqueuer"), job_count, seconds, {"batch_size": batch_size})


CLAIM_STATEMENT = """
UPDATE bench_jobs SET status = 'running'
WHERE id IN (
    SELECT id FROM bench_jobs WHERE status = 'queued' ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
)
RETURNING id
"""
COMPLETE_STATEMENT = "UPDATE bench_jobs SET status = 'done' WHERE id = $1"


async def run_skip_locked(dsn: str, job_count: int, connections: int, batch_size: int) -> BaselineResult:
    """Process rows of a plain table with ``connections`` asyncpg loops that claim and complete them.

    Each loop claims up to ``batch_size`` queued rows in one statement (``FOR UPDATE SKIP
    LOCKED``), then marks each row done with its own statement, as a worker that finishes jobs
    one by one would. Nothing else is stored: this is a floor for any queue on this server.
    """
    setup = await asyncpg.connect(dsn)
    try:
        await setup.execute(
            "CREATE TABLE bench_jobs "
            "(id bigserial PRIMARY KEY, status text NOT NULL DEFAULT 'queued', payload jsonb)"
        )
        await setup.execute("CREATE INDEX bench_jobs_queued ON bench_jobs (id) WHERE status = 'queued'")
        await setup.execute(
            "INSERT INTO bench_jobs (payload) SELECT '{}'::jsonb FROM generate_series(1, $1)", job_count
        )
        await setup.execute("ANALYZE bench_jobs")

        workers = [await asyncpg.connect(dsn) for _ in range(connections)]
        try:
            started = time.perf_counter()
            await asyncio.gather(*(_claim_loop(worker, batch_size) for worker in workers))
            seconds = time.perf_counter() - started
        finally:
            for worker in workers:
                await worker.close()

        done = await setup.fetchval("SELECT count(*) FROM bench_jobs WHERE status = 'done'")
    finally:
        await setup.close()
    if done != job_count:
        raise RuntimeError(f"the claim loop marked {done} of {job_count} rows done")
    return BaselineResult(
        "bare SKIP LOCKED",
        version("asyncpg"),
        job_count,
        seconds,
        {"connections": connections, "batch_size": batch_size},
    )


async def _claim_loop(connection: asyncpg.Connection, batch_size: int) -> None:
    while True:
        claimed = await connection.fetch(CLAIM_STATEMENT, batch_size)
        if not claimed:
            return
        for row in claimed:
            await connection.execute(COMPLETE_STATEMENT, row["id"])
