"""The durable task queue: every database operation on task leases.

A worker claims ready tasks by taking a lease: ``status`` becomes running, ``lease_owner``
names the worker and ``lease_token`` is incremented. Every later write for that task checks
the token it was claimed with, so a worker whose lease expired and was taken over cannot
store a late result. The sweeper returns tasks whose lease expired to the queue.

On PostgreSQL the claim selects rows ``FOR UPDATE SKIP LOCKED``, so concurrent workers
never wait for each other's rows; on SQLite the write transaction itself is exclusive.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, Row, String, and_, bindparam, case, func, or_, select, union_all, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from app.core.config import WorkerSettings
from app.db.engine import Database
from app.db.locking import lock_tasks_in_id_order
from app.db.models import artifacts, llm_calls, messages, projects, task_attempts, task_dependencies, tasks
from app.db.records import NewEvent, TaskRecords, append_events, append_events_many, insert_rows, utc_now
from app.db.states import FINAL_PROJECT_STATUSES, OPEN_TASK_STATUSES, ProjectStatus, TaskKind, TaskStatus
from app.worker import driver_statements, sqlite_statements

# The statements of the hot path are built once: SQLAlchemy then only looks up their
# compiled form, which costs about half as much CPU as building a statement per call.

# A materialized CTE runs the locking select exactly once. As an IN (subquery), PostgreSQL
# may evaluate it again per row, and with SKIP LOCKED every evaluation returns other rows,
# so one claim could take more than ``limit`` tasks.
_CANDIDATES = (
    select(tasks.c.id)
    .where(tasks.c.status == TaskStatus.READY, tasks.c.available_at <= bindparam("claim_now"))
    .order_by(tasks.c.available_at)
    .limit(bindparam("claim_limit", type_=Integer))
    .with_for_update(skip_locked=True)
    .cte("candidates")
    .prefix_with("MATERIALIZED", dialect="postgresql")
)
CLAIM_TASKS = (
    update(tasks)
    .where(tasks.c.id == _CANDIDATES.c.id, tasks.c.status == TaskStatus.READY)
    .values(
        status=TaskStatus.RUNNING,
        lease_owner=bindparam("claim_worker"),
        lease_token=tasks.c.lease_token + 1,
        lease_expires_at=bindparam("claim_expires_at"),
        attempts=tasks.c.attempts + 1,
        started_at=func.coalesce(tasks.c.started_at, bindparam("claim_started_at")),
    )
    .returning(
        tasks.c.id,
        tasks.c.project_id,
        tasks.c.kind,
        tasks.c.key,
        tasks.c.title,
        tasks.c.description,
        tasks.c.role,
        tasks.c.attempts,
        tasks.c.max_attempts,
        tasks.c.lease_token,
        tasks.c.depends_on,
    )
)
READ_PROJECTS = select(
    projects.c.id, projects.c.status, projects.c.brief, projects.c.team, projects.c.knowledge_base
).where(projects.c.id.in_(bindparam("project_ids", expanding=True)))
READ_OUTPUTS = (
    select(tasks.c.id, tasks.c.key, tasks.c.title, tasks.c.role, tasks.c.output)
    .where(tasks.c.id.in_(bindparam("dependency_ids", expanding=True)))
    .order_by(tasks.c.position)
)
LOCK_RUNNING_TASKS = (
    select(tasks.c.id, tasks.c.lease_token)
    .where(tasks.c.id.in_(bindparam("task_ids", expanding=True)), tasks.c.status == TaskStatus.RUNNING)
    .order_by(tasks.c.id)
    .with_for_update()
)
# On PostgreSQL, with the driver statements: locks the finished tasks and their dependents
# in id order, as ``lock_tasks_in_id_order`` does, and reads the finished tasks' tokens in
# the same statement. The ids are collected into one array first: with ``id IN (...) OR
# id IN (subquery)`` PostgreSQL scanned every task, and with ``id = ANY(ARRAY(...))`` it
# looks the rows up in the primary key (0.5 against 1.1 to 1.4 ms for 16 tasks among 3,600,
# by EXPLAIN ANALYZE on a freshly seeded table).
_FINISHED_AND_DEPENDENT_IDS = union_all(
    select(func.unnest(bindparam("task_ids", type_=ARRAY(String)))),
    select(task_dependencies.c.task_id).where(
        task_dependencies.c.depends_on_id == func.any(bindparam("task_ids", type_=ARRAY(String)))
    ),
)
LOCK_FINISHED_AND_DEPENDENTS = (
    select(tasks.c.id, tasks.c.lease_token, tasks.c.status)
    .where(tasks.c.id == func.any(func.array(_FINISHED_AND_DEPENDENT_IDS.scalar_subquery())))
    .order_by(tasks.c.id)
    .with_for_update()
)
COMPLETE_TASK = (
    update(tasks)
    .where(
        tasks.c.id == bindparam("done_task_id"),
        tasks.c.lease_token == bindparam("done_token"),
        tasks.c.status == TaskStatus.RUNNING,
    )
    .values(
        status=TaskStatus.COMPLETED,
        output=bindparam("done_output"),
        error=None,
        finished_at=bindparam("done_at"),
        lease_owner=None,
        lease_expires_at=None,
    )
)
FINISH_ATTEMPT = (
    update(task_attempts)
    .where(
        task_attempts.c.task_id == bindparam("done_task_id"),
        task_attempts.c.lease_token == bindparam("done_token"),
    )
    .values(
        outcome=bindparam("done_outcome"), error=bindparam("attempt_error"), finished_at=bindparam("done_at")
    )
)
# Dependencies of a dependent that finish in the same batch are counted off together. The
# counts are joined in (UPDATE ... FROM), so each dependent's count is computed once rather
# than once per SET expression that reads it.
_FINISHED_COUNTS = (
    select(task_dependencies.c.task_id, func.count().label("finished"))
    .where(task_dependencies.c.depends_on_id.in_(bindparam("finished_ids", expanding=True)))
    .group_by(task_dependencies.c.task_id)
    .subquery("finished_counts")
)
_BECOMES_READY = and_(
    tasks.c.pending_dependencies == _FINISHED_COUNTS.c.finished, tasks.c.status == TaskStatus.BLOCKED
)
RELEASE_DEPENDENTS = (
    update(tasks)
    .where(tasks.c.id == _FINISHED_COUNTS.c.task_id)
    .values(
        pending_dependencies=tasks.c.pending_dependencies - _FINISHED_COUNTS.c.finished,
        status=case((_BECOMES_READY, TaskStatus.READY), else_=tasks.c.status),
        available_at=case((_BECOMES_READY, bindparam("ready_at")), else_=tasks.c.available_at),
    )
    .returning(tasks.c.id, tasks.c.project_id, tasks.c.status)
)


@dataclass(frozen=True, slots=True)
class DependencyOutput:
    """The output of a finished task that a claimed task depends on."""

    key: str
    title: str
    role: str
    output: str | None


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a claimed task's prompt needs, read in the claim's transaction."""

    project_status: str
    brief: str
    team: str
    knowledge_base: str | None
    # In plan order; a report task depends on every work task of its project.
    dependencies: tuple[DependencyOutput, ...]


