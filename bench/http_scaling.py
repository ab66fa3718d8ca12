"""Throughput and latency of a project read through the load balancer and nginx.

    flock /tmp/toronto-bench.lock .venv/bin/python -m bench.http_scaling

In one run, on one new PostgreSQL database (or SQLite file) holding one completed project:

- ``GET /api/v1/projects/{id}`` of that project through the load balancer and through nginx,
  each over 1, 2 and 3 API instances (``deploy.py``), and on one instance directly;
- the same JSON from a bare FastAPI endpoint that serves it from memory with orjson
  (``bench/bare_endpoint.py``), the ceiling of one uvicorn process on this machine.

Load comes from wrk, Debian's package, which ``scripts/install_test_tools.sh`` installs. It
runs one thread with a fixed number of connections, so the generator takes one share of
the cores instead of starving the servers. Results go to ``bench/results/`` and to the
``http_scaling`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import report
from bench.databases import temporary_postgres_database, temporary_sqlite_url
from bench.http_scaling_docs import write_docs

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION = "http_scaling"
BRIEF = "# Benchmark project\n\n- Read this project many times through each front\n"
READY_TIMEOUT_SECONDS = 60.0


class Processes:
    """Child processes of the run, each logging to its own file, all stopped at exit."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, arguments: list[str], environment: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{name}.log").open("wb")
        child = subprocess.Popen(
            arguments,
            cwd=REPO_ROOT,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.children.append(child)
        return child

    def stop(self, child: subprocess.Popen[bytes]) -> None:
        if child.poll() is None:
            child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def stop_all(self) -> None:
        for child in reversed(self.children):
            self.stop(child)


def wait_http(url: str, child: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2, trust_env=False) as client:
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise RuntimeError(f"{shlex.join(child.args)} exited with code {child.returncode}")
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout} s waiting for {url}")


