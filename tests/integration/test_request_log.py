"""One log line per request, with passing health probes kept below INFO."""

from __future__ import annotations

import logging

import httpx


async def test_passing_probes_logged_at_debug(sqlite_client: httpx.AsyncClient, caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="app.api.access"):
        health = await sqlite_client.get("/health")
        ready = await sqlite_client.get("/ready")
        listed = await sqlite_client.get("/api/v1/projects")
    levels = {record.getMessage().split(" ")[1]: record.levelno for record in caplog.records}

    assert (health.status_code, ready.status_code, listed.status_code) == (200, 200, 200)
    assert levels["/health"] == logging.DEBUG
    assert levels["/ready"] == logging.DEBUG
    assert levels["/api/v1/projects"] == logging.INFO
