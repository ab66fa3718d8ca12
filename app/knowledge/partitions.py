"""Query distribution: one query to every partition of a layout in parallel, merged into one ranking.

Each partition is asked on one of its replicas, chosen in turn so that the replicas share the
load, with healthy instances before any that failed in the last ``vector_db.unhealthy_seconds``.
A replica that fails or takes longer than ``vector_db.query_timeout_seconds`` is abandoned for
the next one. A partition none of whose replicas responds is reported as missing, never
silently left out. Each attempt's latency goes to the ``toronto_ai_vector_partition_query_seconds``
histogram.

The per-partition top ``n`` are merged by distance and then chunk id, so ties between
partitions resolve the same way in every run. The merged top ``n`` equals the top ``n`` of
one unpartitioned search over the same vectors, as far as each partition's HNSW search finds
its own exact top ``n``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.core.config import VectorDbSettings
from app.errors import VectorStoreUnavailableError
from app.knowledge.chroma import ChromaInstances, CollectionNotFound
from app.knowledge.layouts import Layout
from app.monitoring.metrics import VECTOR_PARTITION_QUERY_SECONDS, VECTOR_PARTITIONS_MISSING

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


class QueryDistributor:
    def __init__(self, instances: ChromaInstances, settings: VectorDbSettings) -> None:
        self.instances = instances
        self.settings = settings
        self._turn = itertools.count()

    async def query(
        self, layout: Layout, vector: np.ndarray, n_results: int, where: dict[str, Any] | None = None
    ) -> DistributedResult:
        """Return the best ``n_results`` candidates over every partition that responded."""
        embedding = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        per_partition = await asyncio.gather(
            *(
                self._query_partition(layout, partition, embedding, n_results, where)
                for partition in range(layout.partitions)
            )
        )
        missing = tuple(partition for partition, found in enumerate(per_partition) if found is None)
        candidates = [candidate for found in per_partition if found is not None for candidate in found]
        candidates.sort(key=lambda candidate: (candidate.distance, candidate.chunk_id))
        if missing:
            VECTOR_PARTITIONS_MISSING.inc(len(missing))
        return DistributedResult(candidates[:n_results], missing)

    def replica_order(self, layout: Layout, partition: int) -> list[str]:
        """Return the partition's replicas to try, rotated per query, healthy ones first."""
        replicas = list(layout.placement[partition])
        start = next(self._turn) % len(replicas)
        rotated = replicas[start:] + replicas[:start]
        healthy = [address for address in rotated if self.instances.is_healthy(address)]
        return healthy + [address for address in rotated if address not in healthy]

    async def _query_partition(
        self, layout: Layout, partition: int, embedding: np.ndarray, n_results: int, where: dict | None
    ) -> list[Candidate] | None:
        replicas = self.replica_order(layout, partition)
        # Replicas are the retry of a query; a partition without one gets one retry of its own.
        retries = 0 if len(replicas) > 1 else 1
        name = layout.collection(partition)
        for address in replicas:
            started = time.perf_counter()
            try:
                collection = await self.instances.collection(address, name, create=False, retries=retries)
                result = await self.instances.call(
                    address,
                    lambda collection=collection: collection.query(
                        query_embeddings=embedding, n_results=n_results, where=where, include=["distances"]
                    ),
                    timeout=self.settings.query_timeout_seconds,
                    retries=retries,
                    action="query",
                )
            except (VectorStoreUnavailableError, CollectionNotFound) as exc:
                outcome = "not_found" if isinstance(exc, CollectionNotFound) else "unavailable"
                self._observe(partition, address, outcome, started)
                self.instances.forget_collection(address, name)
                self.instances.mark_unhealthy(address)
                logger.warning(
                    "partition %d of %s failed on %s: %s",
                    partition,
                    name,
                    address,
                    exc,
                    extra={
                        "action": "vector_db.partition_failed",
                        "partition": partition,
                        "instance": address,
                        "knowledge_base_id": layout.knowledge_base_id,
                    },
                )
                continue
            self._observe(partition, address, "ok", started)
            ids = result["ids"][0] if result["ids"] else []
            distances = result["distances"][0] if result["distances"] else []
            return [
                Candidate(chunk_id, float(distance), partition)
                for chunk_id, distance in zip(ids, distances, strict=True)
            ]

        logger.error(
            "partition %d of %s: no replica responded (%s)",
            partition,
            name,
            ", ".join(replicas),
            extra={
                "action": "vector_db.partition_missing",
                "partition": partition,
                "knowledge_base_id": layout.knowledge_base_id,
            },
        )
        return None

    @staticmethod
    def _observe(partition: int, address: str, outcome: str, started: float) -> None:
        VECTOR_PARTITION_QUERY_SECONDS.labels(str(partition), address, outcome).observe(
            time.perf_counter() - started
        )
