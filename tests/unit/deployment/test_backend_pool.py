"""Selection, ejection and slow start of the load balancer's backend pool."""

from __future__ import annotations

from collections import Counter

import pytest

from app.deployment.backends import MIN_WEIGHT, Backend, BackendPool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pool(strategy: str = "least_conn", count: int = 3, **options: float) -> tuple[BackendPool, Clock]:
    clock = Clock()
    backends = [Backend("127.0.0.1", 8001 + index) for index in range(count)]
    return BackendPool(backends, strategy=strategy, clock=clock, **options), clock


def test_least_conn_prefers_fewest_requests() -> None:
    pool, _ = make_pool()
    first, second, third = pool.backends
    first.active_requests = 4
    second.active_requests = 1
    third.active_requests = 2
    assert pool.choose() is second
    assert pool.choose(exclude=[second]) is third


def test_least_conn_rotates_ties() -> None:
    pool, _ = make_pool()
    chosen = Counter(pool.choose().port for _ in range(30))
    assert chosen == {8001: 10, 8002: 10, 8003: 10}


def test_round_robin_rotates() -> None:
    pool, _ = make_pool("round_robin")
    assert [pool.choose().port for _ in range(6)] == [8001, 8002, 8003, 8001, 8002, 8003]


def test_ejection_after_max_failures() -> None:
    pool, _ = make_pool(max_failures=3)
    backend = pool.backends[0]
    pool.record_failure(backend, "refused")
    pool.record_failure(backend, "refused")
    assert not backend.ejected
    pool.record_success(backend)
    for _ in range(3):
        pool.record_failure(backend, "refused")
    assert backend.ejected
    assert backend.ejections == 1
    assert all(pool.choose() is not backend for _ in range(10))


def test_all_ejected_returns_none() -> None:
    pool, _ = make_pool(count=2)
    for backend in pool.backends:
        pool.eject(backend, "down")
    assert pool.choose() is None


@pytest.mark.parametrize("strategy", ["least_conn", "round_robin"])
def test_slow_start_share_grows(strategy: str) -> None:
    pool, clock = make_pool(strategy, count=2, slow_start_seconds=10)
    cold = pool.backends[1]
    pool.eject(cold, "down")
    pool.readmit(cold)
    assert pool.weight(cold) == MIN_WEIGHT

    def share_of_cold(batches: int) -> float:
        # Batches of 10 requests in flight at once, as least_conn weighs requests in flight.
        chosen = []
        for _ in range(batches):
            for _ in range(10):
                backend = pool.choose()
                backend.active_requests += 1
                chosen.append(backend)
            for backend in pool.backends:
                backend.active_requests = 0
        return chosen.count(cold) / len(chosen)

    early = share_of_cold(20)
    clock.now += 5
    assert pool.weight(cold) == pytest.approx(0.5)
    middle = share_of_cold(20)
    clock.now += 5
    assert pool.weight(cold) == 1.0
    late = share_of_cold(20)

    assert early < middle < late
    assert late == pytest.approx(0.5, abs=0.02)


def test_unknown_strategy_rejected() -> None:
    with pytest.raises(ValueError, match="least_conn, round_robin"):
        BackendPool([Backend("127.0.0.1", 8001)], strategy="random")
