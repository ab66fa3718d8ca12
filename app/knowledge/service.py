"""Knowledge bases as the API, the CLI and the agents use them.

Queries embed the text once (query embeddings are cached) and search the vector store; the
results of identical queries are cached per knowledge-base version, so a query after a change
to the base never gets a stale entry. Both caches are the process's ``Cache``, so with Redis
every instance shares them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from sqlalchemy import Row

from app.cache import Cache, CacheKind
from app.core.config import KnowledgeSettings
from app.db.engine import Database
from app.errors import ConflictError, DocumentError
from app.knowledge import repository
from app.knowledge.embeddings import Embedder
from app.knowledge.repository import NewDocument
from app.knowledge.store import ScoredChunk, VectorStore

logger = logging.getLogger(__name__)

MAX_SOURCE_CHARS = 1000
MAX_QUERY_CHARS = 10_000


@dataclass(frozen=True, slots=True)
class QueryResult:
    results: list[ScoredChunk]
    cached: bool
    version: int
    # Partitions of a partitioned store that did not respond; their chunks are missing from results.
    missing_partitions: tuple[int, ...] = ()


class KnowledgeService:
    def __init__(
        self,
        database: Database,
        embedder: Embedder,
        store: VectorStore,
        settings: KnowledgeSettings,
        cache: Cache,
    ) -> None:
        self.database = database
        self.embedder = embedder
        self.store = store
        self.settings = settings
        self.cache = cache
        # knowledge.query_cache_entries set to 0 turns both caches off.
        self.caching = settings.query_cache_entries > 0

    async def create(self, name: str, description: str) -> Row:
        async with self.database.transaction() as connection:
            row = await repository.insert_knowledge_base(
                connection, name, description, self.embedder.model_name, self.embedder.dimension
            )
            await self.store.create_knowledge_base(connection, row.id)
        logger.info(
            "knowledge base created", extra={"action": "knowledge_base.created", "knowledge_base": name}
        )
        return row

    async def describe(self, name: str) -> tuple[Row, dict[str, int]]:
        async with self.database.read() as connection:
            row = await repository.get_knowledge_base(connection, name)
            counts = await repository.knowledge_base_counts(connection, row.id)
            # Each statement reads its own snapshot on PostgreSQL, so a document stored
            # between the two reads would show in the counts but not in the version. Read
            # the row again, so its version is at least as new as the counts.
            row = await repository.get_knowledge_base(connection, name)
        return row, counts

    async def add_documents(self, name: str, new_documents: Sequence[NewDocument]) -> tuple[int, int, int]:
        """Validate and queue documents; return how many are new, replace a source, or are unchanged."""
        check_documents(new_documents, self.settings)
        async with self.database.transaction() as connection:
            row = await repository.get_knowledge_base(connection, name)
            self._check_model(row)
            counts = await repository.queue_documents(connection, row.id, new_documents)
        logger.info(
            "documents queued for ingestion",
            extra={
                "action": "documents.queued",
                "knowledge_base": name,
                "added": counts[0],
                "replaced": counts[1],
            },
        )
        return counts

    async def delete_document(self, name: str, source: str) -> None:
        async with self.database.transaction() as connection:
            row = await repository.get_knowledge_base(connection, name)
            document_id = await repository.find_document_id(connection, row.id, source)
            await self.store.delete_document(connection, row.id, document_id)
            await repository.delete_document(connection, row.id, source)

    async def query(self, name: str, text: str, top_k: int, *, source: str | None = None) -> QueryResult:
        if not text.strip():
            raise DocumentError("text: the query is empty; send the question to search for")
        if "\x00" in text or not _is_unicode(text):
            raise DocumentError(
                "text: the query contains NUL characters or unpaired surrogates; send UTF-8 text"
            )
        if len(text) > MAX_QUERY_CHARS:
            raise DocumentError(f"text: the query has {len(text)} characters; the limit is {MAX_QUERY_CHARS}")
        if not 1 <= top_k <= self.settings.max_top_k:
            raise DocumentError(
                f"top_k: {top_k} is outside 1 to {self.settings.max_top_k}; ask for a number of results "
                "in that range, or raise knowledge.max_top_k"
            )

        async with self.database.read() as connection:
            row = await repository.get_knowledge_base(connection, name)
        self._check_model(row)

        # The version grows with every change of the base's chunks, so entries of an older
        # version are never read again and expire with their TTL.
        key = _digest([row.id, row.version, self.embedder.model_name, text, top_k, source])
        cached = await self.cache.get(CacheKind.KNOWLEDGE_QUERY, key) if self.caching else None
        if cached is not None:
            results = [ScoredChunk(**item) for item in orjson.loads(cached)]
            return QueryResult(results, cached=True, version=row.version)

        vector = await self._query_vector(text)
        results = await self.store.search(row.id, row.version, vector, top_k, source=source)
        if results.missing_partitions:
            # A partial result is returned but never cached, so the next query searches the
            # partitions again.
            logger.warning(
                "query of %s returned results without partitions %s",
                name,
                list(results.missing_partitions),
                extra={"action": "knowledge.partial_results", "knowledge_base": name},
            )
            return QueryResult(
                list(results),
                cached=False,
                version=row.version,
                missing_partitions=results.missing_partitions,
            )
        if self.caching:
            await self.cache.set(
                CacheKind.KNOWLEDGE_QUERY,
                key,
                orjson.dumps([dataclasses.asdict(hit) for hit in results], option=orjson.OPT_SERIALIZE_NUMPY),
            )
        return QueryResult(list(results), cached=False, version=row.version)

    async def _query_vector(self, text: str) -> np.ndarray:
        key = _digest([self.embedder.model_name, self.embedder.dimension, text])
        cached = await self.cache.get(CacheKind.QUERY_EMBEDDING, key) if self.caching else None
        if cached is not None and len(cached) == self.embedder.dimension * 4:
            return np.frombuffer(cached, dtype=np.float32)
        vector = (await self.embedder.embed([text]))[0]
        if self.caching:
            await self.cache.set(
                CacheKind.QUERY_EMBEDDING, key, np.asarray(vector, dtype=np.float32).tobytes()
            )
        return vector

    def _check_model(self, row: Row) -> None:
        if row.embedding_model != self.embedder.model_name or row.dimension != self.embedder.dimension:
            raise ConflictError(
                f"knowledge base {row.name!r} was built with {row.embedding_model} ({row.dimension} dimensions), "
                f"but this process embeds with {self.embedder.model_name} ({self.embedder.dimension}); "
                "configure knowledge.embedding_model to match or create a new knowledge base"
            )


def check_documents(new_documents: Sequence[NewDocument], settings: KnowledgeSettings) -> None:
    """Reject a batch before anything is stored, naming the first document that is not acceptable."""
    if not new_documents:
        raise DocumentError("no documents given; send at least one {source, text} object")
    if len(new_documents) > settings.max_documents_per_request:
        raise DocumentError(
            f"{len(new_documents)} documents in one request; the limit is {settings.max_documents_per_request}, "
            "so send them in several requests"
        )

    seen: set[str] = set()
    for document in new_documents:
        source = document.source
        if not source.strip() or len(source) > MAX_SOURCE_CHARS:
            raise DocumentError(f"source {source[:80]!r}: give a name of 1 to {MAX_SOURCE_CHARS} characters")
        if source in seen:
            raise DocumentError(f"source {source!r} appears twice in this request; send each source once")
        seen.add(source)
        size = len(document.text.encode("utf-8", errors="surrogatepass"))
        if size > settings.max_document_bytes:
            raise DocumentError(
                f"source {source!r}: {size} bytes, over the limit of {settings.max_document_bytes}; "
                "split the document or raise knowledge.max_document_bytes"
            )
        if not document.text.strip():
            raise DocumentError(f"source {source!r}: the text is empty; leave the document out")
        if "\x00" in document.text or "\x00" in source:
            raise DocumentError(
                f"source {source!r}: the document contains NUL characters, so it is binary, not text"
            )
        if not _is_unicode(document.text) or not _is_unicode(source):
            raise DocumentError(
                f"source {source!r}: the document contains unpaired surrogates; send UTF-8 text"
            )
        _check_metadata(source, document.metadata)


def _check_metadata(source: str, metadata: dict) -> None:
    try:
        text = json.dumps(metadata, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise DocumentError(
            f"source {source!r}: metadata cannot be stored as JSON text ({exc}); send strings, numbers, "
            "lists and objects in UTF-8"
        ) from exc
    if "\x00" in text:
        raise DocumentError(f"source {source!r}: metadata contains NUL characters; remove them")


def _digest(parts: list[Any]) -> str:
    return hashlib.sha256(orjson.dumps(parts)).hexdigest()


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
