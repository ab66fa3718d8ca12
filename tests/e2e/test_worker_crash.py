"""A worker killed with SIGKILL while it holds a task loses the lease, and another worker finishes it."""

from __future__ import annotations

import signal
from collections import Counter

import pytest

from tests.e2e.processes import BASE_SETTINGS, Deployment
from tests.e2e.projects_api import (
    FINAL_STATUSES,
    count_outputs,
    lease_holder,
    read_events,
    read_task,
    submit_project,
    wait_for_running_task,
    wait_for_status,
)

pytestmark = pytest.mark.slow

# Each model call takes 1.5 s, so the killed worker is still inside its call.
SETTINGS = {"TORONTO_AI_OFFLINE_LATENCY_MS": "1500"}
LEASE_SECONDS = float(BASE_SETTINGS["TORONTO_AI_WORKER__LEASE_SECONDS"])
SWEEP_SECONDS = float(BASE_SETTINGS["TORONTO_AI_WORKER__SWEEP_INTERVAL_SECONDS"])


@pytest.mark.timeout(120)
def test_worker_killed_while_holding_task(deployment: Deployment, database_url: str) -> None:
    api, workers = deployment.start(workers=2, settings=SETTINGS)

    with api.client() as client:
        project_id = submit_project(client)
        task = wait_for_running_task(client, project_id, "work", timeout=30)
        holder_id = lease_holder(client, project_id, task["id"])
        killed = next(worker for worker in workers if worker.worker_id == holder_id)
        survivor = next(worker for worker in workers if worker is not killed)
        assert holder_id.rsplit("-", 2)[1] == str(killed.pid)

        assert killed.kill() == -signal.SIGKILL

        # The lease runs out at most LEASE_SECONDS after the last heartbeat, and the survivor's
        # next sweep then returns the task to the queue. The timeout allows twice that.
        expired = survivor.wait_for_record(
            "task.lease_expired", timeout=2 * (LEASE_SECONDS + SWEEP_SECONDS) + 5, task_id=task["id"]
        )
        assert expired["previous_owner"] == holder_id
        assert expired["worker_id"] == survivor.worker_id

        project = wait_for_status(client, project_id, FINAL_STATUSES, timeout=60)
        assert project["status"] == "completed", project["error"]
        task_ids = {item["id"] for item in project["tasks"]}
        assert {item["status"] for item in project["tasks"]} == {"completed"}

        attempts = read_task(client, project_id, task["id"])["attempt_history"]
        assert [(attempt["worker_id"], attempt["outcome"]) for attempt in attempts] == [
            (holder_id, "lease_expired"),
            (survivor.worker_id, "completed"),
        ]

        events = read_events(client, project_id)

    lease_events = [event for event in events if event["type"] == "task.lease_expired"]
    assert [(event["task_id"], event["data"]["worker_id"]) for event in lease_events] == [
        (task["id"], holder_id)
    ]

    completed_events = Counter(event["task_id"] for event in events if event["type"] == "task.completed")
    assert set(completed_events) == task_ids
    assert max(completed_events.values()) == 1, completed_events

    completed_logs = Counter(
        record["task_id"]
        for worker in workers
        for record in worker.records("task.completed", project_id=project_id)
    )
    assert set(completed_logs) == task_ids
    assert max(completed_logs.values()) == 1, completed_logs

    outputs = count_outputs(database_url, project_id)
    assert set(outputs) == task_ids
    assert {task_id: (1, 1) for task_id in task_ids} == outputs, "(artifacts, assistant messages) per task"
