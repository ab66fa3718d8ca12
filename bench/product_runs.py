"""Runs of the product's own worker over seeded work tasks, in-process or as worker processes.

Each run seeds projects whose plan is already accepted: the planning task is marked completed
and every work task is independent and ready. The final report task of each project is held
back (one extra pending dependency), so every task that runs is a work task. Completing a
work task still decrements the report's dependency count, as it does in production.

A run's wall time is measured in the database, from the first claim (the earliest
``tasks.started_at``) to the last completion (the latest ``tasks.finished_at``), so worker
start-up and shutdown are not counted.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import Row, func, select, update

from app.agent.planning import PlannedTask
from app.agent.team import DEFAULT_TEAM, PROJECT_MANAGER
from app.core.config import Settings, load_settings
from app.db import projects as project_store
from app.db.engine import Database
from app.db.models import artifacts, events, llm_calls, messages, task_attempts, tasks
from app.db.states import TaskKind, TaskStatus
from app.runtime import Runtime
from app.worker.runner import Worker

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
WORK_ROLES = ("product_manager", "system_architect", "developer", "qa_engineer", "devops_engineer")
SEED_PROJECTS_PER_TRANSACTION = 50
# The poll interval only sets how soon an idle worker notices new tasks, because a busy worker
# claims again whenever a task finishes. The default of 1 s would add up to a second of idle
# time at the start of a run.
POLL_INTERVAL_SECONDS = 0.1
# The application_name that the product's engine sets on every connection, which identifies
# the worker processes' connections in pg_stat_activity.
WORKER_APPLICATION_NAME = "toronto-ai"
BRIEF = """# Support ticket triage

Build a small service that sorts incoming support tickets for a five-person team.

- Read tickets from a shared mailbox every minute.
- Tag each ticket with a product area and an urgency from 1 to 4.
- Send urgency 1 tickets to the on-call phone within two minutes.
- Show the open tickets per area on a web page.
- Keep every ticket and its tags for one year.
"""


@dataclass(frozen=True, slots=True)
class ProductResult:
    """One measured run of the product's worker."""

    engine: str
    processes: int
    concurrency: int
    latency_ms: float
    tasks: int
    tasks_per_project: int
    seconds: float
    # User plus system CPU time of the worker process(es) from the first claim until every task
    # was completed. For the in-process runs it includes the benchmark's own polling.
    worker_cpu_seconds: float
    # The maximum number of attempts running at one moment, across all processes. A value above
    # ``processes × concurrency`` shows that a worker claimed more tasks than it had free slots.
    peak_running: int
    # Completed attempts of each worker, largest first: shows how the processes shared the work.
    tasks_per_worker: list[int]
    # Rows stored by the run, counted afterwards to show the full bookkeeping happened.
    stored_rows: dict[str, int]

    @property
    def tasks_per_second(self) -> float:
        return self.tasks / self.seconds

    @property
    def cpu_ms_per_task(self) -> float:
        return 1000 * self.worker_cpu_seconds / self.tasks

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "tasks_per_second": self.tasks_per_second,
            "cpu_ms_per_task": self.cpu_ms_per_task,
        }


def engine_name(database_url: str) -> str:
    return "sqlite" if database_url.startswith("sqlite") else "postgresql"


def worker_environment(database_url: str, latency_ms: float, concurrency: int) -> dict[str, str]:
    """Return the TORONTO_AI_* variables of a benchmark worker. Every other setting keeps its default."""
    return {
        "TORONTO_AI_DATABASE__URL": database_url,
        "TORONTO_AI_LOG_LEVEL": "WARNING",
        "TORONTO_AI_OFFLINE_LATENCY_MS": str(latency_ms),
        "TORONTO_AI_WORKER__CONCURRENCY": str(concurrency),
        "TORONTO_AI_WORKER__POLL_INTERVAL_SECONDS": str(POLL_INTERVAL_SECONDS),
    }


