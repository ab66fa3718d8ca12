"""Vectors for the vector-scaling benchmark: the PEP corpus embedded once, and synthetic ones.

``pep_vectors`` chunks bench/corpus/peps as ingestion does, embeds each distinct chunk text
with the project's LocalEmbedder (all-MiniLM-L6-v2, 384 dimensions) and saves the matrix to a
``.npy`` file, so that later runs load it instead of embedding again (about 11 minutes for the
whole corpus on a 2-core machine). ``synthetic_vectors`` draws unit vectors around random
centres, so that they have the clustered structure of real embeddings rather than the
uniform spread that no nearest-neighbour index handles well.

Run ``python -m bench.vector_corpus --out bench/results/pep_vectors.npy`` to embed ahead of
the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from app.core.config import KnowledgeSettings
from app.knowledge.embeddings import build_embedder
from bench import knowledge_corpus

logger = logging.getLogger(__name__)

EMBED_SLICE = 256  # texts per embed() call, so that progress is logged while it runs


async def embed_pep_corpus(folder: Path, max_chunks: int | None) -> np.ndarray:
    """Embed the distinct chunk texts of the corpus, in corpus order, up to ``max_chunks``."""
    settings = KnowledgeSettings()
    documents = knowledge_corpus.read_corpus(folder, settings.max_document_bytes)
    chunks, _ = knowledge_corpus.chunk_corpus(documents, settings)
    texts = list(dict.fromkeys(chunk.text for chunk in chunks))
    if max_chunks is not None:
        texts = texts[:max_chunks]
    embedder = build_embedder(settings)
    parts = []
    started = time.perf_counter()
    for start in range(0, len(texts), EMBED_SLICE):
        parts.append(await embedder.embed(texts[start : start + EMBED_SLICE]))
        logger.info(
            "embedded %d of %d texts, %.0f s", start + len(parts[-1]), len(texts), time.perf_counter() - started
        )
    return np.ascontiguousarray(np.vstack(parts), dtype=np.float32)


def pep_vectors(path: Path, folder: Path = knowledge_corpus.CORPUS_FOLDER, max_chunks: int | None = None):
    """Load the PEP vectors saved at ``path``, or embed the corpus and save them there first."""
    if path.is_file():
        matrix = np.load(path)
        logger.info("loaded %d PEP vectors from %s", len(matrix), path)
        return matrix
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    matrix = asyncio.run(embed_pep_corpus(folder, max_chunks))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, matrix)
    logger.info("saved %d PEP vectors to %s", len(matrix), path)
    return matrix


def synthetic_vectors(count: int, dimension: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """Return ``count`` unit vectors, each a random centre plus Gaussian noise of norm ``spread``."""
    generator = np.random.default_rng(seed)
    centres = generator.standard_normal((clusters, dimension)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    matrix = np.empty((count, dimension), dtype=np.float32)
    step = 50_000  # rows per block, to bound the temporary arrays
    for start in range(0, count, step):
        rows = min(step, count - start)
        noise = generator.standard_normal((rows, dimension)).astype(np.float32)
        noise *= spread / np.linalg.norm(noise, axis=1, keepdims=True)
        block = centres[generator.integers(0, clusters, rows)] + noise
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        matrix[start : start + rows] = block
    return matrix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.vector_corpus", description="Embed the PEP corpus once and save the vectors."
    )
    parser.add_argument("--out", type=Path, required=True, help=".npy file to write")
    parser.add_argument("--max-chunks", type=int, help="embed only the first N distinct chunk texts")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    pep_vectors(arguments.out, max_chunks=arguments.max_chunks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
