"""Profiles of EmbeddedVectorStore's search and of its first load, as time per step and per function.

The same queries are looked at in several ways. cProfile over the real ``search`` calls names
the Python functions, but inflates them with its own overhead. A stage timing without any
profiler repeats the steps of the store's exact search one at a time on its loaded matrix, and
those of its HNSW search when the base is large enough to have a graph. For the exact path, the
real ``search`` calls also run again with numpy's BLAS limited to one thread.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from app.db.engine import Database
from app.knowledge.store import EmbeddedVectorStore, _collapse_duplicates
from bench.knowledge_search import run_sequential_async

TOP_FUNCTIONS = 12
REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


async def profile_store(
    store: EmbeddedVectorStore,
    database: Database,
    knowledge_base_id: str,
    version: int,
    queries: np.ndarray,
    top_k: int,
) -> dict[str, Any]:
    """Profile ``store.search`` over ``queries`` and the first load of a new store on the same database.

    ``store`` must already hold the loaded matrix of the knowledge base.
    """
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for query in queries:
        await store.search(knowledge_base_id, version, query, top_k)
    profiler.disable()
    profiled_seconds = time.perf_counter() - started

    fresh_store = EmbeddedVectorStore(database, store.dimension, store.settings)
    load_profiler = cProfile.Profile()
    started = time.perf_counter()
    load_profiler.enable()
    await fresh_store.search(knowledge_base_id, version, queries[0], top_k)
    load_profiler.disable()
    load_seconds = time.perf_counter() - started

    index = _loaded_index(store, knowledge_base_id, version)
    one_blas_thread = None
    if index.graph is None:
        one_blas_thread = await _search_with_one_blas_thread(
            store, knowledge_base_id, version, queries, top_k
        )

    return {
        "search_path": "hnsw" if index.graph is not None else "exact",
        "search_with_one_blas_thread": one_blas_thread,
        "search_profile": {
            "queries": len(queries),
            "seconds_under_profiler": profiled_seconds,
            "functions": _top_functions(profiler),
        },
        "stage_timing": _time_exact_stages(index, queries, top_k),
        "graph_stage_timing": _time_graph_stages(index, queries, top_k) if index.graph is not None else None,
        "first_load_profile": {
            "seconds_under_profiler": load_seconds,
            "functions": _top_functions(load_profiler),
        },
    }


def _top_functions(profiler: cProfile.Profile) -> list[dict[str, Any]]:
    statistics = pstats.Stats(profiler)
    entries = []
    for (file, line, name), (_, calls, own_seconds, cumulative_seconds, _) in statistics.stats.items():
        entries.append(
            {
                "function": _function_label(file, line, name),
                "calls": calls,
                "own_seconds": own_seconds,
                "cumulative_seconds": cumulative_seconds,
            }
        )
    entries.sort(key=lambda entry: entry["own_seconds"], reverse=True)
    return entries[:TOP_FUNCTIONS]


def _function_label(file: str, line: int, name: str) -> str:
    if file == "~":
        return name  # a built-in function or a C method
    path = Path(file)
    if path.is_relative_to(REPOSITORY_ROOT):
        display_path = path.relative_to(REPOSITORY_ROOT).as_posix()
    elif "site-packages" in path.parts:
        display_path = "/".join(path.parts[path.parts.index("site-packages") + 1 :])
    else:
        display_path = path.name
    return f"{display_path}:{line} {name}"


def _loaded_index(store: EmbeddedVectorStore, knowledge_base_id: str, version: int) -> Any:
    # The loaded index is private state of the store; reading it here does not change it.
    index = store._indexes[knowledge_base_id]
    if index.version != version:
        raise RuntimeError(f"the store's loaded index is at version {index.version}, expected {version}")
    return index


async def _search_with_one_blas_thread(
    store: EmbeddedVectorStore, knowledge_base_id: str, version: int, queries: np.ndarray, top_k: int
) -> dict[str, Any]:
    """Time the real ``search`` calls again with every loaded BLAS library limited to one thread.

    numpy's BLAS splits one matrix-vector product over its threads and waits for all of them.
    When another process occupies a core, the call waits for it, and one BLAS thread avoids that.
    """

    async def search(query: np.ndarray) -> list[int]:
        await store.search(knowledge_base_id, version, query, top_k)
        return []

    blas_pools = [
        {"library": Path(pool["filepath"]).name, "threads": pool["num_threads"]}
        for pool in threadpool_info()
        if pool["user_api"] == "blas"
    ]
    with threadpool_limits(limits=1, user_api="blas"):
        _, timings = await run_sequential_async(search, queries)
    return {"default_blas_pools": blas_pools, **timings}


def _time_exact_stages(index: Any, queries: np.ndarray, top_k: int) -> dict[str, Any]:
    """Time each step of the store's exact search alone, over all queries, in mean microseconds per query.

    The store searches exactly when the base has fewer than ``knowledge.ann_min_chunks`` chunks,
    and for queries filtered by source.

    NOTE: the steps below copy those of the exact path of ``EmbeddedVectorStore.search`` as of
    this commit; when ``search`` changes, this breakdown no longer describes it.
    """
    matrix = index.matrix
    candidate_count = min(len(matrix), top_k * 2)

    scores_of_queries, product_latencies = [], []
    for query in queries:
        started = time.perf_counter()
        scores_of_queries.append(matrix @ np.asarray(query, dtype=np.float32))
        product_latencies.append(time.perf_counter() - started)
    product_seconds = sum(product_latencies)

    candidates_of_queries = []
    started = time.perf_counter()
    for scores in scores_of_queries:
        candidates_of_queries.append(np.argpartition(-scores, candidate_count - 1)[:candidate_count])
    partition_seconds = time.perf_counter() - started

    ordered_of_queries = []
    started = time.perf_counter()
    for scores, candidates in zip(scores_of_queries, candidates_of_queries, strict=True):
        ordered_of_queries.append(candidates[np.argsort(-scores[candidates], kind="stable")])
    sort_seconds = time.perf_counter() - started

    ranked_of_queries = [
        [(int(row), float(scores[row])) for row in ordered]
        for scores, ordered in zip(scores_of_queries, ordered_of_queries, strict=True)
    ]
    started = time.perf_counter()
    for ranked in ranked_of_queries:
        _collapse_duplicates(index, ranked, top_k)
    collapse_seconds = time.perf_counter() - started

    count = len(queries)
    product_microseconds = product_seconds / count * 1e6
    return {
        "queries": count,
        "matrix_shape": list(matrix.shape),
        "matrix_megabytes": matrix.nbytes / 1e6,
        "microseconds_per_query": {
            "matrix-vector product": product_microseconds,
            "negate scores and argpartition": partition_seconds / count * 1e6,
            "argsort of the candidates": sort_seconds / count * 1e6,
            "_collapse_duplicates (result objects)": collapse_seconds / count * 1e6,
        },
        "product_microseconds_p50": float(np.percentile(product_latencies, 50) * 1e6),
        "product_microseconds_p95": float(np.percentile(product_latencies, 95) * 1e6),
        # The product reads the whole matrix once per query, so this is its memory read rate.
        "product_gigabytes_per_second_at_p50": matrix.nbytes
        / float(np.percentile(product_latencies, 50))
        / 1e9,
    }


def _time_graph_stages(index: Any, queries: np.ndarray, top_k: int) -> dict[str, Any]:
    """Time the steps of the store's HNSW search alone, in mean microseconds per query.

    NOTE: the steps below copy those of the HNSW path of ``EmbeddedVectorStore.search`` as of
    this commit; when ``search`` changes, this breakdown no longer describes it.
    """
    graph = index.graph
    candidate_count = min(len(index.ids), top_k * 2)

    ranked_of_queries, graph_latencies = [], []
    for query in queries:
        started = time.perf_counter()
        scores, rows = graph.search(np.asarray(query, dtype=np.float32).reshape(1, -1), candidate_count)
        ranked_of_queries.append(
            [(int(row), float(score)) for row, score in zip(rows[0], scores[0], strict=True) if row >= 0]
        )
        graph_latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    for ranked in ranked_of_queries:
        _collapse_duplicates(index, ranked, top_k)
    collapse_seconds = time.perf_counter() - started

    count = len(queries)
    return {
        "queries": count,
        "ef_search": int(graph.hnsw.efSearch),
        "ef_construction": int(graph.hnsw.efConstruction),
        "microseconds_per_query": {
            "graph search and (row, score) pairs": sum(graph_latencies) / count * 1e6,
            "_collapse_duplicates (result objects)": collapse_seconds / count * 1e6,
        },
        "graph_search_microseconds_p50": float(np.percentile(graph_latencies, 50) * 1e6),
    }
