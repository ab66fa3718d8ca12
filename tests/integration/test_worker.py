"""A worker running projects to the end, on SQLite and PostgreSQL.

Failure modes use a scripted provider in place of a hosted model, which the test machine
cannot reach; it implements the same interface as the real providers.
"""

import asyncio
import json
from collections.abc import Callable

import pytest

from app.agent import executor as executor_module
from app.agent.team import PROJECT_MANAGER
from app.db import projects as store
from app.db.models import roles, tasks
from app.db.states import ProjectStatus
from app.errors import LLMRequestError, LLMServerError
from app.llm.base import Completion, CompletionRequest
from app.llm.offline import OfflineProvider
from app.llm.registry import ProviderRegistry
from app.worker.runner import Worker
from tests.integration.helpers import outputs_per_task, start_runtime, submit, wait_for_final


class ScriptedProvider(OfflineProvider):
    """The offline provider, except that ``script(call_number, request)`` may override a reply."""

    def __init__(self, script: Callable[[int, CompletionRequest], str | Exception | None]) -> None:
        super().__init__()
        self.script = script
        self.calls = 0

    async def complete(self, request: CompletionRequest) -> Completion:
        self.calls += 1
        outcome = self.script(self.calls, request)
        if isinstance(outcome, Exception):
            raise outcome
        completion = await super().complete(request)
        if outcome is None:
            return completion
        return Completion(outcome, "offline", request.model, 10, 10, 1.0)


@pytest.fixture
async def runtime(database_url, tmp_path):
    runtime = await start_runtime(database_url, tmp_path)
    yield runtime
    await runtime.aclose()


async def run_project(runtime, brief: str = "# Demo\n\nBuild a small thing that works."):
    worker = Worker(runtime.database, runtime.executor, runtime.settings)
    running = asyncio.create_task(worker.run())
    try:
        project_id = await submit(runtime, brief)
        return await wait_for_final(runtime, project_id)
    finally:
        worker.stop()
        await running


def use_provider(runtime, provider) -> None:
    runtime.executor.providers = ProviderRegistry({"offline": provider}, {})


async def test_project_completes_with_one_output_per_task(runtime):
    project = await run_project(runtime)

    assert project.status == ProjectStatus.COMPLETED
    assert project.report.startswith("> Written by the offline provider")
    counts = await outputs_per_task(runtime, project.id)
    assert len(counts) == 7
    assert set(counts.values()) == {(1, 1)}


async def test_llm_calls_are_recorded(runtime):
    project = await run_project(runtime)

    async with runtime.database.read() as connection:
        task_rows = await store.list_tasks(connection, project.id)
        calls = [call for row in task_rows for call in await store.list_llm_calls(connection, row.id)]
    assert len(calls) == len(task_rows)
    assert all(call.prompt_tokens > 0 and call.completion_tokens > 0 for call in calls)
    assert {call.provider for call in calls} == {"offline"}


async def test_invalid_plan_is_corrected_with_feedback(runtime):
    provider = ScriptedProvider(lambda number, request: "not a plan" if number == 1 else None)
    use_provider(runtime, provider)

    project = await run_project(runtime)

    assert project.status == ProjectStatus.COMPLETED
    async with runtime.database.read() as connection:
        plan_task = (await store.list_tasks(connection, project.id))[0]
        detail = await store.list_llm_calls(connection, plan_task.id)
    assert len(detail) == 2


async def test_plan_that_stays_invalid_fails_project(runtime):
    use_provider(runtime, ScriptedProvider(lambda number, request: json.dumps({"tasks": [{"id": "A"}]})))

    project = await run_project(runtime)

    assert project.status == ProjectStatus.FAILED
    assert "no valid plan in 3 attempts" in project.error
    assert "tasks.0.title: Field required" in project.error


async def test_transient_error_is_retried(runtime):
    use_provider(
        runtime,
        ScriptedProvider(
            lambda number, request: LLMServerError("503 from upstream") if number == 2 else None
        ),
    )

    project = await run_project(runtime)

    assert project.status == ProjectStatus.COMPLETED
    async with runtime.database.read() as connection:
        rows = await store.list_tasks(connection, project.id)
        retried = [row for row in rows if row.attempts == 2]
        calls = await store.list_llm_calls(connection, retried[0].id)
    assert len(retried) == 1
    assert [call.status for call in calls] == ["error", "ok"]


async def test_permanent_error_fails_project_at_once(runtime):
    use_provider(
        runtime,
        ScriptedProvider(
            lambda number, request: LLMRequestError("400 model not found") if number == 2 else None
        ),
    )

    project = await run_project(runtime)

    assert project.status == ProjectStatus.FAILED
    assert "LLMRequestError: 400 model not found" in project.error
    async with runtime.database.read() as connection:
        statuses = {row.status for row in await store.list_tasks(connection, project.id)}
    assert statuses <= {"completed", "failed", "cancelled"}


