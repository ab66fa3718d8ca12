"""The OpenAI-compatible embedder against the scripted local server, which stands in for a
hosted embeddings endpoint that the test machine cannot reach."""

from __future__ import annotations

import numpy as np
import pytest

from app.core.config import KnowledgeSettings
from app.errors import EmbeddingError
from app.knowledge.embeddings import OpenAIEmbedder
from tests.integration.llm.scripted_server import Reply, ScriptedServer


def embedder(server: ScriptedServer, dimension: int = 3, batch_size: int = 2) -> OpenAIEmbedder:
    settings = KnowledgeSettings(
        embedding_provider="openai",
        embedding_model="text-embedding-test",
        embedding_base_url=f"{server.url}/v1",
        embedding_api_key="sk-test",
        embedding_dimension=dimension,
        batch_size=batch_size,
    )
    return OpenAIEmbedder(settings)


def vectors_body(*vectors: list[float]) -> dict:
    # Out of order on purpose: clients must sort by "index".
    items = [
        {"object": "embedding", "index": index, "embedding": vector} for index, vector in enumerate(vectors)
    ]
    return {"object": "list", "data": list(reversed(items)), "model": "text-embedding-test"}


async def test_embeds_in_batches_and_normalises(server: ScriptedServer) -> None:
    server.script(Reply(body=vectors_body([3, 4, 0], [0, 0, 2])), Reply(body=vectors_body([1, 0, 0])))
    client = embedder(server)

    matrix = await client.embed(["a", "b", "c"])
    await client.aclose()

    assert matrix.shape == (3, 3)
    assert np.allclose(matrix[0], [0.6, 0.8, 0.0])
    assert np.allclose(matrix[1], [0.0, 0.0, 1.0])
    assert [request.body["input"] for request in server.requests] == [["a", "b"], ["c"]]
    assert server.requests[0].path == "/v1/embeddings"
    assert server.requests[0].headers["authorization"] == "Bearer sk-test"


async def test_wrong_dimension_is_reported(server: ScriptedServer) -> None:
    server.script(Reply(body=vectors_body([1, 0], [0, 1])))
    client = embedder(server)

    with pytest.raises(EmbeddingError, match="knowledge.embedding_dimension"):
        await client.embed(["a", "b"])
    await client.aclose()


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (Reply(status=401, body={"error": {"message": "bad key"}}), "HTTP 401"),
        (Reply(body={"unexpected": True}), "not in the OpenAI format"),
    ],
)
async def test_errors_name_the_endpoint(server: ScriptedServer, reply: Reply, message: str) -> None:
    server.script(reply)
    client = embedder(server)

    with pytest.raises(EmbeddingError, match=message) as caught:
        await client.embed(["a"])
    await client.aclose()

    assert server.url in str(caught.value)
