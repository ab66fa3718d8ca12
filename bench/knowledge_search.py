"""Vector search over one knowledge base's vectors: the project's store beside FAISS and Chroma.

Every system gets the same unit vectors, read back from the ``chunks`` table after ingestion,
and the same query vectors. A single client sends one query at a time, in several passes over
all queries. Recall@10 is measured against an exact float64 search of the same
matrix.

Recall counts a returned chunk as a hit when its text equals the text of a chunk in the exact
top 10 (same content hash). Chunks with identical text have identical vectors, so the exact
order among them is arbitrary, and the store returns only one of them by design.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select

from app.db.engine import Database
from app.db.models import chunks, documents
from app.knowledge.store import EmbeddedVectorStore

logger = logging.getLogger(__name__)

TOP_K = 10
WARM_UP_QUERIES = 20
# Every system runs all queries this many times, and the median pass's QPS is reported.
SEARCH_PASSES = 5
EXACT_BLOCK_QUERIES = 100
HNSW_M = 32
HNSW_EF_SEARCH_VALUES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
CHROMA_COLLECTION = "peps"


@dataclass(frozen=True, slots=True)
class StoredVectors:
    """The chunks of one knowledge base in the store's row order, with their vectors."""

    ids: list[str]
    hashes: list[str]
    texts: list[str]
    sources: list[str]
    headings: list[str]
    positions: list[int]
    matrix: np.ndarray  # (chunks, dimension) float32, unit rows


async def read_vectors(database: Database, knowledge_base_id: str, dimension: int) -> StoredVectors:
    """Read every chunk of a knowledge base with its stored vector, ordered as the store orders them."""
    async with database.read() as connection:
        rows = (
            await connection.execute(
                select(
                    chunks.c.id,
                    chunks.c.content_hash,
                    chunks.c.text,
                    chunks.c.heading,
                    chunks.c.position,
                    chunks.c.embedding,
                    documents.c.source,
                )
                .join(documents, documents.c.id == chunks.c.document_id)
                .where(chunks.c.knowledge_base_id == knowledge_base_id)
                .order_by(documents.c.source, chunks.c.position)
            )
        ).all()
    matrix = np.vstack([np.frombuffer(row.embedding, dtype=np.float32) for row in rows])
    if matrix.shape[1] != dimension:
        raise ValueError(f"stored vectors have {matrix.shape[1]} dimensions, expected {dimension}")
    return StoredVectors(
        ids=[row.id for row in rows],
        hashes=[row.content_hash for row in rows],
        texts=[row.text for row in rows],
        sources=[row.source for row in rows],
        headings=[row.heading for row in rows],
        positions=[row.position for row in rows],
        matrix=np.ascontiguousarray(matrix),
    )


def make_queries(
    matrix: np.ndarray, count: int, noise: float, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Return ``count`` unit query vectors: stored vectors drawn at random, plus Gaussian noise.

    The noise vector of each query has a norm of ``noise`` (relative to the unit vector) before
    the sum is normalised again, so a query is near its source chunk but not identical to it.
    """
    generator = np.random.default_rng(seed)
    rows = generator.choice(len(matrix), size=count, replace=count > len(matrix))
    perturbation = generator.standard_normal((count, matrix.shape[1])).astype(np.float32)
    perturbation *= noise / np.linalg.norm(perturbation, axis=1, keepdims=True)
    queries = matrix[rows] + perturbation
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    cosines = np.einsum("ij,ij->i", queries, matrix[rows])
    description = {
        "kind": "stored chunk vectors plus Gaussian noise",
        "count": count,
        "relative_noise_norm": noise,
        "mean_cosine_to_source_chunk": float(cosines.mean()),
        "seed": seed,
    }
    return np.ascontiguousarray(queries, dtype=np.float32), description


def exact_top_k(matrix: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Return the row numbers of the ``k`` best matches of every query, by float64 inner product."""
    database = matrix.astype(np.float64)
    results = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), EXACT_BLOCK_QUERIES):
        block = queries[start : start + EXACT_BLOCK_QUERIES].astype(np.float64)
        scores = block @ database.T
        candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, candidates, axis=1), axis=1, kind="stable")
        results[start : start + len(block)] = np.take_along_axis(candidates, order, axis=1)
    return results


def recall_at_k(results: list[list[int]], truth: np.ndarray, hashes: list[str]) -> dict[str, float]:
    """Return mean recall@k, by content hash (the reported figure) and by chunk id."""
    by_text, by_id = [], []
    for found, expected in zip(results, truth, strict=True):
        found_hashes = {hashes[row] for row in found}
        by_text.append(sum(hashes[row] in found_hashes for row in expected) / len(expected))
        by_id.append(len(set(found) & set(expected.tolist())) / len(expected))
    return {"recall": float(np.mean(by_text)), "recall_by_chunk_id": float(np.mean(by_id))}


