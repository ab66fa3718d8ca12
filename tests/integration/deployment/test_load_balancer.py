"""The load balancer as a process in front of scripted backends on real sockets.

The backends stand in for API instances so that a test can make one fail its health
check, hold a request open, stream events on cue or drop a connection mid-request.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.balancers import BalancerProcess, NginxProcess
from tests.e2e.processes import port_in_test_range, send_headers_slowly, wait_until
from tests.integration.deployment.balancer_processes import (
    MAX_BODY_BYTES,
    balancer_environment,
    start_balancer,
    stop,
)
from tests.integration.deployment.scripted_backends import DroppingBackend, ScriptedBackend


class Cluster:
    def __init__(self, first: ScriptedBackend, second: ScriptedBackend, dropping: DroppingBackend) -> None:
        self.first = first
        self.second = second
        self.dropping = dropping
        self.balancer: BalancerProcess


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp_path = tmp_path_factory.mktemp("balancer")
    cluster = Cluster(
        ScriptedBackend("first", port_in_test_range()),
        ScriptedBackend("second", port_in_test_range()),
        DroppingBackend(port_in_test_range()),
    )
    for backend in (cluster.first, cluster.second, cluster.dropping):
        backend.start()
    # round_robin sends every third new request to the dropping backend; a high failure
    # count keeps it in the rotation so that each test meets it.
    cluster.balancer = start_balancer(
        tmp_path,
        "balancer",
        [cluster.first.address, cluster.second.address, cluster.dropping.address],
        ["--strategy", "round_robin"],
        TORONTO_AI_LOAD_BALANCER__MAX_FAILURES="1000",
    )
    cluster.balancer.wait_admitted([cluster.first.address, cluster.second.address, cluster.dropping.address])
    try:
        yield cluster
    finally:
        stop(cluster.balancer)
        for backend in (cluster.first, cluster.second, cluster.dropping):
            backend.stop()


def echo_requests(cluster: Cluster) -> int:
    return sum(request["path"] == "/echo" for request in cluster.first.requests + cluster.second.requests)


def test_forwarded_headers_and_request_id(cluster: Cluster) -> None:
    with cluster.balancer.client() as client:
        response = client.get(
            "/echo?a=1&b=%2F",
            headers={
                "X-Forwarded-For": "203.0.113.9",
                "X-Request-ID": "req-123",
                "X-Real-IP": "198.51.100.1",
            },
        )
        generated = client.get("/echo")

    assert response.status_code == 200
    echoed = response.json()
    assert echoed["query"] == "a=1&b=%2F"
    assert echoed["headers"]["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert echoed["headers"]["x-real-ip"] == "127.0.0.1"
    assert echoed["headers"]["x-forwarded-proto"] == "http"
    assert echoed["headers"]["x-request-id"] == "req-123"
    assert echoed["headers"]["host"] == cluster.balancer.base_url.removeprefix("http://")
    assert response.headers["x-request-id"] == "req-123"

    assert generated.status_code == 200
    assert generated.headers["x-request-id"] == generated.json()["headers"]["x-request-id"]
    assert len(generated.headers["x-request-id"]) == 32


def test_not_modified_forwarded(cluster: Cluster) -> None:
    with cluster.balancer.client() as client:
        responses = [client.get("/not-modified") for _ in range(4)]

    # Round robin sends at least one of the four to the backend whose 304 has a Content-Length.
    assert [response.status_code for response in responses] == [304] * 4
    assert all(response.headers["etag"] == '"v1"' for response in responses)
    assert all("content-length" not in response.headers for response in responses)


def test_hop_by_hop_headers_dropped(cluster: Cluster) -> None:
    with cluster.balancer.client() as client:
        response = client.get(
            "/echo", headers={"Connection": "keep-alive, X-Hop-Secret", "X-Hop-Secret": "1"}
        )

    assert response.status_code == 200
    assert "x-hop-secret" not in response.json()["headers"]
    assert "x-hop-only" not in response.headers


def test_long_request_id_cut(cluster: Cluster) -> None:
    with cluster.balancer.client() as client:
        response = client.get("/echo", headers={"X-Request-ID": "r" * 5000})

    assert response.status_code == 200
    assert response.headers["x-request-id"] == "r" * 100
    assert response.json()["headers"]["x-request-id"] == "r" * 100


def test_idempotent_requests_retried_elsewhere(cluster: Cluster) -> None:
    dropped_before = len(cluster.dropping.dropped)
    with cluster.balancer.client() as client:
        responses = [
            client.request(method, "/echo") for method in ("GET", "PUT", "DELETE", "HEAD", "OPTIONS") * 3
        ]

    assert [response.status_code for response in responses] == [200] * len(responses)
    assert len(cluster.dropping.dropped) > dropped_before, "no request reached the dropping backend"
    served = {response.json()["backend"] for response in responses if response.request.method != "HEAD"}
    assert served <= {"first", "second"}


def test_post_not_retried_after_send(cluster: Cluster) -> None:
    with cluster.balancer.client() as client:
        responses = [client.post("/echo", json={"n": index}) for index in range(6)]
        metrics = client.get("/metrics").text
    statuses = [response.status_code for response in responses]

    # The dropping backend received two of the six POSTs and may have acted on them, so they
    # fail with 502 instead of running twice.
    assert statuses.count(502) == 2, statuses
    failed = next(response for response in responses if response.status_code == 502)
    assert "may have taken effect" in failed.json()["detail"]
    assert statuses.count(200) == 4, statuses
    assert f'toronto_ai_lb_upstream_failures_total{{backend="{cluster.dropping.address}"' in metrics


def test_cut_off_body_retried(cluster: Cluster) -> None:
    dropped_before = len(cluster.dropping.dropped)
    with cluster.balancer.client() as client:
        reads = [client.get("/echo?truncate=1") for _ in range(6)]
        writes = [client.post("/echo?truncate=1", json={"n": index}).status_code for index in range(6)]

    # The dropping backend sent the headers and part of the body of a GET, then died: the
    # balancer had not forwarded anything yet, so the read was served whole elsewhere.
    assert len(cluster.dropping.dropped) >= dropped_before + 2, "no request was cut off"
    assert [response.status_code for response in reads] == [200] * len(reads)
    assert {response.json()["backend"] for response in reads} <= {"first", "second"}
    # A POST that reached the instance may have acted, so it is reported instead of repeated.
    assert writes.count(502) == 2, writes
    assert writes.count(200) == 4, writes


def test_event_stream_not_buffered(cluster: Cluster) -> None:
    streaming = (cluster.first, cluster.second)
    for backend in streaming:
        backend.release.clear()
        backend.events_sent = 0
    with cluster.balancer.client(timeout=30) as client, client.stream("GET", "/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        lines = response.iter_lines()
        assert next(lines) == "id: 1"
        assert next(lines) == "data: first"
        # The first event arrived while the backend still holds the second one back.
        assert sum(backend.events_sent for backend in streaming) == 1
        for backend in streaming:
            backend.release.set()
        remaining = list(lines)
    assert "data: second" in remaining


def test_body_over_limit_rejected(cluster: Cluster) -> None:
    requests_before = echo_requests(cluster)
    with cluster.balancer.client() as client:
        declared = client.post("/echo", content=b"x" * (MAX_BODY_BYTES + 1))

        def chunks() -> Iterator[bytes]:
            for _ in range(5):
                yield b"y" * 1024

        chunked = client.post("/echo", content=chunks())
        within = client.put("/echo", content=b"z" * MAX_BODY_BYTES)

    assert declared.status_code == 413
    assert str(MAX_BODY_BYTES) in declared.json()["detail"]
    assert chunked.status_code == 413
    assert within.status_code == 200
    assert within.json()["body_length"] == MAX_BODY_BYTES
    assert echo_requests(cluster) == requests_before + 1


def test_failing_backend_ejected_and_readmitted(cluster: Cluster) -> None:
    balancer = cluster.balancer
    address = cluster.second.address
    cluster.second.healthy = False
    wait_until(lambda: not balancer.backends()[address]["admitted"], 10, f"{address} to be ejected")

    with balancer.client() as client:
        served = [client.get("/echo").json()["backend"] for _ in range(6)]
    assert "second" not in served

    cluster.second.healthy = True
    wait_until(lambda: balancer.backends()[address]["admitted"], 10, f"{address} to be re-admitted")
    state = balancer.backends()[address]
    assert state["ejections"] >= 1
    # Slow start over 30 s: a re-admitted backend starts with a reduced share.
    assert state["weight"] < 1.0

    with balancer.client() as client:
        metrics = client.get("/metrics").text
    assert f'toronto_ai_lb_ejections_total{{backend="{address}"}}' in metrics
    assert f'toronto_ai_lb_backend_admitted{{backend="{address}"}} 1.0' in metrics


def test_no_admitted_backend_returns_503(cluster: Cluster, tmp_path: Path) -> None:
    port = port_in_test_range()  # nothing listens there
    balancer = start_balancer(tmp_path, "lonely", [f"127.0.0.1:{port}"])
    try:
        with balancer.client() as client:
            response = client.get("/echo")
        assert response.status_code == 503
        assert "no API instance is available" in response.json()["detail"]
        assert response.headers["retry-after"]
    finally:
        stop(balancer)


def test_instance_started_late_joins_unejected(tmp_path: Path) -> None:
    backend = ScriptedBackend("late", port_in_test_range())
    balancer = start_balancer(tmp_path, "late", [backend.address])
    try:
        before = balancer.backends()[backend.address]
        backend.start()
        balancer.wait_admitted([backend.address])
        after = balancer.backends()[backend.address]
        with balancer.client() as client:
            served = client.get("/echo")
        waiting = balancer.records("lb.backend_waiting")
        ejected = balancer.records("lb.backend_ejected")
        started = balancer.records("lb.started")
    finally:
        stop(balancer)
        backend.stop()

    assert before["admitted"] is False
    assert before["ejections"] == 0
    assert after["ejections"] == 0
    assert served.status_code == 200
    assert [record["backend"] for record in waiting] == [backend.address]
    assert ejected == []
    # Every request gets 503 until the instance joins, which an operator must notice.
    assert [record["level"] for record in started] == ["WARNING"]


def test_instance_cookies_not_shared(tmp_path: Path) -> None:
    backend = ScriptedBackend("named", port_in_test_range())
    backend.start()
    # Addressed by name: a client's cookie jar refuses cookies of bare IP addresses, which
    # would hide a shared jar.
    balancer = start_balancer(tmp_path, "cookies", [f"localhost:{backend.port}"])
    try:
        balancer.wait_admitted([f"localhost:{backend.port}"])
        with balancer.client() as first_client:
            set_cookie = first_client.get("/set-cookie")
        with balancer.client() as second_client:
            echoed = second_client.get("/echo").json()
    finally:
        stop(balancer)
        backend.stop()

    assert set_cookie.headers["set-cookie"] == "session=first-client; Path=/"
    assert "cookie" not in echoed["headers"]


def test_slow_headers_cut_off(tmp_path: Path) -> None:
    balancer = start_balancer(
        tmp_path, "slow-headers", ["127.0.0.1:9"], TORONTO_AI_LOAD_BALANCER__HEADER_TIMEOUT_SECONDS="1"
    )
    try:
        sent, received = send_headers_slowly(balancer.port)
        log = balancer.log_tail()
    finally:
        stop(balancer)

    assert sent < 30, "the balancer kept waiting for the headers"
    assert received == b""
    assert "http.header_timeout" in log


def test_connection_limit_and_graceful_shutdown(tmp_path: Path) -> None:
    backend = ScriptedBackend("holding", port_in_test_range())
    backend.start()
    balancer = start_balancer(
        tmp_path, "limited", [backend.address], TORONTO_AI_LOAD_BALANCER__MAX_CONNECTIONS="2"
    )
    results: list[int] = []

    def hold() -> None:
        with balancer.client(timeout=30) as client:
            results.append(client.get("/hold").status_code)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    try:
        for thread in holders:
            thread.start()
        wait_until(lambda: sum(r["path"] == "/hold" for r in backend.requests) == 2, 10, "two held requests")

        with balancer.client() as client:
            assert client.get("/echo").status_code == 503

        balancer.popen.send_signal(signal.SIGTERM)

        def refuses_new_connections() -> bool:
            try:
                with balancer.client(timeout=2) as client:
                    client.get("/echo")
            except httpx.TransportError:
                return True
            return False

        # Draining: the listening socket is closed while both held requests are still open.
        wait_until(refuses_new_connections, 10, "the balancer to stop accepting connections")
        assert results == []
        backend.release.set()
        for thread in holders:
            thread.join(timeout=30)
        assert results == [200, 200]
        # uvicorn re-raises the SIGTERM it handled once it has shut down.
        assert balancer.wait_exit(15) == -signal.SIGTERM
        assert balancer.records("lb.stopped")
    finally:
        stop(balancer)
        backend.stop()


def test_saturated_pool_queues_instead_of_ejecting(tmp_path: Path) -> None:
    """More requests than pooled connections wait for one; the busy instance stays admitted."""
    backend = ScriptedBackend("busy", port_in_test_range())
    backend.start()
    balancer = start_balancer(
        tmp_path,
        "pooled",
        [backend.address],
        TORONTO_AI_LOAD_BALANCER__BACKEND_MAX_CONNECTIONS="1",
        TORONTO_AI_LOAD_BALANCER__CONNECT_TIMEOUT_SECONDS="0.2",
        TORONTO_AI_LOAD_BALANCER__MAX_FAILURES="1",
    )
    results: list[int] = []

    def hold() -> None:
        with balancer.client(timeout=30) as client:
            results.append(client.get("/hold").status_code)

    holders = [threading.Thread(target=hold) for _ in range(3)]
    try:
        for thread in holders:
            thread.start()
        wait_until(lambda: any(r["path"] == "/hold" for r in backend.requests), 10, "a held request")
        # The other two wait for the one pooled connection well past the connect timeout.
        threading.Event().wait(1.0)
        backend.release.set()
        for thread in holders:
            thread.join(timeout=30)

        assert results == [200, 200, 200]
        assert not balancer.records("lb.backend_ejected")
    finally:
        stop(balancer)
        backend.stop()


def test_nginx_streams_events_and_limits_body(tmp_path: Path) -> None:
    backend = ScriptedBackend("behind-nginx", port_in_test_range())
    backend.start()
    config_dir = tmp_path / "empty-config"
    config_dir.mkdir()
    nginx = NginxProcess(
        "nginx", [backend.address], port_in_test_range(), balancer_environment(config_dir), tmp_path
    )
    try:
        nginx.wait_serving(timeout=120)  # run_nginx.sh may install nginx first
        with nginx.client(timeout=30) as client:
            echoed = client.get("/echo", headers={"X-Request-ID": "nginx-1"}).json()["headers"]
            too_large = client.post("/echo", content=b"x" * (MAX_BODY_BYTES + 1))

            with client.stream("GET", "/events") as response:
                lines = response.iter_lines()
                assert next(lines) == "id: 1"
                assert next(lines) == "data: first"
                # The first event arrived while the backend still holds the second one back.
                assert backend.events_sent == 1
                backend.release.set()
                remaining = list(lines)

        assert echoed["x-request-id"] == "nginx-1"
        assert echoed["x-real-ip"] == "127.0.0.1"
        assert echoed["x-forwarded-for"] == "127.0.0.1"
        assert echoed["x-forwarded-proto"] == "http"
        # client_max_body_size follows api.max_body_bytes.
        assert too_large.status_code == 413
        assert "data: second" in remaining
    finally:
        nginx.terminate()
        nginx.wait_exit(10)
        backend.stop()