def load_benchmark_settings(environment: dict[str, str]) -> Settings:
    """Load settings from ``environment`` alone, ignoring any configuration file in the folder."""
    with tempfile.TemporaryDirectory(prefix="bench_config_") as empty_folder:
        return load_settings(config_dir=Path(empty_folder), environ=environment)


async def run_in_process(
    database_url: str,
    *,
    task_count: int,
    tasks_per_project: int,
    latency_ms: float,
    concurrency: int,
    timeout_seconds: float,
) -> ProductResult:
    """Seed ``task_count`` work tasks and run one Worker in this event loop until all are completed."""
    settings = load_benchmark_settings(worker_environment(database_url, latency_ms, concurrency))
    runtime = await Runtime.start(settings, migrate=True)
    try:
        await seed_work_tasks(runtime.database, task_count, tasks_per_project, settings.worker.max_attempts)
        worker = Worker(runtime.database, runtime.executor, settings)
        # process_time also counts the thread in which aiosqlite runs SQLite.
        cpu_at_start = time.process_time()
        running = asyncio.create_task(worker.run(), name="benchmark-worker")
        try:
            await _wait_for(
                lambda: _completed_or_stopped(worker, running, task_count),
                timeout_seconds,
                lambda: f"{worker.completed} of {task_count} tasks completed",
            )
            worker_cpu_seconds = time.process_time() - cpu_at_start
        finally:
            worker.stop()
            await running
        return await _measure(
            runtime.database,
            engine=engine_name(database_url),
            processes=1,
            concurrency=concurrency,
            latency_ms=latency_ms,
            task_count=task_count,
            tasks_per_project=tasks_per_project,
            worker_cpu_seconds=worker_cpu_seconds,
        )
    finally:
        await runtime.aclose()


def _completed_or_stopped(worker: Worker, running: asyncio.Task[None], task_count: int) -> bool:
    if running.done():
        running.result()  # raises the worker's error, if any
        raise RuntimeError(f"the worker stopped after {worker.completed} of {task_count} tasks")
    return worker.completed >= task_count


async def run_worker_processes(
    postgres_dsn: str,
    *,
    processes: int,
    task_count: int,
    tasks_per_project: int,
    latency_ms: float,
    concurrency: int,
    timeout_seconds: float,
) -> ProductResult:
    """Seed work tasks, start ``processes`` × ``python -m app.worker.start`` and wait for every task.

    The tasks are seeded with an ``available_at`` far in the future and made available only
    once every worker process has connected, so no process starts the run alone.
    """
    environment = worker_environment(postgres_dsn, latency_ms, concurrency)
    settings = load_benchmark_settings(environment)
    runtime = await Runtime.start(settings, migrate=True)
    try:
        await seed_work_tasks(runtime.database, task_count, tasks_per_project, settings.worker.max_attempts)
        async with runtime.database.transaction() as connection:
            await connection.execute(
                update(tasks).where(tasks.c.kind == TaskKind.WORK).values(available_at=time.time() + 86_400)
            )
    finally:
        await runtime.aclose()

    monitor = await asyncpg.connect(postgres_dsn)
    with tempfile.TemporaryDirectory(prefix="bench_workers_") as folder:
        children: list[_WorkerProcess] = []
        try:
            for index in range(processes):
                children.append(await _start_worker_process(Path(folder), index, environment))
            await _wait_for_connections(monitor, children, processes, timeout_seconds=60.0)
            cpu_at_start = sum(child.cpu_seconds() for child in children)
            await monitor.execute(
                "UPDATE tasks SET available_at = $1 WHERE kind = $2", time.time(), str(TaskKind.WORK)
            )
            completed = 0

            async def poll_completed() -> bool:
                nonlocal completed
                _raise_if_exited(children)
                completed = await monitor.fetchval(
                    "SELECT count(*) FROM tasks WHERE kind = $1 AND status = $2",
                    str(TaskKind.WORK),
                    str(TaskStatus.COMPLETED),
                )
                return completed >= task_count

            await _wait_for_async(
                poll_completed, timeout_seconds, lambda: f"{completed} of {task_count} tasks completed"
            )
            worker_cpu_seconds = sum(child.cpu_seconds() for child in children) - cpu_at_start
        finally:
            await monitor.close()
            await _stop_worker_processes(children)

    database = Database(settings.database)
    try:
        return await _measure(
            database,
            engine="postgresql",
            processes=processes,
            concurrency=concurrency,
            latency_ms=latency_ms,
            task_count=task_count,
            tasks_per_project=tasks_per_project,
            worker_cpu_seconds=worker_cpu_seconds,
        )
    finally:
        await database.dispose()


