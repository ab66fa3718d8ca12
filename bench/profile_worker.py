"""Profile the product's worker on seeded work tasks: cost per step, SQL statements and CPU hot spots.

Run ``python -m bench.profile_worker --engine postgresql --tasks 1000``. It seeds the same
work tasks as bench/queue_throughput.py, with the zero-latency offline provider, and prints:

0. on PostgreSQL, the cost of one statement built with SQLAlchemy Core on every call (as
   the product's rarer statements are) or once with ``bindparam()`` (as its claim and
   store statements are), beside the same statement sent by
   asyncpg alone;
1. the wall and CPU time and the statements of each step of one task (claim, execute,
   store), measured on tasks run one at a time so that no other task interleaves;
2. for one in-process worker at its concurrency, the statements per completed task and,
   under cProfile, the CPU time by package and the functions with the most own time.

CPU times are of the event loop's thread (``time.thread_time``). On SQLite part of the work
runs in aiosqlite's own thread and is not counted. cProfile slows the code down, most of all
code that makes many small calls, so its times are only good for comparing shares.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlalchemy import bindparam, event, select, update

from app.agent.executor import Execution
from app.core.logging import configure_logging
from app.db.models import projects
from app.runtime import Runtime
from app.worker import driver_statements, sqlite_statements
from app.worker.runner import Worker
from bench import product_runs
from bench.databases import temporary_postgres_database, temporary_sqlite_url

STATEMENT_SHAPE = re.compile(
    r"^\s*(SELECT|INSERT INTO|UPDATE|DELETE FROM|BEGIN\w*|COMMIT|ROLLBACK)\s*(\w*)", re.I
)
# The statement that follows the common table expressions of a WITH statement.
MAIN_STATEMENT_AFTER_WITH = re.compile(r"\)\s*(SELECT|INSERT INTO|UPDATE|DELETE FROM)\s+(\w+)", re.I)
SEQUENTIAL_STEPS = ("claim", "execute", "store")


# The statements of app.worker.driver_statements and app.worker.sqlite_statements, by the
# name of their constant there.
DRIVER_STATEMENT_NAMES = {
    value: f"driver {name}"
    for name, value in vars(driver_statements).items()
    if name.isupper() and isinstance(value, str) and value.lstrip().startswith(("WITH", "SELECT"))
} | {
    value: f"sqlite {name}"
    for name, value in vars(sqlite_statements).items()
    if name.isupper()
    and isinstance(value, str)
    and value.lstrip().startswith(("WITH", "SELECT", "UPDATE", "INSERT"))
}


def statement_key(statement: str) -> str:
    """Return the kind and main table of a statement, for example ``UPDATE tasks``.

    A statement of app.worker.driver_statements or app.worker.sqlite_statements is named by
    its constant there.
    """
    if statement in DRIVER_STATEMENT_NAMES:
        return DRIVER_STATEMENT_NAMES[statement]
    if statement.lstrip().upper().startswith("WITH"):
        main = MAIN_STATEMENT_AFTER_WITH.search(statement)
        return f"WITH ... {main.group(1).upper()} {main.group(2)}" if main else "WITH"
    found = STATEMENT_SHAPE.match(statement)
    if not found:
        return statement.split()[0].upper() if statement.strip() else "(empty)"
    kind, table = found.group(1).upper(), found.group(2)
    if kind == "SELECT":
        source = re.search(r"\bFROM\s+(\w+)", statement, re.I)
        table = source.group(1) if source else "(no table)"
    return f"{kind} {table}".strip()


@dataclass
class StatementLog:
    """Statements, transactions and pool checkouts seen by the engines, by the step running."""

    step: str = "other"
    statements: Counter[tuple[str, str]] = field(default_factory=Counter)
    transactions: Counter[str] = field(default_factory=Counter)
    checkouts: Counter[str] = field(default_factory=Counter)

    def attach(self, sync_engine: Any) -> None:
        @event.listens_for(sync_engine, "before_cursor_execute")
        def count_statement(_connection, _cursor, statement, _parameters, _context, _executemany) -> None:
            self.statements[(self.step, statement_key(statement))] += 1

        @event.listens_for(sync_engine, "begin")
        def count_begin(_connection) -> None:
            self.transactions[self.step] += 1

        @event.listens_for(sync_engine.pool, "checkout")
        def count_checkout(_dbapi_connection, _record, _proxy) -> None:
            self.checkouts[self.step] += 1

    def attach_driver_statements(self) -> None:
        """Count the statements that app.worker.driver_statements and
        app.worker.sqlite_statements send to asyncpg and aiosqlite directly.

        They bypass SQLAlchemy, so its events never see them.
        """
        original = driver_statements.driver_connection
        log = self

        class CountingDriver:
            def __init__(self, driver: Any) -> None:
                self._driver = driver

            def __getattr__(self, name: str) -> Any:
                return getattr(self._driver, name)

            async def fetch(self, query: str, *arguments: Any) -> Any:
                log.statements[(log.step, statement_key(query))] += 1
                return await self._driver.fetch(query, *arguments)

            async def fetchval(self, query: str, *arguments: Any) -> Any:
                log.statements[(log.step, statement_key(query))] += 1
                return await self._driver.fetchval(query, *arguments)

            async def execute(self, query: str, *arguments: Any) -> Any:
                log.statements[(log.step, statement_key(query))] += 1
                return await self._driver.execute(query, *arguments)

        async def counting_connection(connection: Any) -> CountingDriver:
            return CountingDriver(await original(connection))

        driver_statements.driver_connection = counting_connection

        original_sqlite = sqlite_statements.driver_connection

        class CountingSQLiteDriver:
            def __init__(self, driver: Any) -> None:
                self._driver = driver

            def __getattr__(self, name: str) -> Any:
                return getattr(self._driver, name)

            async def execute_fetchall(self, query: str, arguments: Any) -> Any:
                log.statements[(log.step, statement_key(query))] += 1
                return await self._driver.execute_fetchall(query, arguments)

            async def executemany(self, query: str, rows: Any) -> Any:
                log.statements[(log.step, statement_key(query))] += 1
                return await self._driver.executemany(query, rows)

        async def counting_sqlite_connection(connection: Any) -> CountingSQLiteDriver:
            return CountingSQLiteDriver(await original_sqlite(connection))

        sqlite_statements.driver_connection = counting_sqlite_connection

    def statements_of(self, step: str) -> int:
        return sum(count for (counted_step, _), count in self.statements.items() if counted_step == step)


async def profile(
    database_url: str, task_count: int, sequential_count: int, concurrency: int, top: int
) -> None:
    settings = product_runs.load_benchmark_settings(
        product_runs.worker_environment(database_url, 0, concurrency)
    )
    runtime = await Runtime.start(settings, migrate=True)
    try:
        await product_runs.seed_work_tasks(
            runtime.database, task_count + sequential_count, 10, settings.worker.max_attempts
        )
        print(f"engine: {product_runs.engine_name(database_url)}")
        if not runtime.database.is_sqlite:
            await _profile_statement_cost(runtime, database_url)

        log = StatementLog()
        for engine in {runtime.database.write_engine, runtime.database.read_engine}:
            log.attach(engine.sync_engine)
        log.attach_driver_statements()
        await _profile_steps(runtime, log, sequential_count)
        log.statements.clear()
        log.transactions.clear()
        log.checkouts.clear()
        await _profile_worker(runtime, settings, log, task_count, top)
    finally:
        await runtime.aclose()


async def _profile_statement_cost(runtime: Runtime, dsn: str, count: int = 2_000) -> None:
    """Time one UPDATE … RETURNING three ways: built per call, built once, and sent by asyncpg alone.

    The first two go through the product's engine.
    Each variant runs ``count`` times inside one transaction, so no commit is timed.
    """
    async with runtime.database.read() as connection:
        project_id = await connection.scalar(select(projects.c.id).limit(1))

    def built_per_call() -> tuple[Any, dict[str, Any]]:
        statement = (
            update(projects)
            .where(projects.c.id == project_id)
            .values(event_seq=projects.c.event_seq + 1)
            .returning(projects.c.event_seq)
        )
        return statement, {}

    built_once = (
        update(projects)
        .where(projects.c.id == bindparam("project_id"))
        .values(event_seq=projects.c.event_seq + 1)
        .returning(projects.c.event_seq)
    )
    timings = {}
    async with runtime.database.transaction() as connection:
        for label, make in (
            ("SQLAlchemy Core, built per call", built_per_call),
            ("SQLAlchemy Core, built once", lambda: (built_once, {"project_id": project_id})),
        ):
            started_wall, started_cpu = time.perf_counter(), time.thread_time()
            for _ in range(count):
                statement, parameters = make()
                await connection.scalar(statement, parameters)
            timings[label] = (time.perf_counter() - started_wall, time.thread_time() - started_cpu)

    connection = await asyncpg.connect(dsn)
    try:
        async with connection.transaction():
            started_wall, started_cpu = time.perf_counter(), time.thread_time()
            for _ in range(count):
                await connection.fetchval(
                    "UPDATE projects SET event_seq = event_seq + 1 WHERE id = $1 RETURNING event_seq",
                    project_id,
                )
            timings["asyncpg alone"] = (time.perf_counter() - started_wall, time.thread_time() - started_cpu)
    finally:
        await connection.close()

    print(f"\n0. one UPDATE ... RETURNING, {count} times in one transaction; per statement:")
    for label, (wall, cpu) in timings.items():
        print(f"  {label:<32} {1e6 * wall / count:6.0f} µs wall, {1e6 * cpu / count:6.0f} µs CPU")


async def _profile_steps(runtime: Runtime, log: StatementLog, count: int) -> None:
    """Run ``count`` tasks one at a time through claim, execute and store, timing each step."""
    wall: Counter[str] = Counter()
    cpu: Counter[str] = Counter()

    @contextmanager
    def measure(step: str) -> Iterator[None]:
        log.step = step
        started_wall, started_cpu = time.perf_counter(), time.thread_time()
        yield
        wall[step] += time.perf_counter() - started_wall
        cpu[step] += time.thread_time() - started_cpu
        log.step = "other"

    for _ in range(count):
        with measure("claim"):
            [lease] = await runtime.queue.claim("profiler", 1)
        execution = Execution(lease)
        with measure("execute"):
            await runtime.executor.execute(execution)
        with measure("store"):
            async with runtime.database.transaction() as connection:
                stored = await runtime.executor.store(connection, execution)
        if not stored:
            raise RuntimeError(f"the lease of task {lease.task_id} was lost while profiling")

    print(f"\n1. {count} tasks one at a time; per task:")
    print(f"  {'step':<8} {'wall ms':>8} {'CPU ms':>8} {'statements':>11} {'transactions':>13}")
    for step in SEQUENTIAL_STEPS:
        print(
            f"  {step:<8} {1000 * wall[step] / count:8.2f} {1000 * cpu[step] / count:8.2f} "
            f"{log.statements_of(step) / count:11.2f} {log.transactions[step] / count:13.2f}"
        )
    print(
        f"  {'total':<8} {1000 * sum(wall.values()) / count:8.2f} {1000 * sum(cpu.values()) / count:8.2f} "
        f"{sum(log.statements_of(step) for step in SEQUENTIAL_STEPS) / count:11.2f} "
        f"{sum(log.transactions[step] for step in SEQUENTIAL_STEPS) / count:13.2f}"
    )
    for (step, key), statements in sorted(log.statements.items()):
        print(f"    {step:<8} {statements / count:5.2f}  {key}")


async def _profile_worker(
    runtime: Runtime, settings: Any, log: StatementLog, task_count: int, top: int
) -> None:
    """Run one worker at its concurrency under cProfile until ``task_count`` tasks are completed."""
    log.step = "worker"
    worker = Worker(runtime.database, runtime.executor, settings)
    # thread_time: CPU time of the event loop's thread, without the time it waits for the database.
    profiler = cProfile.Profile(time.thread_time)
    started_wall, started_cpu = time.perf_counter(), time.thread_time()
    profiler.enable()
    running = asyncio.create_task(worker.run())
    while worker.completed < task_count and not running.done():  # noqa: ASYNC110 - the worker has no event
        await asyncio.sleep(0.01)
    profiler.disable()
    wall, cpu = time.perf_counter() - started_wall, time.thread_time() - started_cpu
    worker.stop()
    await running

    completed = max(worker.completed, 1)
    print(
        f"\n2. one worker at concurrency {settings.worker.concurrency}, "
        f"{worker.completed} tasks, under cProfile"
    )
    print(
        f"  wall time {wall:.2f} s, CPU time of the event loop thread {cpu:.2f} s "
        f"({100 * cpu / wall:.0f} % of the wall time), {1000 * cpu / completed:.2f} ms of CPU per task"
    )
    print("  per completed task, with the claims, heartbeats and sweeps:")
    print(f"    {log.checkouts['worker'] / completed:6.2f}  pool checkouts")
    print(f"    {log.transactions['worker'] / completed:6.2f}  transactions")
    print(f"    {log.statements_of('worker') / completed:6.2f}  statements")
    for (_, key), count in log.statements.most_common():
        print(f"    {count / completed:6.2f}    {key}")

    output = io.StringIO()
    stats = pstats.Stats(profiler, stream=output)
    print("  CPU time per task by package (own time of each function):")
    for package, seconds in _time_by_package(stats).most_common():
        print(f"    {1000 * seconds / completed:6.2f} ms  {package}")
    stats.sort_stats("tottime").print_stats(top)
    print(output.getvalue())


def _time_by_package(stats: pstats.Stats) -> Counter[str]:
    """Sum the own time of the profiled functions by the package, or built-in, they belong to."""
    by_package: Counter[str] = Counter()
    for (filename, _line, name), timing in stats.stats.items():  # type: ignore[attr-defined]
        own_time = timing[2]
        if filename == "~":
            if "socket" in name:
                package = "socket send/recv (system calls)"
            elif "greenlet" in name:
                package = "greenlet switches (SQLAlchemy's async bridge)"
            elif "epoll" in name:
                package = "epoll wait"
            else:
                package = "other built-ins"
        elif "site-packages/" in filename:
            package = filename.split("site-packages/")[1].split("/")[0]
        elif "/app/" in filename:
            package = "app." + filename.split("/app/")[1].split("/")[0].removesuffix(".py")
        elif "/asyncio/" in filename:
            package = "asyncio"
        else:
            package = "other standard library"
        by_package[package] += own_time
    return by_package


async def main_async(arguments: argparse.Namespace) -> None:
    configure_logging("WARNING")
    options = (arguments.tasks, arguments.sequential_tasks, arguments.concurrency, arguments.top)
    if arguments.engine == "sqlite":
        with temporary_sqlite_url() as url:
            await profile(url, *options)
    else:
        async with temporary_postgres_database(arguments.postgres_port) as dsn:
            await profile(dsn, *options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile_worker",
        description="Time each step of a task, count the SQL statements per task and profile the CPU "
        "time of one in-process worker.",
    )
    parser.add_argument("--engine", choices=["sqlite", "postgresql"], default="postgresql")
    parser.add_argument("--tasks", type=int, default=1_000, help="tasks for the concurrent worker")
    parser.add_argument("--sequential-tasks", type=int, default=200, help="tasks run one at a time first")
    parser.add_argument("--concurrency", type=int, default=16, help="worker concurrency")
    parser.add_argument("--top", type=int, default=30, help="functions to list, by own CPU time")
    parser.add_argument(
        "--postgres-port", type=int, default=5432, help="port of the PostgreSQL server on 127.0.0.1"
    )
    arguments = parser.parse_args(argv)
    for name in ("tasks", "sequential_tasks", "concurrency"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(arguments, name)}")
    asyncio.run(main_async(arguments))
    return 0


if __name__ == "__main__":
    sys.exit(main())
