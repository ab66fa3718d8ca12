"""Command-line errors of the load balancer and the nginx launcher."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.arguments import parse_address
from app.core.config import load_settings
from app.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[3]


def run_module(module: str, *arguments: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "TORONTO_AI_CONFIG_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("backends", "message"),
    [
        ("localhost", "'localhost' is not host:port"),
        ("127.0.0.1:99999", "'127.0.0.1:99999' has no valid port"),
        ("127.0.0.1:abc", "has no valid port"),
        ("127.0.0.1:8001,127.0.0.1:8001", "listed twice"),
        ("127.0.0.1:8001 127.0.0.1:8002", "separate addresses with commas"),
        ("127.0.0.1:8001;127.0.0.1:8002", "separate addresses with commas"),
        ("::1:8001", "write IPv6 hosts in brackets"),
        (",", "no backend given"),
    ],
)
def test_balancer_rejects_bad_backends(backends: str, message: str, tmp_path: Path) -> None:
    result = run_module("app.deployment.simple_load_balancer", "--backends", backends, tmp_path=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr


def test_balancer_rejects_option_prefix(tmp_path: Path) -> None:
    result = run_module(
        "app.deployment.simple_load_balancer", "--backend", "127.0.0.1:8001", tmp_path=tmp_path
    )
    assert result.returncode == 2
    assert "unrecognized arguments: --backend" in result.stderr


@pytest.mark.parametrize(
    ("port", "message"),
    [("70000", "70000 is not a TCP port"), ("0", "0 is not a port clients can connect to")],
)
def test_balancer_rejects_bad_port(port: str, message: str, tmp_path: Path) -> None:
    result = run_module("app.deployment.simple_load_balancer", "--port", port, tmp_path=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr


def test_balancer_reports_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_module(
            "app.deployment.simple_load_balancer",
            "--backends",
            "127.0.0.1:1",
            "--port",
            str(port),
            tmp_path=tmp_path,
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "choose another port with --port" in result.stderr


def test_nginx_launcher_rejects_bad_backends(tmp_path: Path) -> None:
    result = run_module("app.deployment.nginx", "--backends", "nohost", "--port", "8080", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "'nohost' is not host:port" in result.stderr


def test_configured_backends_validated(tmp_path: Path) -> None:
    environ = {"TORONTO_AI_LOAD_BALANCER__BACKENDS": '["127.0.0.1:8001", "db"]'}
    with pytest.raises(ConfigError, match="load_balancer.backends: 'db' is not host:port"):
        load_settings(config_dir=tmp_path, environ=environ)


def test_backend_with_scheme_is_rejected() -> None:
    with pytest.raises(ValueError, match="drop the scheme"):
        parse_address("http://127.0.0.1:8001")
