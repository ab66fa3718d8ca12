"""Running the API under uvicorn, shared by ``deploy.py`` and ``python -m app.cli serve``."""

from __future__ import annotations

import asyncio
import errno
import socket

import uvicorn

from app.agent.team import build_team
from app.api.app import create_app
from app.core.config import Settings
from app.db.engine import Database
from app.db.migrate import check_schema, upgrade
from app.errors import ConfigError
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


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket before serving, so that a taken port is a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is already in use; stop the process that listens on it "
                "or choose another port with --port or TORONTO_AI_PORT"
            ) from exc
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; check host (TORONTO_AI_HOST) "
            "and port (--port or TORONTO_AI_PORT)"
        ) from exc
    listener.set_inheritable(True)
    return listener


def serve_api(settings: Settings, *, migrate: bool = True, embedded_worker: bool = False) -> None:
    """Serve until SIGINT or SIGTERM; raises TorontoAIError when the instance cannot start."""
    asyncio.run(prepare_instance(settings, migrate))
    listener = bind_socket(settings.host, settings.port)
    # The schema is current now, so the lifespan only checks it again.
    server = uvicorn.Server(server_config(settings, migrate=False, embedded_worker=embedded_worker))
    try:
        server.run(sockets=[listener])
    finally:
        listener.close()
