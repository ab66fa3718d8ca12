"""The knowledge-base API in process, with an embedded worker, on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import httpx
import pytest
from sqlalchemy import update

from app.db.models import knowledge_bases
from app.knowledge import ingestion
from tests.integration.knowledge.helpers import (
    DEPLOY_RUNBOOK,
    LEAVE_POLICY,
    BrokenEmbedder,
    RecordingEmbedder,
    add_documents,
    create_and_ingest,
    open_api,
    wait_for_ingestion,
)

BASES = "/api/v1/knowledge-bases"
MAX_DOCUMENT_BYTES = 4096

OFFICE_BEFORE = """\
# Office

## Getting in

The front door opens with your badge from 6 am. Visitors sign in at the desk on the
ground floor and wait there for their host.

## Bicycles

The rooftop terrace opens at 7 am for cyclists, with racks for forty bicycles and two
showers on the floor below.

## Parking

The car park has twelve spaces, booked a day ahead on the facilities page.
"""

OFFICE_AFTER = """\
The office moved to 12 Harbour Street in May. The old building is closed, and the new one
has no car park or bicycle storage yet.
"""


@pytest.fixture
async def api(database_url, tmp_path):
    async with open_api(
        database_url, tmp_path, TORONTO_AI_KNOWLEDGE__MAX_DOCUMENT_BYTES=str(MAX_DOCUMENT_BYTES)
    ) as api:
        yield api


async def query(client: httpx.AsyncClient, name: str, text: str, **options) -> httpx.Response:
    return await client.post(f"{BASES}/{name}/query", json={"text": text, **options})


async def query_results(client: httpx.AsyncClient, name: str, text: str, **options) -> list[dict]:
    response = await query(client, name, text, **options)
    assert response.status_code == 200, response.text
    return response.json()["results"]


async def documents_by_source(client: httpx.AsyncClient, name: str) -> dict[str, dict]:
    response = await client.get(f"{BASES}/{name}/documents")
    assert response.status_code == 200, response.text
    return {document["source"]: document for document in response.json()}


async def post_escaped_json(client: httpx.AsyncClient, path: str, body: object) -> httpx.Response:
    """POST with every non-ASCII character escaped, so that unpaired surrogates reach the server."""
    return await client.post(
        path, content=json.dumps(body).encode("ascii"), headers={"Content-Type": "application/json"}
    )


async def test_create_and_read_counts(api):
    created = await api.client.post(BASES, json={"name": "handbook", "description": "Team rules"})

    assert created.status_code == 201
    body = created.json()
    assert body["name"] == "handbook"
    assert body["description"] == "Team rules"
    assert body["embedding_model"] == "all-MiniLM-L6-v2"
    assert body["dimension"] == 384
    assert body["version"] == 0
    assert body["documents"] == 0
    assert body["chunks"] == 0
    assert body["pending_documents"] == 0
    assert body["failed_documents"] == 0

    read = await api.client.get(f"{BASES}/handbook")
    listed = await api.client.get(BASES)

    assert read.status_code == 200
    assert read.json() == body
    assert [item["name"] for item in listed.json()] == ["handbook"]


async def test_duplicate_name_conflicts(api):
    first = await api.client.post(BASES, json={"name": "handbook"})
    second = await api.client.post(BASES, json={"name": "handbook", "description": "again"})

    assert first.status_code == 201
    assert second.status_code == 409
    assert "'handbook' already exists" in second.json()["detail"]


@pytest.mark.parametrize("name", ["", "two words", "-dash-first", "x" * 65, "a/b", "naïve"])
async def test_invalid_name_is_rejected(api, name):
    response = await api.client.post(BASES, json={"name": name})

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "body.name"
    assert "use 1 to 64 letters, digits" in response.json()["errors"][0]["message"]
    assert (await api.client.get(BASES)).json() == []


async def test_ingest_then_query_best_first(api):
    state = await create_and_ingest(
        api.client, "handbook", {"leave.md": LEAVE_POLICY, "deploy.md": DEPLOY_RUNBOOK}
    )

    assert state["documents"] == 2
    assert state["failed_documents"] == 0
    assert state["version"] == 2  # one increment per stored document
    documents = await documents_by_source(api.client, "handbook")
    assert {source: document["status"] for source, document in documents.items()} == {
        "leave.md": "ready",
        "deploy.md": "ready",
    }
    assert all(document["chunks"] > 0 for document in documents.values())
    assert sum(document["chunks"] for document in documents.values()) == state["chunks"]

    response = await query(api.client, "handbook", "How many vacation days do I get each year?", top_k=3)

    assert response.status_code == 200
    body = response.json()
    assert body["cached"] is False
    assert body["knowledge_base_version"] == state["version"]
    results = body["results"]
    assert 1 <= len(results) <= 3
    assert results[0]["source"] == "leave.md"
    assert "25 days" in results[0]["text"]
    assert results[0]["heading"] == "Leave policy > Annual leave"
    scores = [hit["score"] for hit in results]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 <= score <= 1.0 for score in scores)
    assert all(hit["source"] in documents for hit in results)
    assert all(hit["chunk_id"] and hit["position"] >= 0 for hit in results)


async def test_identical_query_is_cached(api):
    await create_and_ingest(api.client, "handbook", {"leave.md": LEAVE_POLICY, "deploy.md": DEPLOY_RUNBOOK})
    question = "Who do I tell when I am ill?"

    first = (await query(api.client, "handbook", question)).json()
    second = (await query(api.client, "handbook", question)).json()
    other_top_k = (await query(api.client, "handbook", question, top_k=1)).json()

    assert first["cached"] is False
    assert second["cached"] is True
    assert second["results"] == first["results"]
    assert other_top_k["cached"] is False
    assert other_top_k["results"] == first["results"][:1]


async def test_query_filters_by_source(api):
    await create_and_ingest(api.client, "handbook", {"leave.md": LEAVE_POLICY, "deploy.md": DEPLOY_RUNBOOK})

    results = await query_results(
        api.client, "handbook", "How many vacation days do I get?", top_k=10, source="deploy.md"
    )
    unknown_source = await query_results(api.client, "handbook", "vacation days", source="missing.md")

    assert results
    assert {hit["source"] for hit in results} == {"deploy.md"}
    assert unknown_source == []


async def test_changed_source_replaces_chunks(api):
    state = await create_and_ingest(api.client, "handbook", {"office.md": OFFICE_BEFORE})
    before = (await documents_by_source(api.client, "handbook"))["office.md"]

    accepted = await add_documents(api.client, "handbook", {"office.md": OFFICE_AFTER})
    replaced_state = await wait_for_ingestion(api.client, "handbook")
    after = (await documents_by_source(api.client, "handbook"))["office.md"]

    assert accepted == {"added": 0, "replaced": 1, "unchanged": 0}
    assert replaced_state["version"] > state["version"]
    assert after["status"] == "ready"
    assert before["chunks"] == 3
    assert after["chunks"] == 1
    assert replaced_state["chunks"] == 1
    results = await query_results(
        api.client, "handbook", "When can cyclists use the rooftop terrace?", top_k=10
    )
    assert results
    assert all("rooftop" not in hit["text"] for hit in results)
    assert "Harbour Street" in results[0]["text"]


async def test_unchanged_text_is_not_embedded_again(api):
    state = await create_and_ingest(api.client, "handbook", {"leave.md": LEAVE_POLICY})
    leave_before = (await documents_by_source(api.client, "handbook"))["leave.md"]
    recording = RecordingEmbedder(api.runtime.ingestor.embedder)
    api.runtime.ingestor.embedder = recording

    repeated = await add_documents(api.client, "handbook", {"leave.md": LEAVE_POLICY})
    repeated_state = (await api.client.get(f"{BASES}/handbook")).json()
    mixed = await add_documents(
        api.client, "handbook", {"leave.md": LEAVE_POLICY, "deploy.md": DEPLOY_RUNBOOK}
    )
    mixed_state = await wait_for_ingestion(api.client, "handbook")

    assert repeated == {"added": 0, "replaced": 0, "unchanged": 1}
    assert repeated_state["pending_documents"] == 0
    assert repeated_state["version"] == state["version"]
    assert mixed == {"added": 1, "replaced": 0, "unchanged": 1}
    assert mixed_state["version"] == state["version"] + 1
    # Only the new document reached the model: every chunk starts with its heading path.
    assert recording.texts
    assert all(text.startswith("Deploying the billing service") for text in recording.texts)
    leave_after = (await documents_by_source(api.client, "handbook"))["leave.md"]
    assert leave_after["ingested_at"] == leave_before["ingested_at"]


async def test_identical_chunks_are_embedded_once(api):
    await create_and_ingest(api.client, "handbook", {"leave.md": LEAVE_POLICY})
    recording = RecordingEmbedder(api.runtime.ingestor.embedder)
    api.runtime.ingestor.embedder = recording

    # The same text under two new sources: its chunks are stored already (under leave.md),
    # so nothing reaches the model, yet both sources get their own chunks.
    await add_documents(api.client, "handbook", {"copy-1.md": LEAVE_POLICY, "copy-2.md": LEAVE_POLICY})
    state = await wait_for_ingestion(api.client, "handbook")
    results = await query_results(api.client, "handbook", "How many vacation days do I get?", top_k=5)

    assert recording.texts == []
    assert state["documents"] == 3
    assert results[0]["text"].count("25 days") == 1


async def test_delete_document_removes_chunks(api):
    state = await create_and_ingest(
        api.client, "handbook", {"leave.md": LEAVE_POLICY, "deploy.md": DEPLOY_RUNBOOK}
    )
    deploy = (await documents_by_source(api.client, "handbook"))["deploy.md"]

    deleted = await api.client.delete(f"{BASES}/handbook/documents", params={"source": "leave.md"})
    after = (await api.client.get(f"{BASES}/handbook")).json()
    results = await query_results(api.client, "handbook", "How many vacation days do I get?", top_k=10)
    filtered = await query_results(api.client, "handbook", "vacation days", source="leave.md")
    again = await api.client.delete(f"{BASES}/handbook/documents", params={"source": "leave.md"})

    assert deleted.status_code == 204
    assert after["documents"] == 1
    assert after["chunks"] == deploy["chunks"]
    assert after["version"] > state["version"]
    assert list(await documents_by_source(api.client, "handbook")) == ["deploy.md"]
    assert {hit["source"] for hit in results} == {"deploy.md"}
    assert filtered == []
    assert again.status_code == 404
    assert "no document with source 'leave.md'" in again.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", f"{BASES}/missing", None),
        ("GET", f"{BASES}/missing/documents", None),
        ("POST", f"{BASES}/missing/documents", {"documents": [{"source": "a.md", "text": "Some text."}]}),
        ("POST", f"{BASES}/missing/query", {"text": "leave"}),
        ("DELETE", f"{BASES}/missing/documents?source=a.md", None),
    ],
)
async def test_unknown_knowledge_base_is_404(api, method, path, body):
    response = await api.client.request(method, path, json=body)

    assert response.status_code == 404
    assert "knowledge base 'missing' not found" in response.json()["detail"]


async def test_project_naming_unknown_base_is_422(api):
    response = await api.client.post(
        "/api/v1/projects",
        json={"brief": "# Leave\n\nSummarise the leave policy.", "knowledge_base": "missing"},
    )

    assert response.status_code == 422
    assert response.json()["detail"].startswith("knowledge_base: knowledge base 'missing' not found")


@pytest.mark.parametrize("top_k", [0, -1, 10000])
async def test_top_k_out_of_range_is_422(api, top_k):
    await api.client.post(BASES, json={"name": "handbook"})

    response = await query(api.client, "handbook", "vacation days", top_k=top_k)

    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith(f"top_k: {top_k} is outside 1 to 100")
    assert "knowledge.max_top_k" in detail


@pytest.mark.parametrize("top_k", [True, 2.5, "3"])
async def test_top_k_not_integer_is_422(api, top_k):
    await api.client.post(BASES, json={"name": "handbook"})

    response = await query(api.client, "handbook", "vacation days", top_k=top_k)

    assert response.status_code == 422
    assert "top_k: Input should be a valid integer" in response.json()["detail"]


@pytest.mark.parametrize("text", ["", "  \n\t "])
async def test_empty_query_is_422(api, text):
    await api.client.post(BASES, json={"name": "handbook"})

    response = await query(api.client, "handbook", text)

    assert response.status_code == 422
    assert "the query is empty" in response.json()["detail"]


VALID_DOCUMENT = {"source": "leave.md", "text": LEAVE_POLICY}


@pytest.mark.parametrize(
    ("documents", "message"),
    [
        pytest.param(
            [VALID_DOCUMENT, {"source": "a.md", "text": ""}], "'a.md': the text is empty", id="empty"
        ),
        pytest.param(
            [VALID_DOCUMENT, {"source": "a.md", "text": " \n\t "}],
            "'a.md': the text is empty",
            id="whitespace",
        ),
        pytest.param(
            [VALID_DOCUMENT, {"source": "a.md", "text": "before\x00after"}],
            "'a.md': the document contains NUL characters",
            id="nul",
        ),
        pytest.param(
            [VALID_DOCUMENT, {"source": "a.md", "text": "\ud800 half of a pair"}],
            "'a.md': the document contains unpaired surrogates",
            id="unpaired-surrogate",
        ),
        pytest.param(
            [VALID_DOCUMENT, {"source": "a.md", "text": "a" * (MAX_DOCUMENT_BYTES + 1)}],
            f"'a.md': {MAX_DOCUMENT_BYTES + 1} bytes, over the limit of {MAX_DOCUMENT_BYTES}",
            id="over-limit",
        ),
        # 2,049 characters, but 4,098 bytes in UTF-8: the limit counts bytes.
        pytest.param(
            [VALID_DOCUMENT, {"source": "a.md", "text": "é" * 2049}],
            f"'a.md': 4098 bytes, over the limit of {MAX_DOCUMENT_BYTES}",
            id="over-limit-in-bytes",
        ),
        pytest.param(
            [VALID_DOCUMENT, {"source": "leave.md", "text": "Another text."}],
            "'leave.md' appears twice in this request",
            id="duplicate-source",
        ),
        pytest.param(
            [VALID_DOCUMENT, {"source": "  ", "text": "Some text."}],
            "give a name of 1 to 1000 characters",
            id="blank-source",
        ),
        pytest.param([], "no documents given", id="empty-list"),
    ],
)
async def test_invalid_documents_store_nothing(api, documents, message):
    await api.client.post(BASES, json={"name": "handbook"})

    response = await post_escaped_json(api.client, f"{BASES}/handbook/documents", {"documents": documents})

    assert response.status_code == 422
    assert message in response.json()["detail"]
    state = (await api.client.get(f"{BASES}/handbook")).json()
    assert await documents_by_source(api.client, "handbook") == {}
    assert state["pending_documents"] == 0
    assert state["chunks"] == 0
    assert state["version"] == 0


async def test_failed_ingestion_keeps_previous_version(api, monkeypatch):
    monkeypatch.setattr(ingestion, "RETRY_DELAY_SECONDS", 0.05)
    await create_and_ingest(api.client, "handbook", {"leave.md": LEAVE_POLICY})
    model = api.runtime.ingestor.embedder
    broken = BrokenEmbedder(model)
    api.runtime.ingestor.embedder = broken
    longer_leave = LEAVE_POLICY.replace("25 days", "30 days")

    await add_documents(api.client, "handbook", {"leave.md": longer_leave, "deploy.md": DEPLOY_RUNBOOK})
    state = await wait_for_ingestion(api.client, "handbook")
    documents = await documents_by_source(api.client, "handbook")

    assert broken.calls >= ingestion.MAX_ATTEMPTS
    assert state["failed_documents"] == 2
    deploy = documents["deploy.md"]
    assert deploy["status"] == "failed"
    assert deploy["error"] == f"embedding failed: {BrokenEmbedder.message}"
    assert deploy["chunks"] == 0
    assert await query_results(api.client, "handbook", "How do I roll back?", source="deploy.md") == []
    leave = documents["leave.md"]
    assert leave["status"] == "failed"
    assert leave["error"] == f"embedding failed: {BrokenEmbedder.message}"
    # The chunks of the version ingested before the failure are still searchable.
    results = await query_results(api.client, "handbook", "How many days of annual leave do I get?")
    assert results[0]["source"] == "leave.md"
    assert "25 days" in results[0]["text"]
    assert all("30 days" not in hit["text"] for hit in results)

    api.runtime.ingestor.embedder = model
    retried = await add_documents(
        api.client, "handbook", {"leave.md": longer_leave, "deploy.md": DEPLOY_RUNBOOK}
    )
    recovered = await wait_for_ingestion(api.client, "handbook")
    results = await query_results(api.client, "handbook", "How many days of annual leave do I get?")

    assert retried == {"added": 0, "replaced": 2, "unchanged": 0}
    assert recovered["failed_documents"] == 0
    assert recovered["documents"] == 2
    assert "30 days" in results[0]["text"]


async def test_model_mismatch_is_refused(database_url, tmp_path):
    async with open_api(database_url, tmp_path, embedded_worker=False) as api:
        await api.client.post(BASES, json={"name": "handbook"})
        await add_documents(api.client, "handbook", {"leave.md": LEAVE_POLICY})
        # Stands in for a knowledge base built by a process configured with another model.
        async with api.runtime.database.transaction() as connection:
            await connection.execute(
                update(knowledge_bases)
                .where(knowledge_bases.c.name == "handbook")
                .values(embedding_model="other-model")
            )

        queried = await query(api.client, "handbook", "vacation days")
        added = await api.client.post(
            f"{BASES}/handbook/documents",
            json={"documents": [{"source": "deploy.md", "text": DEPLOY_RUNBOOK}]},
        )
        leased = await api.runtime.ingestor.claim("test-worker", 8)
        leased_sources = [document.source for document in leased]
        stored = await api.runtime.ingestor.process("test-worker", leased)
        documents = await documents_by_source(api.client, "handbook")

    assert queried.status_code == 409
    detail = queried.json()["detail"]
    assert "built with other-model (384 dimensions)" in detail
    assert "this process embeds with all-MiniLM-L6-v2" in detail
    assert "create a new knowledge base" in detail
    assert added.status_code == 409
    assert added.json()["detail"] == detail
    # The document queued before the change is refused by the worker, not embedded.
    assert leased_sources == ["leave.md"]
    assert stored == 0
    assert list(documents) == ["leave.md"]
    assert documents["leave.md"]["status"] == "failed"
    assert "embeds with other-model" in documents["leave.md"]["error"]
    assert "configured for all-MiniLM-L6-v2" in documents["leave.md"]["error"]


def client_seeing_500(api) -> httpx.AsyncClient:
    """A client that receives an unhandled error as a 500 response instead of the exception."""
    transport = httpx.ASGITransport(app=api.app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


@pytest.mark.parametrize(
    ("method", "path", "params"),
    [
        ("GET", f"{BASES}/a%00b", None),
        ("POST", f"{BASES}/a%00b/query", None),
        ("DELETE", f"{BASES}/handbook/documents", {"source": "a\x00b"}),
        ("GET", f"{BASES}/handbook/documents", {"after": "a\x00b"}),
    ],
    ids=["name", "name-in-query", "delete-source", "list-after"],
)
async def test_nul_in_name_or_parameter_is_not_500(api, method, path, params):
    await api.client.post(BASES, json={"name": "handbook"})
    body = {"text": "vacation days"} if method == "POST" else None

    async with client_seeing_500(api) as client:
        response = await client.request(method, path, params=params, json=body)

    assert response.status_code < 500, response.text


async def test_nul_in_description_is_422(api):
    async with client_seeing_500(api) as client:
        response = await client.post(BASES, json={"name": "handbook", "description": "team\x00rules"})

    assert response.status_code == 422, response.text


async def test_unpaired_surrogate_in_metadata_is_422(api):
    await api.client.post(BASES, json={"name": "handbook"})
    document = {"source": "leave.md", "text": LEAVE_POLICY, "metadata": {"owner": "\ud800"}}

    response = await post_escaped_json(api.client, f"{BASES}/handbook/documents", {"documents": [document]})

    assert response.status_code == 422, response.text


def long_document(number: int) -> str:
    """Return a Markdown document of about ten chunks whose texts no other document shares."""
    sections = [
        f"## Part {part}\n\n" + f"Document {number} describes step {part} of the rollout in detail. " * 25
        for part in range(10)
    ]
    return f"# Document {number}\n\n" + "\n\n".join(sections)


async def test_documents_stored_as_embedded(database_url, tmp_path):
    async with open_api(
        database_url, tmp_path, embedded_worker=False, TORONTO_AI_KNOWLEDGE__BATCH_SIZE="1"
    ) as api:
        await api.client.post(BASES, json={"name": "rollout"})
        await add_documents(
            api.client, "rollout", {f"doc-{number}.md": long_document(number) for number in range(3)}
        )
        leased = await api.runtime.ingestor.claim("test-worker", 8)
        embedder = api.runtime.ingestor.embedder
        ready_at_each_call: list[int] = []
        original_embed = embedder.embed

        async def recording_embed(texts):
            state = (await api.client.get(f"{BASES}/rollout")).json()
            ready_at_each_call.append(state["documents"])
            return await original_embed(texts)

        embedder.embed = recording_embed
        finished: list[int] = []
        try:
            stored = await api.runtime.ingestor.process("test-worker", leased, progress=finished.append)
        finally:
            embedder.embed = original_embed
        state = (await api.client.get(f"{BASES}/rollout")).json()

    assert len(leased) == 3
    assert stored == 3
    assert finished == [1, 1, 1]
    # With 8 texts per embedding call, each document needs more than one call, and the
    # first documents are searchable while the last one is still being embedded.
    assert ready_at_each_call[0] == 0
    assert ready_at_each_call[-1] == 2
    assert state["pending_documents"] == 0
    assert state["chunks"] > 3 * 8
