"""Running the API under uvicorn, shared by ``deploy.py`` and ``python -m app.cli serve``."""

from __future__ import annotations

import uvicorn

from app.api.app import create_app
from app.core.config import Settings


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


def serve_api(settings: Settings, *, migrate: bool = True, embedded_worker: bool = False) -> None:
    uvicorn.Server(server_config(settings, migrate=migrate, embedded_worker=embedded_worker)).run()
