"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.api.deps import RuntimeDep
from app.db.migrate import check_schema
from app.monitoring.metrics import refresh_database_gauges

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["metrics"])


@router.get("/health")
async def read_health() -> dict[str, str]:
    """Liveness: the process serves requests. Dependencies are checked by /ready."""
    return {"status": "ok"}


@router.get("/ready")
async def read_readiness(runtime: RuntimeDep) -> JSONResponse:
    """Readiness: the database answers and its schema is the one this code expects.

    The cache and signals are reported too, but their outage does not make the instance unready.
    """
    checks: dict[str, str] = {}
    try:
        async with runtime.database.read() as connection:
            await connection.execute(text("SELECT 1"))
        await check_schema(runtime.database)
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; the reason is reported
        logger.warning("readiness check failed: %s", exc, extra={"action": "health.not_ready"})
        # /ready is open in production, so it names the failure but not the server's message.
        detail = type(exc).__name__ if runtime.settings.is_production else f"{type(exc).__name__}: {exc}"
        checks["database"] = f"failed: {detail}"

    ready = all(value == "ok" for value in checks.values())
    # A cache outage degrades the instance (lookups miss, signals fall back to polling) but
    # every request still succeeds, so it is reported without making the instance unready.
    cache_status = await runtime.shared_cache.check()
    checks["cache"] = "ok" if cache_status == "ok" else f"degraded: {cache_status}"
    checks["signals"] = "degraded: polling" if runtime.signals.degraded else "ok"
    return JSONResponse(
        status_code=status.HTTP_200_OK if ready else status.HTTP_503_SERVICE_UNAVAILABLE,
        content={"status": "ready" if ready else "not ready", "checks": checks},
    )


@metrics_router.get("/metrics")
async def read_metrics(runtime: RuntimeDep) -> Response:
    try:
        await refresh_database_gauges(runtime.database)
    except Exception as exc:  # noqa: BLE001 - the process metrics are still worth serving
        logger.warning("reading queue gauges failed: %s", exc, extra={"action": "metrics.database_failed"})
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