@dataclass(frozen=True, slots=True)
class Lease:
    """A claimed task, as seen by the worker that leased it."""

    task_id: str
    project_id: str
    kind: str
    key: str
    title: str
    description: str
    role: str
    attempt: int
    max_attempts: int
    token: int
    context: TaskContext | None = None


@dataclass(frozen=True, slots=True)
class FinishedTask:
    """A successful attempt to store: the task's output and the events and rows that go with it."""

    lease: Lease
    output: str
    events: Sequence[NewEvent] = ()
    records: TaskRecords = TaskRecords()


@dataclass(frozen=True, slots=True)
class ExpiredLease:
    task_id: str
    project_id: str
    owner: str | None
    attempts: int
    failed: bool


class TaskQueue:
    def __init__(self, database: Database, settings: WorkerSettings) -> None:
        self.database = database
        self.settings = settings
        # A batch is stored and refilled by statements sent to the driver connection: those
        # of app.worker.driver_statements on PostgreSQL (asyncpg) and of
        # app.worker.sqlite_statements on SQLite (aiosqlite). False sends them through SQLAlchemy.
        self.use_driver_statements = True
        self.statements: Any = sqlite_statements if database.is_sqlite else driver_statements

    async def claim(self, worker_id: str, limit: int) -> list[Lease]:
        """Lease up to ``limit`` ready tasks in a transaction of their own; see ``claim_in``."""
        async with self.database.transaction() as connection:
            return await self.claim_in(connection, worker_id, limit)

    async def claim_in(self, connection: AsyncConnection, worker_id: str, limit: int) -> list[Lease]:
        """Lease up to ``limit`` ready tasks, oldest first, each with the context its prompt needs.

        Runs in the caller's transaction, so the leases exist only once it commits. To claim
        in the transaction that stores finished tasks, use ``complete_and_claim``.
        """
        if self.use_driver_statements:
            leases = await self._lease_by_driver(connection, None, worker_id, limit)
            if leases:
                events_by_project = await self._record_claims(
                    connection, worker_id, leases, insert_attempts=False
                )
                driver = await self.statements.driver_connection(connection)
                await self.statements.store_events_and_records(driver, events_by_project, (), utc_now())
            return leases
        leases, events_by_project = await self._lease(connection, worker_id, limit)
        await append_events_many(connection, events_by_project)
        return leases

    async def _lease(
        self, connection: AsyncConnection, worker_id: str, limit: int
    ) -> tuple[list[Lease], dict[str, list[NewEvent]]]:
        """Lease up to ``limit`` ready tasks; return the leases and the events still to store."""
        now = time.time()
        rows = (
            await connection.execute(
                CLAIM_TASKS,
                {
                    "claim_limit": limit,
                    "claim_now": now,
                    "claim_worker": worker_id,
                    "claim_expires_at": now + self.settings.lease_seconds,
                    "claim_started_at": utc_now(),
                },
            )
        ).all()
        if not rows:
            return [], {}
        rows.sort(key=lambda row: row.id)  # the order of the driver statements' claim
        contexts = await _read_contexts(connection, rows)
        leases = [
            Lease(
                row.id,
                row.project_id,
                row.kind,
                row.key,
                row.title,
                row.description,
                row.role,
                row.attempts,
                row.max_attempts,
                row.lease_token,
                contexts[row.id],
            )
            for row in rows
        ]
        return leases, await self._record_claims(connection, worker_id, leases)

    async def heartbeat(self, worker_id: str, held: dict[str, int]) -> set[str]:
        """Extend the leases of ``held`` (task id to token); return the ids no longer held."""
        if not held:
            return set()
        async with self.database.transaction() as connection:
            await lock_tasks_in_id_order(connection, tasks.c.id.in_(list(held)))
            rows = await connection.execute(
                update(tasks)
                .where(
                    tasks.c.lease_owner == worker_id,
                    tasks.c.status == TaskStatus.RUNNING,
                    tasks.c.id.in_(list(held)),
                )
                .values(lease_expires_at=time.time() + self.settings.lease_seconds)
                .returning(tasks.c.id, tasks.c.lease_token)
            )
            renewed = {task_id for task_id, token in rows if held.get(task_id) == token}
        return set(held) - renewed

    async def sweep_expired(self) -> list[ExpiredLease]:
        """Requeue tasks whose lease expired; fail those that used every attempt."""
        now = time.time()
        async with self.database.transaction() as connection:
            rows = (
                await connection.execute(
                    select(
                        tasks.c.id,
                        tasks.c.project_id,
                        tasks.c.lease_owner,
                        tasks.c.lease_token,
                        tasks.c.attempts,
                        tasks.c.max_attempts,
                        tasks.c.key,
                        tasks.c.title,
                        tasks.c.role,
                    )
                    .where(tasks.c.status == TaskStatus.RUNNING, tasks.c.lease_expires_at < now)
                    .with_for_update(skip_locked=True)
                )
            ).all()

            expired = []
            for row in rows:
                failed = row.attempts >= row.max_attempts
                reason = f"the lease of worker {row.lease_owner} expired; the worker stopped or lost its database connection"
                if failed:
                    await self.fail(
                        connection, row.id, row.project_id, row.lease_token, _describe(row, reason)
                    )
                else:
                    await self._requeue(connection, row.id, row.lease_token, available_at=now, error=reason)
                await _finish_attempt(connection, row.id, row.lease_token, "lease_expired", reason)
                await append_events(
                    connection,
                    row.project_id,
                    [
                        NewEvent(
                            "task.lease_expired",
                            {"worker_id": row.lease_owner, "attempts": row.attempts},
                            row.id,
                        )
                    ],
                )
                expired.append(ExpiredLease(row.id, row.project_id, row.lease_owner, row.attempts, failed))
        return expired

    async def release(self, lease: Lease) -> bool:
        """Give a task back without counting the attempt, for a worker that shuts down."""
        async with self.database.transaction() as connection:
            result = await connection.execute(
                update(tasks)
                .where(_held(lease.task_id, lease.token))
                .values(
                    status=TaskStatus.READY,
                    attempts=tasks.c.attempts - 1,
                    available_at=time.time(),
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
            if result.rowcount:
                await _finish_attempt(connection, lease.task_id, lease.token, "released", None)
                await append_events(
                    connection, lease.project_id, [NewEvent("task.released", {}, lease.task_id)]
                )
        return bool(result.rowcount)

    async def abandon(self, lease: Lease) -> bool:
        """Cancel a leased task whose project is already finished, so that no worker claims it again."""
        async with self.database.transaction() as connection:
            result = await connection.execute(
                update(tasks)
                .where(_held(lease.task_id, lease.token))
                .values(
                    status=TaskStatus.CANCELLED,
                    lease_owner=None,
                    lease_expires_at=None,
                    finished_at=utc_now(),
                )
            )
            if result.rowcount:
                await _finish_attempt(
                    connection, lease.task_id, lease.token, "cancelled", "the project is finished"
                )
        return bool(result.rowcount)

    async def retry_later(
        self, connection: AsyncConnection, lease: Lease, error: str, delay: float | None = None
    ) -> bool:
        """Return a failed attempt to the queue after an exponential backoff with jitter."""
        if delay is None:
            delay = self.backoff_seconds(lease.attempt)
        stored = await self._requeue(
            connection, lease.task_id, lease.token, available_at=time.time() + delay, error=error
        )
        if stored:
            await _finish_attempt(connection, lease.task_id, lease.token, "retry", error)
            await append_events(
                connection,
                lease.project_id,
                [
                    NewEvent(
                        "task.retrying",
                        {"attempt": lease.attempt, "delay_seconds": round(delay, 3), "error": error},
                        lease.task_id,
                    )
                ],
            )
        return stored

    def backoff_seconds(self, attempt: int) -> float:
        ceiling = min(
            self.settings.backoff_max_seconds, self.settings.backoff_base_seconds * 2 ** (attempt - 1)
        )
        # Full jitter keeps the retries of many tasks that failed together from arriving together.
        return random.uniform(ceiling / 2, ceiling)

    async def complete(
        self, connection: AsyncConnection, lease: Lease, output: str, extra_events: Sequence[NewEvent] = ()
    ) -> bool:
        """Store one task's output and release the tasks that waited for it; see ``complete_many``."""
        [stored] = await self.complete_many(connection, [FinishedTask(lease, output, extra_events)])
        return stored

    async def complete_many(
        self, connection: AsyncConnection, finished: Sequence[FinishedTask]
    ) -> list[bool]:
        """Store the outputs of several tasks and release the tasks that waited for them.

        The statements are the same for one task or a hundred. Each task's ``events`` are
        stored after its ``task.completed`` event, and its ``records`` are inserted. Returns,
        per task, whether it was stored: False, with nothing changed for that task, when its
        lease is no longer held because the task was cancelled or its lease expired and
        another worker took it over.
        """
        stored, _ = await self.complete_and_claim(connection, finished, "", 0)
        return stored

    async def complete_and_claim(
        self, connection: AsyncConnection, finished: Sequence[FinishedTask], worker_id: str, limit: int
    ) -> tuple[list[bool], list[Lease]]:
        """Store finished tasks as ``complete_many`` does, then lease up to ``limit`` ready tasks.

        Returns what ``complete_many`` returns and the new leases. One statement numbers the
        events of both and locks their project rows in id order. Two batches that locked
        their projects in two passes, one for the results and one for the claims, could each
        hold a row that the other's second pass waits for, which PostgreSQL ends as a deadlock.
        """
        if not finished and limit <= 0:
            return [], []
        if finished and self.use_driver_statements:
            return await self._complete_and_claim_by_driver(connection, finished, worker_id, limit)
        # Locking the rows first, in id order, makes the check and the writes below one
        # atomic step: a sweep or cancel that runs meanwhile waits for this transaction.
        # The dependents released below are locked in the same pass, so that a cancel or
        # another batch, which lock in id order too, cannot hold one of them while waiting
        # for a row of this batch.
        finished_ids = sorted({item.lease.task_id for item in finished})
        await lock_tasks_in_id_order(
            connection,
            or_(
                tasks.c.id.in_(finished_ids),
                tasks.c.id.in_(
                    select(task_dependencies.c.task_id).where(
                        task_dependencies.c.depends_on_id.in_(finished_ids)
                    )
                ),
            ),
        )
        locked = await connection.execute(LOCK_RUNNING_TASKS, {"task_ids": finished_ids})
        tokens = dict(locked.all())
        held = [item for item in finished if tokens.get(item.lease.task_id) == item.lease.token]
        events_by_project = await self._store_completions(connection, held) if held else {}
        leases: list[Lease] = []
        if limit > 0:
            leases, claim_events = await self._lease(connection, worker_id, limit)
            for project_id, new_events in claim_events.items():
                events_by_project.setdefault(project_id, []).extend(new_events)
        await append_events_many(connection, events_by_project)
        for table, rows in (
            (messages, [row for item in held for row in item.records.messages]),
            (llm_calls, [row for item in held for row in item.records.llm_calls]),
            (artifacts, [row for item in held for row in item.records.artifacts]),
        ):
            await insert_rows(connection, table, rows)
        held_ids = {id(item) for item in held}
        return [id(item) in held_ids for item in finished], leases

    async def _complete_and_claim_by_driver(
        self, connection: AsyncConnection, finished: Sequence[FinishedTask], worker_id: str, limit: int
    ) -> tuple[list[bool], list[Lease]]:
        """Run ``complete_and_claim`` with the statements of ``self.statements``.

        On PostgreSQL that takes 4 or 5 statements (see app.worker.driver_statements). On
        SQLite it takes 12, one more when a claimed task has dependencies and one more when
        it starts a plan (see app.worker.sqlite_statements).
        """
        finished_ids = {item.lease.task_id for item in finished}
        statements = self.statements
        if statements is sqlite_statements:
            driver = await sqlite_statements.driver_connection(connection)
            tokens = await sqlite_statements.read_running_tokens(driver, sorted(finished_ids))
        else:
            # Sent through SQLAlchemy, this statement also begins the transaction.
            locked = await connection.execute(
                LOCK_FINISHED_AND_DEPENDENTS, {"task_ids": sorted(finished_ids)}
            )
            tokens = {
                task_id: token
                for task_id, token, status in locked
                if status == TaskStatus.RUNNING and task_id in finished_ids
            }
            driver = await driver_statements.driver_connection(connection)
        held = [item for item in finished if tokens.get(item.lease.task_id) == item.lease.token]
        now = utc_now()

        events_by_project: dict[str, list[NewEvent]] = {}
        if held:
            released = await statements.complete_and_release(
                driver,
                [(item.lease.task_id, item.lease.token, item.output) for item in held],
                now,
                time.time(),
            )
            events_by_project = _completion_events(held, released)
        leases: list[Lease] = []
        if limit > 0:
            leases = await self._lease_by_driver(connection, driver, worker_id, limit)
            claim_events = await self._record_claims(connection, worker_id, leases, insert_attempts=False)
            for project_id, new_events in claim_events.items():
                events_by_project.setdefault(project_id, []).extend(new_events)
        await statements.store_events_and_records(
            driver, events_by_project, [item.records for item in held], now
        )
        held_ids = {id(item) for item in held}
        return [id(item) in held_ids for item in finished], leases

    async def _lease_by_driver(
        self, connection: AsyncConnection, driver: Any, worker_id: str, limit: int
    ) -> list[Lease]:
        """Lease up to ``limit`` ready tasks and insert their attempts, as ``_lease`` does.

        Without ``driver``, the claim on PostgreSQL goes through SQLAlchemy and begins the
        transaction. SQLite's transaction has begun already, so its claim fetches the driver.
        """
        now = time.time()
        rows = await self.statements.claim(
            connection,
            driver,
            worker_id=worker_id,
            limit=limit,
            now=now,
            expires_at=now + self.settings.lease_seconds,
            started_at=utc_now(),
        )
        dependency_ids = sorted({dependency for row in rows for dependency in row["depends_on"] or ()})
        outputs: dict[str, DependencyOutput] = {}  # in plan order, the order prompts quote them in
        if dependency_ids:
            driver = driver or await self.statements.driver_connection(connection)
            for row in await self.statements.read_outputs(driver, dependency_ids):
                outputs[row["id"]] = DependencyOutput(row["key"], row["title"], row["role"], row["output"])
        leases = []
        for row in rows:
            wanted = set(row["depends_on"] or ())
            context = TaskContext(
                row["project_status"],
                row["brief"],
                row["team"],
                row["knowledge_base"],
                tuple(output for task_id, output in outputs.items() if task_id in wanted),
            )
            leases.append(
                Lease(
                    row["id"],
                    row["project_id"],
                    row["kind"],
                    row["key"],
                    row["title"],
                    row["description"],
                    row["role"],
                    row["attempts"],
                    row["max_attempts"],
                    row["lease_token"],
                    context,
                )
            )
        return leases

    async def _store_completions(
        self, connection: AsyncConnection, held: Sequence[FinishedTask]
    ) -> dict[str, list[NewEvent]]:
        """Write the finished tasks' rows; return their events, which the caller stores."""
        now = utc_now()
        await connection.execute(
            COMPLETE_TASK,
            [
                {
                    "done_task_id": item.lease.task_id,
                    "done_token": item.lease.token,
                    "done_output": item.output,
                    "done_at": now,
                }
                for item in held
            ],
        )
        await connection.execute(
            FINISH_ATTEMPT,
            [
                {
                    "done_task_id": item.lease.task_id,
                    "done_token": item.lease.token,
                    "done_outcome": "completed",
                    "attempt_error": None,
                    "done_at": now,
                }
                for item in held
            ],
        )
        released = await release_dependents_many(connection, [item.lease.task_id for item in held])
        return _completion_events(held, released)

    async def fail(
        self, connection: AsyncConnection, task_id: str, project_id: str, token: int, reason: str
    ) -> bool:
        """Fail a task for good, fail its project with the reason and cancel the rest."""
        await lock_tasks_in_id_order(
            connection,
            and_(tasks.c.project_id == project_id, tasks.c.status.in_(list(OPEN_TASK_STATUSES))),
        )
        result = await connection.execute(
            update(tasks)
            .where(_held(task_id, token))
            .values(
                status=TaskStatus.FAILED,
                error=reason,
                finished_at=utc_now(),
                lease_owner=None,
                lease_expires_at=None,
            )
        )
        if not result.rowcount:
            return False

        await _finish_attempt(connection, task_id, token, "failed", reason)
        await connection.execute(
            update(tasks)
            .where(tasks.c.project_id == project_id, tasks.c.status.in_(list(OPEN_TASK_STATUSES)))
            .values(status=TaskStatus.CANCELLED, lease_owner=None, lease_expires_at=None)
        )
        failed_project = await connection.execute(
            update(projects)
            .where(projects.c.id == project_id, projects.c.status.not_in(list(FINAL_PROJECT_STATUSES)))
            .values(status=ProjectStatus.FAILED, error=reason, updated_at=utc_now(), finished_at=utc_now())
        )
        new_events = [NewEvent("task.failed", {"error": reason}, task_id)]
        if failed_project.rowcount:
            new_events.append(NewEvent("project.failed", {"error": reason}))
        await append_events(connection, project_id, new_events)
        return True

    async def _requeue(
        self, connection: AsyncConnection, task_id: str, token: int, *, available_at: float, error: str
    ) -> bool:
        result = await connection.execute(
            update(tasks)
            .where(_held(task_id, token))
            .values(
                status=TaskStatus.READY,
                available_at=available_at,
                error=error,
                lease_owner=None,
                lease_expires_at=None,
            )
        )
        return bool(result.rowcount)

    async def _record_claims(
        self,
        connection: AsyncConnection,
        worker_id: str,
        leases: list[Lease],
        *,
        insert_attempts: bool = True,
    ) -> dict[str, list[NewEvent]]:
        """Insert the attempts of new leases, unless the claim did; return their events, which the caller stores."""
        now = utc_now()
        if insert_attempts:
            await insert_rows(
                connection,
                task_attempts,
                [
                    {
                        "task_id": lease.task_id,
                        "number": lease.attempt,
                        "worker_id": worker_id,
                        "lease_token": lease.token,
                        "outcome": "running",
                        "started_at": now,
                    }
                    for lease in leases
                ],
            )

        by_project: dict[str, list[NewEvent]] = {}
        for lease in leases:
            by_project.setdefault(lease.project_id, []).append(
                NewEvent(
                    "task.started",
                    {"key": lease.key, "role": lease.role, "attempt": lease.attempt, "worker_id": worker_id},
                    lease.task_id,
                )
            )
        planning = [lease.project_id for lease in leases if lease.kind == TaskKind.PLAN]
        if planning:
            started = await connection.execute(
                update(projects)
                .where(projects.c.id.in_(planning), projects.c.status == ProjectStatus.QUEUED)
                .values(status=ProjectStatus.PLANNING, updated_at=now)
                .returning(projects.c.id)
            )
            for (project_id,) in started:
                by_project[project_id].insert(0, NewEvent("project.planning"))
        return by_project


async def release_dependents_many(
    connection: AsyncConnection, task_ids: Sequence[str]
) -> list[tuple[str, str]]:
    """Count finished dependencies off their dependents; return (id, project id) of those that became ready.

    One statement does both: SQL evaluates every SET expression on the row as it was, so a
    dependent whose last pending dependencies are among ``task_ids`` still reads
    ``pending_dependencies`` equal to the number of them.
    """
    rows = await connection.execute(
        RELEASE_DEPENDENTS, {"finished_ids": list(task_ids), "ready_at": time.time()}
    )
    return [(dependent, project_id) for dependent, project_id, status in rows if status == TaskStatus.READY]


def _completion_events(
    held: Sequence[FinishedTask], released: Sequence[tuple[str, str]]
) -> dict[str, list[NewEvent]]:
    """Return, by project, the events of stored results and of the dependents they released."""
    events_by_project: dict[str, list[NewEvent]] = {}
    for item in held:
        lease = item.lease
        events_by_project.setdefault(lease.project_id, []).extend(
            [
                NewEvent("task.completed", {"key": lease.key, "role": lease.role}, lease.task_id),
                *item.events,
            ]
        )
    for task_id, project_id in released:
        events_by_project.setdefault(project_id, []).append(NewEvent("task.ready", {}, task_id))
    return events_by_project


async def _read_contexts(connection: AsyncConnection, claimed: Sequence[Row]) -> dict[str, TaskContext]:
    """Read the project and the dependency outputs of every claimed task, in two statements."""
    project_rows = await connection.execute(
        READ_PROJECTS, {"project_ids": sorted({row.project_id for row in claimed})}
    )
    projects_by_id = {row.id: row for row in project_rows}
    dependency_ids = sorted({dependency for row in claimed for dependency in row.depends_on or ()})
    outputs: dict[str, DependencyOutput] = {}  # in plan order, the order prompts quote them in
    if dependency_ids:
        for row in await connection.execute(READ_OUTPUTS, {"dependency_ids": dependency_ids}):
            outputs[row.id] = DependencyOutput(row.key, row.title, row.role, row.output)

    contexts = {}
    for row in claimed:
        project = projects_by_id[row.project_id]
        wanted = set(row.depends_on or ())
        dependencies = tuple(output for task_id, output in outputs.items() if task_id in wanted)
        contexts[row.id] = TaskContext(
            project.status, project.brief, project.team, project.knowledge_base, dependencies
        )
    return contexts


def _held(task_id: str, token: int):
    return and_(tasks.c.id == task_id, tasks.c.lease_token == token, tasks.c.status == TaskStatus.RUNNING)


async def _finish_attempt(
    connection: AsyncConnection, task_id: str, token: int, outcome: str, error: str | None
) -> None:
    await connection.execute(
        update(task_attempts)
        .where(task_attempts.c.task_id == task_id, task_attempts.c.lease_token == token)
        .values(outcome=outcome, error=error, finished_at=utc_now())
    )


def _describe(row, reason: str) -> str:
    return f"task {row.key} {row.title!r} ({row.role}) failed after {row.attempts} attempts: {reason}"
