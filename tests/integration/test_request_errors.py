"""Malformed request bodies get a 422 whose message says what to send instead."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.api.app import create_app
from tests.conftest import make_settings

PROJECTS = "/api/v1/projects"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    # Body parsing happens before any query, so one engine is enough here.
    app = create_app(make_settings(f"sqlite:///{tmp_path / 'app.db'}", tmp_path))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def detail(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    return response.json()["detail"]


async def test_invalid_json_names_the_problem(client: httpx.AsyncClient) -> None:
    response = await client.post(
        PROJECTS, content=b'{"brief": "x",,}', headers={"Content-Type": "application/json"}
    )

    message = detail(response)
    assert "the body is not valid JSON" in message
    assert "send a JSON object" in message


async def test_unknown_field_lists_accepted_fields(client: httpx.AsyncClient) -> None:
    response = await client.post(PROJECTS, json={"brief": "Build a thing.", "titel": "Thing"})

    message = detail(response)
    assert "body.titel: unknown field" in message
    assert "accepted fields: brief, knowledge_base, team, title" in message
    assert "did you mean 'title'?" in message


async def test_form_body_asks_for_json(client: httpx.AsyncClient) -> None:
    response = await client.post(PROJECTS, data={"brief": "Build a thing."})

    message = detail(response)
    assert "Content-Type: application/json" in message
    assert "application/x-www-form-urlencoded" in message


async def test_json_array_body_asks_for_an_object(client: httpx.AsyncClient) -> None:
    response = await client.post(PROJECTS, json=["Build a thing."])

    assert detail(response) == "invalid request: body: the body must be a JSON object"
