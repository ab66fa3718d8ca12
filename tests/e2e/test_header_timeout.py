"""An API instance closes a connection whose request headers arrive too slowly."""

from __future__ import annotations

from tests.e2e.processes import Deployment, send_headers_slowly


def test_api_cuts_off_slow_headers(deployment: Deployment) -> None:
    deployment.migrate()
    api = deployment.launch_api({"TORONTO_AI_API__HEADER_TIMEOUT_SECONDS": "1"})
    api.wait_ready()

    sent, received = send_headers_slowly(api.port)
    with api.client() as client:
        health = client.get("/health")

    assert sent < 30, "the instance kept waiting for the headers"
    assert received == b""
    assert health.status_code == 200
    assert "http.header_timeout" in api.log_tail()
