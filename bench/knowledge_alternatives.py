"""Measure candidate designs for the store's search on vectors saved by the benchmark.

``python -m bench.knowledge_alternatives VECTORS.npy`` reads the matrix that
``python -m bench.knowledge_bench --keep-vectors VECTORS.npy`` saved, builds the same kind of
queries (stored vectors plus noise) and times single queries, one client, for:

- the exact float32 search that the store runs (a matrix-vector product and a partial sort),
  with numpy's BLAS at its default thread count and limited to one thread;
- a binary code per vector (the sign of each dimension, 48 bytes for 384 dimensions), searched
  by Hamming distance with ``np.bitwise_count`` (numpy 2.0 or later), whose best candidates are
  then ranked again exactly in float32.

Recall@10 is by row against an exact float64 search, because the file contains no chunk texts.
The results are printed as JSON and are not written to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from bench.knowledge_search import TOP_K, exact_top_k, make_queries, run_sequential

SEED = 20261204
RERANK_CANDIDATES = (50, 100, 200, 400, 800)


def recall_by_row(results: list[list[int]], truth: np.ndarray) -> float:
    hits = [
        len(set(found) & set(expected.tolist())) / len(expected)
        for found, expected in zip(results, truth, strict=True)
    ]
    return float(np.mean(hits))


def exact_search(matrix: np.ndarray):
    def search(query: np.ndarray) -> list[int]:
        scores = matrix @ query
        candidates = np.argpartition(-scores, TOP_K - 1)[:TOP_K]
        return candidates[np.argsort(-scores[candidates])].tolist()

    return search


def binary_search(matrix: np.ndarray, candidate_count: int):
    """Return a search by Hamming distance of sign bits, then exact float32 ranking of the candidates."""
    if matrix.shape[1] % 64:
        raise ValueError(f"the vectors have {matrix.shape[1]} dimensions; this search needs a multiple of 64")
    # The sign bits of a row pack into 64-bit words (six for 384 dimensions). Word i of every row
    # is stored contiguously, so each step below runs over one contiguous array.
    words = np.packbits(matrix > 0, axis=1).view(np.uint64)
    words_by_position = np.ascontiguousarray(words.T)

    def search(query: np.ndarray) -> list[int]:
        query_words = np.packbits(query > 0).view(np.uint64)
        distances = np.bitwise_count(words_by_position[0] ^ query_words[0]).astype(np.uint16)
        for position in range(1, len(query_words)):
            distances += np.bitwise_count(words_by_position[position] ^ query_words[position])
        candidates = np.argpartition(distances, candidate_count - 1)[:candidate_count]
        scores = matrix[candidates] @ query
        best = np.argpartition(-scores, TOP_K - 1)[:TOP_K]
        return candidates[best[np.argsort(-scores[best])]].tolist()

    return search


def measure(label: str, search, queries: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    results, timings = run_sequential(search, queries)
    return {"label": label, **timings, "recall_by_row": recall_by_row(results, truth)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.knowledge_alternatives",
        description="Time candidate designs for the store's search on vectors saved with --keep-vectors.",
    )
    parser.add_argument("vectors", type=Path, help="a .npy file of unit float32 rows")
    parser.add_argument("--queries", type=int, default=1_000, help="query vectors (default 1000)")
    parser.add_argument("--query-noise", type=float, default=0.5, help="relative noise norm (default 0.5)")
    arguments = parser.parse_args(argv)

    matrix = np.ascontiguousarray(np.load(arguments.vectors), dtype=np.float32)
    queries, description = make_queries(matrix, arguments.queries, arguments.query_noise, SEED)
    truth = exact_top_k(matrix, queries, TOP_K)

    entries = [measure("exact float32, default BLAS threads", exact_search(matrix), queries, truth)]
    with threadpool_limits(limits=1, user_api="blas"):
        entries.append(measure("exact float32, one BLAS thread", exact_search(matrix), queries, truth))
        for candidate_count in RERANK_CANDIDATES:
            label = f"sign bits + Hamming, exact ranking of {candidate_count} candidates, one BLAS thread"
            entries.append(measure(label, binary_search(matrix, candidate_count), queries, truth))

    output = {"vectors": list(matrix.shape), "queries": description, "entries": entries}
    json.dump(output, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
