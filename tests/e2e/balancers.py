"""The load balancer and nginx as processes of a test ``Deployment``."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.processes import PYTHON, READY_TIMEOUT_SECONDS, ServiceProcess, wait_until


class FrontProcess(ServiceProcess):
    """A process that listens on ``port`` and forwards to API instances."""

    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 10.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout, trust_env=False)

    def wait_serving(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Wait until GET /health through this process returns 200."""
        with self.client(timeout=2.0) as client:

            def serving() -> bool:
                if self.returncode is not None:
                    raise AssertionError(f"{self.name} exited with code {self.returncode}\n{self.log_tail()}")
                try:
                    return client.get("/health").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(serving, timeout, f"{self.name} to answer GET /health with 200", self.log_tail)


class BalancerProcess(FrontProcess):
    """``python -m app.deployment.simple_load_balancer --backends ... --port PORT``."""

    def __init__(
        self,
        name: str,
        backends: list[str],
        port: int,
        environment: Mapping[str, str],
        log_path: Path,
        extra_arguments: list[str] | None = None,
    ) -> None:
        self.port = port
        arguments = [
            PYTHON,
            "-m",
            "app.deployment.simple_load_balancer",
            "--backends",
            ",".join(backends),
            "--port",
            str(port),
            *(extra_arguments or []),
        ]
        super().__init__(name, arguments, environment, log_path)

    def backends(self) -> dict[str, dict[str, Any]]:
        """Return the balancer's view of each backend, by address."""
        with self.client(timeout=5.0) as client:
            response = client.get("/lb/backends")
        assert response.status_code == 200, response.text
        return {entry["address"]: entry for entry in response.json()}

    def wait_admitted(self, addresses: list[str], timeout: float = READY_TIMEOUT_SECONDS) -> None:
        def admitted() -> bool:
            if self.returncode is not None:
                raise AssertionError(f"{self.name} exited with code {self.returncode}\n{self.log_tail()}")
            try:
                state = self.backends()
            except httpx.TransportError:
                return False
            return all(state[address]["admitted"] for address in addresses)

        wait_until(admitted, timeout, f"{self.name} to admit {addresses}", self.log_tail)


class NginxProcess(FrontProcess):
    """``scripts/run_nginx.sh``: nginx in the foreground, installed with apt-get if missing."""

    def __init__(
        self, name: str, backends: list[str], port: int, environment: Mapping[str, str], directory: Path
    ) -> None:
        self.port = port
        runtime_dir = directory / name
        arguments = [
            "bash",
            "scripts/run_nginx.sh",
            "--backends",
            ",".join(backends),
            "--port",
            str(port),
            "--runtime-dir",
            str(runtime_dir),
            "--worker-processes",
            "1",
        ]
        super().__init__(
            name, arguments, {**environment, "PYTHON": sys.executable}, directory / f"{name}.log"
        )
