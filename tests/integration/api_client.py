"""The API application in process, reached through httpx, for integration tests."""

import asyncio
import time

import httpx

from app.api.app import create_app

BRIEF = "# Demo\n\nBuild a small thing that works."


async def open_client(settings, embedded_worker: bool):
    app = create_app(settings, embedded_worker=embedded_worker)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return app, lifespan, client


async def wait_for_status(client, project_id, expected, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = (await client.get(f"/api/v1/projects/{project_id}")).json()
        if body["status"] == expected:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"project {project_id} is {body['status']}, expected {expected}")