def _timing_summary(passes: list[tuple[list[float], float]]) -> dict[str, Any]:
    """Summarise timed passes of (latencies, wall seconds): the median pass's QPS and pooled latencies."""
    rates = sorted(len(latencies) / wall for latencies, wall in passes)
    milliseconds = np.concatenate([np.array(latencies) for latencies, _ in passes]) * 1000
    return {
        "queries": len(passes[0][0]),
        "passes": len(passes),
        "qps": float(np.median(rates)),
        "qps_min": rates[0],
        "qps_max": rates[-1],
        "latency_ms_p50": float(np.percentile(milliseconds, 50)),
        "latency_ms_p95": float(np.percentile(milliseconds, 95)),
        "latency_ms_p99": float(np.percentile(milliseconds, 99)),
        "latency_ms_mean": float(milliseconds.mean()),
    }


def run_sequential(
    search: Callable[[np.ndarray], list[int]], queries: np.ndarray, passes: int = SEARCH_PASSES
) -> tuple[list[list[int]], dict[str, Any]]:
    """Run every query in turn, ``passes`` times, after a few untimed queries.

    Returns the rows found in the first pass and the timing summary of all passes.
    """
    for query in queries[:WARM_UP_QUERIES]:
        search(query)
    timed: list[tuple[list[float], float]] = []
    first_results: list[list[int]] = []
    for pass_number in range(passes):
        results, latencies = [], []
        wall_started = time.perf_counter()
        for query in queries:
            started = time.perf_counter()
            results.append(search(query))
            latencies.append(time.perf_counter() - started)
        timed.append((latencies, time.perf_counter() - wall_started))
        if pass_number == 0:
            first_results = results
    return first_results, _timing_summary(timed)


async def run_sequential_async(
    search: Callable[[np.ndarray], Awaitable[list[int]]], queries: np.ndarray, passes: int = SEARCH_PASSES
) -> tuple[list[list[int]], dict[str, Any]]:
    """Like ``run_sequential``, for a coroutine function, awaited in the running event loop."""
    for query in queries[:WARM_UP_QUERIES]:
        await search(query)
    timed: list[tuple[list[float], float]] = []
    first_results: list[list[int]] = []
    for pass_number in range(passes):
        results, latencies = [], []
        wall_started = time.perf_counter()
        for query in queries:
            started = time.perf_counter()
            results.append(await search(query))
            latencies.append(time.perf_counter() - started)
        timed.append((latencies, time.perf_counter() - wall_started))
        if pass_number == 0:
            first_results = results
    return first_results, _timing_summary(timed)


async def measure_store(
    store: EmbeddedVectorStore,
    knowledge_base_id: str,
    version: int,
    vectors: StoredVectors,
    queries: np.ndarray,
    truth: np.ndarray,
) -> dict[str, Any]:
    """Measure ``EmbeddedVectorStore.search``.

    Its first call, which loads the matrix and builds the HNSW graph of a large base, is timed
    separately.
    """
    row_of_id = {chunk_id: row for row, chunk_id in enumerate(vectors.ids)}

    async def search(query: np.ndarray) -> list[int]:
        found = await store.search(knowledge_base_id, version, query, TOP_K)
        return [row_of_id[hit.chunk_id] for hit in found]

    started = time.perf_counter()
    await search(queries[0])
    first_call_seconds = time.perf_counter() - started

    # The loaded index is private state of the store; reading it here does not change it.
    uses_graph = store._indexes[knowledge_base_id].graph is not None
    settings = store.settings
    results, timings = await run_sequential_async(search, queries)
    return {
        "label": "EmbeddedVectorStore.search",
        "kind": "project",
        "search_path": "hnsw" if uses_graph else "exact",
        "ann_min_chunks": settings.ann_min_chunks,
        "hnsw_m": settings.hnsw_m,
        "hnsw_ef_construction": settings.hnsw_ef_construction,
        "hnsw_ef_search": settings.hnsw_ef_search,
        "first_call_seconds_with_load": first_call_seconds,
        **timings,
        **recall_at_k(results, truth, vectors.hashes),
    }


