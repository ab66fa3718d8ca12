"""Running the API under uvicorn, shared by ``deploy.py`` and ``python -m app.cli serve``."""

from __future__ import annotations

import asyncio

import uvicorn

from app.agent.team import build_team
from app.api.app import create_app
from app.core.config import Settings
from app.core.http_protocol import with_header_timeout
from app.core.listening import bind_socket
from app.db.engine import Database
from app.db.migrate import check_schema, upgrade
from app.llm.registry import ProviderRegistry


def server_config(
    settings: Settings, *, migrate: bool = True, embedded_worker: bool = False
) -> uvicorn.Config:
    app = create_app(settings, migrate=migrate, embedded_worker=embedded_worker)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # app.core.logging owns the handlers
        http=with_header_timeout(settings.api.header_timeout_seconds),
        # Longer than the worker's grace period, so an embedded worker can drain first.
        timeout_graceful_shutdown=int(settings.worker.shutdown_grace_seconds) + 5,
    )


async def prepare_instance(settings: Settings, migrate: bool) -> None:
    """Check what the lifespan needs before uvicorn starts, so that a failure is one clear error.

    The team and the LLM providers are built once and discarded: a bad role or an unreadable
    API key file raises ConfigError here instead of a traceback from inside uvicorn.
    """
    build_team(settings)
    providers = ProviderRegistry.from_settings(settings)
    await providers.aclose()

    database = Database(settings.database)
    try:
        if migrate:
            await upgrade(database)
        await check_schema(database)
    finally:
        await database.dispose()


def serve_api(settings: Settings, *, migrate: bool = True, embedded_worker: bool = False) -> None:
    """Serve until SIGINT or SIGTERM; raises TorontoAIError when the instance cannot start."""
    asyncio.run(prepare_instance(settings, migrate))
    listener = bind_socket(settings.host, settings.port, "--port or TORONTO_AI_PORT")
    # The schema is current now, so the lifespan only checks it again.
    server = uvicorn.Server(server_config(settings, migrate=False, embedded_worker=embedded_worker))
    try:
        server.run(sockets=[listener])
    finally:
        listener.close()
