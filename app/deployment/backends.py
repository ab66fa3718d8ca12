"""API instances behind the load balancer: their state, ejection, slow start and selection.

An instance is ejected after ``max_failures`` consecutive failed requests (passive checks)
or after ``health_check_failures`` consecutive failed ``GET /health`` probes (active checks,
in ``app.deployment.health``). Only a passing probe re-admits it. A re-admitted instance
then gets a growing share of new requests: its weight rises linearly from ``MIN_WEIGHT`` to
1 over ``slow_start_seconds``, so a cold instance is not handed a full share at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

MIN_WEIGHT = 0.1
STRATEGIES = ("least_conn", "round_robin")


@dataclass(eq=False)
class Backend:
    """One API instance and its state in the balancer."""

    host: str
    port: int
    active_requests: int = 0
    consecutive_failures: int = 0
    ejected: bool = False
    ejections: int = 0
    admitted_at: float | None = None  # monotonic seconds; None for an instance healthy since start
    # Smooth weighted round robin state, as nginx keeps it per peer.
    current_weight: float = field(default=0.0, repr=False)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"


class BackendPool:
    """Choose an instance for each request and track failures, ejection and re-admission."""

    def __init__(
        self,
        backends: list[Backend],
        *,
        strategy: str = "least_conn",
        max_failures: int = 3,
        slow_start_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; accepted: {', '.join(STRATEGIES)}")
        if not backends:
            raise ValueError("a backend pool needs at least one backend")
        self.backends = backends
        self.strategy = strategy
        self.max_failures = max_failures
        self.slow_start_seconds = slow_start_seconds
        self.clock = clock
        self._next_start = 0

    def weight(self, backend: Backend) -> float:
        """Return the backend's share of new requests, from MIN_WEIGHT to 1; 0 while ejected."""
        if backend.ejected:
            return 0.0
        if backend.admitted_at is None or self.slow_start_seconds == 0:
            return 1.0
        ramp = (self.clock() - backend.admitted_at) / self.slow_start_seconds
        return min(1.0, max(MIN_WEIGHT, ramp))

    def choose(self, exclude: Collection[Backend] = ()) -> Backend | None:
        """Return the backend for the next attempt, or None when none is admitted outside ``exclude``."""
        candidates = [backend for backend in self.backends if not backend.ejected and backend not in exclude]
        if not candidates:
            return None
        if self.strategy == "round_robin":
            return self._choose_round_robin(candidates)
        return self._choose_least_conn(candidates)

    def _choose_least_conn(self, candidates: list[Backend]) -> Backend:
        # Fewest requests in flight per unit of weight. The scan starts one place later on every
        # call so that ties, such as an idle pool, rotate over the instances.
        self._next_start = (self._next_start + 1) % len(candidates)
        best = None
        best_load = 0.0
        for offset in range(len(candidates)):
            backend = candidates[(self._next_start + offset) % len(candidates)]
            load = (backend.active_requests + 1) / self.weight(backend)
            if best is None or load < best_load:
                best, best_load = backend, load
        return best

    def _choose_round_robin(self, candidates: list[Backend]) -> Backend:
        # Smooth weighted round robin: every candidate gains its weight, the one with the most
        # accumulated weight is chosen and pays back the total. With equal weights this is
        # plain rotation; a slow-starting instance is chosen in proportion to its weight.
        total = 0.0
        best = candidates[0]
        for backend in candidates:
            weight = self.weight(backend)
            backend.current_weight += weight
            total += weight
            if backend.current_weight > best.current_weight:
                best = backend
        best.current_weight -= total
        return best

    def record_success(self, backend: Backend) -> None:
        backend.consecutive_failures = 0

    def record_failure(self, backend: Backend, reason: str) -> None:
        """Count a failed request; eject the backend when the count reaches ``max_failures``."""
        backend.consecutive_failures += 1
        if backend.ejected or backend.consecutive_failures < self.max_failures:
            return
        self.eject(backend, reason)

    def eject(self, backend: Backend, reason: str) -> None:
        """Take the backend out of the rotation until an active health check passes."""
        if backend.ejected:
            return
        backend.ejected = True
        backend.ejections += 1
        backend.current_weight = 0.0
        logger.warning(
            "backend %s ejected: %s",
            backend.address,
            reason,
            extra={
                "action": "lb.backend_ejected",
                "backend": backend.address,
                "reason": reason,
                "consecutive_failures": backend.consecutive_failures,
            },
        )

    def hold_back(self, backend: Backend, reason: str) -> None:
        """Keep a backend that failed the balancer's first health check out of the rotation.

        Unlike an ejection, this is not counted: the instance may simply not have started yet.
        It joins when an active health check passes, with a slow start.
        """
        backend.ejected = True
        backend.current_weight = 0.0
        logger.info(
            "backend %s not admitted yet: %s; it joins when GET /health passes",
            backend.address,
            reason,
            extra={"action": "lb.backend_waiting", "backend": backend.address, "reason": reason},
        )

    def readmit(self, backend: Backend) -> None:
        """Return an ejected backend to the rotation, starting its slow start."""
        if not backend.ejected:
            return
        backend.ejected = False
        backend.consecutive_failures = 0
        backend.admitted_at = self.clock()
        logger.info(
            "backend %s re-admitted; slow start over %.0f s",
            backend.address,
            self.slow_start_seconds,
            extra={"action": "lb.backend_readmitted", "backend": backend.address},
        )

    def admitted(self) -> list[Backend]:
        return [backend for backend in self.backends if not backend.ejected]
