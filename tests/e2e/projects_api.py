"""Helpers that call the projects API of a running instance, wait on states and count outputs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection, Iterator
from typing import Any

import httpx
from sqlalchemy import func, select

from app.core.config import DatabaseSettings
from app.db.engine import Database
from app.db.models import artifacts, messages, tasks
from tests.e2e.processes import wait_until

BRIEF = """# Team wiki search

- Search every page of the team wiki by title and body
- Show results within one second for 10,000 pages
- Respect page permissions
"""

# A second brief for a project that must not reuse the first one's cached model responses,
# because each worker process caches responses to identical prompts at temperature 0.
SECOND_BRIEF = """# Release notes generator

- Collect merged pull requests since the last tag
- Group the changes by component
"""

FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
OPEN_TASK_STATUSES = frozenset({"blocked", "ready", "running"})


def submit_project(client: httpx.Client, brief: str = BRIEF) -> str:
    response = client.post("/api/v1/projects", json={"brief": brief})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def read_project(client: httpx.Client, project_id: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/projects/{project_id}")
    assert response.status_code == 200, response.text
    return response.json()


def read_task(client: httpx.Client, project_id: str, task_id: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/projects/{project_id}/tasks/{task_id}")
    assert response.status_code == 200, response.text
    return response.json()


def read_events(client: httpx.Client, project_id: str) -> list[dict[str, Any]]:
    """Read every event of a project through the JSON pages of the events endpoint."""
    found: list[dict[str, Any]] = []
    after = 0
    while True:
        response = client.get(f"/api/v1/projects/{project_id}/events", params={"after": after, "limit": 1000})
        assert response.status_code == 200, response.text
        page = response.json()
        if not page["items"]:
            return found
        found += page["items"]
        after = page["last_seq"]


def last_event_seq(client: httpx.Client, project_id: str) -> int:
    events = read_events(client, project_id)
    return events[-1]["seq"] if events else 0


def wait_for_status(
    client: httpx.Client, project_id: str, statuses: Collection[str], timeout: float
) -> dict[str, Any]:
    """Wait until the project's status is one of ``statuses`` and return the project."""
    last: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        last.update(read_project(client, project_id))
        return dict(last) if last["status"] in statuses else None

    def describe() -> str:
        task_states = ", ".join(f"{task['key']}={task['status']}" for task in last.get("tasks", []))
        return f"project is {last.get('status')}: {task_states}; error: {last.get('error')}"

    return wait_until(reached, timeout, f"project {project_id} to become one of {sorted(statuses)}", describe)


def wait_for_running_task(client: httpx.Client, project_id: str, kind: str, timeout: float) -> dict[str, Any]:
    """Wait until a task of this kind (plan, work or report) is running and return it."""

    def running() -> dict[str, Any] | None:
        project = read_project(client, project_id)
        if project["status"] in FINAL_STATUSES:
            raise AssertionError(
                f"project {project_id} finished as {project['status']} before a {kind} task ran"
            )
        return next(
            (task for task in project["tasks"] if task["kind"] == kind and task["status"] == "running"), None
        )

    return wait_until(running, timeout, f"a running {kind} task in project {project_id}")


def lease_holder(client: httpx.Client, project_id: str, task_id: str) -> str:
    """Return the id of the worker whose attempt at the task is running."""
    attempts = read_task(client, project_id, task_id)["attempt_history"]
    running = [attempt["worker_id"] for attempt in attempts if attempt["outcome"] == "running"]
    assert len(running) == 1, f"task {task_id} has {len(running)} running attempts: {attempts}"
    return running[0]


def task_snapshot(client: httpx.Client, project_id: str) -> dict[str, tuple[str, int, list[tuple[str, str]]]]:
    """Return, per task id, its status, attempt count and (worker id, outcome) of each attempt."""
    snapshot = {}
    for task in read_project(client, project_id)["tasks"]:
        attempts = read_task(client, project_id, task["id"])["attempt_history"]
        snapshot[task["id"]] = (
            task["status"],
            task["attempts"],
            [(attempt["worker_id"], attempt["outcome"]) for attempt in attempts],
        )
    return snapshot


def count_outputs(database_url: str, project_id: str) -> dict[str, tuple[int, int]]:
    """Return, for every task of the project, how many artifacts and assistant messages are stored."""
    return asyncio.run(_count_outputs(database_url, project_id))


async def _count_outputs(database_url: str, project_id: str) -> dict[str, tuple[int, int]]:
    database = Database(DatabaseSettings(url=database_url))
    try:
        async with database.read() as connection:
            task_ids = list(
                await connection.scalars(select(tasks.c.id).where(tasks.c.project_id == project_id))
            )
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
    finally:
        await database.dispose()
    return {
        task_id: (artifact_counts.get(task_id, 0), message_counts.get(task_id, 0)) for task_id in task_ids
    }


def iterate_sse(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Yield the events of a text/event-stream response as {"id", "event", "data"} dicts.

    ``data`` is the decoded JSON payload. Comment lines, such as keep-alive pings, are skipped.
    """
    fields: dict[str, str] = {}
    data_lines: list[str] = []
    for line in response.iter_lines():
        if not line:
            if data_lines:
                yield {
                    "id": fields.get("id"),
                    "event": fields.get("event"),
                    "data": json.loads("\n".join(data_lines)),
                }
            fields, data_lines = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data_lines.append(value)
        else:
            fields[name] = value
