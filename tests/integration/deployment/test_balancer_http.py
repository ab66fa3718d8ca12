"""HTTP/1.1 framing at the load balancer, checked byte by byte on raw sockets.

The balancer parses requests and responses itself, so these tests send what ordinary
clients rarely do (pipelined requests, Expect: 100-continue, HTTP/1.0, absolute targets,
malformed or upgrading requests) and have instances respond in ways uvicorn never does.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import pytest

from tests.e2e.balancers import BalancerProcess
from tests.e2e.processes import port_in_test_range, wait_until
from tests.integration.deployment.balancer_processes import MAX_BODY_BYTES, start_balancer, stop
from tests.integration.deployment.canned_backends import CannedBackend
from tests.integration.deployment.scripted_backends import ScriptedBackend

CANNED_RESPONSES = {
    "/early-hints": (
        b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nfinal"
    ),
    "/until-close": b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nthe body ends with the connection",
    "/garbage": b"this is not an HTTP response\r\n\r\n",
}


@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class _ResponseReader:
    """Collect complete responses from the bytes of one connection."""

    def __init__(self) -> None:
        self.responses: list[Response] = []
        self._current = Response()
        self._parser = httptools.HttpResponseParser(self)

    def feed(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current.headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self._current.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._current.body += body

    def on_message_complete(self) -> None:
        self.responses.append(self._current)
        self._current = Response()


def exchange(port: int, request: bytes, expected: int = 1) -> tuple[list[Response], bool]:
    """Send raw bytes; return the responses read and whether the balancer then closed the connection."""
    reader = _ResponseReader()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        closed = False
        while True:
            data = connection.recv(65536)
            if not data:
                closed = True
                break
            reader.feed(data)
            if len(reader.responses) >= expected:
                connection.settimeout(0.5)
                try:
                    closed = connection.recv(1) == b""
                except TimeoutError:
                    closed = False
                break
    return reader.responses, closed


@dataclass
class Fronts:
    backend: ScriptedBackend
    canned: CannedBackend
    balancer: BalancerProcess
    canned_balancer: BalancerProcess


@pytest.fixture(scope="module")
def fronts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fronts]:
    tmp_path = tmp_path_factory.mktemp("balancer-http")
    backend = ScriptedBackend("only", port_in_test_range())
    canned = CannedBackend(port_in_test_range(), CANNED_RESPONSES, closing=frozenset({"/until-close"}))
    backend.start()
    canned.start()
    balancer = start_balancer(tmp_path, "scripted", [backend.address])
    canned_balancer = start_balancer(tmp_path, "canned", [canned.address])
    balancer.wait_admitted([backend.address])
    canned_balancer.wait_admitted([canned.address])
    try:
        yield Fronts(backend, canned, balancer, canned_balancer)
    finally:
        stop(balancer)
        stop(canned_balancer)
        backend.stop()
        canned.stop()


def test_pipelined_requests_kept_in_order(fronts: Fronts) -> None:
    request = b"".join(
        b"GET /echo?n=%d HTTP/1.1\r\nHost: lb\r\n%s\r\n" % (n, b"Connection: close\r\n" if n == 3 else b"")
        for n in (1, 2, 3)
    )

    responses, closed = exchange(fronts.balancer.port, request, expected=3)

    assert [response.status for response in responses] == [200, 200, 200]
    assert [response.body.count(b'"query": "n=%d"' % n) for n, response in enumerate(responses, 1)] == [
        1,
        1,
        1,
    ]
    assert closed


def test_expect_continue_gets_interim_response(fronts: Fronts) -> None:
    with socket.create_connection(("127.0.0.1", fronts.balancer.port), timeout=10) as connection:
        connection.sendall(
            b"POST /echo HTTP/1.1\r\nHost: lb\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = connection.recv(65536)
        connection.sendall(b"0123456789")
        reader = _ResponseReader()
        while not reader.responses:
            reader.feed(connection.recv(65536))

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert reader.responses[0].status == 200
    assert b'"body_length": 10' in reader.responses[0].body
    assert b'"expect"' not in reader.responses[0].body


def test_expect_continue_over_limit_rejected(fronts: Fronts) -> None:
    request = b"POST /echo HTTP/1.1\r\nHost: lb\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (
        MAX_BODY_BYTES + 1
    )

    responses, closed = exchange(fronts.balancer.port, request)

    assert responses[0].status == 413
    assert str(MAX_BODY_BYTES).encode() in responses[0].body
    assert closed


def test_http10_request_without_host(fronts: Fronts) -> None:
    responses, closed = exchange(fronts.balancer.port, b"GET /echo HTTP/1.0\r\n\r\n")

    assert responses[0].status == 200
    assert f'"host": "{fronts.backend.address}"'.encode() in responses[0].body
    assert closed


def test_http10_stream_ends_with_connection(fronts: Fronts) -> None:
    with socket.create_connection(("127.0.0.1", fronts.balancer.port), timeout=10) as connection:
        connection.sendall(b"GET /chunked HTTP/1.0\r\n\r\n")
        received = b""
        while data := connection.recv(65536):
            received += data
    head, _, body = received.partition(b"\r\n\r\n")

    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"part-1;part-2;part-3"


def test_chunked_response_reencoded(fronts: Fronts) -> None:
    with fronts.balancer.client() as client:
        response = client.get("/chunked")

    assert response.status_code == 200
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.text == "part-1;part-2;part-3"


def test_large_response_reaches_slow_reader(fronts: Fronts) -> None:
    size = 8 * 1024 * 1024
    expected = bytes(index % 251 for index in range(size))
    reader = _ResponseReader()
    with socket.create_connection(("127.0.0.1", fronts.balancer.port), timeout=30) as connection:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        connection.sendall(b"GET /large?bytes=%d HTTP/1.1\r\nHost: lb\r\n\r\n" % size)
        reader.feed(connection.recv(64 * 1024))
        # The balancer's buffers fill while this client reads nothing, so it has to stop
        # reading from the instance and resume later without losing a byte.
        threading.Event().wait(1.0)
        while not reader.responses:
            reader.feed(connection.recv(1024 * 1024))
    address = fronts.backend.address

    assert reader.responses[0].status == 200
    assert reader.responses[0].headers["content-length"] == str(size)
    assert reader.responses[0].body == expected
    wait_until(lambda: fronts.balancer.backends()[address]["active_requests"] == 0, 10, "the request to end")


def test_malformed_request_rejected(fronts: Fronts) -> None:
    responses, closed = exchange(
        fronts.balancer.port, b"GET /echo HTTP/1.1\r\nHost: lb\r\nNo colon here\r\n\r\n"
    )

    assert responses[0].status == 400
    assert b"malformed HTTP request" in responses[0].body
    assert closed


def test_malformed_request_after_valid_one(fronts: Fronts) -> None:
    request = b"GET /echo?n=1 HTTP/1.1\r\nHost: lb\r\n\r\nNOT HTTP AT ALL\r\n\r\n"

    responses, closed = exchange(fronts.balancer.port, request, expected=2)

    assert [response.status for response in responses] == [200, 400]
    assert b'"query": "n=1"' in responses[0].body
    assert closed


def test_invalid_absolute_target_rejected(fronts: Fronts) -> None:
    responses, closed = exchange(fronts.balancer.port, b"GET http:// HTTP/1.1\r\nHost: lb\r\n\r\n")

    assert responses[0].status == 400
    assert b"invalid request target 'http://'" in responses[0].body
    assert closed


def test_head_of_own_endpoint_has_no_body(fronts: Fronts) -> None:
    with socket.create_connection(("127.0.0.1", fronts.balancer.port), timeout=10) as connection:
        connection.sendall(b"HEAD /lb/backends HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
        received = b""
        while data := connection.recv(65536):
            received += data
    head, _, body = received.partition(b"\r\n\r\n")

    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-length: " in head
    assert body == b""


def test_connect_method_rejected(fronts: Fronts) -> None:
    responses, closed = exchange(
        fronts.balancer.port, b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n"
    )

    assert responses[0].status == 405
    assert b"CONNECT is not supported" in responses[0].body
    assert closed


def test_upgrade_request_served_then_closed(fronts: Fronts) -> None:
    request = b"GET /echo HTTP/1.1\r\nHost: lb\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"

    responses, closed = exchange(fronts.balancer.port, request)

    assert responses[0].status == 200
    assert b'"upgrade"' not in responses[0].body
    assert closed


def test_absolute_form_target_forwarded_as_path(fronts: Fronts) -> None:
    # The canned instance matches the request target as sent, so only a target cut down to
    # its path finds the response.
    port = fronts.canned_balancer.port
    request = b"GET http://127.0.0.1:%d/until-close?a=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port)

    responses, _ = exchange(port, request)

    assert responses[0].status == 200
    assert responses[0].body == b"the body ends with the connection"


def test_interim_response_skipped(fronts: Fronts) -> None:
    with fronts.canned_balancer.client() as client:
        response = client.get("/early-hints")

    assert response.status_code == 200
    assert response.text == "final"
    assert "link" not in response.headers


def test_close_delimited_response_forwarded(fronts: Fronts) -> None:
    with fronts.canned_balancer.client() as client:
        response = client.get("/until-close")

    assert response.status_code == 200
    assert response.text == "the body ends with the connection"


def test_invalid_response_gives_502(fronts: Fronts) -> None:
    with fronts.canned_balancer.client() as client:
        response = client.get("/garbage")
    failures = fronts.canned_balancer.records("lb.upstream_failed")

    assert response.status_code == 502
    assert "no API instance answered" in response.json()["detail"]
    assert any("invalid HTTP response" in record["message"] for record in failures)


def test_client_leaving_stream_frees_instance(fronts: Fronts) -> None:
    backend = fronts.backend
    backend.release.clear()
    with fronts.balancer.client(timeout=30) as client, client.stream("GET", "/events") as response:
        lines = response.iter_lines()
        assert next(lines) == "id: 1"

    wait_until(
        lambda: fronts.balancer.backends()[backend.address]["active_requests"] == 0,
        10,
        "the balancer to stop the stream its client left",
    )
    backend.release.set()
    assert not fronts.balancer.records("lb.upstream_failed")


def test_read_timeout_gives_502(tmp_path: Path) -> None:
    backend = ScriptedBackend("slow", port_in_test_range())
    backend.start()
    balancer = start_balancer(
        tmp_path, "read-timeout", [backend.address], TORONTO_AI_LOAD_BALANCER__READ_TIMEOUT_SECONDS="0.5"
    )
    try:
        balancer.wait_admitted([backend.address])
        with balancer.client(timeout=30) as client:
            response = client.get("/hold")
        failures = balancer.records("lb.upstream_failed")
    finally:
        stop(balancer)
        backend.stop()

    assert response.status_code == 502
    assert [record["error"] for record in failures] == ["UpstreamTimeout"]
