"""Start-up mistakes a user makes give one ``error:`` line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

from tests.e2e.processes import PYTHON, REPO_ROOT, Deployment, free_port

START_TIMEOUT_SECONDS = 60


def run_deploy(deployment: Deployment, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "deploy.py", "--port", str(port)],
        cwd=REPO_ROOT,
        env=deployment.environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_SECONDS,
        check=False,
    )


def assert_one_clear_error(completed: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr
    error_lines = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, completed.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]


def test_unknown_role_in_config_json_is_one_error_line(tmp_path: Path) -> None:
    deployment = Deployment(f"sqlite:///{tmp_path / 'app.db'}", tmp_path)
    (deployment.config_dir / "config.json").write_text(
        json.dumps({"agents": [{"role": "developr", "model": "any"}]})
    )

    completed = run_deploy(deployment, free_port())

    assert_one_clear_error(completed, "developr", "instructions")


def test_unreadable_api_key_file_names_the_provider(tmp_path: Path) -> None:
    deployment = Deployment(f"sqlite:///{tmp_path / 'app.db'}", tmp_path)
    missing = tmp_path / "no-such-key"
    (deployment.config_dir / "config.json").write_text(
        json.dumps({"llm": {"providers": {"vllm": {"kind": "openai", "api_key_file": str(missing)}}}})
    )

    completed = run_deploy(deployment, free_port())

    assert_one_clear_error(completed, "llm.providers.vllm.api_key_file", str(missing))


def test_port_in_use_is_one_error_line(tmp_path: Path) -> None:
    deployment = Deployment(f"sqlite:///{tmp_path / 'app.db'}", tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        completed = run_deploy(deployment, port)

    assert_one_clear_error(completed, f"port {port}", "already in use", "--port")
    assert "API instance ready" not in completed.stderr + completed.stdout
