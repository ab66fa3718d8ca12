"""Chroma servers for tests and benchmarks: ``chroma run`` processes on loopback ports.

Each server keeps its data in its own folder and is ready once ``/api/v2/heartbeat``
answers, which takes a second or two. On Linux a server is killed with the process that
started it, so an interrupted test run leaves none behind. ``scripts/services/chroma.sh``
starts the same servers from a shell.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0
POLL_SECONDS = 0.1


def chroma_command() -> str:
    """Return the ``chroma`` command installed beside this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "chroma"
    if beside.exists():
        return str(beside)
    found = shutil.which("chroma")
    if found is None:
        raise RuntimeError(
            "the `chroma` command is missing; install it with `pip install 'chromadb>=1.0,<2'`"
        )
    return found


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 is PR_SET_PDEATHSIG


class ChromaServer:
    def __init__(self, port: int, data_folder: Path, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.data_folder = data_folder
        self.log_path = data_folder.with_suffix(".log")
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        """Start the server (again, with the same data) and wait until its heartbeat responds."""
        if self.process is not None and self.process.poll() is None:
            return
        self.data_folder.mkdir(parents=True, exist_ok=True)
        environment = {**os.environ, "ANONYMIZED_TELEMETRY": "False"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    chroma_command(),
                    "run",
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                    "--path",
                    str(self.data_folder),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                preexec_fn=_die_with_parent,
            )
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"chroma run on {self.address} exited with {self.process.returncode}; "
                    f"see {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"http://{self.address}/api/v2/heartbeat", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(POLL_SECONDS)
        raise RuntimeError(
            f"chroma run on {self.address} did not respond its heartbeat within {READY_TIMEOUT_SECONDS} s; "
            f"is the port taken? See {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the server with SIGTERM, or SIGKILL after a timeout; its data stays."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_servers(ports: list[int], folder: Path) -> list[ChromaServer]:
    """Start one server per port, each with data under ``folder``; stop them all if one fails."""
    servers = [ChromaServer(port, folder / f"chroma-{port}") for port in ports]
    try:
        for server in servers:
            server.start()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers
