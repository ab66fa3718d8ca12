"""Partitions on real Chroma servers: exact merged results, repartitioning, stopped instances.

The three servers are the session's ``chroma_servers``; each test works in knowledge bases of
its own database, whose ids name the collections, so tests do not see each other's vectors.
"""

from __future__ import annotations

import asyncio
import json
import signal

import chromadb.errors
import numpy as np
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from app.cache import build_cache
from app.core.config import KnowledgeSettings
from app.db.engine import Database
from app.db.migrate import upgrade
from app.db.models import chunks
from app.errors import VectorStoreUnavailableError
from app.knowledge import layouts, repository
from app.knowledge.chroma import ChromaInstances
from app.knowledge.chroma_store import ChromaVectorStore
from app.knowledge.ingestion import chunk_id
from app.knowledge.layouts import LayoutStatus, partition_of
from app.knowledge.repartition import Repartitioner
from app.knowledge.repository import NewDocument
from app.knowledge.service import KnowledgeService
from app.knowledge.store import EmbeddedVectorStore, StoredChunk
from tests.conftest import make_settings
from tests.integration.knowledge.helpers import open_api

DIMENSION = 32
DOCUMENTS = 6
CHUNKS_PER_DOCUMENT = 100
QUERIES = 25
TOP_K = 10


def chroma_environment(servers, partitions: int, replicas: int) -> dict[str, str]:
    instances = [{"host": server.host, "port": server.port} for server in servers]
    return {
        "TORONTO_AI_VECTOR_DB__PROVIDER": "chroma",
        "TORONTO_AI_VECTOR_DB__INSTANCES": json.dumps(instances),
        "TORONTO_AI_VECTOR_DB__PARTITIONS": str(partitions),
        "TORONTO_AI_VECTOR_DB__REPLICAS": str(replicas),
        "TORONTO_AI_VECTOR_DB__RETRY_BACKOFF_SECONDS": "0.05",
        "TORONTO_AI_VECTOR_DB__MAX_RETRIES": "1",
        "TORONTO_AI_VECTOR_DB__WRITE_BATCH_SIZE": "64",
    }


class FixedEmbedder:
    """Maps each query text to a prepared unit vector, so tests query with known vectors."""

    model_name = "test-model"
    dimension = DIMENSION

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors

    async def embed(self, texts):
        return np.vstack([self.vectors[text] for text in texts])


