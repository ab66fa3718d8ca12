"""Measure the API's read throughput for projects with 0 and 1 read replica, with and without PgBouncer.

Run ``python -m bench.read_replicas``. One run starts its own PostgreSQL primary, streaming
replica and two PgBouncers (tests/services/postgres_cluster.py, ports from ``--port-base``).
It seeds finished projects through the real worker with the offline provider. Then, for
``--rounds`` rounds, it takes each of four database setups in turn, starts one ``deploy.py``
instance and sends it project reads from ``--concurrency`` concurrent clients for
``--duration`` seconds:

- primary only, direct connections;
- primary and one replica, direct connections;
- primary only, through PgBouncer in transaction mode;
- primary and one replica, each through its PgBouncer.

Half of the requests list the newest 20 projects and half read one finished project with its
tasks and usage. Results go to bench/results/ as JSON and to the read_replicas section of
docs/benchmarks.md, with a plot in docs/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from app.core.config import load_settings
from app.db import projects as store
from app.db.states import FINAL_PROJECT_STATUSES
from app.runtime import Runtime
from app.worker.runner import Worker
from bench import report
from bench.read_replicas_docs import write_docs
from tests.e2e.processes import Deployment
from tests.services.postgres_cluster import PostgresCluster, port_open

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
RESULTS_FOLDER = REPOSITORY_ROOT / "bench" / "results"
DOCS_PAGE = REPOSITORY_ROOT / "docs" / "benchmarks.md"
PLOT_PATH = REPOSITORY_ROOT / "docs" / "read_replicas.png"
SECTION_NAME = "read_replicas"
DATABASE = "tat_bench_read_replicas"
BRIEF = "# Benchmark project\n\nBuild a small thing that works."
SEED_TIMEOUT_SECONDS = 300.0


@dataclass(frozen=True)
class Setup:
    label: str
    replica: bool
    pgbouncer: bool


SETUPS = (
    Setup("primary only, direct", replica=False, pgbouncer=False),
    Setup("primary + 1 replica, direct", replica=True, pgbouncer=False),
    Setup("primary only, PgBouncer", replica=False, pgbouncer=True),
    Setup("primary + 1 replica, PgBouncer", replica=True, pgbouncer=True),
)


def database_config(cluster: PostgresCluster, setup: Setup) -> dict[str, Any]:
    endpoint = {
        "host": "127.0.0.1",
        "username": "toronto",
        "database": DATABASE,
        "password_file": str(cluster.password_file),
    }
    primary_port = cluster.ports.primary_bouncer if setup.pgbouncer else cluster.ports.primary
    replica_port = cluster.ports.replica_bouncer if setup.pgbouncer else cluster.ports.replica
    return {
        "database": {
            "master": {**endpoint, "port": primary_port},
            "read_replicas": [{**endpoint, "port": replica_port}] if setup.replica else [],
            "pgbouncer": setup.pgbouncer,
        }
    }


def write_config(folder: Path, document: dict[str, Any]) -> Path:
    (folder / "config").mkdir(parents=True, exist_ok=True)
    (folder / "config" / "database_config.json").write_text(json.dumps(document), encoding="utf-8")
    return folder


async def seed_projects(config_folder: Path, count: int) -> list[str]:
    """Migrate, then run ``count`` projects to completion with the real worker and return their ids."""
    settings = load_settings(
        config_dir=config_folder,
        environ={"TORONTO_AI_ENV": "test", "TORONTO_AI_WORKER__POLL_INTERVAL_SECONDS": "0.05"},
    )
    runtime = await Runtime.start(settings, migrate=True)
    try:
        ids = []
        for _ in range(count):
            async with runtime.database.transaction() as connection:
                project = store.NewProject("Benchmark", BRIEF, "default", None, ["offline"], 3)
                ids.append(await store.insert_project(connection, project, "project_manager"))
        worker = Worker(runtime.database, runtime.executor, settings, ingestor=runtime.ingestor)
        running = asyncio.create_task(worker.run(), name="seed-worker")
        deadline = time.monotonic() + SEED_TIMEOUT_SECONDS
        while not await _all_final(runtime, ids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"seeding: projects not finished after {SEED_TIMEOUT_SECONDS} s")
            await asyncio.sleep(0.2)
        worker.stop()
        await running
        return ids
    finally:
        await runtime.aclose()


async def _all_final(runtime: Runtime, ids: list[str]) -> bool:
    async with runtime.database.read() as connection:
        for project_id in ids:
            if (await store.get_project(connection, project_id)).status not in FINAL_PROJECT_STATUSES:
                return False
    return True


def process_cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU seconds a process has used, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(
    base_url: str, api_pid: int, project_ids: list[str], arguments: argparse.Namespace
) -> dict[str, Any]:
    """Send project reads from ``--concurrency`` clients for ``--duration`` seconds after a warm-up.

    Returns the rate, latencies, failures, and the CPU cores the API process and this load
    generator used while measuring.
    """
    concurrency, seconds = arguments.concurrency, arguments.duration
    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits, trust_env=False) as client:

        async def reader(seed: int, until: float, record: bool) -> None:
            chooser = random.Random(seed)
            turn = seed
            while time.monotonic() < until:
                turn += 1
                path = "/api/v1/projects" if turn % 2 else f"/api/v1/projects/{chooser.choice(project_ids)}"
                started = time.perf_counter()
                try:
                    response = await client.get(path)
                    outcome = None if response.status_code == 200 else f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                if not record:
                    continue
                if outcome is None:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors[outcome] = errors.get(outcome, 0) + 1

        warm_until = time.monotonic() + arguments.warmup
        await asyncio.gather(*(reader(index, warm_until, False) for index in range(concurrency)))
        api_cpu, client_cpu = process_cpu_seconds(api_pid), time.process_time()
        started = time.monotonic()
        until = started + seconds
        await asyncio.gather(*(reader(index, until, True) for index in range(concurrency)))
        elapsed = time.monotonic() - started
        api_cpu, client_cpu = process_cpu_seconds(api_pid) - api_cpu, time.process_time() - client_cpu

    latencies.sort()
    return {
        "requests": len(latencies),
        "seconds": round(elapsed, 3),
        "rate": round(len(latencies) / elapsed, 1),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 2) if latencies else None,
        "p95_ms": round(1000 * latencies[int(len(latencies) * 0.95)], 2) if latencies else None,
        "errors": errors,
        "api_cpu_cores": round(api_cpu / elapsed, 2),
        "load_generator_cpu_cores": round(client_cpu / elapsed, 2),
    }


def reads_by_server(metrics: str) -> dict[str, float]:
    found = re.findall(
        r'^toronto_ai_database_reads_total\{server="([^"]+)"\} ([0-9.e+]+)$', metrics, re.MULTILINE
    )
    return {("replica" if server != "primary" else "primary"): float(value) for server, value in found}


def measure(
    cluster: PostgresCluster,
    setup: Setup,
    project_ids: list[str],
    arguments: argparse.Namespace,
    folder: Path,
) -> dict[str, Any]:
    """Start one API instance for ``setup``, load it, stop it, and return the measurement."""
    config = write_config(folder / "config-run", database_config(cluster, setup))
    deployment = Deployment(None, folder, config_dir=config)
    try:
        api = deployment.launch_api({"TORONTO_AI_LOG_LEVEL": "WARNING"})
        api.wait_ready()
        result = asyncio.run(load(api.base_url, api.pid, project_ids, arguments))
        with api.client() as client:
            result["reads"] = reads_by_server(client.get("/metrics").text)
        if result["errors"]:
            print(f"{setup.label}: failed requests {result['errors']}\n{api.log_tail(80)}", flush=True)
    finally:
        deployment.stop_all()
    return {"setup": setup.label, **result}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summary = []
    for setup in SETUPS:
        mine = [run for run in runs if run["setup"] == setup.label]
        reads = [run["reads"] for run in mine]
        replica_share = [
            entry.get("replica", 0.0) / max(1.0, entry.get("replica", 0.0) + entry.get("primary", 0.0))
            for entry in reads
        ]
        summary.append(
            {
                "setup": setup.label,
                "replica": setup.replica,
                "pgbouncer": setup.pgbouncer,
                "median_rate": statistics.median(run["rate"] for run in mine),
                "rates": [run["rate"] for run in mine],
                "median_p50_ms": statistics.median(run["p50_ms"] for run in mine),
                "median_p95_ms": statistics.median(run["p95_ms"] for run in mine),
                "errors": sum(sum(run["errors"].values()) for run in mine),
                "median_api_cpu_cores": statistics.median(run["api_cpu_cores"] for run in mine),
                "median_load_generator_cpu_cores": statistics.median(
                    run["load_generator_cpu_cores"] for run in mine
                ),
                "replica_read_share": round(statistics.median(replica_share), 3),
            }
        )
    return summary


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.read_replicas", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per run (default 15)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="unmeasured seconds before each run (default 3)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setup, interleaved (default 3)")
    parser.add_argument("--projects", type=int, default=20, help="finished projects to read (default 20)")
    parser.add_argument(
        "--port-base", type=int, default=55420, help="cluster ports are base+1 to base+4 (default 55420)"
    )
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md and the plot")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    started_at = datetime.now(UTC)
    machine = report.describe_machine()
    # SIGTERM (from timeout or a stopped session) unwinds through the finally below, which
    # stops the cluster's servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    folder = Path(tempfile.mkdtemp(prefix="tat-bench-replicas-"))
    folder.chmod(0o755)  # the servers run as the postgres OS user and must reach the cluster folder
    cluster = PostgresCluster(folder / "cluster", arguments.port_base)
    busy = [port for port in vars(cluster.ports).values() if port_open(port)]
    if busy:
        print(f"error: ports {busy} are in use; choose another --port-base")
        return 2
    try:
        cluster.start()
        cluster.create_database(DATABASE)
        seed_config = write_config(folder / "config-seed", database_config(cluster, SETUPS[0]))
        project_ids = asyncio.run(seed_projects(seed_config, arguments.projects))
        cluster.wait_for_replay()
        server_version = cluster.sql(cluster.ports.primary, "SHOW server_version")
        runs = []
        for round_number in range(arguments.rounds):
            for setup in SETUPS:
                run = measure(cluster, setup, project_ids, arguments, folder)
                run["round"] = round_number + 1
                runs.append(run)
                print(
                    f"round {round_number + 1} {setup.label:32} {run['rate']:8.1f} req/s  "
                    f"p50 {run['p50_ms']} ms  p95 {run['p95_ms']} ms  errors {run['errors']}  "
                    f"reads {run['reads']}  API CPU {run['api_cpu_cores']} cores",
                    flush=True,
                )
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)

    finished_at = datetime.now(UTC)
    machine["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    results = {
        "benchmark": SECTION_NAME,
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": finished_at.isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.read_replicas", *(argv or [])]),
        "arguments": vars(arguments),
        "machine": machine,
        "postgres": server_version,
        "source": report.describe_source(REPOSITORY_ROOT),
        "runs": runs,
        "summary": summarise(runs),
    }
    RESULTS_FOLDER.mkdir(parents=True, exist_ok=True)
    path = RESULTS_FOLDER / f"{SECTION_NAME}-{started_at:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"results: {path}")
    if not arguments.no_docs:
        write_docs(results, DOCS_PAGE, PLOT_PATH, SECTION_NAME)
        print(f"docs: {DOCS_PAGE} and {PLOT_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
