"""The load balancer as a process under hostile or broken clients.

Each test speaks raw HTTP/1.1 over a socket, so it can send what a well-behaved client
library never would: oversized or endless headers, trailers, stalled bodies, and
connections closed while the request is still in flight.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.balancers import BalancerProcess
from tests.e2e.processes import port_in_test_range, wait_until
from tests.integration.deployment.balancer_processes import start_balancer, stop
from tests.integration.deployment.canned_backends import CannedBackend
from tests.integration.deployment.scripted_backends import ScriptedBackend

POOLED_CONNECTIONS = 2
HEADER_TIMEOUT_SECONDS = 1.0


class Setup:
    def __init__(self, backend: ScriptedBackend, balancer: BalancerProcess) -> None:
        self.backend = backend
        self.balancer = balancer


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp_path: Path = tmp_path_factory.mktemp("attacks")
    backend = ScriptedBackend("target", port_in_test_range())
    backend.start()
    balancer = start_balancer(
        tmp_path,
        "attacked",
        [backend.address],
        TORONTO_AI_LOAD_BALANCER__BACKEND_MAX_CONNECTIONS=str(POOLED_CONNECTIONS),
        TORONTO_AI_LOAD_BALANCER__HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT_SECONDS),
    )
    try:
        balancer.wait_admitted([backend.address])
        yield Setup(backend, balancer)
    finally:
        stop(balancer)
        backend.stop()


def connect(balancer: BalancerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", balancer.port), timeout=10)


def read_until_closed(connection: socket.socket) -> bytes:
    """Return what the balancer sends until it closes the connection."""
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def echo_requests(backend: ScriptedBackend) -> int:
    return sum(request["path"] == "/echo" for request in backend.requests)


def held_requests(backend: ScriptedBackend) -> int:
    return sum(request["path"] == "/hold" for request in backend.requests)


def test_disconnected_clients_free_their_slots(setup: Setup) -> None:
    backend = setup.backend
    balancer = setup.balancer
    backend.release.clear()
    held_before = held_requests(backend)
    # Two requests take both pooled connections; four more wait for one of them.
    clients = [connect(balancer) for _ in range(POOLED_CONNECTIONS + 4)]
    for client in clients:
        client.sendall(b"GET /hold HTTP/1.1\r\nHost: test\r\n\r\n")
    wait_until(
        lambda: held_requests(backend) == held_before + POOLED_CONNECTIONS, 10, "both pooled connections busy"
    )
    for client in clients:
        client.close()

    address = backend.address
    wait_until(
        lambda: balancer.backends()[address]["active_requests"] == 0,
        10,
        "requests of disconnected clients to end",
        balancer.log_tail,
    )
    # The backend is still handling the first two requests, so this one gets a pooled connection
    # only if the disconnected requests gave theirs back.
    with balancer.client(timeout=10) as client:
        response = client.get("/echo")
    assert response.status_code == 200
    assert "lb.internal_error" not in balancer.log_tail(400)


def send_ignoring_close(connection: socket.socket, parts: Iterator[bytes]) -> None:
    """Send each part until the balancer closes the connection."""
    for part in parts:
        try:
            connection.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            return


def status_line(response: bytes) -> bytes:
    return response.split(b"\r\n", 1)[0]


def many_headers(total_bytes: int) -> Iterator[bytes]:
    batch = b"".join(b"x-filler-%05d: %s\r\n" % (index, b"v" * 80) for index in range(100))
    for _ in range(total_bytes // len(batch) + 1):
        yield batch


def one_long_header(total_bytes: int) -> Iterator[bytes]:
    yield b"x-long: "
    for _ in range(total_bytes // 8192 + 1):
        yield b"v" * 8192


@pytest.mark.parametrize("header_lines", [many_headers, one_long_header])
def test_oversized_headers_rejected(setup: Setup, header_lines) -> None:
    requests_before = echo_requests(setup.backend)
    with connect(setup.balancer) as connection:
        connection.sendall(b"GET /echo HTTP/1.1\r\nHost: test\r\n")
        send_ignoring_close(connection, header_lines(4 * 1024 * 1024))
        response = read_until_closed(connection)

    assert status_line(response) == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert b"send fewer or shorter header fields" in response
    assert echo_requests(setup.backend) == requests_before


def test_large_headers_within_limit_forwarded(setup: Setup) -> None:
    headers = {f"x-filler-{index:03d}": "v" * 200 for index in range(150)}  # about 32 KiB
    with setup.balancer.client() as client:
        response = client.get("/echo", headers=headers)

    assert response.status_code == 200
    assert response.json()["headers"]["x-filler-149"] == "v" * 200


def test_trailers_not_forwarded(setup: Setup) -> None:
    with connect(setup.balancer) as connection:
        connection.sendall(
            b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Trailer-Field: smuggled\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n"
        )
        response = read_until_closed(connection)

    assert status_line(response) == b"HTTP/1.1 200 OK"
    echoed = json.loads(response.split(b"\r\n\r\n", 1)[1])
    assert echoed["body_length"] == 5
    assert "x-trailer-field" not in echoed["headers"]
    assert echoed["headers"]["x-forwarded-for"] == "127.0.0.1"


def test_endless_trailers_rejected(setup: Setup) -> None:
    requests_before = echo_requests(setup.backend)
    with connect(setup.balancer) as connection:
        connection.sendall(
            b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
        )
        send_ignoring_close(connection, many_headers(4 * 1024 * 1024))
        response = read_until_closed(connection)

    assert status_line(response) == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert echo_requests(setup.backend) == requests_before


def test_stalled_body_rejected(setup: Setup) -> None:
    requests_before = echo_requests(setup.backend)
    with connect(setup.balancer) as connection:
        connection.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        response = read_until_closed(connection)

    assert status_line(response) == b"HTTP/1.1 408 Request Timeout"
    assert b"send the whole body without pausing" in response
    assert echo_requests(setup.backend) == requests_before
    assert setup.balancer.records("http.body_timeout")


def test_stalled_trailers_rejected(setup: Setup) -> None:
    with connect(setup.balancer) as connection:
        connection.sendall(
            b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Trailer-Field: 1\r\n"
        )
        response = read_until_closed(connection)

    assert status_line(response) == b"HTTP/1.1 408 Request Timeout"


def test_pipelined_body_waits_for_earlier_response(setup: Setup) -> None:
    """A body held back while an earlier request is handled is not a stalled body."""
    backend = setup.backend
    backend.release.clear()
    held_before = held_requests(backend)
    with connect(setup.balancer) as connection:
        # The second request makes the balancer stop reading until the first has its
        # response, so the third one's body stays unread in the meantime.
        connection.sendall(
            b"GET /hold HTTP/1.1\r\nHost: test\r\n\r\n"
            b"GET /echo HTTP/1.1\r\nHost: test\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 4\r\nConnection: close\r\n\r\nab"
        )
        wait_until(lambda: held_requests(backend) == held_before + 1, 10, "the first request to be held")
        # The balancer does not read the rest of the body for three body timeouts.
        time.sleep(3 * HEADER_TIMEOUT_SECONDS)
        connection.sendall(b"cd")
        backend.release.set()
        response = read_until_closed(connection)

    assert response.count(b"HTTP/1.1 200 OK") == 3
    assert b"HTTP/1.1 408" not in response


SWITCHING_PROTOCOLS = (
    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nframes"
)


@pytest.fixture(scope="module")
def canned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CannedBackend, BalancerProcess]]:
    tmp_path: Path = tmp_path_factory.mktemp("canned")
    backend = CannedBackend(port_in_test_range(), {"/switch": SWITCHING_PROTOCOLS}, frozenset({"/switch"}))
    backend.start()
    balancer = start_balancer(tmp_path, "canned", [backend.address])
    try:
        balancer.wait_admitted([backend.address])
        yield backend, balancer
    finally:
        stop(balancer)
        backend.stop()


def test_unrequested_protocol_switch_rejected(canned: tuple[CannedBackend, BalancerProcess]) -> None:
    backend, balancer = canned
    with balancer.client() as client:
        response = client.get("/switch", headers={"Upgrade": "websocket", "Connection": "upgrade"})

    assert "/switch" in backend.paths
    assert response.status_code == 502
    assert balancer.records("lb.upstream_failed")
    assert not [record for record in balancer.records() if record["level"] == "ERROR"]


def test_upgrade_with_body_rejected(setup: Setup) -> None:
    """httptools skips the body of a request asking to upgrade, so it must not be forwarded without it."""
    requests_before = echo_requests(setup.backend)
    with connect(setup.balancer) as connection:
        connection.sendall(
            b"POST /echo HTTP/1.1\r\nHost: test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\nhello"
        )
        response = read_until_closed(connection)

    assert status_line(response) == b"HTTP/1.1 400 Bad Request"
    assert b"without the Upgrade header" in response
    assert echo_requests(setup.backend) == requests_before


def test_upgrade_without_body_forwarded(setup: Setup) -> None:
    with setup.balancer.client() as client:
        response = client.get("/echo", headers={"Connection": "Upgrade", "Upgrade": "h2c"})

    assert response.status_code == 200
    assert "upgrade" not in response.json()["headers"]


def test_pipelined_headers_wait_for_earlier_response(setup: Setup) -> None:
    """Headers held back while an earlier request is handled are not slow headers."""
    backend = setup.backend
    backend.release.clear()
    held_before = held_requests(backend)
    with connect(setup.balancer) as connection:
        # The second request makes the balancer stop reading until the first has its
        # response, so the rest of the third one's headers stays unread in the meantime.
        connection.sendall(
            b"GET /hold HTTP/1.1\r\nHost: test\r\n\r\nGET /echo HTTP/1.1\r\nHost: test\r\n\r\nGET /ec"
        )
        wait_until(lambda: held_requests(backend) == held_before + 1, 10, "the first request to be held")
        # The balancer does not read the rest of the headers for three header timeouts.
        time.sleep(3 * HEADER_TIMEOUT_SECONDS)
        connection.sendall(b"ho HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        backend.release.set()
        response = read_until_closed(connection)

    assert response.count(b"HTTP/1.1 200 OK") == 3