async def test_unknown_provider_fails_at_once(runtime):
    """A role whose provider this worker does not configure fails on its first attempt."""
    async with runtime.database.transaction() as connection:
        await connection.execute(
            roles.update().where(roles.c.name == PROJECT_MANAGER).values(provider="vllm")
        )

    project = await run_project(runtime)

    assert project.status == ProjectStatus.FAILED
    assert "failed on attempt 1: ConfigError: unknown LLM provider 'vllm'" in project.error


async def test_worker_reads_a_changed_team(runtime, monkeypatch):
    """A team stored again by another process reaches a running worker's next tasks."""
    monkeypatch.setattr(executor_module, "TEAM_REFRESH_SECONDS", 0.0)
    assert (await run_project(runtime)).status == ProjectStatus.COMPLETED

    async with runtime.database.transaction() as connection:
        await connection.execute(
            roles.update().where(roles.c.name == PROJECT_MANAGER).values(provider="vllm")
        )

    project = await run_project(runtime)
    assert project.status == ProjectStatus.FAILED
    assert "unknown LLM provider 'vllm'" in project.error


async def test_exhausted_retries_fail_with_reason(runtime):
    use_provider(
        runtime,
        ScriptedProvider(lambda number, request: LLMServerError("502 bad gateway") if number >= 2 else None),
    )

    project = await run_project(runtime)

    assert project.status == ProjectStatus.FAILED
    assert "failed on attempt 3: LLMServerError: 502 bad gateway" in project.error


async def test_identical_calls_hit_the_cache(runtime):
    first = await run_project(runtime)
    second = await run_project(runtime)

    assert first.report == second.report
    async with runtime.database.read() as connection:
        rows = await store.list_tasks(connection, second.id)
        calls = [call for row in rows for call in await store.list_llm_calls(connection, row.id)]
    assert all(call.cache_hit for call in calls)


async def test_cancelled_sweep_ends_the_worker(runtime, monkeypatch):
    worker = Worker(runtime.database, runtime.executor, runtime.settings)
    sweeping = asyncio.Event()

    async def sweep_that_hides_cancellation():
        # A driver that fails while cleaning up after a cancellation raises its own error
        # in place of the CancelledError.
        sweeping.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise ConnectionResetError("connection lost during cleanup") from None
        return []

    monkeypatch.setattr(worker.queue, "sweep_expired", sweep_that_hides_cancellation)
    running = asyncio.create_task(worker.run())
    await asyncio.wait_for(sweeping.wait(), 10)

    worker.stop()
    done, _ = await asyncio.wait({running}, timeout=15)

    assert running in done, "the worker still runs: its sweeper took the cancellation for an error"
    assert running.exception() is None


async def test_claim_loop_claims_one_batch_at_most(database_url, tmp_path):
    """A worker whose free slots exceed a completion batch claims them in several transactions."""
    runtime = await start_runtime(
        database_url,
        tmp_path,
        TORONTO_AI_WORKER__CONCURRENCY="8",
        TORONTO_AI_WORKER__COMPLETION_BATCH_SIZE="3",
    )
    try:
        limits: list[int] = []
        claim = runtime.queue.claim

        async def recording_claim(worker_id: str, limit: int):
            limits.append(limit)
            return await claim(worker_id, limit)

        runtime.queue.claim = recording_claim
        worker = Worker(runtime.database, runtime.executor, runtime.settings)
        running = asyncio.create_task(worker.run())
        try:
            project_ids = [await submit(runtime) for _ in range(3)]
            projects = [await wait_for_final(runtime, project_id) for project_id in project_ids]
        finally:
            worker.stop()
            await running
    finally:
        await runtime.aclose()

    assert [project.status for project in projects] == [ProjectStatus.COMPLETED] * 3
    assert limits
    assert max(limits) <= 3


@pytest.mark.parametrize(
    ("cancel", "reason", "level"), [(True, "cancelled", "INFO"), (False, "lease_lost", "WARNING")]
)
async def test_discarded_result_names_reason(runtime, caplog, cancel, reason, level):
    project_id = await submit(runtime)
    worker = Worker(runtime.database, runtime.executor, runtime.settings)
    [lease] = await runtime.queue.claim(worker.worker_id, 1)
    async with runtime.database.transaction() as connection:
        if cancel:
            await store.cancel_project(connection, project_id)
        else:
            # Another worker's attempt took the task over after this lease expired.
            await connection.execute(
                tasks.update()
                .where(tasks.c.id == lease.task_id)
                .values(status="ready", lease_token=lease.token + 1)
            )
    ids = {"worker_id": worker.worker_id, "task_id": lease.task_id, "project_id": project_id}

    with caplog.at_level("INFO", logger="app.worker.runner"):
        await worker._log_discarded(lease, ids)
    [record] = [
        record for record in caplog.records if getattr(record, "action", "") == "task.result_discarded"
    ]

    assert record.reason == reason
    assert record.levelname == level
