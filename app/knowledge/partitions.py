"""Query distribution: one query to every partition of a layout in parallel, merged into one ranking.

Each partition is asked on one of its replicas, chosen in turn so that the replicas share the
load, with healthy instances before any that failed in the last ``vector_db.unhealthy_seconds``.
A replica that fails or takes longer than ``vector_db.query_timeout_seconds`` is abandoned for
the next one. A partition none of whose replicas responds is reported as missing, never
silently left out. Each attempt's latency goes to the ``toronto_ai_vector_partition_query_seconds``
histogram.

Concurrent queries of one process to the same partition, with the same ``n_results`` and
filter, are coalesced (``app.knowledge.coalescing``): while ``vector_db.query_requests_in_flight``
requests to the partition are running, new queries wait and then go out together, up to
``vector_db.query_batch_max`` embeddings in one Chroma ``query`` call, whose results are split
per query. A query to an idle partition is sent at once. So one HTTP request and its JSON are
shared by several queries, and a replica retry or a missing partition applies to every query
of the batch. The batch sizes go to ``toronto_ai_vector_partition_query_batch_size``.

The per-partition top ``n`` are merged by distance and then chunk id, so ties between
partitions resolve the same way in every run. The merged top ``n`` equals the top ``n`` of
one unpartitioned search over the same vectors, as far as each partition's HNSW search finds
its own exact top ``n``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.core.config import VectorDbSettings
from app.errors import VectorStoreUnavailableError
from app.knowledge.chroma import ChromaInstances, CollectionNotFound
from app.knowledge.coalescing import Coalescer
from app.knowledge.layouts import Layout
from app.monitoring.metrics import (
    VECTOR_PARTITION_QUERY_BATCH,
    VECTOR_PARTITION_QUERY_SECONDS,
    VECTOR_PARTITIONS_MISSING,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Candidate:
    chunk_id: str
    distance: float  # as the collection's space defines it: 1 - inner product for "ip"
    partition: int


@dataclass(frozen=True, slots=True)
class DistributedResult:
    candidates: list[Candidate]  # best first
    missing_partitions: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PartitionQuery:
    """The fields that queries must share to go to a partition in one request."""

    knowledge_base_id: str
    partition: int
    collection: str
    replicas: tuple[str, ...]
    n_results: int
    where: str | None  # the filter as sorted JSON, so that it can be a key
    # An embedding of another dimension fails its whole request, so only equal ones share one.
    dimension: int


class QueryDistributor:
    def __init__(self, instances: ChromaInstances, settings: VectorDbSettings) -> None:
        self.instances = instances
        self.settings = settings
        self._turn = itertools.count()
        self.coalescer: Coalescer[PartitionQuery, np.ndarray, list[Candidate] | None] = Coalescer(
            self._query_partition,
            max_batch=settings.query_batch_max,
            max_in_flight=settings.query_requests_in_flight,
            window_seconds=settings.query_batch_window_seconds,
        )

    async def query(
        self, layout: Layout, vector: np.ndarray, n_results: int, where: dict[str, Any] | None = None
    ) -> DistributedResult:
        """Return the best ``n_results`` candidates over every partition that responded."""
        embedding = np.asarray(vector, dtype=np.float32).reshape(-1)
        where_key = json.dumps(where, sort_keys=True) if where is not None else None
        per_partition = await asyncio.gather(
            *(
                self.coalescer.submit(
                    PartitionQuery(
                        layout.knowledge_base_id,
                        partition,
                        layout.collection(partition),
                        layout.placement[partition],
                        n_results,
                        where_key,
                        len(embedding),
                    ),
                    embedding,
                )
                for partition in range(layout.partitions)
            )
        )
        missing = tuple(partition for partition, found in enumerate(per_partition) if found is None)
        candidates = [candidate for found in per_partition if found is not None for candidate in found]
        candidates.sort(key=lambda candidate: (candidate.distance, candidate.chunk_id))
        if missing:
            VECTOR_PARTITIONS_MISSING.inc(len(missing))
        return DistributedResult(candidates[:n_results], missing)

    def replica_order(self, replicas: tuple[str, ...]) -> list[str]:
        """Return the partition's replicas to try, rotated per request, healthy ones first."""
        start = next(self._turn) % len(replicas)
        rotated = list(replicas[start:] + replicas[:start])
        healthy = [address for address in rotated if self.instances.is_healthy(address)]
        return healthy + [address for address in rotated if address not in healthy]

    async def _query_partition(
        self, request: PartitionQuery, embeddings: list[np.ndarray]
    ) -> list[list[Candidate] | None]:
        """Query one partition for all ``embeddings`` in one request, or return None for each on failure."""
        replicas = self.replica_order(request.replicas)
        # Replicas are the retry of a query; a partition without one gets one retry of its own.
        retries = 0 if len(replicas) > 1 else 1
        where = json.loads(request.where) if request.where is not None else None
        matrix = np.vstack(embeddings)
        VECTOR_PARTITION_QUERY_BATCH.observe(len(embeddings))
        for address in replicas:
            started = time.perf_counter()
            try:
                collection = await self.instances.collection(
                    address, request.collection, create=False, retries=retries
                )
                result = await self.instances.call(
                    address,
                    lambda collection=collection: collection.query(
                        query_embeddings=matrix,
                        n_results=request.n_results,
                        where=where,
                        include=["distances"],
                    ),
                    timeout=self.settings.query_timeout_seconds,
                    retries=retries,
                    action="query",
                )
            except (VectorStoreUnavailableError, CollectionNotFound) as exc:
                outcome = "not_found" if isinstance(exc, CollectionNotFound) else "unavailable"
                self._observe(request.partition, address, outcome, started)
                self.instances.forget_collection(address, request.collection)
                self.instances.mark_unhealthy(address)
                logger.warning(
                    "partition %d of %s failed on %s for %d queries: %s",
                    request.partition,
                    request.collection,
                    address,
                    len(embeddings),
                    exc,
                    extra={
                        "action": "vector_db.partition_failed",
                        "partition": request.partition,
                        "instance": address,
                        "knowledge_base_id": request.knowledge_base_id,
                    },
                )
                continue
            self._observe(request.partition, address, "ok", started)
            return [
                [
                    Candidate(chunk_id, float(distance), request.partition)
                    for chunk_id, distance in zip(ids, distances, strict=True)
                ]
                for ids, distances in zip(result["ids"], result["distances"], strict=True)
            ]

        logger.error(
            "partition %d of %s: no replica responded (%s) for %d queries",
            request.partition,
            request.collection,
            ", ".join(replicas),
            len(embeddings),
            extra={
                "action": "vector_db.partition_missing",
                "partition": request.partition,
                "knowledge_base_id": request.knowledge_base_id,
            },
        )
        return [None] * len(embeddings)

    @staticmethod
    def _observe(partition: int, address: str, outcome: str, started: float) -> None:
        VECTOR_PARTITION_QUERY_SECONDS.labels(str(partition), address, outcome).observe(
            time.perf_counter() - started
        )
