"""One log line per request, with passing health probes kept below INFO."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.api.app import create_app
from tests.conftest import make_settings


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(f"sqlite:///{tmp_path / 'app.db'}", tmp_path))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def test_passing_probes_logged_at_debug(client: httpx.AsyncClient, caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="app.api.access"):
        health = await client.get("/health")
        ready = await client.get("/ready")
        listed = await client.get("/api/v1/projects")
    levels = {record.getMessage().split(" ")[1]: record.levelno for record in caplog.records}

    assert (health.status_code, ready.status_code, listed.status_code) == (200, 200, 200)
    assert levels["/health"] == logging.DEBUG
    assert levels["/ready"] == logging.DEBUG
    assert levels["/api/v1/projects"] == logging.INFO
