"""Where EmbeddedVectorStore spends the time of one search and of its first load.

The same queries are looked at in three ways. cProfile over the real ``search`` calls names the
Python functions, but inflates them with its own overhead. A stage timing without any profiler
repeats the steps of ``search`` one at a time on the store's loaded matrix. Finally the real
``search`` calls run again with numpy's BLAS limited to one thread.
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

    fresh_store = EmbeddedVectorStore(database, store.dimension)
    load_profiler = cProfile.Profile()
    started = time.perf_counter()
    load_profiler.enable()
    await fresh_store.search(knowledge_base_id, version, queries[0], top_k)
    load_profiler.disable()
    load_seconds = time.perf_counter() - started

    async def search(query: np.ndarray) -> list[int]:
        await store.search(knowledge_base_id, version, query, top_k)
        return []

    # numpy's BLAS splits one matrix-vector product over its threads and waits for all of them.
    # When another process holds a core, the call waits for it, and one BLAS thread avoids that.
    blas_pools = [
        {"library": Path(pool["filepath"]).name, "threads": pool["num_threads"]}
        for pool in threadpool_info()
        if pool["user_api"] == "blas"
    ]
    with threadpool_limits(limits=1, user_api="blas"):
        _, one_blas_thread = await run_sequential_async(search, queries)

    return {
        "search_with_one_blas_thread": {"default_blas_pools": blas_pools, **one_blas_thread},
        "search_profile": {
            "queries": len(queries),
            "seconds_under_profiler": profiled_seconds,
            "functions": _top_functions(profiler),
        },
        "stage_timing": _time_stages(store, knowledge_base_id, version, queries, top_k),
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


def _time_stages(
    store: EmbeddedVectorStore, knowledge_base_id: str, version: int, queries: np.ndarray, top_k: int
) -> dict[str, Any]:
    """Time each step of ``search`` alone, over all queries, and return the mean microseconds per query.

    NOTE: the steps below copy those of ``EmbeddedVectorStore.search`` as of this commit; when
    ``search`` changes, this breakdown no longer describes it.
    """
    # The loaded index is private state of the store; reading it here does not change it.
    index = store._indexes[knowledge_base_id]
    if index.version != version:
        raise RuntimeError(f"the store's loaded index is at version {index.version}, expected {version}")
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
