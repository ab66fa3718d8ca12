"""The vector store interface and its embedded implementation.

``EmbeddedVectorStore`` keeps each chunk's vector in the ``chunks`` table, written in the
same transaction as the document it belongs to, so several local processes share it through
the database and a crash never leaves half a document. Each process keeps one in-memory
matrix per knowledge base, reloaded when the knowledge base's ``version``, which every
change increments, differs from the one it was loaded at.

A small base is searched exactly: a matrix-vector product over unit vectors, so recall is
1.0. From ``knowledge.ann_min_chunks`` chunks on, an HNSW graph (FAISS) built at load time
answers unfiltered queries instead, because the exact product reads the whole matrix for
every query (about 0.9 ms for 30,000 chunks on a 2-core machine, against about 0.1 ms for
the graph at recall@10 above 0.99; see docs/benchmarks.md). Queries filtered by source stay
exact.

``ChromaVectorStore`` (app/knowledge/chroma_store.py) implements the same interface over
partitions on Chroma servers; ``vector_db.provider`` chooses between them. With either, the
``chunks`` table stays the record of every chunk and its vector.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncConnection

from app.core.config import KnowledgeSettings
from app.db.engine import Database
from app.db.models import chunks, documents, knowledge_bases, task_sources, tasks
from app.db.records import utc_now
from app.db.states import TaskKind

# Every column a search result or a loaded index needs, one row per chunk with its document.
CHUNK_ROWS = select(
    chunks.c.id,
    chunks.c.document_id,
    chunks.c.position,
    chunks.c.heading,
    chunks.c.text,
    chunks.c.content_hash,
    chunks.c.embedding,
    documents.c.source,
    documents.c.metadata,
).join(documents, documents.c.id == chunks.c.document_id)


@dataclass(frozen=True, slots=True)
class StoredChunk:
    id: str
    position: int
    heading: str
    text: str
    token_count: int
    content_hash: str
    vector: np.ndarray


@dataclass(frozen=True, slots=True)
class ScoredChunk:
    chunk_id: str
    document_id: str
    source: str
    heading: str
    text: str
    position: int
    score: float
    metadata: dict[str, Any]

    @classmethod
    def from_row(cls, row: Any, score: float) -> ScoredChunk:
        """Build a result from a row of ``CHUNK_ROWS``."""
        return cls(
            chunk_id=row.id,
            document_id=row.document_id,
            source=row.source,
            heading=row.heading,
            text=row.text,
            position=row.position,
            score=score,
            metadata=row.metadata or {},
        )


class SearchHits(list[ScoredChunk]):
    """The chunks a search found, best first, and the partitions that did not respond.

    A partitioned store returns what the other partitions found when some partition has no
    replica that answers, and names the missing ones here, so that callers can tell a partial
    result from a complete one and must not cache it.
    """

    def __init__(self, hits: list[ScoredChunk] = (), missing_partitions: tuple[int, ...] = ()) -> None:
        super().__init__(hits)
        self.missing_partitions = missing_partitions


class VectorStore(Protocol):
    async def create_knowledge_base(self, connection: AsyncConnection, knowledge_base_id: str) -> None:
        """Prepare a new knowledge base's storage, inside the caller's transaction."""

    async def write_document(
        self,
        connection: AsyncConnection,
        knowledge_base_id: str,
        document_id: str,
        items: Sequence[StoredChunk],
    ) -> None:
        """Replace the chunks of a document, inside the caller's transaction."""

    async def delete_document(
        self, connection: AsyncConnection, knowledge_base_id: str, document_id: str
    ) -> None: ...

    async def search(
        self,
        knowledge_base_id: str,
        version: int,
        vector: np.ndarray,
        top_k: int,
        *,
        source: str | None = None,
    ) -> SearchHits:
        """Return the ``top_k`` chunks most similar to a unit ``vector``, best first."""


@dataclass(slots=True)
class _Index:
    version: int
    matrix: np.ndarray  # (chunks, dimension), unit rows
    ids: list[str]
    document_ids: list[str]
    sources: np.ndarray  # of str, for filtering
    headings: list[str]
    texts: list[str]
    positions: list[int]
    hashes: list[str]
    metadata: dict[str, dict[str, Any]]  # by document id
    graph: Any = None  # a faiss.IndexHNSWFlat over ``matrix``, for large bases


