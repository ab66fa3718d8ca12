"""Active health checks: ``GET /health`` on every API instance at a fixed interval."""

from __future__ import annotations

import asyncio
import logging

import httpx

from app.deployment.backends import Backend, BackendPool

logger = logging.getLogger(__name__)


class HealthChecker:
    """Probe every backend: ``failures_to_eject`` failed probes in a row eject it, and a pass re-admits it."""

    def __init__(
        self,
        pool: BackendPool,
        client: httpx.AsyncClient,
        interval_seconds: float,
        failures_to_eject: int,
    ) -> None:
        self.pool = pool
        self.client = client
        self.interval_seconds = interval_seconds
        self.failures_to_eject = failures_to_eject
        self.failed_probes: dict[Backend, int] = {}

    async def probe(self, backend: Backend) -> str | None:
        """Return None when the backend responds with 200, otherwise the reason it failed."""
        try:
            response = await self.client.get(f"{backend.base_url}/health")
        except httpx.HTTPError as exc:
            return f"GET /health failed: {type(exc).__name__}: {exc}"
        if response.status_code != 200:
            return f"GET /health returned {response.status_code}"
        return None

    async def check_once(self, *, initial: bool = False) -> None:
        """Probe every backend at once and apply the results.

        On the first round a backend that fails is held back at once, so the balancer never
        sends a request to an instance that was down when it started.
        """
        reasons = await asyncio.gather(*(self.probe(backend) for backend in self.pool.backends))
        for backend, reason in zip(self.pool.backends, reasons, strict=True):
            if reason is None:
                self.failed_probes[backend] = 0
                if backend.ejected:
                    self.pool.readmit(backend)
                continue
            self.failed_probes[backend] = self.failed_probes.get(backend, 0) + 1
            if initial:
                self.pool.hold_back(backend, reason)
            elif self.failed_probes[backend] >= self.failures_to_eject:
                self.pool.eject(backend, reason)

    async def run(self) -> None:
        """Check every ``interval_seconds`` until cancelled."""
        while True:
            await asyncio.sleep(self.interval_seconds)
            try:
                await self.check_once()
            except Exception:  # noqa: BLE001 - a bug in one round must not stop later rounds
                logger.exception("health check round failed", extra={"action": "lb.health_check_error"})
