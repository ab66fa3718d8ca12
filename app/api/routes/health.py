"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.api.deps import RuntimeDep
from app.db.migrate import check_schema
from app.errors import VectorStoreError
from app.knowledge.chroma_store import ChromaVectorStore
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

    store = runtime.knowledge.store
    if isinstance(store, ChromaVectorStore):
        checks["vector_store"] = await vector_store_check(store)

    # A cache outage degrades the instance (lookups miss, signals fall back to polling) but
    # every request still succeeds, so it is reported without making the instance unready.
    cache_status = await runtime.shared_cache.check()
    checks["cache"] = "ok" if cache_status == "ok" else f"degraded: {cache_status}"
    checks["signals"] = "degraded: polling" if runtime.signals.degraded else "ok"

    # A Chroma server down is "degraded", not a failure: replicas or the other partitions
    # still serve queries, and taking every instance out of rotation would serve none.
    ready = all(value == "ok" or value.startswith("degraded") for value in checks.values())
    return JSONResponse(
        status_code=status.HTTP_200_OK if ready else status.HTTP_503_SERVICE_UNAVAILABLE,
        content={"status": "ready" if ready else "not ready", "checks": checks},
    )


async def vector_store_check(store: ChromaVectorStore) -> str:
    """Return "ok", "degraded: ..." when some Chroma servers do not respond, or "failed: ..." when none does."""
    addresses = [instance.address for instance in store.settings.instances]
    unreachable = []
    for address in addresses:
        try:
            await store.instances.heartbeat(address, retries=0)
        except VectorStoreError:
            unreachable.append(address)
    if not unreachable:
        return "ok"
    state = "failed" if len(unreachable) == len(addresses) else "degraded"
    return f"{state}: Chroma {', '.join(unreachable)} unreachable"


@metrics_router.get("/metrics")
async def read_metrics(runtime: RuntimeDep) -> Response:
    try:
        await refresh_database_gauges(runtime.database)
    except Exception as exc:  # noqa: BLE001 - the process metrics are still worth serving
        logger.warning("reading queue gauges failed: %s", exc, extra={"action": "metrics.database_failed"})
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
