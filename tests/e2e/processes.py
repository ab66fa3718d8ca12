"""Start the API and workers as separate processes on one database, read their logs, stop them.

Each process writes JSON log lines (``TORONTO_AI_LOG_FORMAT=json``) and anything it prints
to its own file under the test's ``tmp_path``. Tests find ``action`` records such as
``task.claimed`` in those files. ``Deployment.stop_all()`` sends SIGTERM to every process
still running, then SIGKILL to any that is still alive after ``STOP_TIMEOUT_SECONDS``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

READY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
MIGRATE_TIMEOUT_SECONDS = 60.0
POLL_SECONDS = 0.05

# Settings every process of a test gets unless the test overrides them. The short lease,
# heartbeat and sweep make a lost worker visible within seconds. The short shutdown grace
# keeps the final SIGTERM of each test fast.
BASE_SETTINGS = {
    "TORONTO_AI_ENV": "test",
    "TORONTO_AI_LOG_FORMAT": "json",
    "TORONTO_AI_LOG_LEVEL": "INFO",
    "TORONTO_AI_WORKER__LEASE_SECONDS": "3",
    "TORONTO_AI_WORKER__HEARTBEAT_SECONDS": "1",
    "TORONTO_AI_WORKER__SWEEP_INTERVAL_SECONDS": "1",
    "TORONTO_AI_WORKER__POLL_INTERVAL_SECONDS": "0.2",
    "TORONTO_AI_WORKER__SHUTDOWN_GRACE_SECONDS": "1",
}

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], timeout: float, description: str, details: Callable[[], str] | None = None
) -> T:
    """Call ``condition`` until it returns a truthy value and return that value.

    Raises AssertionError naming ``description``, followed by ``details()`` if given, when
    ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout} s waiting for {description}"
            raise AssertionError(message + ("\n" + details() if details else ""))
        time.sleep(POLL_SECONDS)


