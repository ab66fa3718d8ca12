"""Outage tracking of Redis servers: when to bypass one, when to try it again, what to log.

A failed command marks its server down for ``retry_seconds``. Until then callers skip it
(the cache is bypassed, signals fall back to polling) without waiting on the network. The
first command after the pause tries the server again, and a success ends the outage. An
outage is logged when it starts, at most once per ``log_interval_seconds`` while it lasts,
and when it ends. The metrics ``toronto_ai_cache_server_up`` and
``toronto_ai_cache_outages_total`` expose it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from app.monitoring.metrics import CACHE_OUTAGES, CACHE_SERVER_UP

logger = logging.getLogger(__name__)


@dataclass
class _Outage:
    started: float
    retry_at: float
    logged_at: float
    failures: int
    error: str


class OutageTracker:
    def __init__(self, role: str, retry_seconds: float, log_interval_seconds: float) -> None:
        self.role = role
        self.retry_seconds = retry_seconds
        self.log_interval_seconds = log_interval_seconds
        self._outages: dict[str, _Outage] = {}
        self._seen: set[str] = set()

    @property
    def any_down(self) -> bool:
        return bool(self._outages)

    def is_down(self, server: str) -> bool:
        return server in self._outages

    def should_try(self, server: str) -> bool:
        """Tell whether a command may go to ``server`` now: it is up, or its pause is over."""
        outage = self._outages.get(server)
        return outage is None or time.monotonic() >= outage.retry_at

    def failed(self, server: str, error: BaseException) -> None:
        now = time.monotonic()
        description = f"{type(error).__name__}: {error}".rstrip(": ")
        outage = self._outages.get(server)
        if outage is None:
            self._outages[server] = _Outage(now, now + self.retry_seconds, now, 1, description)
            CACHE_OUTAGES.labels(self.role, server).inc()
            CACHE_SERVER_UP.labels(self.role, server).set(0)
            logger.warning(
                "Redis server %s is unavailable for the %s; bypassing it and trying again every %s s: %s",
                server,
                self.role,
                self.retry_seconds,
                description,
                extra={"action": "redis.unavailable", "role": self.role, "server": server},
            )
            return

        outage.failures += 1
        outage.retry_at = now + self.retry_seconds
        outage.error = description
        if now - outage.logged_at >= self.log_interval_seconds:
            outage.logged_at = now
            logger.warning(
                "Redis server %s is still unavailable for the %s after %.0f s (%d failed attempts): %s",
                server,
                self.role,
                now - outage.started,
                outage.failures,
                description,
                extra={"action": "redis.still_unavailable", "role": self.role, "server": server},
            )

    def succeeded(self, server: str) -> None:
        if server not in self._seen:
            self._seen.add(server)
            CACHE_SERVER_UP.labels(self.role, server).set(1)
        if not self._outages:
            return
        outage = self._outages.pop(server, None)
        if outage is None:
            return
        CACHE_SERVER_UP.labels(self.role, server).set(1)
        logger.info(
            "Redis server %s is available again for the %s after %.1f s",
            server,
            self.role,
            time.monotonic() - outage.started,
            extra={"action": "redis.recovered", "role": self.role, "server": server},
        )
