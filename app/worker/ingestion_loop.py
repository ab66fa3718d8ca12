"""The worker's ingestion loop: lease queued documents in batches and ingest them.

It runs beside the task loop in every worker, so a large upload is spread over all workers.
A batch in progress at shutdown is given back to the queue at once, and the batch of a
worker that died is requeued when its lease expires.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress

from app.core.config import Settings
from app.knowledge.ingestion import DocumentIngestor
from app.worker.cancelling import raise_if_cancelling

logger = logging.getLogger(__name__)


class IngestionLoop:
    def __init__(self, ingestor: DocumentIngestor, settings: Settings, worker_id: str) -> None:
        self.ingestor = ingestor
        self.batch_documents = settings.knowledge.ingestion_batch_documents
        self.poll_interval = settings.worker.poll_interval_seconds
        self.sweep_interval = settings.worker.sweep_interval_seconds
        self.worker_id = worker_id
        self.wake = asyncio.Event()
        self._last_sweep = 0.0

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self.wake.clear()
            await self._sweep_when_due()
            try:
                leased = await self.ingestor.claim(self.worker_id, self.batch_documents)
            except Exception as exc:  # noqa: BLE001 - a database outage must not end the worker
                logger.error(
                    "claiming documents failed: %s",
                    exc,
                    extra={"action": "ingestion.claim_failed", "worker_id": self.worker_id},
                )
                leased = []

            if leased:
                await self._process(leased)
                continue
            with suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=self.poll_interval)

    async def _process(self, leased) -> None:
        try:
            await self.ingestor.process(self.worker_id, leased)
        except asyncio.CancelledError:
            # Shutdown: hand the batch back so another worker starts on it at once.
            await asyncio.shield(self.ingestor.release(self.worker_id, leased))
            raise
        except Exception as exc:  # noqa: BLE001 - the leases expire and the documents are retried
            logger.error(
                "ingesting a batch failed: %s",
                exc,
                extra={"action": "ingestion.failed", "worker_id": self.worker_id, "documents": len(leased)},
            )

    async def _sweep_when_due(self) -> None:
        if time.monotonic() - self._last_sweep < self.sweep_interval:
            return
        self._last_sweep = time.monotonic()
        try:
            requeued = await self.ingestor.sweep_expired()
        except Exception as exc:  # noqa: BLE001 - the next sweep tries again
            raise_if_cancelling(exc)
            logger.error(
                "sweeping document leases failed: %s",
                exc,
                extra={"action": "ingestion.sweep_failed", "worker_id": self.worker_id},
            )
            return
        if requeued:
            logger.warning(
                "requeued %d documents whose worker stopped",
                requeued,
                extra={
                    "action": "document.lease_expired",
                    "worker_id": self.worker_id,
                    "documents": requeued,
                },
            )
