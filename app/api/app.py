"""The FastAPI application factory.

``create_app(settings)`` builds an app whose lifespan starts the runtime (database, team,
providers) and, for the all-in-one process, an embedded worker in the same event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from fastapi.routing import APIRoute

from app.api.cached_reads import CachedProjectReads
from app.api.consistency import ReadYourWritesMiddleware
from app.api.deps import require_api_key
from app.api.errors import install_error_handlers
from app.api.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from app.api.routes import health, knowledge, projects
from app.core.config import Settings
from app.runtime import Runtime
from app.worker.runner import Worker

logger = logging.getLogger(__name__)


def create_app(settings: Settings, *, migrate: bool = True, embedded_worker: bool = False) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.start(settings, migrate=migrate, use_replicas=True)
        app.state.runtime = runtime
        runtime.signals.receive_events()
        worker_task = None
        if embedded_worker:
            worker = Worker(
                runtime.database,
                runtime.executor,
                settings,
                ingestor=runtime.ingestor,
                signals=runtime.signals,
            )
            runtime.notify_work = worker.wake
            worker_task = asyncio.create_task(worker.run(), name="embedded-worker")
        logger.info(
            "API instance ready",
            extra={"action": "api.started", "port": settings.port, "embedded_worker": embedded_worker},
        )
        try:
            yield
        finally:
            if worker_task is not None:
                worker.stop()
                await worker_task
            await runtime.aclose()
            logger.info("API instance stopped", extra={"action": "api.stopped"})

    app = FastAPI(
        title="TORONTO AI TEAM AGENT",
        version="0.1.0",
        summary="Runs teams of LLM agents on user projects",
        lifespan=lifespan,
        openapi_url="/openapi.json" if settings.api.docs else None,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(health.metrics_router, dependencies=[Depends(require_api_key)])
    app.include_router(projects.router, dependencies=[Depends(require_api_key)])
    app.include_router(knowledge.router, dependencies=[Depends(require_api_key)])
    app.add_middleware(ReadYourWritesMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.api.max_body_bytes)
    app.add_middleware(CachedProjectReads, route=_route_of(projects.router, projects.read_project))
    app.add_middleware(RequestContextMiddleware)
    return app


def _route_of(router: APIRouter, endpoint: object) -> APIRoute:
    return next(
        route for route in router.routes if isinstance(route, APIRoute) and route.endpoint is endpoint
    )
