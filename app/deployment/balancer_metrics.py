"""Prometheus metrics of the load balancer, in a registry of their own.

The balancer serves them on its own ``GET /metrics``; each API instance's metrics are
scraped from the instance directly.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app.deployment.backends import BackendPool


class PoolCollector(Collector):
    """Read the pool's state at scrape time: admission, weight, requests in flight and ejections."""

    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        admitted = GaugeMetricFamily(
            "toronto_ai_lb_backend_admitted",
            "1 when the backend receives requests, 0 while ejected",
            labels=["backend"],
        )
        weight = GaugeMetricFamily(
            "toronto_ai_lb_backend_weight",
            "Share of new requests, below 1 during slow start",
            labels=["backend"],
        )
        active = GaugeMetricFamily(
            "toronto_ai_lb_backend_active_requests", "Requests in flight to the backend", labels=["backend"]
        )
        failures = GaugeMetricFamily(
            "toronto_ai_lb_backend_consecutive_failures",
            "Failures since the last success",
            labels=["backend"],
        )
        ejections = CounterMetricFamily(
            "toronto_ai_lb_ejections", "Times the backend was taken out of the rotation", labels=["backend"]
        )
        for backend in self.pool.backends:
            ejections.add_metric([backend.address], backend.ejections)
            admitted.add_metric([backend.address], 0 if backend.ejected else 1)
            weight.add_metric([backend.address], self.pool.weight(backend))
            active.add_metric([backend.address], backend.active_requests)
            failures.add_metric([backend.address], backend.consecutive_failures)
        yield from (admitted, weight, active, failures, ejections)


class BalancerMetrics:
    def __init__(self, pool: BackendPool) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "toronto_ai_lb_requests_total",
            "Requests answered, by the backend that answered (none for the balancer's own errors)",
            ["backend", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "toronto_ai_lb_request_seconds",
            "Time to the response headers of proxied requests",
            registry=self.registry,
        )
        self.upstream_failures = Counter(
            "toronto_ai_lb_upstream_failures_total",
            "Attempts that failed before the backend responded, or while it streamed",
            ["backend", "error"],
            registry=self.registry,
        )
        self.retries = Counter(
            "toronto_ai_lb_retries_total",
            "Attempts sent to another backend after a failure",
            registry=self.registry,
        )
        self.registry.register(PoolCollector(pool))
