"""Building a runtime on a test database and waiting on project states."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from sqlalchemy import func, select

from app.db import projects as store
from app.db.models import artifacts, messages, tasks
from app.db.states import FINAL_PROJECT_STATUSES
from app.runtime import Runtime
from tests.conftest import make_settings

FAST_WORKER = {
    "TORONTO_AI_WORKER__POLL_INTERVAL_SECONDS": "0.05",
    "TORONTO_AI_WORKER__BACKOFF_BASE_SECONDS": "0.01",
    "TORONTO_AI_WORKER__BACKOFF_MAX_SECONDS": "0.05",
    "TORONTO_AI_WORKER__SWEEP_INTERVAL_SECONDS": "0.2",
}


async def start_runtime(database_url: str, tmp_path: Path, **environment: str) -> Runtime:
    settings = make_settings(database_url, tmp_path, **{**FAST_WORKER, **environment})
    return await Runtime.start(settings, migrate=True)


async def submit(runtime: Runtime, brief: str = "# Demo\n\nBuild a small thing that works.") -> str:
    async with runtime.database.transaction() as connection:
        return await store.insert_project(
            connection,
            store.NewProject(
                "Demo", brief, "default", None, ["offline"], runtime.settings.worker.max_attempts
            ),
            "project_manager",
        )


async def wait_for_final(runtime: Runtime, project_id: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with runtime.database.read() as connection:
            project = await store.get_project(connection, project_id)
        if project.status in FINAL_PROJECT_STATUSES:
            return project
        await asyncio.sleep(0.02)
    raise AssertionError(f"project {project_id} still {project.status} after {timeout} s")


async def outputs_per_task(runtime: Runtime, project_id: str) -> dict[str, tuple[int, int]]:
    """Return, per task id, how many artifacts and assistant messages are stored."""
    async with runtime.database.read() as connection:
        artifact_counts = dict(
            (
                await connection.execute(
                    select(artifacts.c.task_id, func.count())
                    .where(artifacts.c.project_id == project_id)
                    .group_by(artifacts.c.task_id)
                )
            ).all()
        )
        message_counts = dict(
            (
                await connection.execute(
                    select(messages.c.task_id, func.count())
                    .where(messages.c.project_id == project_id, messages.c.sender == "assistant")
                    .group_by(messages.c.task_id)
                )
            ).all()
        )
        task_ids = [
            row[0]
            for row in await connection.execute(select(tasks.c.id).where(tasks.c.project_id == project_id))
        ]
    return {
        task_id: (artifact_counts.get(task_id, 0), message_counts.get(task_id, 0)) for task_id in task_ids
    }
