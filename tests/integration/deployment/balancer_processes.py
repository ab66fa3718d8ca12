"""Start and stop load balancer processes for the deployment tests."""

from __future__ import annotations

import os
from pathlib import Path

from tests.e2e.balancers import BalancerProcess
from tests.e2e.processes import BASE_SETTINGS, port_in_test_range

MAX_BODY_BYTES = 4096


def balancer_environment(config_dir: Path, **settings: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TORONTO_AI_")}
    environment.update(BASE_SETTINGS)
    environment.update(
        {
            "TORONTO_AI_CONFIG_DIR": str(config_dir),
            "TORONTO_AI_API__MAX_BODY_BYTES": str(MAX_BODY_BYTES),
            "TORONTO_AI_LOAD_BALANCER__HEALTH_CHECK_INTERVAL_SECONDS": "0.2",
            "TORONTO_AI_LOAD_BALANCER__SLOW_START_SECONDS": "30",
            **settings,
        }
    )
    return environment


def start_balancer(
    tmp_path: Path, name: str, backends: list[str], arguments: list[str] | None = None, **settings: str
) -> BalancerProcess:
    config_dir = tmp_path / "empty-config"
    config_dir.mkdir(exist_ok=True)
    balancer = BalancerProcess(
        name,
        backends,
        port_in_test_range(),
        balancer_environment(config_dir, **settings),
        tmp_path / f"{name}.log",
        arguments,
    )
    balancer.wait_for_record("lb.started", timeout=30)
    return balancer


def stop(balancer: BalancerProcess) -> None:
    balancer.terminate()
    balancer.wait_exit(10)
