"""The HTTP API in process, with an embedded worker, on SQLite and PostgreSQL."""

import pytest

from app.api.auth import create_api_key
from tests.conftest import make_settings
from tests.integration.api_client import BRIEF, open_client, wait_for_status


async def test_project_runs_to_report(api):
    response = await api.post("/api/v1/projects", json={"brief": BRIEF, "title": "Demo"})
    assert response.status_code == 202
    assert response.json()["status"] == "queued"

    project = await wait_for_status(api, response.json()["id"], "completed")

    assert project["report"].startswith("> Written by the offline provider")
    assert project["notice"] is not None
    assert project["providers"] == ["offline"]
    assert len(project["tasks"]) == 7
    assert all(task["status"] == "completed" for task in project["tasks"])
    assert project["usage"]["llm_calls"] == 7


async def test_task_detail_has_calls_and_input(api):
    project_id = (await api.post("/api/v1/projects", json={"brief": BRIEF})).json()["id"]
    project = await wait_for_status(api, project_id, "completed")
    task = next(task for task in project["tasks"] if task["key"] == "T2")

    detail = (await api.get(f"/api/v1/projects/{project_id}/tasks/{task['id']}")).json()

    assert [message["sender"] for message in detail["input"]] == ["system", "user"]
    assert "## T1:" in detail["input"][1]["content"]
    assert detail["output"]
    assert detail["attempt_history"][0]["outcome"] == "completed"
    assert detail["sources"] == []
    call = detail["llm_calls"][0]
    assert call["provider"] == "offline"
    assert call["prompt_tokens"] > 0


async def test_events_page_in_order(api):
    project_id = (await api.post("/api/v1/projects", json={"brief": BRIEF})).json()["id"]
    await wait_for_status(api, project_id, "completed")

    first = (await api.get(f"/api/v1/projects/{project_id}/events", params={"limit": 5})).json()
    rest = (
        await api.get(
            f"/api/v1/projects/{project_id}/events", params={"after": first["last_seq"], "limit": 1000}
        )
    ).json()

    sequence = [event["seq"] for event in first["items"] + rest["items"]]
    assert sequence == list(range(1, len(sequence) + 1))
    assert first["items"][0]["type"] == "project.created"
    assert rest["items"][-1]["type"] == "project.completed"


async def test_event_stream_ends_after_completion(api):
    project_id = (await api.post("/api/v1/projects", json={"brief": BRIEF})).json()["id"]
    await wait_for_status(api, project_id, "completed")

    response = await api.get(
        f"/api/v1/projects/{project_id}/events", headers={"Accept": "text/event-stream", "Last-Event-ID": "3"}
    )

    ids = [int(line[3:].strip()) for line in response.text.splitlines() if line.startswith("id:")]
    assert ids[0] == 4
    assert ids == list(range(4, ids[-1] + 1))
    assert "event: project.completed" in response.text


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"brief": ""}, "body.brief", "empty or only whitespace"),
        ({"brief": "   \n\t "}, "body.brief", "empty or only whitespace"),
        ({}, "body.brief", "Field required"),
        ({"brief": 5}, "body.brief", "valid string"),
        ({"brief": BRIEF, "colour": "red"}, "body.colour", "unknown field; accepted fields"),
        ({"brief": BRIEF, "team": "no such/team"}, "body.team", "is not a valid name; use 1 to 64 letters"),
        ({"brief": BRIEF, "title": " "}, "body.title", "empty or only whitespace"),
    ],
)
async def test_invalid_body_names_the_field(api_without_worker, body, field, message):
    response = await api_without_worker.post("/api/v1/projects", json=body)

    assert response.status_code == 422
    errors = response.json()["errors"]
    assert errors[0]["field"] == field
    assert message in errors[0]["message"]


async def test_brief_over_limit_is_rejected(api):
    response = await api.post("/api/v1/projects", json={"brief": "x" * 501})

    assert response.status_code == 422
    assert "501 characters, over the limit of 500" in response.json()["detail"]


async def test_body_over_limit_is_rejected(api):
    response = await api.post(
        "/api/v1/projects",
        content=b'{"brief": "' + b"x" * 5000 + b'"}',
        headers={"Content-Type": "application/json"},
    )

    assert response.status_code == 413
    assert "larger than 4096 bytes" in response.json()["detail"]