def measure_numpy(vectors: StoredVectors, queries: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Measure a bare exact search: one matrix-vector product and a partial sort, no result objects."""
    matrix = vectors.matrix

    def search(query: np.ndarray) -> list[int]:
        scores = matrix @ query
        candidates = np.argpartition(-scores, TOP_K - 1)[:TOP_K]
        return candidates[np.argsort(-scores[candidates])].tolist()

    results, timings = run_sequential(search, queries)
    return {
        "label": "numpy exact",
        "kind": "reference",
        **timings,
        **recall_at_k(results, truth, vectors.hashes),
    }


def measure_faiss(vectors: StoredVectors, queries: np.ndarray, truth: np.ndarray) -> list[dict[str, Any]]:
    """Measure FAISS IndexFlatIP and IndexHNSWFlat (M = 32) at every efSearch of the sweep."""
    import faiss

    matrix = vectors.matrix
    dimension = matrix.shape[1]
    entries = []

    flat = faiss.IndexFlatIP(dimension)
    started = time.perf_counter()
    flat.add(matrix)
    build_seconds = time.perf_counter() - started
    results, timings = run_sequential(_faiss_search(flat), queries)
    entries.append(
        {
            "label": "FAISS IndexFlatIP",
            "kind": "reference",
            "build_seconds": build_seconds,
            **timings,
            **recall_at_k(results, truth, vectors.hashes),
        }
    )

    hnsw = faiss.IndexHNSWFlat(dimension, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    started = time.perf_counter()
    hnsw.add(matrix)
    build_seconds = time.perf_counter() - started
    logger.info("FAISS HNSW built in %.1f s", build_seconds)
    for ef_search in HNSW_EF_SEARCH_VALUES:
        hnsw.hnsw.efSearch = ef_search
        results, timings = run_sequential(_faiss_search(hnsw), queries)
        entries.append(
            {
                "label": f"FAISS IndexHNSWFlat, efSearch {ef_search}",
                "kind": "hnsw_sweep",
                "m": HNSW_M,
                "ef_construction": int(hnsw.hnsw.efConstruction),
                "ef_search": ef_search,
                "build_seconds": build_seconds,
                **timings,
                **recall_at_k(results, truth, vectors.hashes),
            }
        )
    return entries


def _faiss_search(index: Any) -> Callable[[np.ndarray], list[int]]:
    def search(query: np.ndarray) -> list[int]:
        _, rows = index.search(query.reshape(1, -1), TOP_K)
        return [row for row in rows[0].tolist() if row >= 0]

    return search


def choose_hnsw(entries: list[dict[str, Any]], recall_target: float) -> dict[str, Any] | None:
    """Return the sweep entry with the smallest efSearch that reaches ``recall_target``, or None."""
    reaching = [
        entry for entry in entries if entry["kind"] == "hnsw_sweep" and entry["recall"] >= recall_target
    ]
    return min(reaching, key=lambda entry: entry["ef_search"]) if reaching else None


def measure_chroma(vectors: StoredVectors, queries: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Measure Chroma's embedded client on a new PersistentClient folder, deleted afterwards.

    Chroma stores the chunk texts as documents and the source, heading and position as metadata,
    and every query uses Chroma's default ``include`` (documents, metadatas, distances), so each
    query result contains what a result of the project's store contains.
    """
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    row_of_id = {chunk_id: row for row, chunk_id in enumerate(vectors.ids)}
    with tempfile.TemporaryDirectory(prefix="bench_chroma_", ignore_cleanup_errors=True) as folder:
        client = chromadb.PersistentClient(path=folder, settings=ChromaSettings(anonymized_telemetry=False))
        collection = client.create_collection(
            CHROMA_COLLECTION, configuration={"hnsw": {"space": "cosine"}}, embedding_function=None
        )
        batch_size = client.get_max_batch_size()
        started = time.perf_counter()
        for start in range(0, len(vectors.ids), batch_size):
            end = start + batch_size
            collection.add(
                ids=vectors.ids[start:end],
                embeddings=vectors.matrix[start:end],
                documents=vectors.texts[start:end],
                metadatas=[
                    {"source": source, "heading": heading, "position": position}
                    for source, heading, position in zip(
                        vectors.sources[start:end],
                        vectors.headings[start:end],
                        vectors.positions[start:end],
                        strict=True,
                    )
                ],
            )
        add_seconds = time.perf_counter() - started
        logger.info("Chroma: %d vectors added in %.1f s", len(vectors.ids), add_seconds)

        def search(query: np.ndarray) -> list[int]:
            answer = collection.query(query_embeddings=query.reshape(1, -1), n_results=TOP_K)
            return [row_of_id[chunk_id] for chunk_id in answer["ids"][0]]

        started = time.perf_counter()
        search(queries[0])
        first_query_seconds = time.perf_counter() - started
        results, timings = run_sequential(search, queries)
        configuration = dict(collection.configuration.get("hnsw") or {})
        client.delete_collection(CHROMA_COLLECTION)

    return {
        "label": "Chroma embedded (PersistentClient)",
        "kind": "reference",
        "add_seconds": add_seconds,
        "add_batch_size": batch_size,
        "first_query_seconds": first_query_seconds,
        "hnsw_configuration": configuration,
        **timings,
        **recall_at_k(results, truth, vectors.hashes),
    }