class EmbeddedVectorStore:
    def __init__(self, database: Database, dimension: int, settings: KnowledgeSettings | None = None) -> None:
        self.database = database
        self.dimension = dimension
        self.settings = settings or KnowledgeSettings()
        self._indexes: dict[str, _Index] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def create_knowledge_base(self, connection: AsyncConnection, knowledge_base_id: str) -> None:
        """Nothing to prepare: the chunks table is the embedded store's storage."""

    async def write_document(
        self,
        connection: AsyncConnection,
        knowledge_base_id: str,
        document_id: str,
        items: Sequence[StoredChunk],
    ) -> None:
        await replace_chunk_rows(connection, knowledge_base_id, document_id, items)

    async def delete_document(
        self, connection: AsyncConnection, knowledge_base_id: str, document_id: str
    ) -> None:
        await connection.execute(delete(chunks).where(chunks.c.document_id == document_id))

    async def search(
        self,
        knowledge_base_id: str,
        version: int,
        vector: np.ndarray,
        top_k: int,
        *,
        source: str | None = None,
    ) -> SearchHits:
        index = await self._index(knowledge_base_id, version)
        if not index.ids or top_k <= 0:
            return SearchHits()

        query = np.asarray(vector, dtype=np.float32)
        # Take more than top_k so that duplicates collapsed below still leave top_k results.
        wanted = min(len(index.ids), top_k * 2)

        if index.graph is not None and source is None:
            graph_scores, rows = index.graph.search(query.reshape(1, -1), wanted)
            ranked = [
                (int(row), float(score))
                for row, score in zip(rows[0], graph_scores[0], strict=True)
                if row >= 0
            ]
            return _collapse_duplicates(index, ranked, top_k)

        scores = index.matrix @ query
        if source is not None:
            scores = np.where(index.sources == source, scores, -np.inf)
        candidates = np.argpartition(-scores, wanted - 1)[:wanted]
        ordered = candidates[np.argsort(-scores[candidates], kind="stable")]
        return _collapse_duplicates(index, [(int(row), float(scores[row])) for row in ordered], top_k)

    def forget(self, knowledge_base_id: str) -> None:
        self._indexes.pop(knowledge_base_id, None)

    async def _index(self, knowledge_base_id: str, version: int) -> _Index:
        index = self._indexes.get(knowledge_base_id)
        if index is not None and index.version == version:
            return index
        lock = self._locks.setdefault(knowledge_base_id, asyncio.Lock())
        async with lock:
            index = self._indexes.get(knowledge_base_id)
            if index is None or index.version != version:
                index = await self._load(knowledge_base_id)
                self._indexes[knowledge_base_id] = index
        return index

    async def _load(self, knowledge_base_id: str) -> _Index:
        async with self.database.read() as connection:
            # The version is read before the chunks: data loaded later is never older
            # than the version it is tagged with, so a newer version always reloads.
            version = await connection.scalar(
                select(knowledge_bases.c.version).where(knowledge_bases.c.id == knowledge_base_id)
            )
            rows = (
                await connection.execute(
                    CHUNK_ROWS.where(chunks.c.knowledge_base_id == knowledge_base_id).order_by(
                        documents.c.source, chunks.c.position
                    )
                )
            ).all()

        matrix = np.zeros((len(rows), self.dimension), dtype=np.float32)
        for row_number, row in enumerate(rows):
            matrix[row_number] = np.frombuffer(row.embedding, dtype=np.float32)
        graph = None
        if len(rows) >= self.settings.ann_min_chunks:
            graph = await asyncio.to_thread(self._build_graph, matrix)
        return _Index(
            version=version or 0,
            matrix=matrix,
            ids=[row.id for row in rows],
            document_ids=[row.document_id for row in rows],
            sources=np.array([row.source for row in rows], dtype=object),
            headings=[row.heading for row in rows],
            texts=[row.text for row in rows],
            positions=[row.position for row in rows],
            hashes=[row.content_hash for row in rows],
            metadata={row.document_id: row.metadata or {} for row in rows},
            graph=graph,
        )

    def _build_graph(self, matrix: np.ndarray):
        import faiss

        graph = faiss.IndexHNSWFlat(self.dimension, self.settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = self.settings.hnsw_ef_construction
        graph.hnsw.efSearch = self.settings.hnsw_ef_search
        graph.add(matrix)
        return graph


async def replace_chunk_rows(
    connection: AsyncConnection, knowledge_base_id: str, document_id: str, items: Sequence[StoredChunk]
) -> None:
    """Replace a document's rows in the chunks table, vectors included."""
    await connection.execute(delete(chunks).where(chunks.c.document_id == document_id))
    if not items:
        return
    now = utc_now()
    await connection.execute(
        chunks.insert(),
        [
            {
                "id": item.id,
                "knowledge_base_id": knowledge_base_id,
                "document_id": document_id,
                "position": item.position,
                "heading": item.heading,
                "text": item.text,
                "token_count": item.token_count,
                "content_hash": item.content_hash,
                "embedding": np.asarray(item.vector, dtype=np.float32).tobytes(),
                "created_at": now,
            }
            for item in items
        ],
    )


def _collapse_duplicates(index: _Index, ranked: list[tuple[int, float]], top_k: int) -> SearchHits:
    """Keep the best of chunks with identical text, such as a licence footer in every document."""
    seen: set[str] = set()
    results = SearchHits()
    for row, score in ranked:
        if not np.isfinite(score) or index.hashes[row] in seen:
            continue
        seen.add(index.hashes[row])
        results.append(
            ScoredChunk(
                chunk_id=index.ids[row],
                document_id=index.document_ids[row],
                source=str(index.sources[row]),
                heading=index.headings[row],
                text=index.texts[row],
                position=index.positions[row],
                score=score,
                metadata=index.metadata.get(index.document_ids[row], {}),
            )
        )
        if len(results) == top_k:
            break
    return results


async def load_cited_chunks(connection: AsyncConnection, project_id: str, limit: int) -> list[ScoredChunk]:
    """Return the chunks the project's work tasks carried, at most ``limit``, for its report.

    Each task's best passage comes first, then each task's second, and so on, so that the
    report covers every part of the project before it adds more of one part. A chunk carried
    by several tasks appears once, with its best score. Chunks deleted since are skipped.
    """
    rows = (
        await connection.execute(
            CHUNK_ROWS.add_columns(task_sources.c.rank, task_sources.c.score.label("cited_score"))
            .join(task_sources, task_sources.c.chunk_id == chunks.c.id)
            .join(tasks, tasks.c.id == task_sources.c.task_id)
            .where(tasks.c.project_id == project_id, tasks.c.kind == TaskKind.WORK)
        )
    ).all()

    best: dict[str, tuple[int, float, Any]] = {}
    for row in rows:
        known = best.get(row.id)
        if known is None or (row.rank, -row.cited_score) < (known[0], -known[1]):
            best[row.id] = (row.rank, row.cited_score, row)
    ordered = sorted(best.values(), key=lambda entry: (entry[0], -entry[1], entry[2].id))
    return [ScoredChunk.from_row(row, score) for _, score, row in ordered[:limit]]
