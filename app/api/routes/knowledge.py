"""Knowledge bases: create, read, add and delete documents, query."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.api.deps import RuntimeDep
from app.api.schemas import NAME_RULE, ResourceName, as_utc, storable_text
from app.errors import DocumentError
from app.knowledge import repository
from app.knowledge.repository import DocumentStatus, NewDocument

router = APIRouter(prefix="/api/v1/knowledge-bases", tags=["knowledge bases"])


class KnowledgeBaseCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ResourceName = Field(description=NAME_RULE.capitalize())
    description: str = Field("", max_length=2000)

    @field_validator("description")
    @classmethod
    def description_is_storable(cls, value: str) -> str:
        return storable_text(value)


class KnowledgeBasePublic(BaseModel):
    name: str
    description: str
    embedding_model: str
    dimension: int
    version: int = Field(description="Grows with every change of the base's chunks")
    documents: int = Field(description="Documents whose latest version is ingested and searchable")
    chunks: int
    pending_documents: int = Field(description="Documents waiting for, or in, ingestion")
    failed_documents: int = Field(
        description="Documents whose latest version failed to ingest; an earlier version stays searchable"
    )
    created_at: datetime
    updated_at: datetime


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        description="Name of the document, unique in the base; re-adding a source replaces it"
    )
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class DocumentsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn]


class DocumentsAccepted(BaseModel):
    added: int = Field(description="New sources, queued for ingestion")
    replaced: int = Field(
        description="Existing sources with new text, queued; their old chunks stay until then"
    )
    unchanged: int = Field(description="Sources already ingested with the same text, left alone")


class DocumentPublic(BaseModel):
    source: str
    status: str
    error: str | None
    chunks: int
    metadata: dict[str, Any]
    updated_at: datetime
    ingested_at: datetime | None


class QueryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="The question or passage to search for")
    # Strict, so that `true` or `2.5` is rejected instead of read as a count.
    top_k: int = Field(
        5, strict=True, description="Results to return, from 1 to knowledge.max_top_k (100 by default)"
    )
    source: str | None = Field(None, description="Only search the chunks of this document")


class QueryHit(BaseModel):
    source: str
    text: str
    score: float = Field(description="Cosine similarity, from -1 to 1")
    heading: str
    chunk_id: str
    position: int
    metadata: dict[str, Any]


class QueryOut(BaseModel):
    results: list[QueryHit]
    cached: bool
    knowledge_base_version: int
    missing_partitions: list[int] = Field(
        default_factory=list,
        description="Partitions of the index that no replica answered; their passages are missing "
        "from results. Empty when the result is complete",
    )


@router.post("", status_code=status.HTTP_201_CREATED, response_model=KnowledgeBasePublic)
async def create_knowledge_base(body: KnowledgeBaseCreate, runtime: RuntimeDep) -> KnowledgeBasePublic:
    await runtime.knowledge.create(body.name, body.description)
    return await read_knowledge_base(body.name, runtime)


@router.get("", response_model=list[KnowledgeBasePublic])
async def list_knowledge_bases(runtime: RuntimeDep) -> list[KnowledgeBasePublic]:
    async with runtime.database.read() as connection:
        rows = await repository.list_knowledge_bases(connection)
    return [await read_knowledge_base(row.name, runtime) for row in rows]


@router.get("/{name}", response_model=KnowledgeBasePublic)
async def read_knowledge_base(name: str, runtime: RuntimeDep) -> KnowledgeBasePublic:
    row, counts = await runtime.knowledge.describe(name)
    return KnowledgeBasePublic(
        name=row.name,
        description=row.description,
        embedding_model=row.embedding_model,
        dimension=row.dimension,
        version=row.version,
        documents=counts.get(DocumentStatus.READY, 0),
        chunks=counts["chunks"],
        pending_documents=counts.get(DocumentStatus.PENDING, 0) + counts.get(DocumentStatus.PROCESSING, 0),
        failed_documents=counts.get(DocumentStatus.FAILED, 0),
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
    )


@router.post("/{name}/documents", status_code=status.HTTP_202_ACCEPTED, response_model=DocumentsAccepted)
async def add_documents(name: str, body: DocumentsIn, runtime: RuntimeDep) -> DocumentsAccepted:
    """Queue documents; workers chunk and embed them in batches. Follow progress on the base."""
    new_documents = [NewDocument(item.source, item.text, item.metadata) for item in body.documents]
    try:
        added, replaced, unchanged = await runtime.knowledge.add_documents(name, new_documents)
    except DocumentError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"documents: {exc}") from exc
    if runtime.notify_work is not None:
        runtime.notify_work()
    return DocumentsAccepted(added=added, replaced=replaced, unchanged=unchanged)


@router.get("/{name}/documents", response_model=list[DocumentPublic])
async def list_documents(
    name: str,
    runtime: RuntimeDep,
    status_filter: Annotated[
        str | None, Query(alias="status", pattern="^(pending|processing|ready|failed)$")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(description="Return sources that sort after this one")] = None,
) -> list[DocumentPublic]:
    if after is not None and "\x00" in after:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, "after: contains a NUL character; remove it"
        )
    async with runtime.database.read() as connection:
        row = await repository.get_knowledge_base(connection, name)
        rows = await repository.list_documents(connection, row.id, status_filter, limit, after)
    return [
        DocumentPublic(
            source=item.source,
            status=item.status,
            error=item.error,
            chunks=item.chunk_count,
            metadata=item.metadata or {},
            updated_at=as_utc(item.updated_at),
            ingested_at=as_utc(item.ingested_at),
        )
        for item in rows
    ]


@router.delete("/{name}/documents", status_code=status.HTTP_204_NO_CONTENT)
async def delete_document(
    name: str,
    runtime: RuntimeDep,
    source: Annotated[str, Query(min_length=1, description="The document's source")],
) -> None:
    await runtime.knowledge.delete_document(name, source)


@router.post("/{name}/query", response_model=QueryOut)
async def query_knowledge_base(name: str, body: QueryIn, runtime: RuntimeDep) -> QueryOut:
    """Return the passages most similar to ``text``, best first; identical queries come from a cache."""
    try:
        found = await runtime.knowledge.query(name, body.text, body.top_k, source=body.source)
    except DocumentError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    return QueryOut(
        results=[
            QueryHit(
                source=hit.source,
                text=hit.text,
                score=round(hit.score, 6),
                heading=hit.heading,
                chunk_id=hit.chunk_id,
                position=hit.position,
                metadata=hit.metadata,
            )
            for hit in found.results
        ],
        cached=found.cached,
        knowledge_base_version=found.version,
        missing_partitions=list(found.missing_partitions),
    )