def seconds_between(earlier: Mapping[str, Any], later: Mapping[str, Any]) -> float:
    """Return the seconds from one log record to another, by their ``time`` fields."""
    return (datetime.fromisoformat(later["time"]) - datetime.fromisoformat(earlier["time"])).total_seconds()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now.

    NOTE: another process may take the port between this call and the server's bind. The
    API then fails to start and ``wait_ready`` reports its log.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Servers that other processes must find at a known address (load balancers, nginx and
# the API instances behind them) take ports from this range, which TAT_TEST_PORT_RANGE
# overrides as FIRST-LAST.
TEST_PORT_RANGE = os.environ.get("TAT_TEST_PORT_RANGE", "18000-18099")
_ports_handed_out: set[int] = set()


def port_in_test_range() -> int:
    """Return a port of TEST_PORT_RANGE that is free now and was not returned before."""
    first, _, last = TEST_PORT_RANGE.partition("-")
    for port in range(int(first), int(last) + 1):
        if port in _ports_handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_handed_out.add(port)
        return port
    raise AssertionError(f"no free port left in TAT_TEST_PORT_RANGE={TEST_PORT_RANGE}; widen the range")


def _die_with_parent() -> None:
    # Runs in the child before exec. On Linux it asks the kernel to send SIGKILL to the child
    # when the test process dies, so a test runner killed mid-test leaves no server behind.
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 is PR_SET_PDEATHSIG


class ServiceProcess:
    """One started process and its log file, which contains both its stdout and its stderr."""

    def __init__(
        self, name: str, arguments: list[str], environment: Mapping[str, str], log_path: Path
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log_file = log_path.open("wb")
        self.popen = subprocess.Popen(
            arguments,
            cwd=REPO_ROOT,
            env=dict(environment),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def records(self, action: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        """Return the JSON log records written so far, filtered by action and field values.

        Lines that are not JSON (a traceback, a print) and a last line that is still being
        written are skipped.
        """
        found = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            if not line.endswith("\n") or not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if action is not None and record.get("action") != action:
                continue
            if all(record.get(key) == value for key, value in fields.items()):
                found.append(record)
        return found

    def wait_for_record(self, action: str, timeout: float, **fields: Any) -> dict[str, Any]:
        """Wait until the log has a record with this action and these field values, and return it."""

        def first_match() -> dict[str, Any] | None:
            matches = self.records(action, **fields)
            if matches:
                return matches[0]
            if self.returncode is not None:
                raise AssertionError(
                    f"{self.name} exited with code {self.returncode} before logging {action} {fields}\n"
                    + self.log_tail()
                )
            return None

        return wait_until(first_match, timeout, f"{self.name} to log {action} {fields}", self.log_tail)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        return f"--- last {len(text)} lines of {self.log_path} ---\n" + "\n".join(text)

    def kill(self) -> int:
        """Send SIGKILL, as a crash or an out-of-memory kill would, and return the exit code."""
        self.popen.kill()
        return self.popen.wait(timeout=STOP_TIMEOUT_SECONDS)

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit, send SIGKILL after ``timeout`` seconds, and return the exit code."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(timeout=STOP_TIMEOUT_SECONDS)
        finally:
            self._log_file.close()


class ApiProcess(ServiceProcess):
    """``python deploy.py --port PORT --no-migrate`` (without ``--no-migrate`` when ``migrate``), on 127.0.0.1."""

    def __init__(
        self,
        name: str,
        environment: Mapping[str, str],
        log_path: Path,
        port: int | None = None,
        migrate: bool = False,
    ) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        arguments = [PYTHON, "deploy.py", "--host", "127.0.0.1", "--port", str(self.port)]
        if not migrate:
            arguments.append("--no-migrate")
        super().__init__(name, arguments, environment, log_path)

    def client(self, timeout: float = 10.0) -> httpx.Client:
        # trust_env=False ignores proxy variables, so the test's requests go straight to 127.0.0.1.
        return httpx.Client(base_url=self.base_url, timeout=timeout, trust_env=False)

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Wait until GET /ready returns 200."""
        with self.client(timeout=2.0) as client:

            def ready() -> bool:
                if self.returncode is not None:
                    raise AssertionError(f"{self.name} exited with code {self.returncode}\n{self.log_tail()}")
                try:
                    return client.get("/ready").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(ready, timeout, f"{self.name} to answer GET /ready with 200", self.log_tail)


class WorkerProcess(ServiceProcess):
    """``python -m app.worker.start``. Its id, ``host-pid-suffix``, comes from its worker.started record."""

    def __init__(self, name: str, environment: Mapping[str, str], log_path: Path) -> None:
        super().__init__(name, [PYTHON, "-m", "app.worker.start"], environment, log_path)
        self.worker_id = ""

    def wait_started(self, timeout: float = READY_TIMEOUT_SECONDS) -> str:
        """Wait for the worker.started record and return the worker id it names."""
        record = self.wait_for_record("worker.started", timeout)
        self.worker_id = record["worker_id"]
        return self.worker_id


class Deployment:
    """The processes of one test, all on one database, with their logs under ``directory``."""

    def __init__(self, database_url: str | None, directory: Path, config_dir: Path | None = None) -> None:
        """``database_url`` None leaves the database to the files in ``config_dir``."""
        self.database_url = database_url
        self.directory = directory
        self.config_dir = config_dir or directory / "empty-config"
        self.config_dir.mkdir(exist_ok=True)
        self.processes: list[ServiceProcess] = []

    def environment(self, settings: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return the environment of a new process.

        It is this process's environment without its TORONTO_AI_* variables, plus
        BASE_SETTINGS, the empty config folder, the database URL and then ``settings``.
        """
        environment = {key: value for key, value in os.environ.items() if not key.startswith("TORONTO_AI_")}
        environment.update(BASE_SETTINGS)
        environment["TORONTO_AI_CONFIG_DIR"] = str(self.config_dir)
        if self.database_url is not None:
            environment["TORONTO_AI_DATABASE__URL"] = self.database_url
        environment.update(settings or {})
        return environment

    def migrate(self) -> None:
        """Run ``python -m app.cli migrate`` so that workers, which never migrate, find the schema."""
        log_path = self.directory / "migrate.log"
        with log_path.open("wb") as log_file:
            completed = subprocess.run(
                [PYTHON, "-m", "app.cli", "migrate"],
                cwd=REPO_ROOT,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                timeout=MIGRATE_TIMEOUT_SECONDS,
                check=False,
            )
        if completed.returncode != 0:
            raise AssertionError(
                f"migrate exited with code {completed.returncode}\n{log_path.read_text(errors='replace')}"
            )

    def launch_api(
        self, settings: Mapping[str, str] | None = None, port: int | None = None, migrate: bool = False
    ) -> ApiProcess:
        """Start an API instance without waiting for it; call ``wait_ready()`` next."""
        name = f"api-{len(self.processes)}"
        api = ApiProcess(name, self.environment(settings), self.directory / f"{name}.log", port, migrate)
        self.processes.append(api)
        return api

    def launch_worker(self, settings: Mapping[str, str] | None = None) -> WorkerProcess:
        """Start a worker without waiting for it; call ``wait_started()`` next."""
        name = f"worker-{len(self.processes)}"
        worker = WorkerProcess(name, self.environment(settings), self.directory / f"{name}.log")
        self.processes.append(worker)
        return worker

    def start_worker(self, settings: Mapping[str, str] | None = None) -> WorkerProcess:
        worker = self.launch_worker(settings)
        worker.wait_started()
        return worker

    def start(
        self, workers: int = 1, settings: Mapping[str, str] | None = None
    ) -> tuple[ApiProcess, list[WorkerProcess]]:
        """Migrate, then start one API instance and ``workers`` workers and wait until all are up."""
        self.migrate()
        started = [self.launch_worker(settings) for _ in range(workers)]
        api = self.launch_api(settings)
        api.wait_ready()
        for worker in started:
            worker.wait_started()
        return api, started

    def workers(self) -> list[WorkerProcess]:
        return [process for process in self.processes if isinstance(process, WorkerProcess)]

    def stop_all(self) -> None:
        """Send SIGTERM to every process, then SIGKILL to those still running after the deadline."""
        for process in self.processes:
            process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for process in self.processes:
            process.wait_exit(max(0.0, deadline - time.monotonic()))
        # Printed to the captured output, which pytest shows when the test failed.
        print("process logs:", *(str(process.log_path) for process in self.processes), sep="\n  ")


def send_headers_slowly(port: int, byte_interval: float = 0.2, max_bytes: int = 30) -> tuple[int, bytes]:
    """Send a request's headers one byte at a time, as a slowloris client does.

    Returns how many header bytes went out before the server closed the connection
    (``max_bytes`` when it never did) and what the server sent back.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n")
        sent = 0
        while sent < max_bytes:
            time.sleep(byte_interval)
            try:
                connection.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
        connection.settimeout(2)
        try:
            received = connection.recv(1024)
        except (ConnectionResetError, TimeoutError):
            received = b""
    return sent, received
