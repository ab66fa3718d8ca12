"""Ingestion of queued documents by workers: chunk, embed in batches, store atomically.

Documents wait in the ``documents`` table with their text in ``pending_text``. A worker
leases a batch of them and chunks each one by the embedding model's tokens. It embeds the
chunks of the whole batch together, so that small documents still fill the model's
batches. Then it stores each document in its own transaction, which replaces the old
chunks of the source and increments the knowledge base's version. Nothing of a document
that failed is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sqlalchemy import and_, select, update

from app.core.config import KnowledgeSettings
from app.db.engine import Database
from app.db.models import chunks, documents, knowledge_bases
from app.db.records import utc_now
from app.knowledge.chunking import Chunk, chunk_document
from app.knowledge.documents import detect_format
from app.knowledge.embeddings import Embedder
from app.knowledge.repository import DocumentStatus, bump_version, text_hash
from app.knowledge.store import StoredChunk, VectorStore
from app.knowledge.tokens import default_token_counter

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
RETRY_DELAY_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class LeasedDocument:
    id: str
    knowledge_base_id: str
    source: str
    text: str
    metadata: dict
    attempts: int
    embedding_model: str


ProgressCallback = Callable[[int], None]  # called with the number of documents just stored or failed


class DocumentIngestor:
    def __init__(
        self,
        database: Database,
        embedder: Embedder,
        store: VectorStore,
        settings: KnowledgeSettings,
        lease_seconds: float,
    ) -> None:
        self.database = database
        self.embedder = embedder
        self.store = store
        self.settings = settings
        self.lease_seconds = lease_seconds

    async def claim(
        self, worker_id: str, limit: int, knowledge_base_id: str | None = None
    ) -> list[LeasedDocument]:
        now = time.time()
        candidates = (
            select(documents.c.id)
            .where(documents.c.status == DocumentStatus.PENDING, documents.c.available_at <= now)
            .order_by(documents.c.available_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        if knowledge_base_id is not None:
            candidates = candidates.where(documents.c.knowledge_base_id == knowledge_base_id)
        candidates = candidates.cte("candidates").prefix_with("MATERIALIZED", dialect="postgresql")

        async with self.database.transaction() as connection:
            claimed = await connection.execute(
                update(documents)
                .where(documents.c.id == candidates.c.id)
                .values(
                    status=DocumentStatus.PROCESSING,
                    lease_owner=worker_id,
                    lease_expires_at=now + self.lease_seconds,
                    attempts=documents.c.attempts + 1,
                )
                .returning(documents.c.id)
            )
            claimed_ids = [document_id for (document_id,) in claimed]
            if not claimed_ids:
                return []
            rows = await connection.execute(
                select(
                    documents.c.id,
                    documents.c.knowledge_base_id,
                    documents.c.source,
                    documents.c.pending_text,
                    documents.c.pending_metadata,
                    documents.c.attempts,
                    knowledge_bases.c.embedding_model,
                )
                .join(knowledge_bases, knowledge_bases.c.id == documents.c.knowledge_base_id)
                .where(documents.c.id.in_(claimed_ids))
            )
            return [
                LeasedDocument(row[0], row[1], row[2], row[3] or "", row[4] or {}, row[5], row[6])
                for row in rows
            ]

    async def process(
        self, worker_id: str, leased: list[LeasedDocument], progress: ProgressCallback | None = None
    ) -> int:
        """Chunk, embed and store leased documents; return how many were stored.

        Texts are embedded in slices that span the batch's documents, and each document is
        stored as soon as all its chunks have vectors, so a document becomes searchable, and
        progress shows, before the rest of its batch is embedded.
        """
        mismatched = [document for document in leased if document.embedding_model != self.embedder.model_name]
        for document in mismatched:
            await self._fail(worker_id, document, _model_mismatch(document, self.embedder), final=True)
        leased = [document for document in leased if document not in mismatched]
        if progress is not None and mismatched:
            progress(len(mismatched))
        chunked = await asyncio.to_thread(self._chunk_all, leased)
        hashes = [[text_hash(chunk.text) for chunk in pieces] for _, pieces in chunked]

        # Chunks are deduplicated by content hash: a text met earlier in this batch, or
        # already stored with this model (a licence footer, a re-added document), is not
        # embedded again.
        all_hashes = {digest for document_hashes in hashes for digest in document_hashes}
        known = await self._stored_vectors({document.knowledge_base_id for document in leased}, all_hashes)
        missing: dict[str, str] = {}
        for (_, pieces), document_hashes in zip(chunked, hashes, strict=True):
            for chunk, digest in zip(pieces, document_hashes, strict=True):
                if digest not in known:
                    missing.setdefault(digest, chunk.text)
        texts = list(missing.values())

        stored = 0
        next_document = 0

        async def store_completed() -> None:
            # Missing texts are embedded in document order, so documents complete in order.
            nonlocal stored, next_document
            while next_document < len(chunked) and all(digest in known for digest in hashes[next_document]):
                document, pieces = chunked[next_document]
                vectors = _stack([known[digest] for digest in hashes[next_document]], self.embedder.dimension)
                stored += await self._store(worker_id, document, pieces, vectors)
                next_document += 1
                if progress is not None:
                    progress(1)

        await store_completed()
        # Embed in slices and renew the leases between them: a large batch takes longer
        # than one lease on a CPU.
        slice_size = self.settings.batch_size * 8
        for start in range(0, len(texts), slice_size):
            part = texts[start : start + slice_size]
            try:
                vectors = await self.embedder.embed(part)
            except Exception as exc:  # noqa: BLE001 - every document still waiting is retried or failed
                for document, _ in chunked[next_document:]:
                    await self._fail(worker_id, document, f"embedding failed: {exc}")
                if progress is not None:
                    progress(len(chunked) - next_document)
                return stored
            known.update({text_hash(text): vector for text, vector in zip(part, vectors, strict=True)})
            await self._renew(worker_id, [document for document, _ in chunked[next_document:]])
            await store_completed()
        return stored

    async def release(self, worker_id: str, leased: list[LeasedDocument]) -> None:
        """Give documents back to the queue without counting the attempt."""
        async with self.database.transaction() as connection:
            await connection.execute(
                update(documents)
                .where(
                    documents.c.id.in_([document.id for document in leased]),
                    documents.c.lease_owner == worker_id,
                    documents.c.status == DocumentStatus.PROCESSING,
                )
                .values(
                    status=DocumentStatus.PENDING,
                    attempts=documents.c.attempts - 1,
                    lease_owner=None,
                    lease_expires_at=None,
                    available_at=time.time(),
                )
            )

    async def sweep_expired(self) -> int:
        """Return documents whose worker stopped renewing its lease to the queue."""
        async with self.database.transaction() as connection:
            result = await connection.execute(
                update(documents)
                .where(
                    documents.c.status == DocumentStatus.PROCESSING,
                    documents.c.lease_expires_at < time.time(),
                )
                .values(
                    status=DocumentStatus.PENDING,
                    lease_owner=None,
                    lease_expires_at=None,
                    available_at=time.time(),
                )
            )
        return result.rowcount

    def _chunk_all(self, leased: list[LeasedDocument]) -> list[tuple[LeasedDocument, list[Chunk]]]:
        counter = default_token_counter()
        return [
            (
                document,
                chunk_document(
                    document.text,
                    detect_format(document.source, document.text),
                    counter,
                    max_tokens=self.settings.chunk_max_tokens,
                    overlap_tokens=self.settings.chunk_overlap_tokens,
                ),
            )
            for document in leased
        ]

    async def _stored_vectors(self, knowledge_base_ids: set[str], hashes: set[str]) -> dict[str, np.ndarray]:
        """Return the vectors already stored in these knowledge bases for these chunk hashes."""
        found: dict[str, np.ndarray] = {}
        ordered = sorted(hashes)
        async with self.database.read() as connection:
            for start in range(0, len(ordered), 500):  # bounded IN lists
                rows = await connection.execute(
                    select(chunks.c.content_hash, chunks.c.embedding).where(
                        chunks.c.knowledge_base_id.in_(knowledge_base_ids),
                        chunks.c.content_hash.in_(ordered[start : start + 500]),
                    )
                )
                for digest, embedding in rows:
                    found[digest] = np.frombuffer(embedding, dtype=np.float32)
        return found

    async def _renew(self, worker_id: str, leased: list[LeasedDocument]) -> None:
        async with self.database.transaction() as connection:
            await connection.execute(
                update(documents)
                .where(
                    documents.c.id.in_([document.id for document in leased]),
                    documents.c.lease_owner == worker_id,
                )
                .values(lease_expires_at=time.time() + self.lease_seconds)
            )

    async def _store(
        self, worker_id: str, document: LeasedDocument, pieces: list[Chunk], vectors: np.ndarray
    ) -> int:
        items = [
            StoredChunk(
                id=chunk_id(document.knowledge_base_id, document.source, chunk.index, chunk.text),
                position=chunk.index,
                heading=chunk.heading,
                text=chunk.text,
                token_count=chunk.token_count,
                content_hash=text_hash(chunk.text),
                vector=vector,
            )
            for chunk, vector in zip(pieces, vectors, strict=True)
        ]
        async with self.database.transaction() as connection:
            held = await connection.execute(
                update(documents)
                .where(_held(document.id, worker_id))
                .values(
                    status=DocumentStatus.READY,
                    metadata=document.metadata,
                    content_hash=text_hash(document.text),
                    chunk_count=len(items),
                    pending_text=None,
                    pending_metadata=None,
                    error=None,
                    lease_owner=None,
                    lease_expires_at=None,
                    ingested_at=utc_now(),
                    updated_at=utc_now(),
                )
            )
            if not held.rowcount:
                # Deleted, re-added or taken over by another worker meanwhile: its text is not ours to store.
                logger.info(
                    "ingestion result discarded",
                    extra={
                        "action": "document.discarded",
                        "document_id": document.id,
                        "worker_id": worker_id,
                    },
                )
                return 0
            await self.store.write_document(connection, document.knowledge_base_id, document.id, items)
            await bump_version(connection, document.knowledge_base_id)

        logger.info(
            "document ingested",
            extra={
                "action": "document.ingested",
                "document_id": document.id,
                "source": document.source,
                "chunks": len(items),
                "worker_id": worker_id,
            },
        )
        return 1

    async def _fail(
        self, worker_id: str, document: LeasedDocument, error: str, *, final: bool = False
    ) -> None:
        final = final or document.attempts >= MAX_ATTEMPTS
        values = (
            {"status": DocumentStatus.FAILED, "pending_text": None}
            if final
            else {"status": DocumentStatus.PENDING, "available_at": time.time() + RETRY_DELAY_SECONDS}
        )
        async with self.database.transaction() as connection:
            await connection.execute(
                update(documents)
                .where(_held(document.id, worker_id))
                .values(error=error, lease_owner=None, lease_expires_at=None, updated_at=utc_now(), **values)
            )
        log = logger.error if final else logger.warning
        log(
            "ingesting %s failed: %s",
            document.source,
            error,
            extra={
                "action": "document.failed" if final else "document.retry",
                "document_id": document.id,
                "worker_id": worker_id,
                "attempts": document.attempts,
            },
        )


def _model_mismatch(document: LeasedDocument, embedder: Embedder) -> str:
    return (
        f"the knowledge base embeds with {document.embedding_model}, but this worker is configured for "
        f"{embedder.model_name}; mixing models in one base would make its vectors incomparable, so set "
        "knowledge.embedding_model back or create a new knowledge base"
    )


def chunk_id(knowledge_base_id: str, source: str, position: int, text: str) -> str:
    """A stable id: the same text at the same place of the same source keeps its id."""
    material = f"{knowledge_base_id}\x00{source}\x00{position}\x00{text_hash(text)}"
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:32]


def _held(document_id: str, worker_id: str):
    return and_(
        documents.c.id == document_id,
        documents.c.lease_owner == worker_id,
        documents.c.status == DocumentStatus.PROCESSING,
    )


def _stack(vectors: list[np.ndarray], dimension: int) -> np.ndarray:
    """Return the vectors as the rows of one matrix, or an empty one for a document without chunks."""
    if not vectors:
        return np.zeros((0, dimension), dtype=np.float32)
    return np.vstack(vectors)
