"""A worker stopped by SIGTERM releases the leases it holds, and another worker finishes the tasks."""

from __future__ import annotations

import pytest

from tests.e2e.processes import Deployment
from tests.e2e.projects_api import (
    BRIEF,
    FINAL_STATUSES,
    SECOND_BRIEF,
    count_outputs,
    lease_holder,
    read_events,
    read_project,
    read_task,
    submit_project,
    wait_for_running_task,
    wait_for_status,
)

pytestmark = pytest.mark.slow

# The first worker's model calls outlast the test, so its tasks are still running at SIGTERM
# and 0.5 s of grace cannot let them finish. The second worker's calls are quick.
SLOW_WORKER = {"TORONTO_AI_OFFLINE_LATENCY_MS": "60000", "TORONTO_AI_WORKER__SHUTDOWN_GRACE_SECONDS": "0.5"}
FAST_WORKER = {"TORONTO_AI_OFFLINE_LATENCY_MS": "100"}
EXIT_TIMEOUT_SECONDS = 10.0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_graceful_shutdown_releases_leases(deployment: Deployment, database_url: str) -> None:
    api, [first] = deployment.start(workers=1, settings=SLOW_WORKER)

    with api.client() as client:
        project_ids = [submit_project(client, BRIEF), submit_project(client, SECOND_BRIEF)]
        plan_ids = {}
        for project_id in project_ids:
            plan = wait_for_running_task(client, project_id, "plan", timeout=30)
            assert lease_holder(client, project_id, plan["id"]) == first.worker_id
            plan_ids[project_id] = plan["id"]

        first.terminate()
        assert first.wait_exit(EXIT_TIMEOUT_SECONDS) == 0, first.log_tail()

        released = {record["task_id"] for record in first.records("task.released")}
        assert released == set(plan_ids.values())
        assert len(first.records("worker.stopped")) == 1

        # Released tasks are ready again and the attempt does not count.
        for project_id, plan_id in plan_ids.items():
            plan = next(task for task in read_project(client, project_id)["tasks"] if task["id"] == plan_id)
            assert plan["status"] == "ready"
            assert plan["attempts"] == 0
            attempts = read_task(client, project_id, plan_id)["attempt_history"]
            assert [(attempt["worker_id"], attempt["outcome"]) for attempt in attempts] == [
                (first.worker_id, "released")
            ]
            released_events = [
                event for event in read_events(client, project_id) if event["type"] == "task.released"
            ]
            assert [event["task_id"] for event in released_events] == [plan_id]

        second = deployment.start_worker(FAST_WORKER)
        for project_id, plan_id in plan_ids.items():
            project = wait_for_status(client, project_id, FINAL_STATUSES, timeout=60)
            assert project["status"] == "completed", project["error"]

            plan = read_task(client, project_id, plan_id)
            assert plan["attempts"] == 1
            assert [(attempt["worker_id"], attempt["outcome"]) for attempt in plan["attempt_history"]] == [
                (first.worker_id, "released"),
                (second.worker_id, "completed"),
            ]

            outputs = count_outputs(database_url, project_id)
            assert set(outputs.values()) == {(1, 1)}, "(artifacts, assistant messages) per task"
