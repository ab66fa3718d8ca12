"""Cancelling a project while a worker runs one of its tasks, and after that worker died."""

from __future__ import annotations

import signal
import time

import pytest

from tests.e2e.processes import BASE_SETTINGS, Deployment, seconds_between
from tests.e2e.projects_api import (
    OPEN_TASK_STATUSES,
    SECOND_BRIEF,
    count_outputs,
    lease_holder,
    read_events,
    read_project,
    submit_project,
    task_snapshot,
    wait_for_running_task,
)

pytestmark = pytest.mark.slow

# Each model call takes 2 s, so the cancel arrives while the worker waits for the model.
LATENCY_SECONDS = 2.0
SETTINGS = {"TORONTO_AI_OFFLINE_LATENCY_MS": str(int(LATENCY_SECONDS * 1000))}
LEASE_SECONDS = float(BASE_SETTINGS["TORONTO_AI_WORKER__LEASE_SECONDS"])


@pytest.mark.timeout(90)
def test_cancel_running_project(deployment: Deployment, database_url: str) -> None:
    api, [worker] = deployment.start(workers=1, settings=SETTINGS)

    with api.client() as client:
        project_id = submit_project(client)
        task = wait_for_running_task(client, project_id, "work", timeout=30)

        response = client.post(f"/api/v1/projects/{project_id}/cancel")
        cancelled_at = time.monotonic()
        assert response.status_code == 200, response.text
        assert response.json() == {"id": project_id, "status": "cancelled"}

        project = read_project(client, project_id)
        assert project["status"] == "cancelled"
        statuses = {item["id"]: item["status"] for item in project["tasks"]}
        assert statuses[task["id"]] == "cancelled"
        assert not OPEN_TASK_STATUSES & set(statuses.values()), statuses
        snapshot = task_snapshot(client, project_id)
        assert snapshot[task["id"]] == ("cancelled", 1, [(worker.worker_id, "cancelled")])

        # The worker learns of the cancel at its next heartbeat, well within one lease.
        worker.wait_for_record(
            "task.lease_lost", timeout=cancelled_at + LEASE_SECONDS - time.monotonic(), task_id=task["id"]
        )

        # The worker stays usable and plans a second project. That plan takes one 2 s model
        # call, so the cancelled task's own call has ended by the time the plan is stored.
        second_id = submit_project(client, SECOND_BRIEF)
        second_plan = worker.wait_for_record("task.completed", timeout=30, project_id=second_id)
        first_claim = worker.records("task.claimed", task_id=task["id"])[0]
        assert seconds_between(first_claim, second_plan) >= LATENCY_SECONDS

        assert read_project(client, project_id)["status"] == "cancelled"
        assert task_snapshot(client, project_id) == snapshot
        events = read_events(client, project_id)

    assert worker.records("task.completed", task_id=task["id"]) == []
    assert worker.records("task.result_discarded", task_id=task["id"]) == []

    cancel_seq = next(event["seq"] for event in events if event["type"] == "project.cancelled")
    assert [event["type"] for event in events if event["seq"] > cancel_seq] == []
    cancelled_events = {event["task_id"] for event in events if event["type"] == "task.cancelled"}
    assert cancelled_events == {task_id for task_id, status in statuses.items() if status == "cancelled"}

    outputs = count_outputs(database_url, project_id)
    assert outputs[task["id"]] == (0, 0), "(artifacts, assistant messages) of the cancelled task"


@pytest.mark.timeout(90)
def test_cancel_when_worker_dead(deployment: Deployment, database_url: str) -> None:
    api, [worker] = deployment.start(workers=1, settings=SETTINGS)

    with api.client() as client:
        project_id = submit_project(client)
        task = wait_for_running_task(client, project_id, "work", timeout=30)
        assert lease_holder(client, project_id, task["id"]) == worker.worker_id

        assert worker.kill() == -signal.SIGKILL
        # No worker is left to sweep the expired lease, so the task stays running.
        project = read_project(client, project_id)
        assert {item["id"]: item["status"] for item in project["tasks"]}[task["id"]] == "running"

        response = client.post(f"/api/v1/projects/{project_id}/cancel")
        assert response.status_code == 200, response.text
        assert response.json() == {"id": project_id, "status": "cancelled"}

        project = read_project(client, project_id)
        assert project["status"] == "cancelled"
        statuses = {item["id"]: item["status"] for item in project["tasks"]}
        assert not OPEN_TASK_STATUSES & set(statuses.values()), statuses
        snapshot = task_snapshot(client, project_id)
        assert snapshot[task["id"]] == ("cancelled", 1, [(worker.worker_id, "cancelled")])
        events = read_events(client, project_id)

        # The new worker sweeps at start and every second after. By the time it has stored
        # the 2 s plan of a second project, it has swept and claimed several times.
        replacement = deployment.start_worker(SETTINGS)
        second_id = submit_project(client, SECOND_BRIEF)
        second_plan = replacement.wait_for_record("task.completed", timeout=30, project_id=second_id)
        started = replacement.records("worker.started")[0]
        assert seconds_between(started, second_plan) >= LATENCY_SECONDS

        assert read_project(client, project_id)["status"] == "cancelled"
        assert task_snapshot(client, project_id) == snapshot
        assert read_events(client, project_id) == events

    assert replacement.records(project_id=project_id) == []
    assert count_outputs(database_url, project_id)[task["id"]] == (0, 0)