async def test_malformed_json_is_rejected(api_without_worker):
    response = await api_without_worker.post(
        "/api/v1/projects", content=b"{brief", headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 422
    assert "JSON" in response.json()["detail"]


async def test_unknown_team_and_knowledge_base(api_without_worker):
    team = await api_without_worker.post("/api/v1/projects", json={"brief": BRIEF, "team": "blue"})
    knowledge = await api_without_worker.post(
        "/api/v1/projects", json={"brief": BRIEF, "knowledge_base": "docs"}
    )

    assert team.status_code == 422
    assert "no team named 'blue'" in team.json()["detail"]
    assert knowledge.status_code == 422
    assert "'docs'" in knowledge.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/projects/missing"),
        ("POST", "/api/v1/projects/missing/cancel"),
        ("GET", "/api/v1/projects/missing/events"),
        ("GET", "/api/v1/projects/missing/tasks/missing"),
    ],
)
async def test_unknown_id_is_404(api_without_worker, method, path):
    response = await api_without_worker.request(method, path)

    assert response.status_code == 404
    assert "not found" in response.json()["detail"]


async def test_list_pages_newest_first(api_without_worker):
    created = [
        (await api_without_worker.post("/api/v1/projects", json={"brief": f"{BRIEF} {index}"})).json()["id"]
        for index in range(5)
    ]

    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await api_without_worker.get("/api/v1/projects", params=params)).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == list(reversed(created))


async def test_list_filters_by_status(api_without_worker):
    project_id = (await api_without_worker.post("/api/v1/projects", json={"brief": BRIEF})).json()["id"]
    await api_without_worker.post("/api/v1/projects", json={"brief": BRIEF})
    await api_without_worker.post(f"/api/v1/projects/{project_id}/cancel")

    page = (await api_without_worker.get("/api/v1/projects", params={"status": "cancelled"})).json()
    invalid = await api_without_worker.get("/api/v1/projects", params={"status": "done"})

    assert [item["id"] for item in page["items"]] == [project_id]
    assert invalid.status_code == 422


async def test_invalid_cursor_is_rejected(api_without_worker):
    response = await api_without_worker.get("/api/v1/projects", params={"cursor": "bogus"})

    assert response.status_code == 422
    assert "invalid cursor" in response.json()["detail"]


async def test_cancel_is_idempotent_and_final(api_without_worker):
    project_id = (await api_without_worker.post("/api/v1/projects", json={"brief": BRIEF})).json()["id"]

    first = await api_without_worker.post(f"/api/v1/projects/{project_id}/cancel")
    second = await api_without_worker.post(f"/api/v1/projects/{project_id}/cancel")
    project = (await api_without_worker.get(f"/api/v1/projects/{project_id}")).json()

    assert first.json()["status"] == second.json()["status"] == "cancelled"
    assert {task["status"] for task in project["tasks"]} == {"cancelled"}


async def test_cancel_of_completed_project_conflicts(api):
    project_id = (await api.post("/api/v1/projects", json={"brief": BRIEF})).json()["id"]
    await wait_for_status(api, project_id, "completed")

    response = await api.post(f"/api/v1/projects/{project_id}/cancel")

    assert response.status_code == 409
    assert "already completed" in response.json()["detail"]


async def test_health_ready_and_metrics(api_without_worker):
    health = await api_without_worker.get("/health")
    ready = await api_without_worker.get("/ready")
    metrics = await api_without_worker.get("/metrics")

    assert health.json() == {"status": "ok"}
    assert ready.json()["checks"] == {"database": "ok", "cache": "ok", "signals": "ok"}
    assert 'toronto_ai_tasks{status="ready"}' in metrics.text
    assert health.headers["x-request-id"]


async def test_request_id_is_propagated(api_without_worker):
    response = await api_without_worker.get("/health", headers={"X-Request-ID": "abc-123"})

    assert response.headers["x-request-id"] == "abc-123"