def run_wrk(url: str, connections: int, duration: float) -> dict[str, Any]:
    """Run wrk with one thread and return requests/s, latency percentiles and error counts."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", url]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    percentiles = {
        int(match.group(1)): _milliseconds(match.group(2), match.group(3))
        for match in re.finditer(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    }
    requests = re.search(r"(\d+) requests in", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if not (requests and rate and 50 in percentiles and 99 in percentiles):
        raise RuntimeError(f"cannot parse the output of {shlex.join(command)}:\n{output}")
    return {
        "requests_per_second": float(rate.group(1)),
        "p50_ms": percentiles[50],
        "p99_ms": percentiles[99],
        "requests": int(requests.group(1)),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(int(value) for value in socket_errors.groups()) if socket_errors else 0,
    }


def _milliseconds(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def environment_for(database_url: str, config_dir: Path) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TORONTO_AI_")}
    environment.update(
        {
            "TORONTO_AI_CONFIG_DIR": str(config_dir),
            "TORONTO_AI_DATABASE__URL": database_url,
            "TORONTO_AI_ENV": "test",
            "TORONTO_AI_LOG_FORMAT": "json",
        }
    )
    return environment


def completed_project(processes: Processes, environment: dict[str, str], port: int) -> tuple[str, dict]:
    """Run one project to completion with a worker and return its id and its JSON document."""
    worker = processes.start("worker", [sys.executable, "-m", "app.worker.start"], environment)
    base_url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base_url, timeout=10, trust_env=False) as client:
        project_id = client.post("/api/v1/projects", json={"brief": BRIEF}).json()["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            document = client.get(f"/api/v1/projects/{project_id}").json()
            if document["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.2)
    processes.stop(worker)
    if document["status"] != "completed":
        raise RuntimeError(f"the benchmark project ended as {document['status']}: {document.get('error')}")
    return project_id, document


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.http_scaling", description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--postgres-port", type=int, default=5432)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of measured load per target")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load before each")
    parser.add_argument(
        "--connections", type=int, default=32, help="wrk connections, the same for every target"
    )
    parser.add_argument(
        "--first-port", type=int, default=18060, help="first of 14 consecutive loopback ports"
    )
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--page", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-docs", action="store_true", help="write only the JSON results, not docs/")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if shutil.which("wrk") is None:
        print("error: wrk is not installed; run scripts/install_test_tools.sh", file=sys.stderr)
        return 2
    started_at = datetime.now(UTC)
    machine = report.describe_machine()
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="http_scaling_")))
        if arguments.engine == "postgresql":
            database_url = stack.enter_context(postgres_database(arguments.postgres_port))
        else:
            database_url = stack.enter_context(temporary_sqlite_url())
        processes = Processes(folder)
        stack.callback(processes.stop_all)
        measurements = measure_all(arguments, processes, environment_for(database_url, folder), folder)

    machine["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    results = {
        "benchmark": SECTION,
        "command": "flock /tmp/toronto-bench.lock .venv/bin/python -m bench.http_scaling "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "source": report.describe_source(REPO_ROOT),
        "arguments": {
            key: str(value) if isinstance(value, Path) else value for key, value in vars(arguments).items()
        },
        "wrk": subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        .stdout.split("[")[0]
        .strip(),
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "measurements": measurements,
    }
    arguments.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = arguments.output_dir / f"{SECTION}-{started_at:%Y%m%dT%H%M%SZ}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"results: {json_path}")
    if not arguments.no_docs:
        write_docs(results, arguments.page, arguments.page.parent / "http_scaling.png", SECTION)
        print(f"section {SECTION} of {arguments.page} updated")
    return 0


@contextmanager
def postgres_database(port: int) -> Iterator[str]:
    """Create a new PostgreSQL database for the run and drop it at exit."""
    manager = temporary_postgres_database(port)
    loop = asyncio.new_event_loop()
    try:
        yield loop.run_until_complete(manager.__aenter__())
    finally:
        loop.run_until_complete(manager.__aexit__(None, None, None))
        loop.close()


def measure_all(
    arguments: argparse.Namespace, processes: Processes, environment: dict[str, str], folder: Path
) -> list[dict[str, Any]]:
    python = sys.executable
    ports = iter(range(arguments.first_port, arguments.first_port + 14))
    migrated = subprocess.run(
        [python, "-m", "app.cli", "migrate"], cwd=REPO_ROOT, env=environment, capture_output=True, text=True
    )
    if migrated.returncode != 0:
        raise RuntimeError(f"python -m app.cli migrate failed:\n{migrated.stderr}")

    instance_ports = [next(ports) for _ in range(3)]
    for index, port in enumerate(instance_ports):
        child = processes.start(
            f"api-{index}", [python, "deploy.py", "--port", str(port), "--no-migrate"], environment
        )
        wait_http(f"http://127.0.0.1:{port}/ready", child)
    project_id, document = completed_project(processes, environment, instance_ports[0])
    path = f"/api/v1/projects/{project_id}"

    document_path = folder / "project.json"
    document_path.write_text(json.dumps(document))
    bare_port = next(ports)
    bare = processes.start(
        "bare",
        [python, "-m", "bench.bare_endpoint", "--port", str(bare_port), "--document", str(document_path)],
        environment,
    )
    wait_http(f"http://127.0.0.1:{bare_port}/health", bare)

    def start_front(front: str, backend_ports: list[int]) -> int:
        port = next(ports)
        backends = ",".join(f"127.0.0.1:{backend_port}" for backend_port in backend_ports)
        name = f"{front}-{port}"
        if front == "load_balancer":
            arguments = [python, "-m", "app.deployment.simple_load_balancer", "--backends", backends]
            child = processes.start(name, [*arguments, "--port", str(port)], environment)
        else:
            arguments = ["bash", "scripts/run_nginx.sh", "--backends", backends, "--port", str(port)]
            arguments += ["--runtime-dir", str(folder / name)]
            child = processes.start(name, arguments, {**environment, "PYTHON": python})
        wait_http(f"http://127.0.0.1:{port}/health", child)
        return port

    targets: list[tuple[str, str, int, int]] = [
        ("bare FastAPI endpoint, orjson from memory", "bare", bare_port, 0),
        ("one API instance, direct", "direct", instance_ports[0], 1),
    ]
    # The proxies over the bare endpoint: their own ceiling, where the instance costs least.
    for front, label in (("load_balancer", "load balancer"), ("nginx", "nginx")):
        targets.append(
            (f"{label} over the bare endpoint", f"{front}_bare", start_front(front, [bare_port]), 0)
        )
    for count in (1, 2, 3):
        targets.append(
            (
                f"load balancer over {count} instance{'s' * (count > 1)}",
                "load_balancer",
                start_front("load_balancer", instance_ports[:count]),
                count,
            )
        )
        targets.append(
            (
                f"nginx over {count} instance{'s' * (count > 1)}",
                "nginx",
                start_front("nginx", instance_ports[:count]),
                count,
            )
        )

    measurements = []
    for label, front, port, instances in targets:
        url = f"http://127.0.0.1:{port}{path}"
        if arguments.warmup > 0:
            run_wrk(url, arguments.connections, arguments.warmup)
        result = run_wrk(url, arguments.connections, arguments.duration)
        print(
            f"{label}: {result['requests_per_second']:,.0f} requests/s, "
            f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms"
        )
        measurements.append({"label": label, "front": front, "instances": instances, **result})
    return measurements


if __name__ == "__main__":
    sys.exit(main())
