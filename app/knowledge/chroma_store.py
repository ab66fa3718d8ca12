"""The vector store over partitions on Chroma servers.

The ``chunks`` table stays the record of every chunk and its vector, written in the caller's
transaction as the embedded store writes it. The same transaction then writes the vectors to
every layout of the knowledge base that takes writes (the active one, and one that a
repartitioning run is building), to every replica of each chunk's partition, in batches
within the server's max batch size. Chroma keeps only the vector and the source, for
filtering; a search hydrates the candidates from the database and ranks them by the exact
inner product with the query, then by chunk id, so that the ranking does not depend on how the
vectors are partitioned.

NOTE: a transaction that fails to commit after its Chroma writes leaves Chroma ahead of the
database. A search never returns such a vector, because it hydrates from the database, and
the next ingestion of the document or a repartitioning run, which compares every partition
with the database, puts the two back in line.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from app.core.config import VectorDbSettings
from app.db.engine import Database
from app.db.models import chunks, documents, knowledge_bases
from app.errors import VectorStoreError
from app.knowledge import layouts
from app.knowledge.chroma import ChromaInstances
from app.knowledge.layouts import Layout, LayoutStatus, partition_of
from app.knowledge.partitions import QueryDistributor
from app.knowledge.store import CHUNK_ROWS, ScoredChunk, SearchHits, StoredChunk, replace_chunk_rows

logger = logging.getLogger(__name__)

WRITABLE = (LayoutStatus.ACTIVE, LayoutStatus.BUILDING)


@dataclass(frozen=True, slots=True)
class VectorRecord:
    """The part of a chunk that a Chroma collection stores."""

    chunk_id: str
    vector: np.ndarray
    source: str
    document_id: str


class ChromaVectorStore:
    def __init__(
        self,
        database: Database,
        dimension: int,
        settings: VectorDbSettings,
        instances: ChromaInstances | None = None,
    ) -> None:
        self.database = database
        self.dimension = dimension
        self.settings = settings
        self.instances = instances or ChromaInstances(settings)
        self.distributor = QueryDistributor(self.instances, settings)
        self._layouts: dict[str, tuple[int, Layout | None]] = {}

    async def create_knowledge_base(self, connection: AsyncConnection, knowledge_base_id: str) -> None:
        """Give a new knowledge base an active layout of ``vector_db.partitions`` empty collections."""
        placement = self.settings.placement_for(self.settings.partitions)
        layout = await layouts.insert_layout(connection, knowledge_base_id, LayoutStatus.ACTIVE, placement)
        await self.create_collections(layout)

    async def create_collections(self, layout: Layout) -> None:
        """Create every partition's collection on each of its replicas, so that an empty one responds to queries."""
        await asyncio.gather(
            *(
                self.instances.collection(address, layout.collection(partition), create=True)
                for partition, replicas in enumerate(layout.placement)
                for address in replicas
            )
        )

    async def drop_collections(self, layout: Layout) -> list[str]:
        """Drop the layout's collections; return the addresses that could not be reached."""
        unreachable = []
        for partition, replicas in enumerate(layout.placement):
            for address in replicas:
                try:
                    await self.instances.drop_collection(address, layout.collection(partition))
                except VectorStoreError as exc:
                    logger.warning(
                        "dropping %s on %s failed: %s",
                        layout.collection(partition),
                        address,
                        exc,
                        extra={"action": "vector_db.drop_failed", "instance": address},
                    )
                    unreachable.append(address)
        return sorted(set(unreachable))

    async def write_document(
        self,
        connection: AsyncConnection,
        knowledge_base_id: str,
        document_id: str,
        items: Sequence[StoredChunk],
    ) -> None:
        await layouts.lock_knowledge_base(connection, knowledge_base_id)
        old_ids = set(
            await connection.scalars(select(chunks.c.id).where(chunks.c.document_id == document_id))
        )
        await replace_chunk_rows(connection, knowledge_base_id, document_id, items)
        source = await connection.scalar(select(documents.c.source).where(documents.c.id == document_id))
        records = [VectorRecord(item.id, item.vector, source or "", document_id) for item in items]
        stale = old_ids - {item.id for item in items}
        for layout in await layouts.list_layouts(connection, knowledge_base_id, WRITABLE):
            await self.upsert(layout, records)
            await self.delete_ids(layout, stale)

    async def delete_document(
        self, connection: AsyncConnection, knowledge_base_id: str, document_id: str
    ) -> None:
        await layouts.lock_knowledge_base(connection, knowledge_base_id)
        ids = set(await connection.scalars(select(chunks.c.id).where(chunks.c.document_id == document_id)))
        await replace_chunk_rows(connection, knowledge_base_id, document_id, [])
        for layout in await layouts.list_layouts(connection, knowledge_base_id, WRITABLE):
            await self.delete_ids(layout, ids)

    async def upsert(self, layout: Layout, records: Sequence[VectorRecord]) -> None:
        """Write records to every replica of their partitions, in batches the servers accept."""
        for partition, group in _by_partition(layout, (record.chunk_id for record in records), records):
            for address in layout.placement[partition]:
                collection = await self.instances.collection(
                    address, layout.collection(partition), create=True
                )
                size = min(self.settings.write_batch_size, await self.instances.max_batch_size(address))
                for start in range(0, len(group), size):
                    batch = group[start : start + size]
                    await self.instances.call(
                        address,
                        lambda collection=collection, batch=batch: collection.upsert(
                            ids=[record.chunk_id for record in batch],
                            embeddings=np.vstack([record.vector for record in batch]).astype(np.float32),
                            metadatas=[
                                {"source": record.source, "document_id": record.document_id}
                                for record in batch
                            ],
                        ),
                        action="upsert",
                    )

    async def delete_ids(self, layout: Layout, chunk_ids: Iterable[str]) -> None:
        ids = sorted(chunk_ids)
        for partition, group in _by_partition(layout, ids, ids):
            for address in layout.placement[partition]:
                collection = await self.instances.collection(
                    address, layout.collection(partition), create=True
                )
                size = await self.instances.max_batch_size(address)
                for start in range(0, len(group), size):
                    batch = group[start : start + size]
                    await self.instances.call(
                        address,
                        lambda collection=collection, batch=batch: collection.delete(ids=batch),
                        action="delete",
                    )

    async def search(
        self,
        knowledge_base_id: str,
        version: int,
        vector: np.ndarray,
        top_k: int,
        *,
        source: str | None = None,
    ) -> SearchHits:
        layout = await self.active_layout(knowledge_base_id, version)
        if layout is None:
            raise VectorStoreError(
                "this knowledge base has no vectors on the Chroma servers yet; copy them there with "
                "`python -m app.training.cli vector_db --partition-indices`"
            )
        # Take more than top_k so that duplicates collapsed below still leave top_k results.
        wanted = top_k * 2
        where = {"source": source} if source is not None else None
        found = await self.distributor.query(layout, vector, wanted, where)
        hits = await self._hydrate(knowledge_base_id, [c.chunk_id for c in found.candidates], vector, top_k)
        return SearchHits(hits, missing_partitions=found.missing_partitions)

    async def active_layout(self, knowledge_base_id: str, version: int) -> Layout | None:
        cached = self._layouts.get(knowledge_base_id)
        if cached is not None and cached[0] == version:
            return cached[1]
        async with self.database.read() as connection:
            # Read the version first: a layout read after it is never older than the version it
            # is tagged with, so a newer version always reloads.
            current = await connection.scalar(
                select(knowledge_bases.c.version).where(knowledge_bases.c.id == knowledge_base_id)
            )
            layout = await layouts.active_layout(connection, knowledge_base_id)
        self._layouts[knowledge_base_id] = (current or 0, layout)
        return layout

    async def _hydrate(
        self, knowledge_base_id: str, chunk_ids: list[str], vector: np.ndarray, top_k: int
    ) -> list[ScoredChunk]:
        if not chunk_ids:
            return []
        async with self.database.read() as connection:
            rows = (
                await connection.execute(
                    CHUNK_ROWS.where(
                        chunks.c.knowledge_base_id == knowledge_base_id, chunks.c.id.in_(chunk_ids)
                    )
                )
            ).all()
        query = np.asarray(vector, dtype=np.float32)
        scored = sorted(
            ((float(np.dot(np.frombuffer(row.embedding, dtype=np.float32), query)), row) for row in rows),
            key=lambda pair: (-pair[0], pair[1].id),
        )
        seen: set[str] = set()
        hits: list[ScoredChunk] = []
        for score, row in scored:
            if row.content_hash in seen:
                continue
            seen.add(row.content_hash)
            hits.append(ScoredChunk.from_row(row, score))
            if len(hits) == top_k:
                break
        return hits


def _by_partition(layout: Layout, keys: Iterable[str], values: Sequence) -> list[tuple[int, list]]:
    groups: dict[int, list] = defaultdict(list)
    for key, value in zip(keys, values, strict=True):
        groups[partition_of(key, layout.partitions)].append(value)
    return sorted(groups.items())
