"""The embedded vector store's two search paths, exact and HNSW, on random unit vectors."""

from __future__ import annotations

import numpy as np
import pytest

from app.core.config import KnowledgeSettings
from app.db.engine import Database
from app.db.migrate import upgrade
from app.knowledge import repository
from app.knowledge.ingestion import chunk_id
from app.knowledge.repository import NewDocument
from app.knowledge.store import EmbeddedVectorStore, StoredChunk
from tests.conftest import make_settings

DIMENSION = 32
CHUNKS = 2000
QUERIES = 100


@pytest.fixture
async def filled(database_url, tmp_path):
    """A knowledge base of one document whose chunks carry random unit vectors."""
    settings = make_settings(database_url, tmp_path)
    database = Database(settings.database)
    await upgrade(database)
    generator = np.random.default_rng(7)
    vectors = generator.normal(size=(CHUNKS, DIMENSION)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    store = EmbeddedVectorStore(database, DIMENSION)
    async with database.transaction() as connection:
        base = await repository.insert_knowledge_base(connection, "random", "", "test-model", DIMENSION)
        await repository.queue_documents(connection, base.id, [NewDocument("random.txt", "x")])
        document_id = (await repository.list_documents(connection, base.id, None, 1, None))[0].id
        items = [
            StoredChunk(
                chunk_id(base.id, "random.txt", row, str(row)), row, "", str(row), 1, str(row), vectors[row]
            )
            for row in range(CHUNKS)
        ]
        await store.write_document(connection, base.id, document_id, items)
        await repository.bump_version(connection, base.id)
        base = await repository.get_knowledge_base(connection, "random")

    queries = vectors[generator.choice(CHUNKS, QUERIES, replace=False)] + generator.normal(
        scale=0.05, size=(QUERIES, DIMENSION)
    ).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    yield database, base, vectors, queries
    await database.dispose()


def exact_top(vectors, query, top_k):
    return [str(row) for row in np.argsort(-(vectors @ query))[:top_k]]


async def test_exact_search_matches_brute_force(filled):
    database, base, vectors, queries = filled
    store = EmbeddedVectorStore(database, DIMENSION, KnowledgeSettings(ann_min_chunks=CHUNKS + 1))

    for query in queries:
        found = await store.search(base.id, base.version, query, 10)
        assert [hit.text for hit in found] == exact_top(vectors, query, 10)


async def test_hnsw_search_keeps_recall(filled):
    database, base, vectors, queries = filled
    store = EmbeddedVectorStore(database, DIMENSION, KnowledgeSettings(ann_min_chunks=1))

    hits = 0
    for query in queries:
        found = await store.search(base.id, base.version, query, 10)
        hits += len({hit.text for hit in found} & set(exact_top(vectors, query, 10)))
        assert [hit.score for hit in found] == sorted((hit.score for hit in found), reverse=True)

    assert hits / (10 * QUERIES) >= 0.95


async def test_source_filter_searches_exactly(filled):
    database, base, vectors, queries = filled
    store = EmbeddedVectorStore(database, DIMENSION, KnowledgeSettings(ann_min_chunks=1))

    found = await store.search(base.id, base.version, queries[0], 10, source="random.txt")
    nothing = await store.search(base.id, base.version, queries[0], 10, source="other.txt")

    assert [hit.text for hit in found] == exact_top(vectors, queries[0], 10)
    assert nothing == []
