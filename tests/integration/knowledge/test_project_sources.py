"""A project with a knowledge base, run by the offline provider through the API.

Every work task gets the passages most relevant to it, and the final report gets the passages
its tasks used, each task's best first. The task detail lists those passages under
``sources``, and the offline provider ends each output with a "### Sources" section that
quotes them as [n].
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from sqlalchemy import select

from app.db.models import chunks
from tests.integration.knowledge.helpers import DEPLOY_RUNBOOK, LEAVE_POLICY, create_and_ingest, open_api

BRIEF = """\
# Leave tracker

Build a small web page where employees see how many days of annual leave they have left,
and report a sick day to their manager. Deploy it like the billing service.
"""
TASK_TOP_K = 4
PROJECT_TIMEOUT_SECONDS = 60.0


@pytest.fixture
async def api(database_url, tmp_path):
    async with open_api(database_url, tmp_path, TORONTO_AI_KNOWLEDGE__TASK_TOP_K=str(TASK_TOP_K)) as api:
        yield api


async def run_project(client: httpx.AsyncClient, knowledge_base: str) -> dict:
    """Submit the brief with the knowledge base and return the project once it completed."""
    response = await client.post("/api/v1/projects", json={"brief": BRIEF, "knowledge_base": knowledge_base})
    assert response.status_code == 202, response.text
    project_id = response.json()["id"]

    deadline = time.monotonic() + PROJECT_TIMEOUT_SECONDS
    while True:
        project = (await client.get(f"/api/v1/projects/{project_id}")).json()
        if project["status"] == "completed":
            return project
        assert project["status"] not in ("failed", "cancelled"), project
        assert time.monotonic() < deadline, (
            f"project still {project['status']} after {PROJECT_TIMEOUT_SECONDS} s"
        )
        await asyncio.sleep(0.05)


def sources_section(output: str) -> list[str]:
    """Return the entries of the "### Sources" section that ends an offline output."""
    _, heading, section = output.rpartition("\n### Sources\n")
    assert heading, f"no Sources section in:\n{output}"
    return [line for line in section.splitlines() if line.startswith("- [")]


async def test_tasks_record_and_cite_sources(api):
    await create_and_ingest(api.client, "handbook", {"leave.md": LEAVE_POLICY, "deploy.md": DEPLOY_RUNBOOK})
    async with api.runtime.database.read() as connection:
        chunk_ids = set((await connection.execute(select(chunks.c.id))).scalars())

    project = await run_project(api.client, "handbook")

    assert project["knowledge_base"] == "handbook"
    work_tasks = [task for task in project["tasks"] if task["kind"] == "work"]
    report_tasks = [task for task in project["tasks"] if task["kind"] == "report"]
    assert len(report_tasks) == 1
    cited_by_tasks: list[dict] = []
    for task in work_tasks:
        response = await api.client.get(f"/api/v1/projects/{project['id']}/tasks/{task['id']}")
        detail = response.json()
        key = detail["key"]
        sources = detail["sources"]
        cited_by_tasks.extend(sources)

        assert [source["rank"] for source in sources] == list(range(1, TASK_TOP_K + 1)), key
        scores = [source["score"] for source in sources]
        assert scores == sorted(scores, reverse=True), key
        assert {source["source"] for source in sources} <= {"leave.md", "deploy.md"}, key
        assert {source["chunk_id"] for source in sources} <= chunk_ids, key
        prompt = detail["input"][-1]["content"]
        assert "# Knowledge" in prompt, key
        assert f"[1] {sources[0]['source']} ({sources[0]['heading']})" in prompt, key
        cited = sources_section(detail["output"])
        assert len(cited) == len(sources), key
        for entry, source in zip(cited, sources, strict=True):
            assert entry.startswith(f'- [{source["rank"]}] {source["source"]}, {source["heading"]}: "'), key

    report_detail = (
        await api.client.get(f"/api/v1/projects/{project['id']}/tasks/{report_tasks[0]['id']}")
    ).json()
    report_sources = report_detail["sources"]
    assert project["report"] == report_detail["output"]
    assert [source["rank"] for source in report_sources] == list(range(1, len(report_sources) + 1))
    # Every task's best passage first, then every task's second, and so on, each chunk once.
    expected: list[str] = []
    for source in sorted(cited_by_tasks, key=lambda item: (item["rank"], -item["score"], item["chunk_id"])):
        if source["chunk_id"] not in expected:
            expected.append(source["chunk_id"])
    assert [source["chunk_id"] for source in report_sources] == expected[: 2 * TASK_TOP_K]
    cited = sources_section(project["report"])
    assert len(cited) == len(report_sources)
    assert cited[0].startswith(f"- [1] {report_sources[0]['source']}")


async def test_source_with_space_is_cited(api):
    await create_and_ingest(api.client, "handbook", {"team handbook.md": LEAVE_POLICY})

    project = await run_project(api.client, "handbook")

    cited = sources_section(project["report"])
    assert cited[0].startswith("- [1] team handbook.md, Leave policy > ")
