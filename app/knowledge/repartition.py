"""Repartitioning a knowledge base's vectors onto a new layout while it stays queryable.

A run builds a new layout beside the active one, which keeps serving queries:

1. insert a ``building`` layout and create its collections;
2. copy every chunk's vector from the database, in chunk-id order and in batches, recording
   the last id copied after each batch in the same database, so that a killed run resumes
   there (writes are upserts by chunk id, so a batch copied twice is stored once);
3. verify each replica of each partition against the database by count and by a checksum of
   ids and vector bytes, repairing any difference (a vector missing, changed or left over);
4. switch in one transaction: the building layout becomes ``active``, the old one ``retired``,
   and the knowledge base's version grows, so every process reloads its layout;
5. drop the retired layout's collections.

Ingestion keeps running meanwhile: its writes go to both layouts (see ``ChromaVectorStore``),
and the switch happens only if the knowledge base's version did not change since the last
verification, under the row lock that writers take, so no write is lost in between.

A run that finds a building layout of another partition count or placement rolls it back
(drops its collections) before it starts; ``rollback()`` does only that.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from sqlalchemy import Row, func, select

from app.core.config import VectorDbSettings
from app.db.engine import Database
from app.db.models import chunks, documents
from app.errors import VectorStoreError
from app.knowledge import layouts
from app.knowledge.chroma_store import ChromaVectorStore, VectorRecord
from app.knowledge.layouts import Layout, LayoutStatus, partition_of
from app.knowledge.repository import bump_version

logger = logging.getLogger(__name__)

MAX_VERIFY_ROUNDS = 5
CHECKSUM_MODULUS = 2**64
VERIFY_PAGE_SIZE = 1000  # vectors read back from Chroma per request
RETIRE_GRACE_SECONDS = 1.0  # lets queries that read the old layout just before the switch finish


class Progress(Protocol):
    def update(self, count: int) -> None: ...

    def close(self) -> None: ...


ProgressFactory = Callable[[str, int, int], Progress]  # (description, total, initial)


@dataclass
class Outcome:
    knowledge_base: str
    action: str  # repartitioned, unchanged, rolled back, nothing to roll back
    partitions: int
    previous_partitions: int | None = None
    vectors: int = 0
    resumed_from: int = 0
    repaired: int = 0
    leftover_instances: list[str] = field(default_factory=list)


def digest(chunk_id: str, embedding: bytes) -> int:
    """Return a record's share of a partition's checksum: 8 bytes of SHA-256 of its id and vector."""
    return int.from_bytes(hashlib.sha256(chunk_id.encode("utf-8") + b"\x00" + embedding).digest()[:8], "big")


class Repartitioner:
    def __init__(
        self,
        database: Database,
        store: ChromaVectorStore,
        settings: VectorDbSettings,
        *,
        batch_size: int | None = None,
        progress: ProgressFactory | None = None,
    ) -> None:
        self.database = database
        self.store = store
        self.settings = settings
        self.batch_size = batch_size or settings.write_batch_size
        self.progress = progress

    async def repartition(self, knowledge_base: Row, partitions: int) -> Outcome:
        """Move ``knowledge_base`` onto ``partitions`` partitions placed as the settings define."""
        placement = self.settings.placement_for(partitions)
        outcome = Outcome(knowledge_base.name, "repartitioned", partitions)
        await self._finish_retired(knowledge_base.id, outcome)

        async with self.database.read() as connection:
            current = await layouts.list_layouts(
                connection, knowledge_base.id, (LayoutStatus.ACTIVE, LayoutStatus.BUILDING)
            )
        active = next((layout for layout in current if layout.status == LayoutStatus.ACTIVE), None)
        building = next((layout for layout in current if layout.status == LayoutStatus.BUILDING), None)
        outcome.previous_partitions = active.partitions if active else None

        if building is not None and _placement(building) != placement:
            await self._roll_back(knowledge_base.name, building)
            building = None
        if building is None:
            if active is not None and _placement(active) == placement:
                outcome.action = "unchanged"
                return outcome
            async with self.database.transaction() as connection:
                building = await layouts.insert_layout(
                    connection, knowledge_base.id, LayoutStatus.BUILDING, placement
                )
            logger.info(
                "building layout %d of %s with %d partitions",
                building.version,
                knowledge_base.name,
                partitions,
                extra={"action": "vector_db.layout_building", "knowledge_base": knowledge_base.name},
            )
        else:
            outcome.resumed_from = building.copied
            logger.info(
                "resuming layout %d of %s after %d vectors",
                building.version,
                knowledge_base.name,
                building.copied,
                extra={"action": "vector_db.layout_resumed", "knowledge_base": knowledge_base.name},
            )

        await self.store.create_collections(building)
        outcome.vectors = await self._copy(knowledge_base.name, building)
        outcome.repaired = await self._verify_and_switch(knowledge_base.name, building)
        await self._finish_retired(knowledge_base.id, outcome, grace=True)
        return outcome

    async def rollback(self, knowledge_base: Row) -> Outcome:
        """Drop the collections of an interrupted run's building layout, if there is one."""
        async with self.database.read() as connection:
            building = await layouts.list_layouts(connection, knowledge_base.id, (LayoutStatus.BUILDING,))
            active = await layouts.active_layout(connection, knowledge_base.id)
        partitions = active.partitions if active else 0
        if not building:
            return Outcome(knowledge_base.name, "nothing to roll back", partitions, partitions)
        for layout in building:
            await self._roll_back(knowledge_base.name, layout)
        return Outcome(knowledge_base.name, "rolled back", partitions, partitions)

    async def _copy(self, name: str, layout: Layout) -> int:
        async with self.database.read() as connection:
            total = await connection.scalar(
                select(func.count())
                .select_from(chunks)
                .where(chunks.c.knowledge_base_id == layout.knowledge_base_id)
            )
        copied, after = layout.copied, layout.copied_through
        bar = self.progress(f"copying {name}", total or 0, min(copied, total or 0)) if self.progress else None
        try:
            while rows := await self._read_chunks(layout.knowledge_base_id, after, self.batch_size):
                await self.store.upsert(layout, [_record(row) for row in rows])
                after = rows[-1].id
                copied += len(rows)
                async with self.database.transaction() as connection:
                    await layouts.record_progress(connection, layout.id, after, copied)
                if bar is not None:
                    bar.update(len(rows))
        finally:
            if bar is not None:
                bar.close()
        return total or 0

    async def _read_chunks(self, knowledge_base_id: str, after: str | None, limit: int) -> list[Row]:
        query = (
            select(chunks.c.id, chunks.c.document_id, chunks.c.embedding, documents.c.source)
            .join(documents, documents.c.id == chunks.c.document_id)
            .where(chunks.c.knowledge_base_id == knowledge_base_id)
            .order_by(chunks.c.id)
            .limit(limit)
        )
        if after is not None:
            query = query.where(chunks.c.id > after)
        async with self.database.read() as connection:
            return list(await connection.execute(query))

    async def _verify_and_switch(self, name: str, building: Layout) -> int:
        repaired_total = 0
        for _ in range(MAX_VERIFY_ROUNDS):
            async with self.database.read() as connection:
                version = await layouts.knowledge_base_version(connection, building.knowledge_base_id)
            repaired = await self._verify(name, building)
            repaired_total += repaired
            if repaired:
                continue  # verify the repairs too
            async with self.database.transaction() as connection:
                current = await layouts.lock_knowledge_base(connection, building.knowledge_base_id)
                if current != version:
                    continue  # a write landed during verification; verify again
                statuses = {
                    layout.id: layout.status
                    for layout in await layouts.list_layouts(connection, building.knowledge_base_id)
                }
                if statuses.get(building.id) != LayoutStatus.BUILDING:
                    raise VectorStoreError(
                        f"{name}: layout {building.version} is {statuses.get(building.id)}, no longer building; "
                        "another run switched or rolled it back, so this one stops"
                    )
                for layout_id, status in statuses.items():
                    if status == LayoutStatus.ACTIVE:
                        await layouts.set_status(connection, layout_id, LayoutStatus.RETIRED)
                await layouts.set_status(connection, building.id, LayoutStatus.ACTIVE)
                await bump_version(connection, building.knowledge_base_id)
            logger.info(
                "switched %s to layout %d with %d partitions",
                name,
                building.version,
                building.partitions,
                extra={"action": "vector_db.layout_switched", "knowledge_base": name},
            )
            return repaired_total
        raise VectorStoreError(
            f"{name}: the knowledge base changed during each of {MAX_VERIFY_ROUNDS} verifications; run the "
            "command again, when ingestion is quieter, to resume"
        )

    async def _verify(self, name: str, layout: Layout) -> int:
        """Compare every replica with the database; repair and return the count of differences."""
        expected = await self._expected_digests(layout)
        repaired = 0
        for partition, replicas in enumerate(layout.placement):
            wanted = expected.get(partition, {})
            for address in replicas:
                stored = await self._stored_digests(address, layout.collection(partition))
                count_ok = len(stored) == len(wanted)
                checksum_ok = (
                    sum(stored.values()) % CHECKSUM_MODULUS == sum(wanted.values()) % CHECKSUM_MODULUS
                )
                if count_ok and checksum_ok and stored == wanted:
                    continue
                stale = [chunk_id for chunk_id in stored if chunk_id not in wanted]
                absent = [chunk_id for chunk_id, value in wanted.items() if stored.get(chunk_id) != value]
                logger.warning(
                    "%s partition %d on %s: %d vectors, expected %d; rewriting %d and deleting %d",
                    name,
                    partition,
                    address,
                    len(stored),
                    len(wanted),
                    len(absent),
                    len(stale),
                    extra={
                        "action": "vector_db.partition_repaired",
                        "knowledge_base": name,
                        "instance": address,
                    },
                )
                await self._repair(layout, partition, address, absent, stale)
                repaired += len(absent) + len(stale)
        return repaired

    async def _expected_digests(self, layout: Layout) -> dict[int, dict[str, int]]:
        expected: dict[int, dict[str, int]] = defaultdict(dict)
        after = None
        while rows := await self._read_chunks(layout.knowledge_base_id, after, VERIFY_PAGE_SIZE * 5):
            for row in rows:
                expected[partition_of(row.id, layout.partitions)][row.id] = digest(row.id, row.embedding)
            after = rows[-1].id
        return expected

    async def _stored_digests(self, address: str, collection_name: str) -> dict[str, int]:
        collection = await self.store.instances.collection(address, collection_name, create=True)
        stored: dict[str, int] = {}
        offset = 0
        while True:
            page = await self.store.instances.call(
                address,
                lambda offset=offset: collection.get(
                    limit=VERIFY_PAGE_SIZE, offset=offset, include=["embeddings"]
                ),
                action="read back",
            )
            ids = page["ids"]
            if not ids:
                return stored
            vectors = np.asarray(page["embeddings"], dtype=np.float32)
            for chunk_id, vector in zip(ids, vectors, strict=True):
                stored[chunk_id] = digest(chunk_id, vector.tobytes())
            offset += len(ids)

    async def _repair(
        self, layout: Layout, partition: int, address: str, absent: list[str], stale: list[str]
    ) -> None:
        single = Layout(
            layout.id,
            layout.knowledge_base_id,
            layout.version,
            layout.status,
            layout.partitions,
            tuple((address,) if index == partition else () for index in range(layout.partitions)),
            layout.copied_through,
            layout.copied,
        )
        if stale:
            await self.store.delete_ids(single, stale)
        for start in range(0, len(absent), self.batch_size):
            async with self.database.read() as connection:
                rows = list(
                    await connection.execute(
                        select(chunks.c.id, chunks.c.document_id, chunks.c.embedding, documents.c.source)
                        .join(documents, documents.c.id == chunks.c.document_id)
                        .where(chunks.c.id.in_(absent[start : start + self.batch_size]))
                    )
                )
            await self.store.upsert(single, [_record(row) for row in rows])

    async def _roll_back(self, name: str, layout: Layout) -> None:
        leftover = await self.store.drop_collections(layout)
        if leftover:
            raise VectorStoreError(
                f"{name}: rolling back the interrupted layout {layout.version} left collections on "
                f"{', '.join(leftover)}; start those Chroma servers and run the command again"
            )
        async with self.database.transaction() as connection:
            await layouts.set_status(connection, layout.id, LayoutStatus.DELETED)
        logger.info(
            "rolled back layout %d of %s",
            layout.version,
            name,
            extra={"action": "vector_db.layout_rolled_back", "knowledge_base": name},
        )

    async def _finish_retired(self, knowledge_base_id: str, outcome: Outcome, *, grace: bool = False) -> None:
        async with self.database.read() as connection:
            retired = await layouts.list_layouts(connection, knowledge_base_id, (LayoutStatus.RETIRED,))
        if retired and grace:
            await asyncio.sleep(RETIRE_GRACE_SECONDS)
        for layout in retired:
            leftover = await self.store.drop_collections(layout)
            if leftover:
                outcome.leftover_instances.extend(leftover)
                continue
            async with self.database.transaction() as connection:
                await layouts.set_status(connection, layout.id, LayoutStatus.DELETED)


def _placement(layout: Layout) -> list[list[str]]:
    return [list(entry) for entry in layout.placement]


def _record(row: Row) -> VectorRecord:
    return VectorRecord(row.id, np.frombuffer(row.embedding, dtype=np.float32), row.source, row.document_id)