async def seed_work_tasks(
    database: Database, task_count: int, tasks_per_project: int, max_attempts: int
) -> None:
    """Insert projects with an accepted plan of independent work tasks, ``task_count`` tasks in all.

    Every task gets a unique title, so the response cache never returns a stored completion
    in place of a model call.
    """
    sizes = [tasks_per_project] * (task_count // tasks_per_project)
    if task_count % tasks_per_project:
        sizes.append(task_count % tasks_per_project)

    number = 0
    for first in range(0, len(sizes), SEED_PROJECTS_PER_TRANSACTION):
        async with database.transaction() as connection:
            for size in sizes[first : first + SEED_PROJECTS_PER_TRANSACTION]:
                project = project_store.NewProject(
                    title=f"Benchmark project {number // tasks_per_project + 1}",
                    brief=BRIEF,
                    team=DEFAULT_TEAM,
                    knowledge_base=None,
                    providers=["offline"],
                    max_attempts=max_attempts,
                )
                project_id = await project_store.insert_project(connection, project, PROJECT_MANAGER)
                planned = []
                for index in range(size):
                    number += 1
                    planned.append(
                        PlannedTask(
                            id=f"W{index + 1}",
                            title=f"Work item {number}",
                            role=WORK_ROLES[number % len(WORK_ROLES)],
                            description=f"Deliver part {number} of the service described in the brief.",
                        )
                    )
                await project_store.insert_plan(
                    connection, project_id, planned, PROJECT_MANAGER, max_attempts
                )

    async with database.transaction() as connection:
        await connection.execute(
            update(tasks)
            .where(tasks.c.kind == TaskKind.PLAN)
            .values(
                status=TaskStatus.COMPLETED, output="(plan seeded by the benchmark)", finished_at=func.now()
            )
        )
        await connection.execute(
            update(tasks)
            .where(tasks.c.kind == TaskKind.REPORT)
            .values(pending_dependencies=tasks.c.pending_dependencies + 1)
        )


async def _measure(
    database: Database,
    *,
    engine: str,
    processes: int,
    concurrency: int,
    latency_ms: float,
    task_count: int,
    tasks_per_project: int,
    worker_cpu_seconds: float,
) -> ProductResult:
    """Read the run's wall time, concurrency and stored row counts.

    Raises RuntimeError if a work task is not completed.
    """
    work = tasks.c.kind == TaskKind.WORK
    async with database.read() as connection:
        completed = await connection.scalar(
            select(func.count()).where(work, tasks.c.status == TaskStatus.COMPLETED)
        )
        first_claim, last_finish = (
            await connection.execute(
                select(func.min(tasks.c.started_at), func.max(tasks.c.finished_at)).where(work)
            )
        ).one()
        stored_rows = {
            table.name: await connection.scalar(select(func.count()).select_from(table))
            for table in (task_attempts, messages, llm_calls, artifacts, events)
        }
        attempts = (
            await connection.execute(
                select(task_attempts.c.worker_id, task_attempts.c.started_at, task_attempts.c.finished_at)
            )
        ).all()
    if completed != task_count:
        raise RuntimeError(f"{completed} of {task_count} work tasks are completed after the run")
    seconds = (_as_utc(last_finish) - _as_utc(first_claim)).total_seconds()
    return ProductResult(
        engine=engine,
        processes=processes,
        concurrency=concurrency,
        latency_ms=latency_ms,
        tasks=task_count,
        tasks_per_project=tasks_per_project,
        seconds=seconds,
        worker_cpu_seconds=worker_cpu_seconds,
        peak_running=_peak_running(attempts),
        tasks_per_worker=sorted(Counter(worker_id for worker_id, _, _ in attempts).values(), reverse=True),
        stored_rows=stored_rows,
    )


def _peak_running(attempts: list[Row]) -> int:
    """Return the maximum number of attempts whose claim-to-finish intervals overlap at one moment."""
    changes = []
    for _, started_at, finished_at in attempts:
        changes.append((_as_utc(started_at), 1))
        if finished_at is not None:
            changes.append((_as_utc(finished_at), -1))
    running = peak = 0
    # At equal times the finish (-1) sorts first, so back-to-back attempts do not count as overlapping.
    for _, change in sorted(changes):
        running += change
        peak = max(peak, running)
    return peak


def _as_utc(moment: datetime) -> datetime:
    # SQLite returns the stored UTC times without a zone.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def _wait_for(done: Callable[[], bool], timeout_seconds: float, describe: Callable[[], str]) -> None:
    async def check() -> bool:
        return done()

    await _wait_for_async(check, timeout_seconds, describe, interval=0.01)


async def _wait_for_async(
    check: Callable[[], Awaitable[bool]],
    timeout_seconds: float,
    describe: Callable[[], str],
    interval: float = 0.2,
) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"run timed out after {timeout_seconds:g} s: {describe()}")
        await asyncio.sleep(interval)


