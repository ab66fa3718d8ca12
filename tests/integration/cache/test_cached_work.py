"""What the service caches, on a real Redis shared by two API instances in this process."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from app.db.models import llm_calls
from tests.integration.knowledge.helpers import (
    DEPLOY_RUNBOOK,
    LEAVE_POLICY,
    add_documents,
    create_and_ingest,
    open_api,
    wait_for_ingestion,
)

BRIEF = "# Expense reports\n\nLet staff photograph receipts and submit monthly expense reports."
FINAL_STATUSES = {"completed", "failed", "cancelled"}


async def run_project(client, brief: str = BRIEF) -> dict:
    response = await client.post("/api/v1/projects", json={"brief": brief})
    assert response.status_code == 202, response.text
    project_id = response.json()["id"]
    for _ in range(600):
        project = (await client.get(f"/api/v1/projects/{project_id}")).json()
        if project["status"] in FINAL_STATUSES:
            return project
        await asyncio.sleep(0.05)
    raise AssertionError(f"project {project_id} did not finish: {project['status']}")


async def calls_by_role(runtime, project_id: str) -> dict[str, list[bool]]:
    async with runtime.database.read() as connection:
        rows = await connection.execute(
            select(llm_calls.c.agent_role, llm_calls.c.cache_hit).where(llm_calls.c.project_id == project_id)
        )
        found: dict[str, list[bool]] = {}
        for role, cache_hit in rows:
            found.setdefault(role, []).append(bool(cache_hit))
    return found


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_model_responses_shared_and_recorded(database_url, tmp_path, redis_server, key_prefix):
    settings = {
        **redis_server.standalone_settings(key_prefix),
        "TORONTO_AI_CACHING__DISABLED_ROLES": '["developer"]',
    }
    async with open_api(database_url, tmp_path, **settings) as first:
        project = await run_project(first.client)
        first_calls = await calls_by_role(first.runtime, project["id"])
    # A second instance with its own process memory: only Redis can give it the responses.
    async with open_api(database_url, tmp_path, **settings) as second:
        repeated = await run_project(second.client)
        repeated_calls = await calls_by_role(second.runtime, repeated["id"])

    assert project["status"] == repeated["status"] == "completed"
    assert project["report"] == repeated["report"]
    assert not any(hit for hits in first_calls.values() for hit in hits)
    assert "developer" in repeated_calls
    for role, hits in repeated_calls.items():
        expected = role != "developer"
        assert hits == [expected] * len(hits), f"cache hits of {role}: {hits}"
    assert repeated["usage"]["cache_hits"] == sum(
        len(hits) for role, hits in repeated_calls.items() if role != "developer"
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_query_cache_invalidated_on_change(database_url, tmp_path, redis_server, key_prefix):
    settings = redis_server.standalone_settings(key_prefix)
    question = "What do I do on the first day I am ill?"
    async with (
        open_api(database_url, tmp_path, **settings) as first,
        open_api(database_url, tmp_path, embedded_worker=False, **settings) as second,
    ):
        await create_and_ingest(first.client, "handbook", {"leave.md": LEAVE_POLICY})
        before = (
            await first.client.post("/api/v1/knowledge-bases/handbook/query", json={"text": question})
        ).json()
        shared = (
            await second.client.post("/api/v1/knowledge-bases/handbook/query", json={"text": question})
        ).json()

        await add_documents(first.client, "handbook", {"deploy.md": DEPLOY_RUNBOOK})
        await wait_for_ingestion(first.client, "handbook")
        after = (
            await second.client.post(
                "/api/v1/knowledge-bases/handbook/query", json={"text": question, "top_k": 10}
            )
        ).json()
        after_again = (
            await first.client.post(
                "/api/v1/knowledge-bases/handbook/query", json={"text": question, "top_k": 10}
            )
        ).json()

    assert before["cached"] is False
    assert shared["cached"] is True
    assert shared["results"] == before["results"]
    assert after["cached"] is False
    assert after["knowledge_base_version"] > before["knowledge_base_version"]
    assert {hit["source"] for hit in after["results"]} == {"leave.md", "deploy.md"}
    assert after_again["cached"] is True
    assert after_again["results"] == after["results"]
