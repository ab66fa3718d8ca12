"""The PEP corpus of the knowledge-base benchmark, read and chunked by the project's own code.

Files are read with the ``ingest`` command's ``collect_files`` and ``read_documents``, and
chunked by ``chunk_document`` with the token counter and chunk settings that ingestion uses,
so the chunks measured here are the chunks a knowledge base stores.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.core.config import KnowledgeSettings
from app.knowledge.chunking import chunk_document
from app.knowledge.documents import detect_format
from app.knowledge.repository import NewDocument
from app.knowledge.tokens import default_token_counter
from app.training.cli import collect_files, read_documents

CORPUS_FOLDER = Path(__file__).resolve().parent / "corpus" / "peps"


@dataclass(frozen=True, slots=True)
class CorpusChunk:
    source: str
    position: int
    text: str
    token_count: int  # without [CLS] and [SEP], as the chunker counts


def read_corpus(folder: Path, max_document_bytes: int) -> list[NewDocument]:
    """Read every supported file under ``folder``, and raise ValueError if any file is rejected."""
    documents, rejected = read_documents(collect_files([folder]), max_document_bytes)
    if rejected:
        raise ValueError(f"{len(rejected)} corpus files were rejected, the first: {rejected[0]}")
    if not documents:
        raise ValueError(f"no Markdown, reStructuredText, HTML or text file found under {folder}")
    return documents


def chunk_corpus(
    documents: list[NewDocument], settings: KnowledgeSettings
) -> tuple[list[CorpusChunk], float]:
    """Chunk every document as ingestion does, and return the chunks and the seconds it took."""
    counter = default_token_counter()
    started = time.perf_counter()
    chunks = []
    for document in documents:
        pieces = chunk_document(
            document.text,
            detect_format(document.source, document.text),
            counter,
            max_tokens=settings.chunk_max_tokens,
            overlap_tokens=settings.chunk_overlap_tokens,
        )
        chunks.extend(
            CorpusChunk(document.source, piece.index, piece.text, piece.token_count) for piece in pieces
        )
    return chunks, time.perf_counter() - started


def token_statistics(chunks: list[CorpusChunk], model: Any) -> dict[str, Any]:
    """Summarise chunk lengths, counted again by the model's own tokenizer with special tokens.

    ``model`` is a loaded SentenceTransformer. A chunk is truncated by the model when its
    length with [CLS] and [SEP] exceeds ``model.max_seq_length``, so ``truncated_chunks`` counts
    the chunks whose end the model ignores.
    """
    chunker_counts = np.array([chunk.token_count for chunk in chunks])
    encoded = model.tokenizer(
        [chunk.text for chunk in chunks], add_special_tokens=True, truncation=False, padding=False
    )
    model_counts = np.array([len(ids) for ids in encoded["input_ids"]])
    limit = int(model.max_seq_length)
    return {
        "chunks": len(chunks),
        "documents": len({chunk.source for chunk in chunks}),
        "chunker_tokens": _distribution(chunker_counts),
        "model_tokens_with_special": _distribution(model_counts),
        "model_max_seq_length": limit,
        "truncated_chunks": int((model_counts > limit).sum()),
        "histogram": np.bincount(model_counts).tolist(),
    }


def _distribution(values: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(values.mean()),
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "max": int(values.max()),
        "min": int(values.min()),
    }


def sample_texts(chunks: list[CorpusChunk], size: int, seed: int) -> list[str]:
    """Return the texts of ``size`` chunks drawn at random without replacement, in corpus order."""
    if size > len(chunks):
        raise ValueError(f"a sample of {size} chunks was requested, but the corpus has {len(chunks)}")
    picked = sorted(random.Random(seed).sample(range(len(chunks)), size))
    return [chunks[index].text for index in picked]


def pick_documents(documents: list[NewDocument], count: int | None, seed: int) -> list[NewDocument]:
    """Return all documents, or ``count`` of them drawn at random, in source order."""
    if count is None or count >= len(documents):
        return list(documents)
    picked = sorted(random.Random(seed).sample(range(len(documents)), count))
    return [documents[index] for index in picked]