async def fill(database: Database, store, name: str, seed: int) -> tuple[object, np.ndarray]:
    """Create knowledge base ``name`` with random unit vectors in several documents.

    Every tenth chunk repeats the text of the chunk before it, as a licence footer would, so that
    duplicates must collapse across partitions too.
    """
    generator = np.random.default_rng(seed)
    vectors = generator.normal(size=(DOCUMENTS * CHUNKS_PER_DOCUMENT, DIMENSION)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    async with database.transaction() as connection:
        base = await repository.insert_knowledge_base(connection, name, "", "test-model", DIMENSION)
        await store.create_knowledge_base(connection, base.id)
        sources = [f"doc-{number}.txt" for number in range(DOCUMENTS)]
        await repository.queue_documents(
            connection, base.id, [NewDocument(source, "x") for source in sources]
        )
        rows = await repository.list_documents(connection, base.id, None, DOCUMENTS, None)
    for document_number, row in enumerate(rows):
        items = []
        for position in range(CHUNKS_PER_DOCUMENT):
            row_number = document_number * CHUNKS_PER_DOCUMENT + position
            text = f"text {row_number - 1}" if row_number % 10 == 9 else f"text {row_number}"
            if row_number % 10 == 9:
                vectors[row_number] = vectors[row_number - 1]
            items.append(
                StoredChunk(
                    chunk_id(base.id, row.source, position, text),
                    position,
                    "",
                    text,
                    1,
                    repository.text_hash(text),
                    vectors[row_number],
                )
            )
        async with database.transaction() as connection:
            await store.write_document(connection, base.id, row.id, items)
            await repository.bump_version(connection, base.id)
    return base, vectors


def make_queries(vectors: np.ndarray, seed: int) -> np.ndarray:
    generator = np.random.default_rng(seed)
    queries = vectors[generator.choice(len(vectors), QUERIES, replace=False)]
    queries = queries + generator.normal(scale=0.3, size=queries.shape).astype(np.float32)
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


async def ranked(
    store,
    database: Database,
    knowledge_base_id: str,
    queries: np.ndarray,
    field: str = "chunk_id",
    *,
    concurrently: bool = False,
) -> list[list[str]]:
    """Return ``field`` of each query's hits, asserting that every partition responded.

    With ``concurrently``, every query is in flight at once, so the store coalesces them.
    """
    async with database.read() as connection:
        version = await layouts.knowledge_base_version(connection, knowledge_base_id)
    if concurrently:
        found = await asyncio.gather(
            *(store.search(knowledge_base_id, version, query, TOP_K) for query in queries)
        )
    else:
        found = [await store.search(knowledge_base_id, version, query, TOP_K) for query in queries]
    assert [hits.missing_partitions for hits in found] == [()] * len(queries)
    return [[getattr(hit, field) for hit in hits] for hits in found]


def partition_requests() -> tuple[float, float]:
    """Return how many requests went to partitions so far, and how many queries they carried."""
    requests = REGISTRY.get_sample_value("toronto_ai_vector_partition_query_batch_size_count") or 0.0
    queries = REGISTRY.get_sample_value("toronto_ai_vector_partition_query_batch_size_sum") or 0.0
    return requests, queries


async def stored_ids(instances: ChromaInstances, layout) -> dict[tuple[str, int], set[str]]:
    """Return the ids held by each replica of each partition of ``layout``."""
    held = {}
    for partition, replicas in enumerate(layout.placement):
        for address in replicas:
            collection = await instances.collection(address, layout.collection(partition), create=False)
            page = await collection.get(include=[])
            held[(address, partition)] = set(page["ids"])
    return held


async def chunk_ids(connection, knowledge_base_id: str) -> set[str]:
    return set(
        await connection.scalars(select(chunks.c.id).where(chunks.c.knowledge_base_id == knowledge_base_id))
    )


@pytest.fixture
async def database(database_url, tmp_path):
    settings = make_settings(database_url, tmp_path)
    database = Database(settings.database)
    await upgrade(database)
    yield database
    await database.dispose()


async def test_repartitioning_keeps_every_vector_and_result(database, tmp_path, database_url, chroma_servers):
    settings = make_settings(database_url, tmp_path, **chroma_environment(chroma_servers, 1, 1))
    store = ChromaVectorStore(database, DIMENSION, settings.vector_db)
    base, vectors = await fill(database, store, "random", seed=11)
    queries = make_queries(vectors, seed=12)
    exact = EmbeddedVectorStore(database, DIMENSION, KnowledgeSettings(ann_min_chunks=10**6))
    # Twins of identical text tie exactly; the stores keep different ones, so compare texts.
    assert await ranked(store, database, base.id, queries, "text") == await ranked(
        exact, database, base.id, queries, "text"
    )
    expected = await ranked(store, database, base.id, queries)

    async with database.read() as connection:
        all_ids = await chunk_ids(connection, base.id)
    repartitioner = Repartitioner(database, store, settings.vector_db, batch_size=100)
    for partitions, previous in ((4, 1), (2, 4)):
        async with database.read() as connection:
            old = await layouts.active_layout(connection, base.id)

        outcome = await repartitioner.repartition(base, partitions)

        assert outcome.action == "repartitioned"
        assert outcome.previous_partitions == previous
        assert outcome.vectors == len(all_ids)
        async with database.read() as connection:
            new = await layouts.active_layout(connection, base.id)
            statuses = {
                layout.version: layout.status for layout in await layouts.list_layouts(connection, base.id)
            }
        assert new.partitions == partitions
        assert statuses[old.version] == LayoutStatus.DELETED
        held = await stored_ids(store.instances, new)
        for (address, partition), ids in held.items():
            assert ids == {chunk for chunk in all_ids if partition_of(chunk, partitions) == partition}, (
                address
            )
        assert set().union(*held.values()) == all_ids
        for partition, replicas in enumerate(old.placement):
            for address in replicas:
                with pytest.raises(chromadb.errors.NotFoundError):
                    client = await store.instances.client(address)
                    await client.get_collection(old.collection(partition))
        assert await ranked(store, database, base.id, queries) == expected

    again = await repartitioner.repartition(base, 2)
    assert again.action == "unchanged"


async def test_writes_reach_a_layout_being_built(database, tmp_path, database_url, chroma_servers):
    settings = make_settings(database_url, tmp_path, **chroma_environment(chroma_servers, 2, 0))
    store = ChromaVectorStore(database, DIMENSION, settings.vector_db)
    base, vectors = await fill(database, store, "moving", seed=21)
    async with database.transaction() as connection:
        building = await layouts.insert_layout(
            connection, base.id, LayoutStatus.BUILDING, settings.vector_db.placement_for(3)
        )
    await store.create_collections(building)

    # A document replaced while the new layout is built: its new chunks go to both layouts,
    # and its old ones leave both.
    async with database.read() as connection:
        document = (await repository.list_documents(connection, base.id, None, 1, None))[0]
        old_ids = await chunk_ids(connection, base.id)
    replacement = [
        StoredChunk(
            chunk_id(base.id, document.source, 0, "new"),
            0,
            "",
            "new",
            1,
            repository.text_hash("new"),
            vectors[0],
        )
    ]
    async with database.transaction() as connection:
        await store.write_document(connection, base.id, document.id, replacement)
        await repository.bump_version(connection, base.id)

    async with database.read() as connection:
        active = await layouts.active_layout(connection, base.id)
        current_ids = await chunk_ids(connection, base.id)
    assert set().union(*(await stored_ids(store.instances, active)).values()) == current_ids
    assert set().union(*(await stored_ids(store.instances, building)).values()) == {replacement[0].id}
    assert not old_ids & set().union(*(await stored_ids(store.instances, building)).values())

    outcome = await Repartitioner(database, store, settings.vector_db).repartition(base, 3)

    assert outcome.resumed_from == 0
    async with database.read() as connection:
        layout = await layouts.active_layout(connection, base.id)
    assert layout.version == building.version
    assert set().union(*(await stored_ids(store.instances, layout)).values()) == current_ids


async def test_stopped_instance_uses_replicas_or_reports(database, tmp_path, database_url, chroma_servers):
    replicated = make_settings(database_url, tmp_path, **chroma_environment(chroma_servers, 3, 1))
    single = make_settings(database_url, tmp_path, **chroma_environment(chroma_servers, 3, 0))
    replicated_store = ChromaVectorStore(database, DIMENSION, replicated.vector_db)
    single_store = ChromaVectorStore(database, DIMENSION, single.vector_db)
    replicated_base, vectors = await fill(database, replicated_store, "replicated", seed=31)
    single_base, _ = await fill(database, single_store, "single", seed=31)
    queries = make_queries(vectors, seed=32)
    expected = await ranked(replicated_store, database, replicated_base.id, queries)
    question = {"where is it": queries[0]}
    service = KnowledgeService(
        database, FixedEmbedder(question), single_store, single.knowledge, build_cache(single)
    )
    complete = await service.query("single", "where is it", 30)
    stopped = chroma_servers[0]
    async with database.read() as connection:
        single_layout = await layouts.active_layout(connection, single_base.id)
    lost = [
        partition for partition, replicas in enumerate(single_layout.placement) if stopped.address in replicas
    ]

    stopped.stop()
    try:
        assert await ranked(replicated_store, database, replicated_base.id, queries) == expected

        partial = await service.query("single", "where is it", 5)
        repeated = await service.query("single", "where is it", 5)

        assert partial.missing_partitions == tuple(lost)
        assert len(partial.results) == 5
        assert all(partition_of(hit.chunk_id, 3) not in lost for hit in partial.results)
        assert {hit.text for hit in partial.results} <= {hit.text for hit in complete.results}
        assert repeated.cached is False
        assert repeated.missing_partitions == tuple(lost)
        with pytest.raises(VectorStoreUnavailableError, match=stopped.address):
            async with database.transaction() as connection:
                document = (await repository.list_documents(connection, single_base.id, None, 1, None))[0]
                await single_store.write_document(connection, single_base.id, document.id, [])
    finally:
        stopped.start()

    recovered = await service.query("single", "where is it", 5)
    assert recovered.missing_partitions == ()
    assert [hit.chunk_id for hit in recovered.results] == [hit.chunk_id for hit in complete.results[:5]]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_query_api_lists_missing_partitions(database_url, tmp_path, chroma_servers):
    environment = chroma_environment(chroma_servers[:1], 2, 0)
    async with open_api(database_url, tmp_path, embedded_worker=False, **environment) as api:
        created = await api.client.post("/api/v1/knowledge-bases", json={"name": "outage"})
        assert created.status_code == 201, created.text
        ready = await api.client.get("/ready")
        chroma_servers[0].stop()
        try:
            response = await api.client.post(
                "/api/v1/knowledge-bases/outage/query", json={"text": "anything", "top_k": 3}
            )
            not_ready = await api.client.get("/ready")
            metrics = await api.client.get("/metrics")
        finally:
            chroma_servers[0].start()

    assert response.status_code == 200, response.text
    assert response.json()["missing_partitions"] == [0, 1]
    assert response.json()["results"] == []
    assert ready.json()["checks"]["vector_store"] == "ok"
    assert not_ready.status_code == 503
    assert (
        not_ready.json()["checks"]["vector_store"]
        == f"failed: Chroma {chroma_servers[0].address} unreachable"
    )
    assert (
        f'toronto_ai_vector_partition_query_seconds_count{{instance="{chroma_servers[0].address}",'
        'outcome="unavailable",partition="1"}'
    ) in metrics.text


async def test_concurrent_queries_match_one_at_a_time(database, tmp_path, database_url, chroma_servers):
    settings = make_settings(database_url, tmp_path, **chroma_environment(chroma_servers, 3, 0))
    store = ChromaVectorStore(database, DIMENSION, settings.vector_db)
    base, vectors = await fill(database, store, "coalesced", seed=51)
    queries = make_queries(vectors, seed=52)
    async with database.read() as connection:
        layout = await layouts.active_layout(connection, base.id)
    sent = QUERIES * layout.partitions

    before = partition_requests()
    alone = [await store.distributor.query(layout, query, TOP_K) for query in queries]
    between = partition_requests()
    together = await asyncio.gather(*(store.distributor.query(layout, query, TOP_K) for query in queries))
    after = partition_requests()

    # A query with nothing else in flight goes out alone, at once, to every partition.
    assert between[0] - before[0] == sent
    assert between[1] - before[1] == sent
    # Concurrent queries share requests, and the results split per query are the same.
    assert after[0] - between[0] < sent
    assert after[1] - between[1] == sent
    assert [result.missing_partitions for result in together] == [()] * QUERIES
    assert together == alone
    assert await ranked(store, database, base.id, queries, concurrently=True) == await ranked(
        store, database, base.id, queries
    )


async def test_failed_batch_uses_replicas_or_reports(database, tmp_path, database_url, chroma_servers):
    replicated = make_settings(database_url, tmp_path, **chroma_environment(chroma_servers, 3, 1))
    single = make_settings(database_url, tmp_path, **chroma_environment(chroma_servers, 3, 0))
    replicated_store = ChromaVectorStore(database, DIMENSION, replicated.vector_db)
    single_store = ChromaVectorStore(database, DIMENSION, single.vector_db)
    replicated_base, vectors = await fill(database, replicated_store, "batch-replicated", seed=61)
    single_base, _ = await fill(database, single_store, "batch-single", seed=61)
    queries = make_queries(vectors, seed=62)
    expected = await ranked(replicated_store, database, replicated_base.id, queries)
    async with database.read() as connection:
        single_layout = await layouts.active_layout(connection, single_base.id)
    stopped = chroma_servers[0]
    lost = tuple(
        partition for partition, replicas in enumerate(single_layout.placement) if stopped.address in replicas
    )
    failures_before = failures_of(stopped.address)

    stopped.stop()
    try:
        before = partition_requests()
        found = await ranked(replicated_store, database, replicated_base.id, queries, concurrently=True)
        partial = await asyncio.gather(
            *(single_store.distributor.query(single_layout, query, TOP_K) for query in queries)
        )
        after = partition_requests()
    finally:
        stopped.start()

    assert found == expected
    assert after[0] - before[0] < after[1] - before[1]  # some requests carried several queries
    assert [result.missing_partitions for result in partial] == [lost] * QUERIES
    assert all(candidate.partition not in lost for result in partial for candidate in result.candidates)
    assert failures_of(stopped.address) > failures_before


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_frozen_instance_times_out_to_replica(database, tmp_path, database_url, chroma_servers):
    environment = chroma_environment(chroma_servers, 3, 1)
    environment["TORONTO_AI_VECTOR_DB__QUERY_TIMEOUT_SECONDS"] = "0.5"
    settings = make_settings(database_url, tmp_path, **environment)
    store = ChromaVectorStore(database, DIMENSION, settings.vector_db)
    base, vectors = await fill(database, store, "frozen", seed=41)
    queries = make_queries(vectors, seed=42)[:5]
    expected = await ranked(store, database, base.id, queries)
    frozen = chroma_servers[1]
    timeouts_before = failures_of(frozen.address)

    # SIGSTOP keeps the server's connections open but unanswered, as a server stuck in a
    # long pause would.
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        found = await ranked(store, database, base.id, queries)
    finally:
        frozen.process.send_signal(signal.SIGCONT)

    assert found == expected
    assert failures_of(frozen.address) > timeouts_before


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_frozen_instance_fails_whole_batch_over(database, tmp_path, database_url, chroma_servers):
    environment = chroma_environment(chroma_servers, 3, 1)
    environment["TORONTO_AI_VECTOR_DB__QUERY_TIMEOUT_SECONDS"] = "0.5"
    settings = make_settings(database_url, tmp_path, **environment)
    store = ChromaVectorStore(database, DIMENSION, settings.vector_db)
    base, vectors = await fill(database, store, "frozen-batch", seed=71)
    queries = make_queries(vectors, seed=72)[:5]
    async with database.read() as connection:
        layout = await layouts.active_layout(connection, base.id)
    expected = [
        [candidate.chunk_id for candidate in (await store.distributor.query(layout, query, TOP_K)).candidates]
        for query in queries
    ]
    frozen = chroma_servers[1]
    failures_before = failures_of(frozen.address)

    # Each round sends one request per partition carrying all five queries. The replicas are
    # taken in turn, so one of two rounds sends its requests to the frozen server first.
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        rounds = [
            await asyncio.gather(*(store.distributor.query(layout, query, TOP_K) for query in queries))
            for _ in range(2)
        ]
    finally:
        frozen.process.send_signal(signal.SIGCONT)

    assert failures_of(frozen.address) > failures_before
    for found in rounds:
        assert [result.missing_partitions for result in found] == [()] * len(queries)
        assert [[candidate.chunk_id for candidate in result.candidates] for result in found] == expected


def failures_of(address: str) -> float:
    """Return how many partition queries to ``address`` ended unavailable, over partitions 0 to 2."""
    return sum(
        REGISTRY.get_sample_value(
            "toronto_ai_vector_partition_query_seconds_count",
            {"partition": str(partition), "instance": address, "outcome": "unavailable"},
        )
        or 0.0
        for partition in range(3)
    )
