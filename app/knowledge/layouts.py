"""Vector layouts: how a knowledge base's vectors are partitioned over Chroma servers.

A chunk belongs to partition ``partition_of(chunk_id, partitions)``, a stable hash of its id,
so every process and every run puts it in the same place. Partition ``p`` of layout ``v`` is
the collection ``collection_name(knowledge_base_id, v, p)`` on each instance listed in
``placement[p]``. The statements below run inside the caller's transaction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db.models import knowledge_bases, vector_layouts
from app.db.records import utc_now


class LayoutStatus:
    BUILDING = "building"  # being filled by a repartitioning run; receives writes, serves no query
    ACTIVE = "active"  # serves queries and receives writes
    RETIRED = "retired"  # replaced; its collections wait to be dropped
    DELETED = "deleted"  # its collections are dropped; the row keeps the version number taken


@dataclass(frozen=True, slots=True)
class Layout:
    id: int
    knowledge_base_id: str
    version: int
    status: str
    partitions: int
    placement: tuple[tuple[str, ...], ...]  # per partition, instance addresses, primary first
    copied_through: str | None
    copied: int

    def collection(self, partition: int) -> str:
        return collection_name(self.knowledge_base_id, self.version, partition)

    def instances(self) -> set[str]:
        return {address for replicas in self.placement for address in replicas}


def partition_of(chunk_id: str, partitions: int) -> int:
    """Return the partition of a chunk: the first 8 bytes of SHA-256 of its id, modulo ``partitions``."""
    digest = hashlib.sha256(chunk_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % partitions


def collection_name(knowledge_base_id: str, version: int, partition: int) -> str:
    return f"tat-{knowledge_base_id}-v{version}-p{partition}"


def _layout(row) -> Layout:
    return Layout(
        id=row.id,
        knowledge_base_id=row.knowledge_base_id,
        version=row.version,
        status=row.status,
        partitions=row.partitions,
        placement=tuple(tuple(entry) for entry in row.placement),
        copied_through=row.copied_through,
        copied=row.copied,
    )


async def list_layouts(
    connection: AsyncConnection, knowledge_base_id: str, statuses: tuple[str, ...] | None = None
) -> list[Layout]:
    query = (
        select(vector_layouts)
        .where(vector_layouts.c.knowledge_base_id == knowledge_base_id)
        .order_by(vector_layouts.c.version)
    )
    if statuses is not None:
        query = query.where(vector_layouts.c.status.in_(statuses))
    return [_layout(row) for row in await connection.execute(query)]


async def active_layout(connection: AsyncConnection, knowledge_base_id: str) -> Layout | None:
    found = await list_layouts(connection, knowledge_base_id, (LayoutStatus.ACTIVE,))
    return found[0] if found else None


async def insert_layout(
    connection: AsyncConnection,
    knowledge_base_id: str,
    status: str,
    placement: list[list[str]],
) -> Layout:
    """Insert a layout with the next version number of the knowledge base."""
    latest = await connection.scalar(
        select(func.max(vector_layouts.c.version)).where(
            vector_layouts.c.knowledge_base_id == knowledge_base_id
        )
    )
    now = utc_now()
    await connection.execute(
        vector_layouts.insert().values(
            knowledge_base_id=knowledge_base_id,
            version=(latest or 0) + 1,
            status=status,
            partitions=len(placement),
            placement=placement,
            copied_through=None,
            copied=0,
            created_at=now,
            updated_at=now,
        )
    )
    row = (
        await connection.execute(
            select(vector_layouts).where(
                vector_layouts.c.knowledge_base_id == knowledge_base_id,
                vector_layouts.c.version == (latest or 0) + 1,
            )
        )
    ).one()
    return _layout(row)


async def set_status(connection: AsyncConnection, layout_id: int, status: str) -> None:
    await connection.execute(
        update(vector_layouts)
        .where(vector_layouts.c.id == layout_id)
        .values(status=status, updated_at=utc_now())
    )


async def record_progress(
    connection: AsyncConnection, layout_id: int, copied_through: str, copied: int
) -> None:
    await connection.execute(
        update(vector_layouts)
        .where(vector_layouts.c.id == layout_id)
        .values(copied_through=copied_through, copied=copied, updated_at=utc_now())
    )


async def knowledge_base_version(connection: AsyncConnection, knowledge_base_id: str) -> int | None:
    return await connection.scalar(
        select(knowledge_bases.c.version).where(knowledge_bases.c.id == knowledge_base_id)
    )


async def lock_knowledge_base(connection: AsyncConnection, knowledge_base_id: str) -> int | None:
    """Lock the knowledge base's row until commit and return its version.

    Writers of vectors take this lock before they read the layouts to write to, and the switch
    to a new layout takes it too, so no write can land only in a layout that was just retired.
    On SQLite the write transaction already holds the database's write lock.
    """
    return await connection.scalar(
        select(knowledge_bases.c.version).where(knowledge_bases.c.id == knowledge_base_id).with_for_update()
    )
