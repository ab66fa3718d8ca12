"""Reads of finished projects served from the shared cache before routing."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from prometheus_client import REGISTRY

from app.api.auth import create_api_key, revoke_api_key
from app.cache import CacheKind
from app.runtime import Runtime
from tests.conftest import make_settings
from tests.integration.api_client import BRIEF, open_client, wait_for_status
from tests.integration.helpers import FAST_WORKER

READ_ROUTE = "/api/v1/projects/{project_id}"


def served_reads() -> float:
    labels = {"method": "GET", "path": READ_ROUTE, "status": "200"}
    return REGISTRY.get_sample_value("toronto_ai_http_request_seconds_count", labels) or 0.0


async def finished_cached_project(client) -> str:
    project_id = (await client.post("/api/v1/projects", json={"brief": BRIEF})).json()["id"]
    await wait_for_status(client, project_id, "completed")
    runtime = client._transport.app.state.runtime
    assert await runtime.shared_cache.get(CacheKind.PROJECT, project_id) is not None
    return project_id


async def test_cached_read_matches_route(api):
    project_id = (await api.post("/api/v1/projects", json={"brief": BRIEF})).json()["id"]
    await wait_for_status(api, project_id, "completed")
    from_route = await api.get(f"/api/v1/projects/{project_id}")
    runtime = api._transport.app.state.runtime
    assert await runtime.shared_cache.get(CacheKind.PROJECT, project_id) == from_route.content

    counted_before = served_reads()
    cached = await api.get(f"/api/v1/projects/{project_id}", headers={"X-Request-ID": "cached-1"})

    assert cached.status_code == 200
    assert cached.content == from_route.content
    assert cached.headers["content-type"] == from_route.headers["content-type"]
    assert cached.headers["x-request-id"] == "cached-1"
    # Counted under the route's path template, like reads that reach the route.
    assert served_reads() == counted_before + 1


@asynccontextmanager
async def production_api(database_url, tmp_path) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient, str]]:
    """Yield the runtime, a client without a key, and a valid API key, in production mode."""
    settings = make_settings(
        database_url,
        tmp_path,
        TORONTO_AI_ENV="production",
        TORONTO_AI_LLM__ALLOW_OFFLINE_IN_PRODUCTION="true",
        **FAST_WORKER,
    )
    app, lifespan, client = await open_client(settings, embedded_worker=True)
    runtime = app.state.runtime
    try:
        async with runtime.database.transaction() as connection:
            key = await create_api_key(connection, "reader")
        yield runtime, client, key
    finally:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


async def test_cached_read_needs_valid_key(database_url, tmp_path):
    async with production_api(database_url, tmp_path) as (runtime, client, key):
        authorized = {"Authorization": f"Bearer {key}"}
        keyed = httpx.AsyncClient(transport=client._transport, base_url="http://test", headers=authorized)
        project_id = await finished_cached_project(keyed)

        with_key = await keyed.get(f"/api/v1/projects/{project_id}")
        without_key = await client.get(f"/api/v1/projects/{project_id}")
        wrong_key = await client.get(
            f"/api/v1/projects/{project_id}", headers={"Authorization": "Bearer tat_wrong"}
        )
        async with runtime.database.transaction() as connection:
            await revoke_api_key(connection, key)
        revoked_key = await keyed.get(f"/api/v1/projects/{project_id}")

    assert with_key.status_code == 200
    assert with_key.json()["status"] == "completed"
    for refused in (without_key, wrong_key, revoked_key):
        assert refused.status_code == 401
        assert "create-api-key" in refused.json()["detail"]
        assert refused.headers["www-authenticate"] == "Bearer"


async def test_invalid_position_rejected_when_cached(api):
    project_id = await finished_cached_project(api)

    by_header = await api.get(f"/api/v1/projects/{project_id}", headers={"X-Toronto-AI-LSN": "garbage"})
    api.cookies.set("toronto_ai_lsn", "garbage")
    by_cookie = await api.get(f"/api/v1/projects/{project_id}")
    api.cookies.set("toronto_ai_lsn", "0/16B3748")
    valid_cookie = await api.get(f"/api/v1/projects/{project_id}")

    assert by_header.status_code == 422
    assert "X-Toronto-AI-LSN" in by_header.json()["detail"]
    assert by_cookie.status_code == 422
    assert "toronto_ai_lsn" in by_cookie.json()["detail"]
    assert valid_cookie.status_code == 200


async def test_body_limit_applies_when_cached(api):
    project_id = await finished_cached_project(api)

    response = await api.request("GET", f"/api/v1/projects/{project_id}", content=b"x" * 5000)

    assert response.status_code == 413


async def test_failed_key_check_gives_usual_503(database_url, tmp_path, monkeypatch):
    async with production_api(database_url, tmp_path) as (runtime, client, key):
        client.headers["Authorization"] = f"Bearer {key}"
        project_id = await finished_cached_project(client)

        def database_down():
            raise ConnectionRefusedError("connection refused by the test")

        monkeypatch.setattr(runtime.database, "read", database_down)
        response = await client.get(f"/api/v1/projects/{project_id}", headers={"X-Request-ID": "down-1"})
        monkeypatch.undo()

    assert response.status_code == 503
    assert "database is unavailable" in response.json()["detail"]
    assert response.headers["retry-after"]
    assert response.headers["x-request-id"] == "down-1"


def project_cache_misses() -> float:
    labels = {"kind": "project", "result": "miss"}
    return REGISTRY.get_sample_value("toronto_ai_cache_requests_total", labels) or 0.0


async def test_unfinished_project_not_cached(api_without_worker):
    project_id = (await api_without_worker.post("/api/v1/projects", json={"brief": BRIEF})).json()["id"]

    misses_before = project_cache_misses()
    first = await api_without_worker.get(f"/api/v1/projects/{project_id}")
    assert project_cache_misses() == misses_before + 1
    cancelled = await api_without_worker.post(f"/api/v1/projects/{project_id}/cancel")
    second = await api_without_worker.get(f"/api/v1/projects/{project_id}")

    assert first.json()["status"] == "queued"
    assert cancelled.status_code == 200
    assert second.json()["status"] == "cancelled"
