"""An in-process API with an embedded worker, small documents, and embedders for tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from fastapi import FastAPI

from app.api.app import create_app
from app.errors import EmbeddingError
from app.knowledge.embeddings import Embedder
from app.runtime import Runtime
from tests.conftest import make_settings
from tests.integration.helpers import FAST_WORKER

# The first ingestion of a test process also loads the embedding model, which takes about
# 7 s on a 2-core machine. Later ingestions of these documents take well under a second.
INGESTION_TIMEOUT_SECONDS = 90.0

LEAVE_POLICY = """\
# Leave policy

## Annual leave

Every employee gets 25 days of paid annual leave per calendar year. Days not taken carry
over until the end of March of the next year and then expire.

## Sick leave

Tell your manager before 10:00 on the first day you are ill. From the fourth day in a row,
bring a note from a doctor.
"""

DEPLOY_RUNBOOK = """\
# Deploying the billing service

## Before you start

Check that the main branch is green in CI and that no database migration waits for review.

## Steps

1. Tag the release with the next semantic version.
2. Run the deploy pipeline against the staging cluster and watch the error rate for
   fifteen minutes.
3. Promote the same container image to production, during office hours only.

## Rolling back

Redeploy the previous tag. Migrations stay backwards compatible for one release, so the
previous version runs against the new schema.
"""


@dataclass
class ApiUnderTest:
    app: FastAPI
    client: httpx.AsyncClient

    @property
    def runtime(self) -> Runtime:
        return self.app.state.runtime


@asynccontextmanager
async def open_api(
    database_url: str, tmp_path: Path, *, embedded_worker: bool = True, **environment: str
) -> AsyncIterator[ApiUnderTest]:
    """Start the API, with an embedded worker unless ``embedded_worker`` is false, and stop it on exit."""
    settings = make_settings(database_url, tmp_path, **{**FAST_WORKER, **environment})
    app = create_app(settings, embedded_worker=embedded_worker)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield ApiUnderTest(app, client)


async def add_documents(client: httpx.AsyncClient, name: str, documents: dict[str, str]) -> dict:
    """Queue documents given as source to text, assert 202, and return the counts."""
    response = await client.post(
        f"/api/v1/knowledge-bases/{name}/documents",
        json={"documents": [{"source": source, "text": text} for source, text in documents.items()]},
    )
    assert response.status_code == 202, response.text
    return response.json()


async def wait_for_ingestion(
    client: httpx.AsyncClient, name: str, timeout_seconds: float = INGESTION_TIMEOUT_SECONDS
) -> dict:
    """Poll the knowledge base until no document waits for ingestion, and return its last state."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        response = await client.get(f"/api/v1/knowledge-bases/{name}")
        assert response.status_code == 200, response.text
        body = response.json()
        if body["pending_documents"] == 0:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(
                f"knowledge base {name!r} still has pending documents after {timeout_seconds} s: {body}"
            )
        await asyncio.sleep(0.05)


async def create_and_ingest(client: httpx.AsyncClient, name: str, documents: dict[str, str]) -> dict:
    """Create a knowledge base, add the documents, wait for them and return the base's state."""
    created = await client.post("/api/v1/knowledge-bases", json={"name": name})
    assert created.status_code == 201, created.text
    await add_documents(client, name, documents)
    return await wait_for_ingestion(client, name)


class RecordingEmbedder:
    """An embedder wrapper that records every text it is asked to embed."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.model_name = inner.model_name
        self.dimension = inner.dimension
        self.texts: list[str] = []

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.texts.extend(texts)
        return await self.inner.embed(texts)


class BrokenEmbedder:
    """A stand-in for a broken model, with the configured name and dimension, whose every call fails."""

    message = "the model returned no vectors (broken on purpose by the test)"

    def __init__(self, like: Embedder) -> None:
        self.model_name = like.model_name
        self.dimension = like.dimension
        self.calls = 0

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        raise EmbeddingError(self.message)
