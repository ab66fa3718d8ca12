"""Statements on knowledge bases and documents, run inside the caller's transaction."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db.models import chunks, documents, knowledge_bases
from app.db.projects import new_id
from app.db.records import utc_now
from app.errors import ConflictError, InvalidInputError, NotFoundError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # the names POST /knowledge-bases accepts


class DocumentStatus:
    PENDING = "pending"  # waits for a worker; earlier chunks of the same source stay searchable
    PROCESSING = "processing"  # leased by a worker
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class NewDocument:
    source: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


async def insert_knowledge_base(
    connection: AsyncConnection, name: str, description: str, model: str, dimension: int
) -> Row:
    if not NAME.fullmatch(name):
        raise InvalidInputError(
            f"{name!r} is not a valid knowledge-base name; use 1 to 64 letters, digits, '_', '.' "
            "or '-', starting with a letter or digit"
        )
    existing = await connection.scalar(select(knowledge_bases.c.id).where(knowledge_bases.c.name == name))
    if existing is not None:
        raise ConflictError(f"a knowledge base named {name!r} already exists; choose another name")
    now = utc_now()
    await connection.execute(
        knowledge_bases.insert().values(
            id=new_id(),
            name=name,
            description=description,
            embedding_model=model,
            dimension=dimension,
            version=0,
            created_at=now,
            updated_at=now,
        )
    )
    return await get_knowledge_base(connection, name)


async def get_knowledge_base(connection: AsyncConnection, name: str) -> Row:
    row = None
    # A name that no knowledge base can have (NUL bytes, say) would make PostgreSQL fail
    # instead of finding nothing, so it never reaches the query.
    if NAME.fullmatch(name):
        row = (
            await connection.execute(select(knowledge_bases).where(knowledge_bases.c.name == name))
        ).first()
    if row is None:
        raise NotFoundError(
            f"knowledge base {name!r} not found; create it with POST /api/v1/knowledge-bases, "
            "`python -m app.training.cli create`, or `ingest ... --create`"
        )
    return row


async def list_knowledge_bases(connection: AsyncConnection) -> list[Row]:
    return list(await connection.execute(select(knowledge_bases).order_by(knowledge_bases.c.name)))


async def knowledge_base_counts(connection: AsyncConnection, knowledge_base_id: str) -> dict[str, int]:
    status_counts = dict(
        (
            await connection.execute(
                select(documents.c.status, func.count())
                .where(documents.c.knowledge_base_id == knowledge_base_id)
                .group_by(documents.c.status)
            )
        ).all()
    )
    chunk_count = await connection.scalar(
        select(func.count()).select_from(chunks).where(chunks.c.knowledge_base_id == knowledge_base_id)
    )
    return {"chunks": chunk_count or 0, **status_counts}


async def queue_documents(
    connection: AsyncConnection, knowledge_base_id: str, new_documents: Sequence[NewDocument]
) -> tuple[int, int, int]:
    """Queue documents for ingestion; return how many are new, replace a source, or are unchanged.

    A document whose source is already ingested with the same text is left alone, so that
    adding a folder again only re-embeds what changed.
    """
    sources = [document.source for document in new_documents]
    rows = await connection.execute(
        select(documents.c.source, documents.c.id, documents.c.content_hash, documents.c.status).where(
            documents.c.knowledge_base_id == knowledge_base_id, documents.c.source.in_(sources)
        )
    )
    existing = {}
    unchanged = set()
    for source, document_id, content_hash, status in rows:
        existing[source] = document_id
        if status == DocumentStatus.READY and content_hash is not None:
            unchanged.add((source, content_hash))
    new_documents = [
        document for document in new_documents if (document.source, text_hash(document.text)) not in unchanged
    ]
    now = utc_now()
    ready_at = time.time()

    fresh = [document for document in new_documents if document.source not in existing]
    if fresh:
        await connection.execute(
            documents.insert(),
            [
                {
                    "id": new_id(),
                    "knowledge_base_id": knowledge_base_id,
                    "source": document.source,
                    "metadata": {},
                    "status": DocumentStatus.PENDING,
                    "chunk_count": 0,
                    "pending_text": document.text,
                    "pending_metadata": document.metadata,
                    "attempts": 0,
                    "available_at": ready_at,
                    "created_at": now,
                    "updated_at": now,
                }
                for document in fresh
            ],
        )
    for document in new_documents:
        if document.source in existing:
            await connection.execute(
                update(documents)
                .where(documents.c.id == existing[document.source])
                .values(
                    status=DocumentStatus.PENDING,
                    pending_text=document.text,
                    pending_metadata=document.metadata,
                    error=None,
                    attempts=0,
                    available_at=ready_at,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                )
            )
    return len(fresh), len(new_documents) - len(fresh), len(sources) - len(new_documents)


async def find_document_id(connection: AsyncConnection, knowledge_base_id: str, source: str) -> str:
    document_id = None
    if "\x00" not in source:  # no stored source has one, and PostgreSQL rejects it in a query
        document_id = await connection.scalar(
            select(documents.c.id).where(
                documents.c.knowledge_base_id == knowledge_base_id, documents.c.source == source
            )
        )
    if document_id is None:
        raise NotFoundError(f"no document with source {source!r} in this knowledge base")
    return document_id


async def delete_document(connection: AsyncConnection, knowledge_base_id: str, source: str) -> None:
    document_id = await find_document_id(connection, knowledge_base_id, source)
    await connection.execute(delete(chunks).where(chunks.c.document_id == document_id))
    await connection.execute(delete(documents).where(documents.c.id == document_id))
    await bump_version(connection, knowledge_base_id)


async def list_documents(
    connection: AsyncConnection, knowledge_base_id: str, status: str | None, limit: int, after: str | None
) -> list[Row]:
    query = (
        select(
            documents.c.id,
            documents.c.source,
            documents.c.status,
            documents.c.error,
            documents.c.chunk_count,
            documents.c.metadata,
            documents.c.updated_at,
            documents.c.ingested_at,
        )
        .where(documents.c.knowledge_base_id == knowledge_base_id)
        .order_by(documents.c.source)
        .limit(limit)
    )
    if status:
        query = query.where(documents.c.status == status)
    if after:
        query = query.where(documents.c.source > after)
    return list(await connection.execute(query))


async def bump_version(connection: AsyncConnection, knowledge_base_id: str) -> None:
    """Mark the knowledge base changed, so caches and in-memory indexes reload."""
    await connection.execute(
        update(knowledge_bases)
        .where(knowledge_bases.c.id == knowledge_base_id)
        .values(version=knowledge_bases.c.version + 1, updated_at=utc_now())
    )