class _WorkerProcess:
    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def cpu_seconds(self) -> float:
        """Return the user plus system CPU time the process has used, read from /proc (Linux only)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        # After the command name: state is field 3 of proc(5), so utime (14) and stime (15) are at 11 and 12.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


async def _start_worker_process(folder: Path, index: int, environment: dict[str, str]) -> _WorkerProcess:
    # The parent's TORONTO_AI_* variables are dropped so that only the benchmark's settings apply.
    child_environment = {key: value for key, value in os.environ.items() if not key.startswith("TORONTO_AI_")}
    child_environment.update(environment, TORONTO_AI_CONFIG_DIR=str(folder))
    log_path = folder / f"worker-{index}.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app.worker.start",
            cwd=REPOSITORY_ROOT,
            env=child_environment,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    return _WorkerProcess(process, log_path)


def _raise_if_exited(children: list[_WorkerProcess]) -> None:
    for child in children:
        if child.process.returncode is not None:
            raise RuntimeError(
                f"worker process {child.process.pid} exited with code {child.process.returncode} "
                f"during the run; last lines of its log:\n{child.log_tail()}"
            )


async def _wait_for_connections(
    monitor: asyncpg.Connection, children: list[_WorkerProcess], processes: int, timeout_seconds: float
) -> None:
    """Wait until the worker processes have ``processes`` connections open, then one second more.

    A process connects near the end of its start-up. The extra second covers the rest, so
    that one process does not start the run alone.
    """

    async def connected() -> bool:
        _raise_if_exited(children)
        count = await monitor.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = $1",
            WORKER_APPLICATION_NAME,
        )
        return count >= processes

    await _wait_for_async(
        connected, timeout_seconds, lambda: f"the {processes} worker processes did not connect"
    )
    await asyncio.sleep(1.0)


async def _stop_worker_processes(children: list[_WorkerProcess], grace_seconds: float = 30.0) -> None:
    """Send SIGTERM to every worker that still runs, and SIGKILL to any still running after the grace."""
    for child in children:
        if child.process.returncode is None:
            child.process.terminate()
    for child in children:
        try:
            await asyncio.wait_for(child.process.wait(), grace_seconds)
        except TimeoutError:
            child.process.kill()
            await child.process.wait()
