"""Following a project's events by server-sent events, with a reconnect in the middle."""

from __future__ import annotations

import pytest

from tests.e2e.processes import Deployment, wait_until
from tests.e2e.projects_api import iterate_sse, last_event_seq, read_events, submit_project

pytestmark = pytest.mark.slow

SETTINGS = {"TORONTO_AI_OFFLINE_LATENCY_MS": "300"}
STREAM_HEADERS = {"Accept": "text/event-stream"}
EVENTS_BEFORE_DISCONNECT = 3


@pytest.mark.timeout(60)
def test_sse_resumes_after_last_event_id(deployment: Deployment) -> None:
    api, _ = deployment.start(workers=1, settings=SETTINGS)

    with api.client() as client:
        project_id = submit_project(client)
        url = f"/api/v1/projects/{project_id}/events"

        before: list[dict] = []
        with client.stream("GET", url, headers=STREAM_HEADERS) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            for event in iterate_sse(response):
                before.append(event)
                if len(before) == EVENTS_BEFORE_DISCONNECT:
                    break
        last_id = before[-1]["id"]

        # Events committed while no client listens must come with the resumed stream.
        wait_until(
            lambda: last_event_seq(client, project_id) > int(last_id),
            timeout=30,
            description=f"events after seq {last_id} in project {project_id}",
        )

        # The server ends the stream once the project is finished and every event was sent.
        # The client's 10 s read timeout stops the test if the stream never ends.
        with client.stream("GET", url, headers={**STREAM_HEADERS, "Last-Event-ID": last_id}) as response:
            assert response.status_code == 200, response.read()
            after = list(iterate_sse(response))

        stored = read_events(client, project_id)

    received = before + after
    sequence_numbers = [int(event["id"]) for event in received]
    assert sequence_numbers == list(range(1, len(received) + 1)), "gap or duplicate in seq"
    assert int(after[0]["id"]) == int(last_id) + 1
    assert received[-1]["event"] == "project.completed"
    for event in received:
        assert event["event"] == event["data"]["type"]
        assert int(event["id"]) == event["data"]["seq"]
    assert [event["data"] for event in received] == stored
