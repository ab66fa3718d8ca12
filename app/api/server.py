"""Running the API under uvicorn, shared by ``deploy.py`` and ``python -m app.cli serve``."""

from __future__ import annotations

import asyncio

import uvicorn

from app.api.app import create_app
from app.core.config import Settings
from app.db.engine import Database
from app.db.migrate import check_schema, upgrade


def server_config(
    settings: Settings, *, migrate: bool = True, embedded_worker: bool = False
) -> uvicorn.Config:
    app = create_app(settings, migrate=migrate, embedded_worker=embedded_worker)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # app.core.logging owns the handlers
        # Longer than the worker's grace period, so an embedded worker can drain first.
        timeout_graceful_shutdown=int(settings.worker.shutdown_grace_seconds) + 5,
    )


async def prepare_database(settings: Settings, migrate: bool) -> None:
    """Migrate or check the schema before uvicorn starts, so that a failure is one clear error."""
    database = Database(settings.database)
    try:
        if migrate:
            await upgrade(database)
        await check_schema(database)
    finally:
        await database.dispose()


def serve_api(settings: Settings, *, migrate: bool = True, embedded_worker: bool = False) -> None:
    """Serve until SIGINT or SIGTERM; raises TorontoAIError when the database is not usable."""
    asyncio.run(prepare_database(settings, migrate))
    # The schema is current now, so the lifespan only checks it again.
    uvicorn.Server(server_config(settings, migrate=False, embedded_worker=embedded_worker)).run()
