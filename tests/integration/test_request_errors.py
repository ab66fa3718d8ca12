"""Malformed request bodies get a 422 whose message says what to send instead."""

from __future__ import annotations

import httpx

PROJECTS = "/api/v1/projects"


def detail(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    return response.json()["detail"]


async def test_invalid_json_names_the_problem(sqlite_client: httpx.AsyncClient) -> None:
    response = await sqlite_client.post(
        PROJECTS, content=b'{"brief": "x",,}', headers={"Content-Type": "application/json"}
    )

    message = detail(response)
    assert "the body is not valid JSON" in message
    assert "send a JSON object" in message


async def test_unknown_field_lists_accepted_fields(sqlite_client: httpx.AsyncClient) -> None:
    response = await sqlite_client.post(PROJECTS, json={"brief": "Build a thing.", "titel": "Thing"})

    message = detail(response)
    assert "body.titel: unknown field" in message
    assert "accepted fields: brief, knowledge_base, team, title" in message
    assert "did you mean 'title'?" in message


async def test_form_body_asks_for_json(sqlite_client: httpx.AsyncClient) -> None:
    response = await sqlite_client.post(PROJECTS, data={"brief": "Build a thing."})

    message = detail(response)
    assert "Content-Type: application/json" in message
    assert "application/x-www-form-urlencoded" in message


async def test_json_array_body_asks_for_an_object(sqlite_client: httpx.AsyncClient) -> None:
    response = await sqlite_client.post(PROJECTS, json=["Build a thing."])

    assert detail(response) == "invalid request: body: the body must be a JSON object"