async def test_production_requires_api_key(database_url, tmp_path):
    settings = make_settings(
        database_url,
        tmp_path,
        TORONTO_AI_ENV="production",
        TORONTO_AI_LLM__ALLOW_OFFLINE_IN_PRODUCTION="true",
    )
    app, lifespan, client = await open_client(settings, embedded_worker=False)
    try:
        async with app.state.runtime.database.transaction() as connection:
            key = await create_api_key(connection, "test")

        missing = await client.get("/api/v1/projects")
        not_bearer = await client.get("/api/v1/projects", headers={"Authorization": key})
        wrong = await client.get("/api/v1/projects", headers={"Authorization": "Bearer tat_wrong"})
        right = await client.get("/api/v1/projects", headers={"Authorization": f"Bearer {key}"})
        metrics = await client.get("/metrics")
        health = await client.get("/health")
    finally:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)

    assert missing.status_code == 401
    assert "create-api-key" in missing.json()["detail"]
    assert not_bearer.status_code == 401
    assert "Bearer scheme" in not_bearer.json()["detail"]
    assert wrong.status_code == 401
    assert right.status_code == 200
    assert metrics.status_code == 401
    assert health.status_code == 200


async def test_production_on_sqlite_warns(database_url, tmp_path, caplog):
    settings = make_settings(
        database_url,
        tmp_path,
        TORONTO_AI_ENV="production",
        TORONTO_AI_LLM__ALLOW_OFFLINE_IN_PRODUCTION="true",
    )
    app, lifespan, client = await open_client(settings, embedded_worker=False)
    await client.aclose()
    await lifespan.__aexit__(None, None, None)

    warnings = [
        record for record in caplog.records if getattr(record, "action", "") == "config.sqlite_in_use"
    ]
    if database_url.startswith("sqlite"):
        assert [record.levelname for record in warnings] == ["WARNING"]
    else:
        assert warnings == []


async def test_docs_can_be_turned_off(database_url, tmp_path):
    settings = make_settings(database_url, tmp_path, TORONTO_AI_API__DOCS="false")
    app, lifespan, client = await open_client(settings, embedded_worker=False)
    try:
        statuses = {
            path: (await client.get(path)).status_code for path in ("/docs", "/redoc", "/openapi.json")
        }
        health = await client.get("/health")
    finally:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)

    assert statuses == {"/docs": 404, "/redoc": 404, "/openapi.json": 404}
    assert health.status_code == 200


async def test_docs_served_by_default(api_without_worker):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert (await api_without_worker.get(path)).status_code == 200, path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"brief": "\\ud800 build it"}', "unpaired surrogate"),
        (b'{"brief": "build \\u0000 it"}', "NUL character"),
        (b'{"brief": "build it", "title": "a\\u0000b"}', "NUL character"),
    ],
)
async def test_unstorable_text_is_rejected(api_without_worker, content, message):
    response = await api_without_worker.post(
        "/api/v1/projects", content=content, headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 422
    assert message in response.json()["detail"]


@pytest.mark.parametrize("project_id", ["%00", "x" * 300, "1' OR '1'='1", "..%2F..%2Fetc"])
async def test_malformed_id_is_404(api_without_worker, project_id):
    response = await api_without_worker.get(f"/api/v1/projects/{project_id}")

    assert response.status_code == 404


async def test_event_positions_are_bounded(api_without_worker):
    project_id = (await api_without_worker.post("/api/v1/projects", json={"brief": BRIEF})).json()["id"]

    huge_after = await api_without_worker.get(
        f"/api/v1/projects/{project_id}/events", params={"after": 2**31}
    )
    superscript = await api_without_worker.get(
        f"/api/v1/projects/{project_id}/events",
        headers={"Accept": "text/event-stream", "Last-Event-ID": "²".encode()},
    )
    too_large = await api_without_worker.get(
        f"/api/v1/projects/{project_id}/events",
        headers={"Accept": "text/event-stream", "Last-Event-ID": "99999999999999999999"},
    )

    assert huge_after.status_code == 422
    assert superscript.status_code == 422
    assert too_large.status_code == 422


async def test_chunked_body_over_limit_is_413(api):
    async def chunks():
        for _ in range(10):
            yield b"x" * 1000

    response = await api.post(
        "/api/v1/projects", content=chunks(), headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 413


async def test_chunked_body_within_limit_is_read(api):
    async def chunks():
        yield b'{"brief": '
        yield b'"# Demo\\n\\nBuild a small thing."}'

    response = await api.post(
        "/api/v1/projects", content=chunks(), headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 202
